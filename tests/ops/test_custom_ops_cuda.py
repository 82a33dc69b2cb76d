"""torch.library.opcheck of every registered op on CUDA tensors: schema, autograd and fake kernels.

Shape legend: T tokens, D model dim, E experts, N assignments, F hidden dim.
"""

from __future__ import annotations

import torch

from lightning_moe import ops
from tests.ops.gpu_checks import GPU_MARKS, on_cuda, routing_inputs
from tests.ops.routing_cases import make_case

pytestmark = GPU_MARKS


def test_opcheck_of_every_op(generator: torch.Generator) -> None:
    case = on_cuda(make_case("dropped_assignments", generator))
    _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
    offsets = ops.token_offsets(case.token_ids, case.num_tokens)
    x_TD = torch.randn(case.num_tokens, 16, generator=generator).cuda().requires_grad_()
    y_ND = torch.randn(case.token_ids.numel(), 16, generator=generator).cuda().requires_grad_()
    weights = case.weights.clone().requires_grad_()
    torch.library.opcheck(torch.ops.lightning_moe.sort_by_expert.default, (case.expert_ids, case.num_experts))
    torch.library.opcheck(torch.ops.lightning_moe.permute.default, (x_TD, inverse, offsets))
    torch.library.opcheck(torch.ops.lightning_moe.unpermute.default, (y_ND, inverse, weights, offsets, torch.float32))
    torch.library.opcheck(
        torch.ops.lightning_moe.capacity_mask.default, (case.expert_ids, case.weights, case.num_experts, 3)
    )
    logits_TE, bias_E = routing_inputs(case.num_tokens, case.num_experts, True, generator)
    # Not test_aot_dispatch_dynamic: it adds up the outputs in place starting from the first, an
    # int64 tensor, and fails casting the float sums; test_compiled_topk_route_matches_eager covers it.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in ((logits_TE, 2, "sigmoid", True, bias_E), (logits_TE, 3, "softmax", False, None)):
        torch.library.opcheck(torch.ops.lightning_moe.topk_route.default, args, test_utils=checks)
    router_weight = torch.randn(5, 16, generator=generator).cuda().requires_grad_()
    grad_TE = torch.randn(case.num_tokens, 5, generator=generator).cuda()
    torch.library.opcheck(torch.ops.lightning_moe.router_logits.default, (x_TD, router_weight))
    grad_x_args = (grad_TE, router_weight.detach(), torch.float32)
    torch.library.opcheck(torch.ops.lightning_moe.router_logits_grad_x.default, grad_x_args)
    torch.library.opcheck(torch.ops.lightning_moe.router_logits_grad_weight.default, (grad_TE, x_TD.detach()))
    x_bf16 = torch.randn(case.num_tokens, 64, generator=generator).cuda().bfloat16().requires_grad_()
    tc_weight = torch.randn(8, 64, generator=generator).cuda().requires_grad_()
    tc_grad = torch.randn(case.num_tokens, 8, generator=generator).cuda()
    torch.library.opcheck(torch.ops.lightning_moe.router_logits_tc.default, (x_bf16, tc_weight))
    torch.library.opcheck(torch.ops.lightning_moe.router_logits_tc_grad_x.default, (tc_grad, tc_weight.detach()))
    tc_grad_weight_args = (tc_grad, x_bf16.detach())
    torch.library.opcheck(torch.ops.lightning_moe.router_logits_tc_grad_weight.default, tc_grad_weight_args)
    a_NF, b_NF = (torch.randn(7, 24, generator=generator).cuda().requires_grad_() for _ in range(2))
    for gate_NF, name in ((b_NF, "silu"), (None, "gelu")):
        torch.library.opcheck(torch.ops.lightning_moe.activation.default, (a_NF, gate_NF, name))
        grad_NF = torch.randn(7, 24, generator=generator).cuda()
        gate_in = None if gate_NF is None else gate_NF.detach()
        backward_args = (grad_NF, a_NF.detach(), gate_in, name)
        torch.library.opcheck(torch.ops.lightning_moe.activation_backward.default, backward_args)

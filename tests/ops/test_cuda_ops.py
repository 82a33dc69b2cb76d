"""The CUDA kernels against their references, and the MoE layer on a GPU against the CPU.

Shape legend: T tokens, D model dim, E experts, N assignments.

Each output is checked on fresh random inputs, written into memory poisoned with NaN first (the
ops allocate their outputs; freeing a NaN-filled block just before hands that block to them), so
a row the kernel forgets to write shows up as NaN. Rounding is judged against a float64 oracle:
a kernel's error may be at most about twice that of the same computation done by PyTorch in the
same dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.layers.experts import GroupedExperts, _run_grouped
from lightning_moe.layers.moe import MoE
from lightning_moe.ops import extension, reference
from lightning_moe.ops.grouped_mm import grouped_mm_usable
from tests.ops.routing_cases import CASE_NAMES, Case, loop_sort, make_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]


@pytest.fixture(scope="module", autouse=True)
def cuda_extension() -> None:
    """The kernels must build here: a GPU run that silently fell back would test nothing."""
    assert extension.load_extension() is not None, "the CUDA extension did not build; see the warning"


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def poison_cached_memory(num_bytes: int = 1 << 26) -> None:
    """Leave a freed NaN-filled block in the caching allocator for the next outputs to reuse."""
    block = torch.full((num_bytes // 4,), float("nan"), device="cuda")
    del block


def on_cuda(case: Case) -> Case:
    return Case(case.num_tokens, case.num_experts, case.token_ids.cuda(), case.expert_ids.cuda(), case.weights.cuda())


def assert_close_to_oracle(got: Tensor, same_dtype_torch: Tensor, oracle: Tensor) -> None:
    """``got`` no further from the float64 ``oracle`` than twice PyTorch's own result in its dtype."""
    assert not got.isnan().any(), "an output element was never written"
    got_error = (got.double().cpu() - oracle).abs().max().item() if got.numel() else 0.0
    torch_error = (same_dtype_torch.double().cpu() - oracle).abs().max().item() if got.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    assert got_error <= 2 * torch_error + 1e-6 * max(scale, 1.0), (got_error, torch_error)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sort_by_expert_matches_the_stable_sort(name: str, generator: torch.Generator) -> None:
    case = on_cuda(make_case(name, generator))
    poison_cached_memory()
    order, inverse, counts = ops.sort_by_expert(case.expert_ids, case.num_experts)
    expected = loop_sort(case.expert_ids.cpu(), case.num_experts)
    assert (order.tolist(), inverse.tolist(), counts.tolist()) == expected


@pytest.mark.parametrize(("num_assignments", "num_experts"), [(98_304, 64), (65_536, 8), (100_003, 1024), (777, 8192)])
def test_sort_by_expert_at_scale(num_assignments: int, num_experts: int, generator: torch.Generator) -> None:
    expert_ids = torch.randint(0, num_experts, (num_assignments,), generator=generator).cuda()
    poison_cached_memory()
    order, inverse, counts = ops.sort_by_expert(expert_ids, num_experts)
    expected = reference.sort_by_expert(expert_ids, num_experts)
    for got, want in zip((order, inverse, counts), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dim", [64, 13], ids=["vectorized", "unaligned_dim"])
def test_permute_forward_and_backward(name: str, dtype: torch.dtype, dim: int, generator: torch.Generator) -> None:
    case = on_cuda(make_case(name, generator))
    _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
    x_TD = torch.randn(case.num_tokens, dim, generator=generator).to("cuda", dtype).requires_grad_()
    poison_cached_memory()
    x_ND = ops.permute(x_TD, case.token_ids, inverse)
    assert torch.equal(x_ND, reference.permute(x_TD, case.token_ids, inverse))  # a copy: exact
    grad_ND = torch.randn(x_ND.shape, generator=generator).to("cuda", dtype)
    poison_cached_memory()
    (grad_x,) = torch.autograd.grad(x_ND, x_TD, grad_ND)
    x_ref = x_TD.detach().requires_grad_()
    (torch_grad,) = torch.autograd.grad(reference.permute(x_ref, case.token_ids, inverse), x_ref, grad_ND)
    x64 = x_TD.detach().double().cpu().requires_grad_()
    (oracle,) = torch.autograd.grad(
        reference.permute(x64, case.token_ids.cpu(), inverse.cpu()), x64, grad_ND.double().cpu()
    )
    assert grad_x.dtype == dtype
    assert_close_to_oracle(grad_x, torch_grad, oracle)


def test_permute_of_a_misaligned_view(generator: torch.Generator) -> None:
    case = on_cuda(make_case("random", generator))
    storage = torch.randn(case.num_tokens * 64 + 1, generator=generator).cuda().bfloat16()
    x_TD = storage[1:].view(case.num_tokens, 64)  # contiguous but 2 bytes past a 16-byte boundary
    _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
    assert torch.equal(ops.permute(x_TD, case.token_ids, inverse), reference.permute(x_TD, case.token_ids, inverse))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["out_float32", "out_bfloat16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dim", [64, 13], ids=["vectorized", "unaligned_dim"])
def test_unpermute_forward_and_backward(
    name: str, dtype: torch.dtype, out_dtype: torch.dtype, dim: int, generator: torch.Generator
) -> None:
    case = on_cuda(make_case(name, generator))
    _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
    y_ND = torch.randn(case.token_ids.numel(), dim, generator=generator).to("cuda", dtype).requires_grad_()
    weights = case.weights.clone().requires_grad_()
    args = (case.token_ids, inverse)
    poison_cached_memory()
    out = ops.unpermute(y_ND, *args, weights, case.num_tokens, out_dtype)
    torch_out = reference.unpermute(y_ND, *args, weights, case.num_tokens, out_dtype)
    y64 = y_ND.detach().double().cpu().requires_grad_()
    w64 = weights.detach().double().cpu().requires_grad_()
    cpu_args = (case.token_ids.cpu(), inverse.cpu())
    oracle = reference.unpermute(y64, *cpu_args, w64, case.num_tokens, torch.float64)
    assert out.dtype == out_dtype
    assert_close_to_oracle(out, torch_out, oracle.detach())

    grad_out = torch.randn(out.shape, generator=generator).to("cuda", out_dtype)
    poison_cached_memory()
    grad_y, grad_w = torch.autograd.grad(out, (y_ND, weights), grad_out)
    torch_grad_y, torch_grad_w = torch.autograd.grad(torch_out, (y_ND, weights), grad_out)
    oracle_y, oracle_w = torch.autograd.grad(oracle, (y64, w64), grad_out.double().cpu())
    assert grad_y.dtype == dtype and grad_w.dtype == torch.float32
    assert_close_to_oracle(grad_y, torch_grad_y, oracle_y)
    assert_close_to_oracle(grad_w, torch_grad_w, oracle_w)


def test_results_are_the_same_on_every_run(generator: torch.Generator) -> None:
    case = on_cuda(make_case("random", generator, num_tokens=4096, num_experts=64, top_k=6))
    x_TD = torch.randn(case.num_tokens, 256, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    weights = case.weights.clone().requires_grad_()

    def run() -> list[Tensor]:
        _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
        y_ND = ops.permute(x_TD, case.token_ids, inverse) * 1.5
        out = ops.unpermute(y_ND, case.token_ids, inverse, weights, case.num_tokens)
        return [out, *torch.autograd.grad(out.square().sum(), (x_TD, weights))]

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_ops_do_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    case = on_cuda(make_case("random", generator, num_tokens=512))
    x_TD = torch.randn(case.num_tokens, 64, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    weights = case.weights.clone().requires_grad_()
    experts = GroupedExperts(case.num_experts, 64, 128, seed=0).to("cuda", torch.bfloat16)
    grouped = _grouped(experts, x_TD)  # probes torch's grouped GEMM once, which syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, inverse, tokens_per_expert = ops.sort_by_expert(case.expert_ids, case.num_experts)
        x_ND = ops.permute(x_TD, case.token_ids, inverse)
        y_ND = experts(x_ND, tokens_per_expert) if grouped else x_ND
        out = ops.unpermute(y_ND, case.token_ids, inverse, weights, case.num_tokens)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _grouped(experts: GroupedExperts, x_ND: Tensor) -> bool:
    return grouped_mm_usable(x_ND.device, x_ND.dtype, experts.num_experts, experts.d_model, experts.d_hidden)


def test_compiled_ops_match_eager(generator: torch.Generator) -> None:
    case = on_cuda(make_case("dropped_assignments", generator, num_tokens=256))
    x_TD = torch.randn(case.num_tokens, 64, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    weights = case.weights.clone().requires_grad_()

    def pipeline(x: Tensor, w: Tensor) -> Tensor:
        _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
        y_ND = ops.permute(x, case.token_ids, inverse) * 2
        return ops.unpermute(y_ND, case.token_ids, inverse, w, case.num_tokens)

    compiled = torch.compile(pipeline, fullgraph=True)
    outputs = []
    for function in (pipeline, compiled):
        out = function(x_TD, weights)
        outputs.append([out, *torch.autograd.grad(out.square().sum(), (x_TD, weights))])
    for eager, traced in zip(*outputs, strict=True):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize(("activation", "bias"), [("gelu", False), ("swiglu", True)])
def test_grouped_gemm_experts_match_the_loop(activation: str, bias: bool, generator: torch.Generator) -> None:
    experts = GroupedExperts(8, 128, 256, activation=activation, bias=bias, seed=1).to("cuda", torch.bfloat16)
    tokens_per_expert = torch.tensor([40, 0, 3, 100, 0, 17, 1, 95], device="cuda")  # empty experts too
    x_ND = torch.randn(256, 128, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    assert _grouped(experts, x_ND), "the grouped-GEMM path should be taken on this GPU"
    out = experts(x_ND, tokens_per_expert)
    loop = _run_grouped(experts.expert_forward, x_ND, tokens_per_expert)
    torch.testing.assert_close(out, loop, rtol=2e-2, atol=2e-2)
    params = [x_ND, experts.w1, experts.w2] + ([experts.b1] if bias else [])
    grads = torch.autograd.grad(out.float().square().sum(), params)
    loop_grads = torch.autograd.grad(loop.float().square().sum(), params)
    for got, want in zip(grads, loop_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_grouped_gemm_experts_under_autocast(generator: torch.Generator) -> None:
    experts = GroupedExperts(8, 128, 256, seed=2).cuda()  # float32 weights, bf16 compute
    tokens_per_expert = torch.tensor([30, 2, 0, 64, 7, 0, 100, 53], device="cuda")
    x_ND = torch.randn(256, 128, generator=generator).cuda().requires_grad_()
    assert grouped_mm_usable(x_ND.device, torch.bfloat16, 8, 128, 256)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = experts(x_ND, tokens_per_expert)
        loop = _run_grouped(experts.expert_forward, x_ND, tokens_per_expert)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loop.float(), rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(out.square().sum(), experts.w2)
    (loop_grad,) = torch.autograd.grad(loop.float().square().sum(), experts.w2)
    torch.testing.assert_close(grad, loop_grad, rtol=3e-2, atol=3e-2 * loop_grad.abs().max().item())


def make_layer(dtype: torch.dtype) -> tuple[MoE, MoE]:
    """The same layer in float32 on the CPU and in ``dtype`` on the GPU, with the same (rounded) weights."""
    torch.manual_seed(0)
    cpu_layer = MoE(d_model=128, num_experts=8, top_k=2, d_hidden=256, aux_loss_weight=0.01)
    gpu_layer = copy.deepcopy(cpu_layer).to("cuda", dtype)
    cpu_layer.load_state_dict({name: value.float().cpu() for name, value in gpu_layer.state_dict().items()})
    return cpu_layer, gpu_layer


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["float32", "bf16"])
def test_moe_layer_on_gpu_matches_the_cpu(dtype: torch.dtype, rtol: float, generator: torch.Generator) -> None:
    cpu_layer, gpu_layer = make_layer(dtype)
    x_gpu = torch.randn(4, 64, 128, generator=generator).to("cuda", dtype).requires_grad_()
    # The CPU runs in float32 on the same (rounded) inputs, so both routers see the same logits.
    x_cpu = x_gpu.detach().float().cpu().requires_grad_()
    out_gpu, out_cpu = gpu_layer(x_gpu), cpu_layer(x_cpu)
    grad = torch.randn(out_cpu.shape, generator=generator)
    out_gpu.backward(grad.to("cuda", dtype))
    out_cpu.backward(grad)
    scale = out_cpu.abs().max().item()
    torch.testing.assert_close(out_gpu.float().cpu(), out_cpu, rtol=rtol, atol=rtol * scale)
    pairs = [(x_gpu.grad, x_cpu.grad)] + [
        (p_gpu.grad, p_cpu.grad) for p_gpu, p_cpu in zip(gpu_layer.parameters(), cpu_layer.parameters(), strict=True)
    ]
    for got, want in pairs:
        torch.testing.assert_close(got.float().cpu(), want, rtol=rtol, atol=rtol * want.abs().max().item())


def test_compiled_layer_matches_eager(generator: torch.Generator) -> None:
    _, layer = make_layer(torch.bfloat16)
    compiled = torch.compile(layer)
    x = torch.randn(2, 128, 128, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    out_eager = layer(x)
    (grad_eager,) = torch.autograd.grad(out_eager.float().sum(), x)
    out_compiled = compiled(x)
    (grad_compiled,) = torch.autograd.grad(out_compiled.float().sum(), x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=2e-2, atol=2e-2)

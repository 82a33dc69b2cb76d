"""The whole MoE layer on a GPU against the same layer on the CPU, eager and compiled."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_moe.layers.moe import MoE
from tests.ops.gpu_checks import GPU_MARKS

pytestmark = GPU_MARKS


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

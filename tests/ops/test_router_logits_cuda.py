"""The router-logits kernels against PyTorch's float32 matmul and a float64 oracle, on a GPU.

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.ops.extension import require_extension
from lightning_moe.ops.router_logits import router_logits, split_accepts, takes_tensor_cores, tensor_core_accepts
from tests.ops.gpu_checks import DTYPE_IDS, DTYPES, GPU_MARKS, assert_close_to_gpu_oracle, poison_float_blocks

pytestmark = GPU_MARKS

# The module, not the function of the same name that lightning_moe.ops exports.
router_logits_module = importlib.import_module("lightning_moe.ops.router_logits")


ROUTER_TOKENS = [0, 1, 37, 16_384]
ROUTER_DIMS = [8, 1000, 1024, 2048]
ROUTER_EXPERTS = [1, 2, 5, 8, 64, 160, 256]


def router_inputs(
    num_tokens: int, dim: int, num_experts: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens in ``dtype``, a float32 weight scaled like a router's, and a gradient of the logits."""
    x_TD = torch.randn(num_tokens, dim, generator=generator).to("cuda", dtype)
    weight_ED = ((torch.rand(num_experts, dim, generator=generator) * 2 - 1) / dim**0.5).cuda()
    grad_TE = torch.randn(num_tokens, num_experts, generator=generator).cuda()
    return x_TD, weight_ED, grad_TE


def assert_router_logits_close(
    x_TD: Tensor, weight_ED: Tensor, grad_TE: Tensor, function: Callable[[Tensor, Tensor], Tensor] = router_logits
) -> None:
    """The op's logits and gradients against PyTorch's float32 computation and a float64 oracle."""
    x_TD, weight_ED = x_TD.detach().requires_grad_(), weight_ED.detach().requires_grad_()
    poison_float_blocks()
    logits = function(x_TD, weight_ED)
    poison_float_blocks()
    grad_x, grad_weight = torch.autograd.grad(logits, (x_TD, weight_ED), grad_TE)
    assert logits.dtype == torch.float32 and grad_weight.dtype == torch.float32 and grad_x.dtype == x_TD.dtype
    if takes_tensor_cores(x_TD, weight_ED):
        assert_tensor_core_results(x_TD.detach(), weight_ED.detach(), grad_TE, [logits, grad_x, grad_weight])
        return
    x32, weight = x_TD.detach().float(), weight_ED.detach()
    x64, weight64, grad64 = x32.double(), weight.double(), grad_TE.double()
    # Float32 accumulation, on the tensor cores (split_accepts) or in the SIMT kernels' running sums,
    # whose error over D = 1000 products reaches a few 1e-6 where cuBLAS's stays near 2e-7: allowed
    # 2^-18 of the sum of the terms' magnitudes. A wrong or missing product is far above that.
    check = assert_close_at_float32_accumulation
    check(logits, x32 @ weight.t(), x64 @ weight64.t(), x64.abs() @ weight64.abs().t())
    check(grad_weight, grad_TE.t() @ x32, grad64.t() @ x64, grad64.abs().t() @ x64.abs())
    if split_accepts(x_TD, weight_ED):
        check(grad_x, (grad_TE @ weight).to(x_TD.dtype), grad64 @ weight64, grad64.abs() @ weight64.abs())
    else:  # rounded to x's dtype from a float32 sum: within an ulp (see assert_close_to_gpu_oracle)
        assert_close_to_gpu_oracle(grad_x, (grad_TE @ weight).to(x_TD.dtype), grad64 @ weight64)


def profiled_step(x_TD: Tensor, weight_ED: Tensor, grad_TE: Tensor) -> tuple[list[str], list[Tensor]]:
    """The names of the CUDA kernels that :func:`router_logits` forward + backward launch, and its
    logits, ``grad_x`` and ``grad_weight``."""
    x_TD, weight_ED = x_TD.detach().requires_grad_(), weight_ED.detach().requires_grad_()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        logits = router_logits(x_TD, weight_ED)
        grads = torch.autograd.grad(logits, (x_TD, weight_ED), grad_TE)
        torch.cuda.synchronize()
    return [event.key for event in prof.key_averages()], [logits, *grads]


def assert_close_at_float32_accumulation(got: Tensor, torch_result: Tensor, oracle: Tensor, terms: Tensor) -> None:
    """``got`` within twice PyTorch's float32 (or bf16-rounded) error of the float64 ``oracle``, plus
    2^-18 of ``terms``, the sum of the absolute values of the products each element adds up."""
    assert not got.isnan().any(), "an output element was never written"
    if got.numel() == 0:
        return
    torch_error = (torch_result.double() - oracle).abs()
    excess = (got.double() - oracle).abs() - 2 * torch_error.max() - 2.0**-18 * terms
    assert excess.max().item() <= 0, (excess.max().item(), torch_error.max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_experts", ROUTER_EXPERTS, ids=lambda e: f"E{e}")
@pytest.mark.parametrize("dim", ROUTER_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("num_tokens", ROUTER_TOKENS, ids=lambda t: f"T{t}")
def test_router_logits_forward_and_backward(
    num_tokens: int, dim: int, num_experts: int, dtype: torch.dtype, generator: torch.Generator
) -> None:
    assert_router_logits_close(*router_inputs(num_tokens, dim, num_experts, dtype, generator))


@pytest.mark.parametrize("layout", ["unaligned_dim", "misaligned_view", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_router_logits_of_unaligned_tokens(layout: str, dtype: torch.dtype, generator: torch.Generator) -> None:
    num_tokens, dim, num_experts = 300, 64, 3
    x_TD, weight_ED, grad_TE = router_inputs(num_tokens, 2 * dim + 1, num_experts, dtype, generator)
    if layout == "unaligned_dim":  # rows of 129 elements: no row but the first starts on 16 bytes
        weight = weight_ED
    elif layout == "misaligned_view":  # contiguous, but one element past a 16-byte boundary
        x_TD = x_TD.flatten()[1 : 1 + num_tokens * dim].view(num_tokens, dim)
        weight = weight_ED[:, :dim]
    else:  # every other column: the wrapper makes it contiguous
        x_TD = x_TD[:, : 2 * dim : 2]
        weight = weight_ED[:, :dim]
    assert_router_logits_close(x_TD, weight, grad_TE)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("dim", "num_experts", "few_kernels"),
    [(4096, 8, True), (4104, 8, False), (8192, 4, True), (16, 3, True), (1020, 7, False)],
    ids=["largest_weight", "weight_too_large", "four_experts", "short_rows", "dim_not_multiple_of_8"],
)
def test_routers_of_few_experts_take_the_streaming_kernels(
    dim: int, num_experts: int, few_kernels: bool, dtype: torch.dtype, generator: torch.Generator
) -> None:
    """Up to 8 experts whose padded weight fits in 128 KiB of shared memory, with D a multiple of 8,
    take the few-experts kernels; the rest the tiled ones; both within float32 accuracy."""
    x_TD, weight_ED, grad_TE = router_inputs(3000, dim, num_experts, dtype, generator)
    names, _ = profiled_step(x_TD, weight_ED, grad_TE)
    passes = ("forward", "grad_x", "grad_weight")
    ran = {kernel: any(f"few_experts_logits_{kernel}_kernel" in name for name in names) for kernel in passes}
    assert ran == dict.fromkeys(passes, few_kernels), names
    assert_router_logits_close(x_TD, weight_ED, grad_TE)


@pytest.mark.parametrize(
    ("num_tokens", "dim", "num_experts"), [(16_384, 1024, 8), (16_384, 2048, 64), (37, 1000, 160), (4096, 13, 3)]
)
def test_router_logits_are_the_same_on_every_run(
    num_tokens: int, dim: int, num_experts: int, generator: torch.Generator
) -> None:
    x_TD, weight_ED, grad_TE = router_inputs(num_tokens, dim, num_experts, torch.bfloat16, generator)
    x_TD.requires_grad_()
    weight_ED.requires_grad_()

    def run() -> list[Tensor]:
        logits = ops.router_logits(x_TD, weight_ED)
        return [logits, *torch.autograd.grad(logits, (x_TD, weight_ED), grad_TE)]

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_router_logits_do_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    inputs = [router_inputs(4096, 1024, num_experts, torch.bfloat16, generator) for num_experts in (1, 8, 64, 160)]
    for x_TD, weight_ED, _ in inputs:
        x_TD.requires_grad_()
        weight_ED.requires_grad_()
    router_logits(*inputs[0][:2])  # loads the extension
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x_TD, weight_ED, grad_TE in inputs:
            router_logits(x_TD, weight_ED).backward(grad_TE)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("num_experts", [8, 64], ids=["simt", "tensor_cores"])
def test_compiled_router_logits_match_eager(num_experts: int, generator: torch.Generator) -> None:
    x_TD, weight_ED, grad_TE = router_inputs(1000, 256, num_experts, torch.bfloat16, generator)
    assert takes_tensor_cores(x_TD, weight_ED) is (num_experts == 64)
    compiled = torch.compile(router_logits, fullgraph=True)
    outputs = []
    for function in (router_logits, compiled):
        x_in, weight_in = x_TD.clone().requires_grad_(), weight_ED.clone().requires_grad_()
        logits = function(x_in, weight_in)
        outputs.append([logits, *torch.autograd.grad(logits, (x_in, weight_in), grad_TE)])
    for eager, traced in zip(*outputs, strict=True):
        assert torch.equal(traced, eager)
    assert_router_logits_close(x_TD, weight_ED, grad_TE, compiled)


def test_router_logits_ignore_autocast(generator: torch.Generator) -> None:
    x_TD, weight_ED, _ = router_inputs(500, 256, 8, torch.float32, generator)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = router_logits(x_TD, weight_ED)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, router_logits(x_TD, weight_ED))


def test_router_logits_of_a_half_precision_weight_take_the_kernels(generator: torch.Generator) -> None:
    """A model cast whole to bf16 still gets the kernels, its weight widened to float32."""
    x_TD, weight_ED, grad_TE = router_inputs(4096, 1024, 8, torch.bfloat16, generator)  # below SPLIT_MIN_WORK
    weight_bf16 = weight_ED.bfloat16()
    names, (logits, grad_x, grad_weight) = profiled_step(x_TD, weight_bf16, grad_TE)
    assert any("logits_forward_kernel" in name for name in names), "the kernels did not run"
    assert logits.dtype == torch.float32 and grad_weight.dtype == torch.bfloat16 and grad_x.dtype == torch.bfloat16
    weight32 = weight_bf16.float()
    x64, weight64, grad64 = x_TD.double(), weight32.double(), grad_TE.double()
    assert_close_to_gpu_oracle(logits, x_TD.float() @ weight32.t(), x64 @ weight64.t())
    expected_grad_weight = (grad_TE.t() @ x_TD.float()).bfloat16()
    assert_close_to_gpu_oracle(grad_weight, expected_grad_weight, (grad64.t() @ x64).bfloat16().double())


@pytest.mark.parametrize(("num_tokens", "dim", "num_experts"), [(32_768, 512, 64), (4096, 1024, 256)])
def test_large_bf16_routers_take_the_tensor_core_path(
    num_tokens: int, dim: int, num_experts: int, generator: torch.Generator
) -> None:
    """From SPLIT_MIN_WORK multiply-adds bf16 tokens skip the SIMT kernels, eager and compiled."""
    from lightning_moe.ops.router_logits import SPLIT_MIN_WORK

    assert num_tokens * dim * num_experts >= SPLIT_MIN_WORK
    x_TD, weight_ED, grad_TE = router_inputs(num_tokens, dim, num_experts, torch.bfloat16, generator)
    names, _ = profiled_step(x_TD, weight_ED, grad_TE)
    assert not any("logits_forward_kernel" in name or "logits_grad" in name for name in names), names
    # Eager and compiled both within the tensor-core accuracy bound (inductor may fuse the part sums).
    assert_router_logits_close(x_TD, weight_ED, grad_TE)
    assert_router_logits_close(x_TD, weight_ED, grad_TE, torch.compile(router_logits, fullgraph=True))


# ---------------------------------------------------------------------------------------------
# The one-launch tensor-core kernels (src_cuda/router_logits_tc.cu).

TC_TOKENS = [0, 1, 37, 8192]
TC_DIMS = [64, 1024]
TC_EXPERTS = [8, 64, 256]
TC_SCALES = ["router", "spread"]
# Name prefixes: each pass has a pipelined or persistent kernel beside the register-staged one.
TC_KERNELS = ("tc_logits_forward", "tc_logits_grad_x", "tc_logits_grad_weight")


def tensor_core_inputs(
    num_tokens: int, dim: int, num_experts: int, scale: str, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """bf16 tokens, a float32 weight and logit gradient; with "spread", weight and gradient scaled by
    powers of two spread over 24 binades, so that every element has three nonzero bf16 parts of very
    different sizes next to its neighbours'."""
    x_TD, weight_ED, grad_TE = router_inputs(num_tokens, dim, num_experts, torch.bfloat16, generator)
    if scale == "spread":
        weight_ED = weight_ED * 2.0 ** torch.randint(-4, 20, weight_ED.shape, generator=generator).cuda()
        grad_TE = grad_TE * 2.0 ** torch.randint(-12, 12, grad_TE.shape, generator=generator).cuda()
    return x_TD, weight_ED, grad_TE


def assert_tensor_core_results(x_TD: Tensor, weight_ED: Tensor, grad_TE: Tensor, results: list[Tensor]) -> None:
    """Logits, grad_x and grad_weight within the split path's bound of the float64 oracle."""
    logits, grad_x, grad_weight = results
    num_tokens, num_experts, dim = x_TD.shape[0], weight_ED.shape[0], x_TD.shape[1]
    assert logits.shape == (num_tokens, num_experts) and logits.dtype == torch.float32
    assert grad_x.shape == (num_tokens, dim) and grad_x.dtype == torch.bfloat16
    assert grad_weight.shape == (num_experts, dim) and grad_weight.dtype == weight_ED.dtype
    weight = weight_ED.float()
    x64, weight64, grad64 = x_TD.double(), weight.double(), grad_TE.double()
    check = assert_close_at_float32_accumulation
    check(logits, x_TD.float() @ weight.t(), x64 @ weight64.t(), x64.abs() @ weight64.abs().t())
    assert_close_at_bf16_rounding(grad_x, grad64 @ weight64, grad64.abs() @ weight64.abs())
    if weight_ED.dtype == torch.float32:
        check(grad_weight, grad_TE.t() @ x_TD.float(), grad64.t() @ x64, grad64.abs().t() @ x64.abs())
    if num_tokens == 0:
        assert torch.equal(grad_weight, torch.zeros_like(grad_weight))


def assert_close_at_bf16_rounding(got: Tensor, oracle: Tensor, terms: Tensor) -> None:
    """bf16 ``got`` within one bf16 unit of the float64 ``oracle``, element by element, plus 2^-13 of
    ``terms``: the float32 sum rounded once, the terms g w1, g1 w and smaller that grad_x leaves out
    (each below 2^-14 of the terms' magnitudes) and float32 accumulation."""
    assert not got.isnan().any(), "an output element was never written"
    if got.numel() == 0:
        return
    excess = (got.double() - oracle).abs() - torch.finfo(torch.bfloat16).eps * oracle.abs() - 2.0**-13 * terms
    assert excess.max().item() <= 0, excess.max().item()


def tensor_core_kernels(x_TD: Tensor, weight_ED: Tensor, grad_TE: Tensor) -> list[Tensor]:
    """The three kernels called directly, each output written into NaN-poisoned memory."""
    ext = require_extension()
    results = []
    for call in (
        lambda: ext.router_logits_tc_forward(x_TD, weight_ED),
        lambda: ext.router_logits_tc_grad_x(grad_TE, weight_ED),
        lambda: ext.router_logits_tc_grad_weight(grad_TE, x_TD),
    ):
        poison_float_blocks()
        results.append(call())
    return results


@pytest.mark.parametrize("scale", TC_SCALES)
@pytest.mark.parametrize("num_experts", TC_EXPERTS, ids=lambda e: f"E{e}")
@pytest.mark.parametrize("dim", TC_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("num_tokens", TC_TOKENS, ids=lambda t: f"T{t}")
def test_tensor_core_kernels_against_float64(
    num_tokens: int, dim: int, num_experts: int, scale: str, generator: torch.Generator
) -> None:
    x_TD, weight_ED, grad_TE = tensor_core_inputs(num_tokens, dim, num_experts, scale, generator)
    assert_tensor_core_results(x_TD, weight_ED, grad_TE, tensor_core_kernels(x_TD, weight_ED, grad_TE))


def test_tensor_core_kernels_are_more_accurate_than_one_bf16_part(generator: torch.Generator) -> None:
    """The second and third parts count: the logits are far closer to float64 than x @ bf16(w)."""
    x_TD, weight_ED, _ = tensor_core_inputs(4096, 1024, 64, "router", generator)
    oracle = x_TD.double() @ weight_ED.double().t()
    logits = require_extension().router_logits_tc_forward(x_TD, weight_ED)
    one_part = x_TD.float() @ weight_ED.bfloat16().float().t()
    assert (logits.double() - oracle).abs().max() * 64 < (one_part.double() - oracle).abs().max()


@pytest.mark.parametrize(("num_tokens", "dim", "num_experts"), [(8192, 1024, 64), (37, 64, 8), (20_000, 512, 256)])
def test_tensor_core_kernels_are_the_same_on_every_run(
    num_tokens: int, dim: int, num_experts: int, generator: torch.Generator
) -> None:
    inputs = tensor_core_inputs(num_tokens, dim, num_experts, "spread", generator)
    for first, second in zip(tensor_core_kernels(*inputs), tensor_core_kernels(*inputs), strict=True):
        assert torch.equal(first, second)


# Each tensor-core kernel behind a switch, called with the switch on and off, and the shapes that
# exercise it: it must give the bits of the kernel it replaces.
SWITCHED_KERNELS: dict[str, tuple[Callable[..., Tensor], list[tuple[int, int, int]]]] = {
    # 128 blocks; two k tiles, fewer than the pipeline's stages; a partly filled expert tile; one token.
    "pipelined-forward": (
        lambda ext, x, weight, grad, on: ext.router_logits_tc_forward(x, weight, on),
        [(8192, 1024, 64), (37, 64, 16), (300, 128, 40), (1, 1024, 8)],
    ),
    # Many token tiles per block; a partly filled last k step; one token; fewer tiles than blocks.
    "persistent-grad-x": (
        lambda ext, x, weight, grad, on: ext.router_logits_tc_grad_x(grad, weight, on),
        [(8192, 1024, 64), (300, 128, 40), (1, 1024, 8), (37, 64, 16)],
    ),
    # Chunks of many k tiles (64 experts); 32 experts; a partly filled last k tile and expert tile;
    # one token; two k tiles.
    "pipelined-grad-weight": (
        lambda ext, x, weight, grad, on: ext.router_logits_tc_grad_weight(grad, x, on),
        [(8192, 1024, 64), (4096, 512, 32), (300, 128, 40), (1, 1024, 8), (37, 64, 16)],
    ),
}
SWITCHED_CASES = [
    pytest.param(name, *shape, id=f"{name}-T{shape[0]}-D{shape[1]}-E{shape[2]}")
    for name, (_, shapes) in SWITCHED_KERNELS.items()
    for shape in shapes
]


@pytest.mark.parametrize(("kernel", "num_tokens", "dim", "num_experts"), SWITCHED_CASES)
def test_switched_kernels_give_the_bits_of_the_kernels_they_replace(
    kernel: str, num_tokens: int, dim: int, num_experts: int, generator: torch.Generator
) -> None:
    inputs = tensor_core_inputs(num_tokens, dim, num_experts, "spread", generator)
    run, ext = SWITCHED_KERNELS[kernel][0], require_extension()
    poison_float_blocks()
    switched_on = run(ext, *inputs, True)
    poison_float_blocks()
    switched_off = run(ext, *inputs, False)
    assert not switched_on.isnan().any()
    assert torch.equal(switched_on, switched_off)


# A bf16 weight read as it is: 128 blocks of the pipelined forward and the streamed grad_x; three
# k tiles, fewer than the forward's stages in flight, and grad_x's three column chunks in runs of
# two; a partly filled expert tile and k step; one token; above 64 experts (grad_x widens the
# weight for the per-tile kernel) and the shapes where a float32 weight takes the 64-expert
# forward; no tokens.
BF16_WEIGHT_SHAPES = [
    (8192, 1024, 64),
    (8192, 192, 64),
    (37, 64, 16),
    (300, 128, 40),
    (1, 1024, 8),
    (300, 128, 72),
    (20_000, 512, 256),
    (0, 64, 8),
]


@pytest.mark.parametrize(
    ("num_tokens", "dim", "num_experts"),
    [pytest.param(*shape, id="T{}-D{}-E{}".format(*shape)) for shape in BF16_WEIGHT_SHAPES],
)
def test_tensor_core_kernels_give_a_bf16_weight_the_bits_of_its_float32_copy(
    num_tokens: int, dim: int, num_experts: int, generator: torch.Generator
) -> None:
    """A bf16 weight is its own leading part: the kernels that read it as it is (and skip the zero
    parts' products) give the logits and grad_x of the float32 kernels on its widened copy, and a
    grad_weight rounded to bf16 or float16 by the kernel is the float32 one cast."""
    x_TD, weight_ED, grad_TE = tensor_core_inputs(num_tokens, dim, num_experts, "spread", generator)
    weight_bf16, ext = weight_ED.bfloat16(), require_extension()
    passes = {
        "forward": lambda weight: ext.router_logits_tc_forward(x_TD, weight),
        "grad_x": lambda weight: ext.router_logits_tc_grad_x(grad_TE, weight),
    }
    for name, run in passes.items():
        poison_float_blocks()
        got = run(weight_bf16)
        poison_float_blocks()
        expected = run(weight_bf16.float())
        assert not got.isnan().any(), f"{name}: an element was never written"
        assert torch.equal(got, expected), name
    in_float32 = ext.router_logits_tc_grad_weight(grad_TE, x_TD)
    for dtype in (torch.bfloat16, torch.float16):
        poison_float_blocks()
        rounded = ext.router_logits_tc_grad_weight(grad_TE, x_TD, True, dtype)
        assert rounded.dtype == dtype and torch.equal(rounded, in_float32.to(dtype)), dtype


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per_tile"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("num_tokens", "dim", "num_experts"), [(8192, 1024, 64), (37, 64, 16), (300, 128, 72)])
def test_tensor_core_grad_x_adds_an_addend_with_the_bits_of_a_bf16_addition(
    num_tokens: int, dim: int, num_experts: int, weight_dtype: torch.dtype, persistent: bool, generator: torch.Generator
) -> None:
    """grad_x + addend, the addend (another gradient of the tokens) added in the kernel's epilogue
    (or, past the persistent kernel's 64 experts, after it): the bits of adding the two in bf16."""
    x_TD, weight_ED, grad_TE = tensor_core_inputs(num_tokens, dim, num_experts, "spread", generator)
    weight_ED, ext = weight_ED.to(weight_dtype), require_extension()
    addend = torch.randn(num_tokens, dim, generator=generator).to("cuda", torch.bfloat16) * 64
    alone = ext.router_logits_tc_grad_x(grad_TE, weight_ED, persistent)
    poison_float_blocks()
    summed = ext.router_logits_tc_grad_x(grad_TE, weight_ED, persistent, addend)
    assert torch.equal(summed, alone + addend)
    with pytest.raises(RuntimeError, match="addend must have the shape"):
        ext.router_logits_tc_grad_x(grad_TE, weight_ED, persistent, addend[:, :-64].contiguous())


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("num_tokens", "dim", "num_experts"), [(8192, 1024, 64), (37, 64, 16), (300, 128, 256)])
def test_router_logits_take_the_tensor_core_kernels_by_default(
    num_tokens: int,
    dim: int,
    num_experts: int,
    weight_dtype: torch.dtype,
    generator: torch.Generator,
) -> None:
    """Below SPLIT_MIN_WORK, from TENSOR_CORE_MIN_EXPERTS experts, router_logits and autograd run the
    three kernels and nothing else of the other paths; a bf16 weight gets its gradient in bf16 from
    the kernels, and is read as it is (no copy kernel runs) but by the per-tile grad_x kernel, which
    takes more than 64 experts and widens it."""
    x_TD, weight_ED, grad_TE = tensor_core_inputs(num_tokens, dim, num_experts, "router", generator)
    weight_ED = weight_ED.to(weight_dtype)
    assert tensor_core_accepts(x_TD, weight_ED) and not split_accepts(x_TD, weight_ED)
    assert takes_tensor_cores(x_TD, weight_ED)
    poison_float_blocks()
    names, results = profiled_step(x_TD, weight_ED, grad_TE)
    for kernel in TC_KERNELS:
        assert any(kernel in name for name in names), (kernel, names)
    assert not any("logits_forward_kernel" in name and "tc_" not in name for name in names), names
    widened = weight_dtype == torch.bfloat16 and num_experts > 64
    assert sum("copy" in name for name in names) == (1 if widened else 0), names
    assert_tensor_core_results(x_TD, weight_ED, grad_TE, results)


@pytest.mark.parametrize(("num_tokens", "dim", "num_experts"), [(4096, 1024, 8), (8192, 1024, 64), (300, 128, 256)])
def test_router_logits_take_the_simt_kernels_without_the_tensor_core_router(
    num_tokens: int, dim: int, num_experts: int, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 8 experts (by default) or with TENSOR_CORE_ROUTER off, bf16 tokens take the SIMT kernels,
    within twice PyTorch's float32 error."""
    if num_experts >= router_logits_module.TENSOR_CORE_MIN_EXPERTS:
        monkeypatch.setattr(router_logits_module, "TENSOR_CORE_ROUTER", False)
    x_TD, weight_ED, grad_TE = router_inputs(num_tokens, dim, num_experts, torch.bfloat16, generator)
    assert not takes_tensor_cores(x_TD, weight_ED) and not split_accepts(x_TD, weight_ED)
    names, _ = profiled_step(x_TD, weight_ED, grad_TE)
    assert not any("tc_logits" in name for name in names), names
    assert any("logits_forward_kernel" in name for name in names), names
    assert_router_logits_close(x_TD, weight_ED, grad_TE)


def test_tensor_core_kernels_take_tokens_at_an_offset(generator: torch.Generator) -> None:
    """A contiguous view that does not start on 16 bytes is copied by the wrapper, not refused."""
    x_TD, weight_ED, grad_TE = tensor_core_inputs(65, 64, 8, "router", generator)
    x_view = x_TD.flatten()[1 : 1 + 64 * 64].view(64, 64)
    assert x_view.data_ptr() % 16 != 0
    from lightning_moe.ops.router_logits import _tensor_core_router_logits

    x_in, weight_in = x_view.clone().requires_grad_(), weight_ED.clone().requires_grad_()
    logits = _tensor_core_router_logits(x_view.detach(), weight_in)
    expected = _tensor_core_router_logits(x_in, weight_in)
    assert torch.equal(logits, expected)

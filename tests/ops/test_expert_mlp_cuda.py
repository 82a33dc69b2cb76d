"""The one-node expert path (``lightning_moe.ops.expert_mlp``) against the composition of ops it
stands for, on a compute capability 9.0 GPU: the same kernels in the same order, so the same bits.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, N assignments.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.layers.moe import MoE
from lightning_moe.ops.expert_mlp import expert_mlp, expert_mlp_usable
from lightning_moe.ops.grouped_linear import grouped_linear_usable
from lightning_moe.ops.grouped_mm import grouped_mlp
from lightning_moe.ops.token_grad import TokenGradSum
from tests.ops.gpu_checks import GPU_MARKS


def _kernels_here() -> bool:
    return torch.cuda.is_available() and grouped_linear_usable(64, 1, 128, 128, torch.device("cuda"))


pytestmark = [*GPU_MARKS, pytest.mark.skipif(not _kernels_here(), reason="needs the sm_90a grouped GEMM kernels")]


@pytest.fixture
def paused_gc() -> Iterator[None]:
    """Python's garbage collected, then none collected until the test ends. Earlier tests' cyclic
    garbage can hold CUDA tensors; freed between or during two measured steps, at a moment the
    collector picks, it would lower one step's memory baseline and not the other's."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


D, F, E = 128, 256, 8
# How the assignments fall on the experts: random top-2, all on one expert (the others get
# none), and a single token.
ROUTINGS = {"random": (300, 2), "all-on-one": (200, 1), "one-token": (1, 2)}


def _routing(name: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(T, K) int64 experts (distinct per token) and (T, K) float32 weights, on the GPU."""
    tokens, top_k = ROUTINGS[name]
    if name == "all-on-one":
        expert_ids = torch.full((tokens, 1), 3)
    else:
        expert_ids = torch.rand(tokens, E, generator=generator).argsort(dim=1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=generator)
    return expert_ids.cuda(), weights.cuda()


class _Assignments(NamedTuple):
    """Token-major assignments on the GPU and what the layer derives from them."""

    token_ids: Tensor  # (N,)
    token_offsets: Tensor  # (T + 1,)
    inverse: Tensor  # (N,)
    tokens_per_expert: Tensor  # (E,)
    expert_ends: Tensor  # (E,) int32
    weights: Tensor  # (N,) float32


def _assignments(routing: str, generator: torch.Generator) -> _Assignments:
    expert_ids_TK, weights_TK = _routing(routing, generator)
    num_tokens, top_k = expert_ids_TK.shape
    token_ids = torch.arange(num_tokens, device="cuda").repeat_interleave(top_k)
    token_offsets = torch.arange(0, num_tokens * top_k + 1, top_k, device="cuda")
    _, inverse, tokens_per_expert, expert_ends = ops.sort_by_expert_with_ends(expert_ids_TK.reshape(-1), E)
    return _Assignments(token_ids, token_offsets, inverse, tokens_per_expert, expert_ends, weights_TK.reshape(-1))


def _leaf(shape: tuple[int, ...], scale: float, generator: torch.Generator) -> Tensor:
    return (torch.randn(shape, generator=generator) * scale).to("cuda", torch.bfloat16).requires_grad_()


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16_out", "float32_out"])
def test_expert_mlp_gives_the_bits_of_the_ops_it_fuses(
    routing: str, activation: str, out_dtype: torch.dtype, generator: torch.Generator
) -> None:
    token_ids, token_offsets, inverse, tokens_per_expert, expert_ends, weights = _assignments(routing, generator)
    num_tokens = token_offsets.shape[0] - 1
    assert expert_mlp_usable(torch.empty(0, D, device="cuda", dtype=torch.bfloat16), token_ids.shape[0], E, D, F)
    x = _leaf((num_tokens, D), 1.0, generator)
    weights.requires_grad_()
    w1, w2 = _leaf((E, F, D), D**-0.5, generator), _leaf((E, D, F), F**-0.5, generator)
    w3 = _leaf((E, F, D), D**-0.5, generator) if activation == "swiglu" else None
    leaves = [t for t in (x, weights, w1, w2, w3) if t is not None]
    grad = torch.randn(num_tokens, D, generator=generator).to("cuda", out_dtype)

    fused = expert_mlp(x, inverse, token_offsets, weights, expert_ends, w1, w2, w3, activation, out_dtype)
    fused_grads = torch.autograd.grad(fused, leaves, grad)
    x_ND = ops.permute(x, token_ids, inverse, token_offsets)
    y_ND = grouped_mlp(x_ND, tokens_per_expert, w1, w2, w3, None, None, activation)
    composed = ops.unpermute(y_ND, token_ids, inverse, weights, num_tokens, out_dtype, token_offsets)
    composed_grads = torch.autograd.grad(composed, leaves, grad)

    assert fused.dtype == out_dtype and torch.equal(fused, composed)
    for got, want in zip(fused_grads, composed_grads, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_expert_mlp_computes_only_the_gradients_asked_for(generator: torch.Generator) -> None:
    """Frozen experts: the tokens and combine weights get their gradients, the weights none."""
    _, token_offsets, inverse, _, expert_ends, weights = _assignments("random", generator)
    x = _leaf((token_offsets.shape[0] - 1, D), 1.0, generator)
    weights.requires_grad_()
    w1, w2 = _leaf((E, F, D), D**-0.5, generator), _leaf((E, D, F), F**-0.5, generator)
    args = (x, inverse, token_offsets, weights, expert_ends)
    out = expert_mlp(*args, w1.detach(), w2.detach(), None, "gelu", torch.bfloat16)
    grad_x, grad_weights = torch.autograd.grad(out.float().sum(), (x, weights))
    expected = torch.autograd.grad(expert_mlp(*args, w1, w2, None, "gelu", torch.bfloat16).float().sum(), (x, weights))
    assert torch.equal(grad_x, expected[0]) and torch.equal(grad_weights, expected[1])


def test_expert_mlp_refuses_weights_and_ends_in_other_dtypes(generator: torch.Generator) -> None:
    _, token_offsets, inverse, tokens_per_expert, expert_ends, weights = _assignments("random", generator)
    x = _leaf((token_offsets.shape[0] - 1, D), 1.0, generator)
    w1, w2 = _leaf((E, F, D), 1.0, generator), _leaf((E, D, F), 1.0, generator)
    args = (x, inverse, token_offsets, weights, expert_ends)
    with pytest.raises(ValueError, match="bfloat16 weights"):
        expert_mlp(*args, w1.float(), w2, None, "gelu", x.dtype)
    with pytest.raises(ValueError, match="w3 exactly for the GLU"):
        expert_mlp(*args, w1, w2, None, "swiglu", x.dtype)
    with pytest.raises(ValueError, match="int32 expert_ends"):
        expert_mlp(x, inverse, token_offsets, weights, tokens_per_expert.cumsum(0), w1, w2, None, "gelu", x.dtype)


# One assignment per token: random, all on one expert, a single token.
TOP1_ROUTINGS = {"random": 300, "all-on-one": 200, "one-token": 1}


def _spy_on_token_epilogues(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> list[str]:
    """The names of expert_mlp's token-epilogue functions in the order they are called."""
    import lightning_moe.ops.expert_mlp as expert_mlp_module

    calls: list[str] = []
    for name in names:
        real = getattr(expert_mlp_module, name)

        def spy(*args: object, name: str = name, real: object = real) -> object:
            calls.append(name)
            return real(*args)  # type: ignore[operator]

        monkeypatch.setattr(expert_mlp_module, name, spy)
    return calls


@pytest.mark.parametrize("routing", TOP1_ROUTINGS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16_out", "float32_out"])
def test_one_assignment_per_token_gives_the_bits_of_the_row_kernels(
    routing: str, activation: str, out_dtype: torch.dtype, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the sort's order, the GEMMs write the combine and the token gradient themselves (for
    bf16 outputs and plain experts); outputs and gradients are those of the row kernels."""
    tokens = TOP1_ROUTINGS[routing]
    if routing == "all-on-one":
        expert_ids = torch.full((tokens,), 3)
    else:
        expert_ids = torch.randint(0, E, (tokens,), generator=generator)
    order, inverse, _, expert_ends = ops.sort_by_expert_with_ends(expert_ids.cuda(), E)
    token_offsets = torch.arange(tokens + 1, device="cuda")
    weights = torch.rand(tokens, generator=generator).cuda().requires_grad_()
    x = _leaf((tokens, D), 1.0, generator)
    w1, w2 = _leaf((E, F, D), D**-0.5, generator), _leaf((E, D, F), F**-0.5, generator)
    w3 = _leaf((E, F, D), D**-0.5, generator) if activation == "swiglu" else None
    leaves = [t for t in (x, weights, w1, w2, w3) if t is not None]
    grad = torch.randn(tokens, D, generator=generator).to("cuda", out_dtype)
    calls = _spy_on_token_epilogues(monkeypatch, ("forward_and_combine_tokens", "input_grad_to_tokens"))

    args = (x, inverse, token_offsets, weights, expert_ends, w1, w2, w3, activation, out_dtype)
    out = expert_mlp(*args, order)
    grads = torch.autograd.grad(out, leaves, grad)
    token_epilogues = calls.copy()
    expected = expert_mlp(*args)
    expected_grads = torch.autograd.grad(expected, leaves, grad)

    assert token_epilogues == ["forward_and_combine_tokens"] * (out_dtype == torch.bfloat16) + [
        "input_grad_to_tokens"
    ] * (w3 is None)
    assert out.dtype == out_dtype and torch.equal(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_expert_mlp_takes_order_only_for_one_assignment_per_token(generator: torch.Generator) -> None:
    _, token_offsets, inverse, _, expert_ends, weights = _assignments("random", generator)  # top-2
    x = _leaf((token_offsets.shape[0] - 1, D), 1.0, generator)
    w1, w2 = _leaf((E, F, D), 1.0, generator), _leaf((E, D, F), 1.0, generator)
    with pytest.raises(ValueError, match="order only for one assignment per token"):
        expert_mlp(x, inverse, token_offsets, weights, expert_ends, w1, w2, None, "gelu", x.dtype, inverse)


@pytest.mark.parametrize("top_k", [1, 2])
def test_top1_layer_takes_the_token_epilogues_with_the_bits_of_the_layer_op_by_op(
    top_k: int, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = MoE(d_model=D, num_experts=E, top_k=top_k, d_hidden=F, aux_loss_weight=0.01).to("cuda", torch.bfloat16)
    x = torch.randn(2, 150, D, generator=generator).to("cuda", torch.bfloat16)
    grad = torch.randn(x.shape, generator=generator).to("cuda", x.dtype)
    calls = _spy_on_token_epilogues(monkeypatch, ("forward_and_combine_tokens",))

    def step() -> tuple[Tensor, list[Tensor]]:
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        return out, list(torch.autograd.grad(out, [leaf, *layer.parameters()], grad))

    out, grads = step()
    assert calls == (["forward_and_combine_tokens"] if top_k == 1 else [])
    monkeypatch.setattr(MoE, "_fused_experts_apply", lambda *args: False)
    expected_out, expected_grads = step()
    assert torch.equal(out, expected_out)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_weights", "bf16_mixed"])
def test_layer_with_fewer_nodes_gives_the_bits_of_the_layer_op_by_op(
    activation: str, autocast: bool, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch, paused_gc: None
) -> None:
    torch.manual_seed(0)
    layer = MoE(d_model=D, num_experts=E, top_k=2, d_hidden=F, activation=activation, aux_loss_weight=0.01)
    layer = layer.cuda() if autocast else layer.to("cuda", torch.bfloat16)
    x = torch.randn(4, 96, D, generator=generator).to("cuda", torch.float32 if autocast else torch.bfloat16)
    grad = torch.randn(x.shape, generator=generator).to("cuda", x.dtype)

    def step() -> tuple[Tensor, list[Tensor]]:
        leaf = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = layer(leaf)
        grads = torch.autograd.grad(out, [leaf, *layer.parameters()], grad)
        return out, list(grads)

    nodes = []
    real_combine = layer.experts.forward_and_combine

    def combine(*args: object) -> Tensor:
        out = real_combine(*args)  # type: ignore[arg-type]
        nodes.append(type(out.grad_fn).__name__)
        return out

    monkeypatch.setattr(layer.experts, "forward_and_combine", combine)
    torch.cuda.reset_peak_memory_stats()
    out, grads = step()
    peak = torch.cuda.max_memory_allocated()
    # Gated experts keep the composition: in one node they would hold both first projections'
    # weight gradients at once.
    assert nodes == (["_ExpertOutputFunctionBackward"] if activation == "gelu" else [])
    monkeypatch.setattr(MoE, "_fused_experts_apply", lambda *args: False)
    torch.cuda.reset_peak_memory_stats()
    expected_out, expected_grads = step()
    assert len(nodes) == (1 if activation == "gelu" else 0)
    # The two nodes free what they saved as the composition's five do: no higher peak.
    assert peak <= torch.cuda.max_memory_allocated()
    assert torch.equal(out, expected_out)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.equal(got, want)


def _add_kernels(names: list[str]) -> int:
    return sum("CUDAFunctor_add" in name for name in names)


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_node_adds_the_experts_token_gradient_with_the_bits_of_autograds_sum(
    top_k: int, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the tensor-core router (64 experts), the experts' node hands its gradient of the tokens
    to the router's node, whose grad_x kernel adds it: the gradients are the bits of autograd adding
    the two, with one addition kernel fewer; a second backward of the same graph gives them again."""
    torch.manual_seed(0)
    layer = MoE(d_model=D, num_experts=64, top_k=top_k, d_hidden=F, aux_loss_weight=0.01).to("cuda", torch.bfloat16)
    x = torch.randn(2, 150, D, generator=generator).to("cuda", torch.bfloat16)
    grad = torch.randn(x.shape, generator=generator).to("cuda", x.dtype)

    def step() -> tuple[list[str], list[Tensor], list[Tensor]]:
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        inputs = [leaf, *layer.parameters()]
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            grads = torch.autograd.grad(out, inputs, grad, retain_graph=True)
            torch.cuda.synchronize()
        again = torch.autograd.grad(out, inputs, grad)
        return [event.key for event in prof.key_averages() for _ in range(event.count)], list(grads), list(again)

    handed_over = []
    real_give = TokenGradSum.give

    def give(self: TokenGradSum, grad_TD: Tensor) -> bool:
        handed_over.append(real_give(self, grad_TD))
        return handed_over[-1]

    monkeypatch.setattr(TokenGradSum, "give", give)
    names, grads, again = step()
    # Handed over in the first backward; in the second the sum is taken, so autograd adds.
    assert handed_over == [True, False]
    monkeypatch.setattr(MoE, "_token_grad_sum", lambda *args: None)
    expected_names, expected_grads, expected_again = step()
    assert _add_kernels(names) == _add_kernels(expected_names) - 1
    for got, want in zip(grads + again, expected_grads + expected_again, strict=True):
        assert torch.equal(got, want)

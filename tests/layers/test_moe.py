"""The whole MoE layer against the float64 per-token reference in ``moe_reference.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_moe import MoE
from lightning_moe.routers import TopKRouter
from tests.autograd_graph import consumer_names, graph_node_names
from tests.layers.moe_reference import reference_moe

EXPERT_PARAMS = ("w1", "w2", "w3", "b1", "b2")


def float64_params(module: nn.Module | None) -> dict | None:
    """Leaf float64 copies of a GroupedExperts' weights, requiring grad."""
    if module is None:
        return None
    params = {}
    for name in EXPERT_PARAMS:
        value = getattr(module, name)
        params[name] = None if value is None else value.detach().double().requires_grad_(True)
    return params


def run_both(moe: MoE, x: torch.Tensor, normalize: bool = True):
    """Forward + backward through the layer and the reference with the same upstream gradient."""
    x = x.detach().requires_grad_(True)
    out = moe(x)
    upstream = torch.randn_like(out, dtype=torch.float64)
    (out.double() * upstream).sum().backward()

    x64 = x.detach().double().reshape(-1, moe.d_model).requires_grad_(True)
    router64 = moe.router.weight.detach().double().requires_grad_(True)
    experts64 = float64_params(moe.experts)
    shared64 = float64_params(moe.shared_experts)
    ref, aux, z, dropped = reference_moe(
        x64, router64, experts64, shared64, moe.top_k, moe.experts.activation, moe.capacity_factor, normalize
    )
    ref_loss = (ref * upstream.reshape(ref.shape)).sum() + moe.aux_loss_weight * aux + moe.z_loss_weight * z
    ref_loss.backward()
    return out, x, ref.reshape(x.shape), x64, router64, experts64, shared64, aux, z, dropped


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Relative error in norm, robust to individual near-zero elements."""
    error = (actual.double() - expected.double()).norm()
    scale = expected.double().norm().clamp(min=1e-12)
    assert error / scale < rtol, f"relative error {float(error / scale):.3e} >= {rtol}"


CASES = [
    pytest.param(dict(activation="gelu", top_k=1), id="gelu-top1"),
    pytest.param(dict(activation="gelu_tanh", top_k=2), id="gelu_tanh-top2"),
    pytest.param(dict(activation="relu", top_k=3), id="relu-top3"),
    pytest.param(dict(activation="silu", top_k=4), id="silu-topE"),
    pytest.param(dict(activation="swiglu", top_k=2, bias=True), id="swiglu-bias"),
    pytest.param(dict(activation="geglu", top_k=2, num_shared_experts=2), id="geglu-shared2"),
    pytest.param(dict(activation="gelu", top_k=2, capacity_factor=0.5), id="capacity0.5"),
    pytest.param(dict(activation="swiglu", top_k=3, capacity_factor=1.0, bias=True), id="capacity1-bias"),
    pytest.param(dict(activation="gelu", top_k=2, z_loss_weight=0.1, aux_loss_weight=0.5), id="strong-losses"),
]


@pytest.mark.parametrize("config", CASES)
@pytest.mark.parametrize("shape", [(1, 12), (7, 12), (3, 5, 12)], ids=["1token", "7tokens", "3d"])
def test_layer_matches_float64_reference(config: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(sum(shape) + len(str(config)))
    moe = MoE(12, num_experts=4, d_hidden=10, **config).double()
    x = torch.randn(shape, dtype=torch.float64)
    out, x, ref, x64, router64, experts64, shared64, aux, z, dropped = run_both(moe, x)

    assert out.shape == x.shape and out.dtype == x.dtype
    # Router math runs in float32 by design, so even a float64 layer agrees to float32 rounding.
    assert_close(out, ref, 1e-6)
    assert int(moe.routing_stats["dropped"]) == dropped
    assert torch.allclose(moe.routing_stats["aux_loss"].double(), aux.detach(), rtol=1e-5)
    assert torch.allclose(moe.routing_stats["z_loss"].double(), z.detach(), rtol=1e-5)
    assert_close(x.grad, x64.grad.reshape(x.shape), 1e-6)
    assert_close(moe.router.weight.grad, router64.grad, 1e-4)
    for name in EXPERT_PARAMS:
        if experts64[name] is not None:
            assert_close(getattr(moe.experts, name).grad, experts64[name].grad, 1e-6)
        if shared64 is not None and shared64[name] is not None:
            assert_close(getattr(moe.shared_experts, name).grad, shared64[name].grad, 1e-6)


@pytest.mark.parametrize("num_tokens", [1, 13, 37], ids=lambda t: f"T{t}")
def test_float32_and_normalize_false_match_reference(num_tokens: int) -> None:
    torch.manual_seed(num_tokens)
    moe = MoE(16, num_experts=5, top_k=2, router=TopKRouter(16, 5, top_k=2, normalize=False))
    out, x, ref, x64, router64, *_ = run_both(moe, torch.randn(num_tokens, 16), normalize=False)
    assert out.dtype == torch.float32
    assert_close(out, ref, 1e-5)
    assert_close(x.grad, x64.grad, 1e-4)
    assert_close(moe.router.weight.grad, router64.grad, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_relative_bound(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    moe = MoE(32, num_experts=4, top_k=2, d_hidden=64, activation="swiglu").to(dtype)
    x = torch.randn(64, 32).to(dtype)
    out, x, ref, x64, *_ = run_both(moe, x)
    assert out.dtype == dtype
    # The same layer evaluated in float64 from the rounded weights: only rounding separates them.
    assert_close(out, ref, 2e-2)
    assert_close(x.grad, x64.grad, 5e-2)


@pytest.mark.parametrize("shape", [(10, 16), (2, 5, 16)], ids=["tokens", "batch"])
def test_tokens_of_two_dimensions_take_no_reshape(shape: tuple[int, ...]) -> None:
    """(T, D) tokens go to the router and the experts as they are, and the output comes back as it
    is: no reshape adds a view and its autograd node to every step. Other shapes are flattened to
    (T, D) and the output reshaped back, one view each way."""
    layer = MoE(d_model=16, num_experts=4, top_k=2, d_hidden=32, aux_loss_weight=0.0)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    consumers = consumer_names(out, x)
    output_node = type(out.grad_fn).__name__
    if len(shape) == 2:
        assert consumers and not any(name.startswith("View") for name in consumers)
        assert not output_node.startswith("View")
    else:
        assert consumers == ["ViewBackward0"] and output_node == "ViewBackward0"
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_router_math_runs_in_float32_for_low_precision_inputs() -> None:
    torch.manual_seed(1)
    moe = MoE(8, num_experts=4).to(torch.bfloat16)
    routing = moe.router(torch.randn(5, 8).to(torch.bfloat16))
    assert routing.weights.dtype == torch.float32
    assert routing.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)], ids=["0tokens", "empty-3d"])
def test_empty_batch_returns_empty_output(shape: tuple[int, ...]) -> None:
    moe = MoE(8, num_experts=4, num_shared_experts=1)
    x = torch.randn(shape, requires_grad=True)
    out = moe(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert int(moe.routing_stats["tokens_per_expert"].sum()) == 0


def test_tokens_per_expert_counted_before_drops() -> None:
    torch.manual_seed(3)
    moe = MoE(8, num_experts=4, top_k=2, capacity_factor=0.25)
    moe(torch.randn(40, 8))
    stats = moe.routing_stats
    assert int(stats["tokens_per_expert"].sum()) == 80
    capacity = 5  # ceil(0.25 * 40 * 2 / 4)
    expected_dropped = int((stats["tokens_per_expert"] - capacity).clamp(min=0).sum())
    assert int(stats["dropped"]) == expected_dropped > 0


def test_capacity_drops_lowest_probability_first() -> None:
    # Every token prefers expert 0, with probability rising with the token's first feature.
    moe = MoE(2, num_experts=2, top_k=1, capacity_factor=1.0, d_hidden=4)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    x = torch.stack([torch.linspace(0.1, 2.0, 10), torch.zeros(10)], dim=1)
    x = x[torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    out = moe(x)
    # capacity = ceil(1.0 * 10 * 1 / 2) = 5: the five tokens with the largest feature keep expert 0.
    kept = out.abs().sum(dim=1) > 0
    assert int(moe.routing_stats["dropped"]) == 5
    assert torch.equal(kept, x[:, 0] > x[:, 0].median())


def test_capacity_ties_keep_lower_token_index() -> None:
    moe = MoE(2, num_experts=2, top_k=1, capacity_factor=1.0, d_hidden=4)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    x = torch.ones(6, 2)  # identical tokens: identical probabilities
    out = moe(x)
    kept = out.abs().sum(dim=1) > 0
    assert kept.tolist() == [True, True, True, False, False, False]


def test_dropless_never_drops_under_total_imbalance() -> None:
    moe = MoE(4, num_experts=8, top_k=2)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
        moe.router.weight[1, 0] = 9.0
    moe(torch.ones(100, 4))
    assert moe.routing_stats["tokens_per_expert"][:2].tolist() == [100, 100]
    assert int(moe.routing_stats["dropped"]) == 0


def test_losses_reach_router_gradient_without_being_added() -> None:
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, aux_loss_weight=1.0, z_loss_weight=1.0)
    x = torch.randn(16, 8)
    # The output gets no gradient at all, so any router gradient comes from the attached losses.
    (moe(x) * 0).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0

    moe.zero_grad()
    moe.aux_loss_weight = moe.z_loss_weight = 0.0
    (moe(x) * 0).sum().backward()
    assert moe.router.weight.grad.abs().sum() == 0


def test_aux_loss_scale_multiplies_loss_gradient() -> None:
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, aux_loss_weight=1.0)
    x = torch.randn(16, 8)
    (moe(x) * 0).sum().backward()
    full = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe.aux_loss_scale = 0.25
    (moe(x) * 0).sum().backward()
    torch.testing.assert_close(moe.router.weight.grad, 0.25 * full)


@pytest.mark.parametrize(("aux_weight", "z_weight"), [(0.3, 0.02), (0.3, 0.0), (0.0, 0.02)])
def test_attached_losses_give_the_gradient_of_their_weighted_sum(aux_weight: float, z_weight: float) -> None:
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, aux_loss_weight=aux_weight, z_loss_weight=z_weight)
    moe.aux_loss_scale = 0.5
    x = torch.randn(16, 8)
    (moe(x) * 0).sum().backward()
    attached = moe.router.weight.grad.clone()
    moe.zero_grad()
    routing = moe.router(x)
    (0.5 * (aux_weight * routing.aux_loss + z_weight * routing.z_loss)).backward()
    torch.testing.assert_close(attached, moe.router.weight.grad, rtol=1e-6, atol=1e-9)
    assert attached.abs().sum() > 0


class TinyExpert(nn.Module):
    def __init__(self, d_model: int = 6, hidden: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, d_model))

    def forward(self, x):
        return self.net(x)


def test_custom_expert_factory_and_list_route_the_same_way() -> None:
    torch.manual_seed(0)
    moe = MoE(6, num_experts=3, top_k=2, experts=lambda: TinyExpert())
    assert len(moe.experts.experts) == 3
    x = torch.randn(9, 6)
    out = moe(x)
    routing = moe.router(x)
    expected = torch.zeros(9, 6)
    for t, e, w in zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), routing.weights, strict=True):
        expected[t] += w * moe.experts.experts[e](x[t : t + 1])[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    heterogeneous = [TinyExpert(6, h) for h in (2, 3, 4)]
    moe_list = MoE(6, num_experts=3, experts=heterogeneous)
    assert list(moe_list.experts.experts) == heterogeneous
    assert moe_list(x).shape == x.shape


def test_expert_initialisation_depends_only_on_seed_and_global_index() -> None:
    from lightning_moe.layers.experts import GroupedExperts

    whole = GroupedExperts(8, 4, 6, "swiglu", bias=True, seed=123)
    shard = GroupedExperts(2, 4, 6, "swiglu", bias=True, seed=123, expert_offset=4)
    for name in EXPERT_PARAMS:
        assert torch.equal(getattr(whole, name)[4:6], getattr(shard, name))
    other = GroupedExperts(8, 4, 6, "swiglu", bias=True, seed=124)
    assert not torch.equal(whole.w1, other.w1)
    assert not torch.equal(whole.w1[0], whole.w1[1])


def test_same_seed_builds_same_layer() -> None:
    torch.manual_seed(5)
    first = MoE(8, num_experts=4, experts=lambda: TinyExpert(8))
    torch.manual_seed(5)
    second = MoE(8, num_experts=4, experts=lambda: TinyExpert(8))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_stacked_weight_layouts() -> None:
    moe = MoE(8, num_experts=3, d_hidden=5, activation="geglu", bias=True)
    assert moe.experts.w1.shape == (3, 5, 8)
    assert moe.experts.w2.shape == (3, 8, 5)
    assert moe.experts.w3.shape == (3, 5, 8)
    assert moe.experts.b1.shape == (3, 5)
    assert moe.experts.b2.shape == (3, 8)
    assert moe.router.weight.shape == (3, 8)
    assert MoE(8, num_experts=3).d_hidden == 32
    assert MoE(8, num_experts=3).experts.w3 is None


def test_layer_builds_under_a_device_context_like_lightning_init() -> None:
    # Lightning builds configure_model under `torch.device(...)`; the per-expert streams are CPU.
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = MoE(8, num_experts=4, num_shared_experts=1)
    assert meta.experts.w1.is_meta
    torch.manual_seed(0)
    eager = MoE(8, num_experts=4, num_shared_experts=1)
    # Materialising the meta layer reproduces the experts of the eager one: same seed draw.
    meta.to_empty(device="cpu")
    meta.experts.reset_parameters()
    assert torch.equal(meta.experts.w1, eager.experts.w1)


BAD_ARGUMENTS = [
    pytest.param(dict(top_k=0), ValueError, "top_k must be at least 1", id="top_k<1"),
    pytest.param(dict(top_k=5), ValueError, "top_k=5 is larger than num_experts=4", id="top_k>E"),
    pytest.param(dict(num_experts=0, top_k=1), ValueError, "num_experts must be at least 1", id="E<1"),
    pytest.param(dict(d_model=0), ValueError, "d_model must be at least 1", id="d_model<1"),
    pytest.param(dict(d_model=8.0), TypeError, "d_model must be an int", id="d_model-float"),
    pytest.param(dict(activation="tanh"), ValueError, "Unknown activation 'tanh'; choose one of", id="activation"),
    pytest.param(dict(router="hash"), ValueError, "Unknown router 'hash'; choose one of", id="router-name"),
    pytest.param(dict(router=object()), TypeError, "router must be a router name or a Router", id="router-type"),
    pytest.param(dict(capacity_factor=0.0), ValueError, "capacity_factor must be positive", id="capacity<=0"),
    pytest.param(dict(router="switch", top_k=2), ValueError, "use top_k=1", id="switch-top2"),
    pytest.param(dict(num_shared_experts=-1), ValueError, "num_shared_experts must be a non-negative", id="shared<0"),
    pytest.param(dict(aux_loss_weight=-1.0), ValueError, "aux_loss_weight must be >= 0", id="aux<0"),
    pytest.param(
        dict(experts=[TinyExpert(8)]), ValueError, "experts= lists 1 modules but num_experts=4", id="experts-len"
    ),
    pytest.param(dict(experts=TinyExpert(8)), TypeError, "Pass `experts=lambda: MyExpert", id="experts-module"),
    pytest.param(
        dict(router=TopKRouter(8, 6, top_k=2)), ValueError, "router.num_experts=6 but MoE num_experts=4", id="router-E"
    ),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_fail_at_construction_naming_the_fix(overrides: dict, error: type, message: str) -> None:
    arguments = {**dict(d_model=8, num_experts=4, top_k=2), **overrides}
    with pytest.raises(error, match=message.replace("(", r"\(").replace("`", ".")):
        MoE(**arguments)


def test_num_groups_must_divide_num_experts() -> None:
    from lightning_moe.routers import SigmoidRouter

    with pytest.raises(ValueError, match="num_groups=3 must be a positive divisor of num_experts=4"):
        SigmoidRouter(8, 4, top_k=2, num_groups=3)


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        pytest.param(torch.randn(3, 7), ValueError, r"inputs of shape \(\.\.\., d_model=8\), got \(3, 7\)", id="width"),
        pytest.param(torch.randn(()), ValueError, r"inputs of shape \(\.\.\., d_model=8\), got \(\)", id="scalar"),
        pytest.param(torch.ones(3, 8, dtype=torch.int64), TypeError, "got dtype torch.int64", id="int64"),
    ],
)
def test_bad_inputs_fail_at_forward(x: torch.Tensor, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        MoE(8, num_experts=4)(x)


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "capacity0.5"])
def test_single_expert_layer_is_the_weighted_expert(router: str, capacity_factor: float | None) -> None:
    torch.manual_seed(0)
    moe = MoE(8, num_experts=1, top_k=1, d_hidden=12, router=router, capacity_factor=capacity_factor, bias=True)
    moe.eval()  # no router noise: the weights are deterministic
    x = torch.randn(3, 5, 8, requires_grad=True)
    out = moe(x)
    routing = moe.router(x.reshape(-1, 8))
    kept = torch.zeros(15, dtype=torch.bool)
    if capacity_factor is None or router == "expert_choice":  # expert choice applies C itself
        kept[routing.token_ids] = True
    else:  # capacity ceil(0.5 * 15 * 1 / 1) = 8: the 8 highest priorities stay
        order = torch.argsort(routing.priorities, descending=True, stable=True)
        kept[routing.token_ids[order[:8]]] = True
    weights = torch.zeros(15)
    weights[routing.token_ids] = routing.weights
    expected = moe.experts.expert_forward(0, x.reshape(-1, 8)) * (weights * kept).unsqueeze(-1)
    torch.testing.assert_close(out.reshape(-1, 8), expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert x.grad is not None and moe.experts.w1.grad is not None


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch", "expert_choice"])
def test_routers_that_skip_the_single_expert_weight_give_exactly_one(router: str) -> None:
    """The one-expert layer skips scaling by the weight only for routers whose weight is exactly 1."""
    torch.manual_seed(0)
    moe = MoE(8, num_experts=1, top_k=1, d_hidden=12, router=router)
    assert moe.router.single_expert_weight_is_one
    x_TD = torch.randn(64, 8) * torch.logspace(-3, 3, 64).unsqueeze(-1)  # tiny to huge logits
    for mode in (moe.train, moe.eval):
        mode()
        routing = moe.router(x_TD)
        assert torch.equal(routing.weights, torch.ones_like(routing.weights))
        assert torch.equal(routing.token_ids, torch.arange(64))


def test_sigmoid_router_keeps_scaling_by_the_weight() -> None:
    # A sigmoid that underflows to 0 gives weight 0, not 1: the layer must use the weight.
    assert not MoE(8, num_experts=1, top_k=1, router="sigmoid").router.single_expert_weight_is_one


@pytest.mark.parametrize("top_k", [1, 2])
def test_tokens_are_cast_to_the_expert_dtype_before_the_permutation(top_k: int, monkeypatch) -> None:
    # float32 tokens, bf16 experts: the T tokens are cast once, not the T*K permuted rows, and the
    # result is that of permuting float32 rows and casting them afterwards.
    torch.manual_seed(0)
    layer = MoE(16, 4, top_k=top_k, d_hidden=24)
    layer.experts.to(torch.bfloat16)
    x = torch.randn(2, 11, 16, requires_grad=True)

    permuted_dtypes = []
    permute = layer.permute

    def spy(x_TD, *args):
        permuted_dtypes.append(x_TD.dtype)
        return permute(x_TD, *args)

    monkeypatch.setattr(layer, "permute", spy)
    out = layer(x)
    (grad_x,) = torch.autograd.grad(out, x, out.detach().cos())
    assert permuted_dtypes == [torch.bfloat16]
    assert out.dtype == torch.float32

    monkeypatch.setattr(layer, "_narrower_expert_dtype", lambda x_TD: None)  # permute float32 rows
    expected = layer(x)
    (expected_grad_x,) = torch.autograd.grad(expected, x, expected.detach().cos())
    assert permuted_dtypes[-1] == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The backward sums each token's K row gradients; the early cast rounds that sum to bf16 once.
    torch.testing.assert_close(grad_x, expected_grad_x, rtol=1e-2, atol=1e-3)


def test_expert_loop_unbinds_each_stacked_weight_once_and_idle_experts_get_zero_gradients() -> None:
    # Indexing w[e] per expert would make each backward fill a zero tensor of the whole stack.
    from lightning_moe.layers.experts import GroupedExperts

    experts = GroupedExperts(6, 4, 8, "swiglu", bias=True, seed=0)
    x_ND = torch.randn(5, 4)
    y_ND = experts(x_ND, torch.tensor([2, 0, 3, 0, 0, 0]))
    names = graph_node_names(y_ND)
    assert names.count("UnbindBackward0") == 5  # w1, w2, w3, b1, b2
    assert "SelectBackward0" not in names
    y_ND.sum().backward()
    for name in ("w1", "w2", "w3", "b1", "b2"):
        grad = getattr(experts, name).grad
        assert grad is not None and grad[[1, 3, 4, 5]].abs().max() == 0, name
        assert grad[[0, 2]].abs().max() > 0, name


def test_experts_run_in_one_node_only_where_the_composition_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-node path stands for permute, compute_experts and unpermute: anything that changes
    or observes those steps (a subclass, hooks on the experts, a dispatcher) keeps them apart."""
    from lightning_moe.layers.experts import GroupedExperts

    x = torch.randn(8, 16)
    layer = MoE(d_model=16, num_experts=4, top_k=2, d_hidden=32)
    assert not layer._fused_experts_apply(x, layer.route(x))  # CPU tokens: the kernels are not there
    monkeypatch.setattr(GroupedExperts, "can_forward_and_combine", lambda self, x_TD, num_rows: True)
    routing = layer.route(x)
    assert layer._fused_experts_apply(x, routing)

    handle = layer.experts.register_forward_hook(lambda module, args, out: None)
    assert not layer._fused_experts_apply(x, routing)
    handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    assert not layer._fused_experts_apply(x, routing)
    handle.remove()
    layer.dispatcher = object()  # type: ignore[assignment]
    assert not layer._fused_experts_apply(x, routing)
    layer.dispatcher = None
    assert layer._fused_experts_apply(x, routing)

    class CountingMoE(MoE):
        def compute_experts(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
            return super().compute_experts(x_ND, tokens_per_expert)

    subclass = CountingMoE(d_model=16, num_experts=4, top_k=2, d_hidden=32)
    assert not subclass._fused_experts_apply(x, subclass.route(x))
    module_list = MoE(d_model=16, num_experts=4, top_k=2, d_hidden=32, experts=lambda: nn.Linear(16, 16))
    assert not module_list._fused_experts_apply(x, module_list.route(x))


def test_only_plain_experts_without_biases_forward_and_combine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernels would take the sizes: gated experts (whose two first projections' weight
    gradients one node would hold together) and experts with biases keep the composition."""
    import lightning_moe.layers.experts as experts_module
    from lightning_moe.layers.experts import GroupedExperts

    monkeypatch.setattr(experts_module, "grouped_mm_usable", lambda *args: True)
    monkeypatch.setattr(experts_module, "expert_mlp_usable", lambda *args: True)
    x = torch.randn(8, 16)
    assert GroupedExperts(4, 16, 32, "gelu").can_forward_and_combine(x, 16)
    assert not GroupedExperts(4, 16, 32, "swiglu").can_forward_and_combine(x, 16)
    assert not GroupedExperts(4, 16, 32, "gelu", bias=True).can_forward_and_combine(x, 16)
    assert not GroupedExperts(4, 16, 32, "gelu").can_forward_and_combine(x.double(), 16)  # not the compute dtype

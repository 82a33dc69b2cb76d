"""moefy on plain PyTorch models: recognised shapes, upcycling, target forms, errors, Lightning."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE, MoELightningModule
from lightning_moe.conversion import moefy
from lightning_moe.routers import TopKRouter

ACTIVATIONS = [
    pytest.param(nn.GELU(), "gelu", id="gelu"),
    pytest.param(nn.GELU(approximate="tanh"), "gelu_tanh", id="gelu_tanh"),
    pytest.param(nn.ReLU(), "relu", id="relu"),
    pytest.param(nn.SiLU(), "silu", id="silu"),
]


def ffn(d_model: int = 8, d_hidden: int = 24, act: nn.Module | None = None, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_model, d_hidden, bias=bias), act or nn.GELU(), nn.Linear(d_hidden, d_model, bias=bias)
    )


class Net(nn.Module):
    """Two residual blocks around Sequential feed-forward blocks, plus a non-FFN head."""

    def __init__(self, act: nn.Module | None = None, bias: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ffn(act=act, bias=bias) for _ in range(2)])
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))  # 8 -> 3: not an FFN

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class FeedForward(nn.Module):
    """A custom block moefy does not recognise by shape."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 20)
        self.down = nn.Linear(20, 8)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, mask):
        return self.proj(x) * mask


class ReturnsTuple(FeedForward):
    def forward(self, x):
        return super().forward(x), None


@pytest.mark.parametrize(("act", "name"), ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_upcycled_sequential_computes_the_dense_model(act: nn.Module, name: str, bias: bool) -> None:
    torch.manual_seed(0)
    model = Net(act, bias)
    x = torch.randn(4, 5, 8)
    dense_out = model(x)
    report = moefy(model, num_experts=4, top_k=2, upcycle=True)
    assert [(r.name, r.kind, r.d_model, r.d_hidden, r.activation) for r in report] == [
        ("blocks.0", "sequential", 8, 24, name),
        ("blocks.1", "sequential", 8, 24, name),
    ]
    assert isinstance(model.blocks[0], MoE) and not isinstance(model.head, MoE)
    assert (model.blocks[0].experts.b1 is not None) == bias
    torch.testing.assert_close(model(x), dense_out, rtol=1e-5, atol=1e-6)


def test_without_upcycle_experts_are_fresh_and_differ() -> None:
    torch.manual_seed(0)
    model = Net()
    moefy(model, num_experts=4)
    w1 = model.blocks[0].experts.w1
    assert not torch.equal(w1[0], w1[1])
    assert not torch.equal(w1[0], model.blocks[1].experts.w1[0])


def test_trailing_dropout_is_kept_after_the_moe() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(*ffn(), nn.Dropout(0.25)))
    report = moefy(model, num_experts=2, top_k=1)
    replaced = model[1]
    assert isinstance(replaced[0], MoE) and isinstance(replaced[1], nn.Dropout) and replaced[1].p == 0.25
    assert report.replacements[0].moe_name == "1.0"
    assert model.get_submodule("1.0") is replaced[0]


def test_dtype_and_device_are_kept() -> None:
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    dense_out = model(x)
    moefy(model, num_experts=4, upcycle=True)
    assert {p.dtype for p in model.blocks[0].parameters()} == {torch.bfloat16}
    out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, dense_out, rtol=2e-2, atol=2e-2)


def test_meta_device_model_stays_on_meta() -> None:
    with torch.device("meta"):
        model = Net()
    moefy(model, num_experts=4)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    with torch.device("meta"):
        dense = Net()
    with pytest.warns(UserWarning, match="meta device copies nothing"):
        moefy(dense, num_experts=4, upcycle=True)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(FeedForward, id="class"),
        pytest.param("layers.1", id="glob"),
        pytest.param(re.compile(r"layers\.\d"), id="regex"),
        pytest.param(lambda name, module: isinstance(module, FeedForward), id="predicate"),
    ],
)
def test_target_forms_select_unrecognised_blocks(target) -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layers", nn.ModuleList([FeedForward(), FeedForward()]))
    report = moefy(model, num_experts=4, target=target, activation="silu")
    names = [r.name for r in report]
    assert names == (["layers.1"] if target == "layers.1" else ["layers.0", "layers.1"])
    assert {(r.kind, r.d_model, r.d_hidden, r.activation) for r in report} == {("generic", 8, 20, "silu")}
    assert model.layers[1](torch.randn(3, 8)).shape == (3, 8)


def test_target_restricts_recognised_blocks() -> None:
    model = Net()
    report = moefy(model, num_experts=2, target="blocks.1")
    assert [r.name for r in report] == ["blocks.1"]
    assert not isinstance(model.blocks[0], MoE)


def test_moe_kwargs_reach_every_layer_and_router_instances_are_copied() -> None:
    model = Net()
    router = TopKRouter(8, num_experts=4, top_k=2, normalize=False)
    moefy(model, num_experts=4, router=router, capacity_factor=1.5, d_hidden=12, aux_loss_weight=0.0)
    first, second = model.blocks
    assert first.router is router and second.router is not router
    assert isinstance(second.router, TopKRouter) and not second.router.normalize
    assert not torch.equal(first.router.weight, second.router.weight)
    assert (first.capacity_factor, first.d_hidden, first.aux_loss_weight) == (1.5, 12, 0.0)


def test_upcycling_training_moves_experts_apart() -> None:
    torch.manual_seed(0)
    model = Net()
    moefy(model, num_experts=4, upcycle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(32, 8)).square().mean().backward()
        optimizer.step()
    w1 = model.blocks[0].experts.w1
    assert all(not torch.allclose(w1[0], w1[e]) for e in range(1, 4))


def test_nothing_matched_lists_the_shapes_and_target() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))  # 8 -> 2: not a feed-forward block
    with pytest.raises(ValueError) as error:
        moefy(nn.Sequential(model), num_experts=4)
    message = str(error.value)
    for expected in ("nn.Sequential(nn.Linear(D, F)", "c_fc", "gate_proj", "intermediate.dense", "target="):
        assert expected in message


def test_target_that_selects_nothing_names_the_modules() -> None:
    with pytest.raises(ValueError, match=r"target='mlp\*' selected no module.*blocks\.0"):
        moefy(Net(), num_experts=4, target="mlp*")


def test_second_call_explains_the_existing_moe_layers() -> None:
    model = Net()
    moefy(model, num_experts=4)
    with pytest.raises(ValueError, match="already holds 2 MoE layer"):
        moefy(model, num_experts=4)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        pytest.param(TwoInputs(), "forward takes 2 arguments", id="extra-args"),
        pytest.param(ReturnsTuple(), "returns tuple", id="tuple"),
    ],
)
def test_target_with_another_interface_is_refused(module: nn.Module, message: str) -> None:
    model = nn.Sequential(module)
    with pytest.raises(ValueError, match=message):
        moefy(model, num_experts=2, target="0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"target": FeedForward}, "does not know how FeedForward", id="generic"),
        pytest.param({"activation": "relu"}, "keeps the block's activation", id="activation"),
        pytest.param({"d_hidden": 16}, "keeps the block's hidden size", id="d_hidden"),
        pytest.param({"experts": lambda: nn.Identity()}, "do not pass experts=", id="experts"),
    ],
)
def test_upcycle_refuses_what_it_cannot_copy(kwargs: dict, message: str) -> None:
    model = nn.Sequential(nn.Sequential(ffn()), FeedForward())
    with pytest.raises(ValueError, match=message):
        moefy(model, num_experts=2, upcycle=True, **kwargs)


def test_unknown_activation_needs_an_explicit_choice() -> None:
    model = nn.Sequential(ffn(act=nn.Tanh()))
    with pytest.raises(ValueError, match="activation Tanh"):
        moefy(model, num_experts=2)
    assert moefy(model, num_experts=2, activation="gelu").replacements[0].activation == "gelu"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        pytest.param({"router": "switch", "top_k": 1}, "Switch", id="switch"),
        pytest.param({"capacity_factor": 1.0}, "capacity_factor", id="capacity"),
        pytest.param({"num_shared_experts": 1}, "shared experts", id="shared"),
    ],
)
def test_upcycle_warns_when_the_start_is_not_exact(kwargs: dict, reason: str) -> None:
    with pytest.warns(UserWarning, match=reason):
        moefy(Net(), num_experts=4, upcycle=True, **kwargs)


def test_model_that_is_itself_a_block_is_refused() -> None:
    with pytest.raises(ValueError, match="model itself is a feed-forward block"):
        moefy(ffn(), num_experts=2)


def test_bad_target_and_predicate() -> None:
    with pytest.raises(TypeError, match="target must be"):
        moefy(Net(), num_experts=2, target=3)
    with pytest.raises(TypeError, match=r"predicate\(name, module\)"):
        moefy(Net(), num_experts=2, target=lambda module: True)


class DenseThenMoE(MoELightningModule):
    """Dense in __init__, moefied in configure_model, as a checkpoint-upcycling run would be."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def configure_model(self) -> None:
        if any(isinstance(m, MoE) for m in self.modules()):
            return  # configure_model may run more than once
        moefy(self.net, num_experts=4, upcycle=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_moefy_in_configure_model_trains_the_experts() -> None:
    torch.manual_seed(0)
    module = DenseThenMoE()
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    w1 = module.net.blocks[0].experts.w1
    assert not torch.allclose(w1[0], w1[1])  # the optimizer held the new expert parameters
    module.configure_model()  # idempotent

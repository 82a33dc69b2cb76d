"""Mixtral / Qwen2-MoE sparse blocks into MoE and back, checked against transformers' own blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_moe import MoE
from lightning_moe.conversion import GatedSharedExpertMoE, from_hf_sparse_block, to_hf_sparse_block

transformers = pytest.importorskip("transformers")
mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
qwen2_moe = pytest.importorskip("transformers.models.qwen2_moe.modeling_qwen2_moe")

D, E = 32, 4


def mixtral_config(**kwargs):
    return transformers.MixtralConfig(
        hidden_size=D, intermediate_size=48, num_local_experts=E, num_experts_per_tok=2, **kwargs
    )


def qwen2_moe_config(norm_topk_prob: bool):
    return transformers.Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=E,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
    )


def randomised(block: nn.Module) -> nn.Module:
    """transformers leaves some weights uninitialised (or zero) outside a model; give every one a value."""
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.1)
    return block.eval()


BLOCKS = [
    pytest.param(lambda: mixtral.MixtralSparseMoeBlock(mixtral_config()), id="mixtral"),
    pytest.param(lambda: qwen2_moe.Qwen2MoeSparseMoeBlock(qwen2_moe_config(True)), id="qwen2moe-norm"),
    pytest.param(lambda: qwen2_moe.Qwen2MoeSparseMoeBlock(qwen2_moe_config(False)), id="qwen2moe-raw"),
]


@pytest.mark.parametrize("make_block", BLOCKS)
def test_loaded_layer_matches_the_block_and_exports_back(make_block) -> None:
    torch.manual_seed(0)
    block = randomised(make_block())
    x = torch.randn(2, 9, D)
    layer = from_hf_sparse_block(block, aux_loss_weight=0.0)
    has_shared = hasattr(block, "shared_expert")
    assert isinstance(layer, GatedSharedExpertMoE) == has_shared
    moe = layer.moe if has_shared else layer
    assert (moe.num_experts, moe.top_k, moe.experts.activation) == (E, 2, "swiglu")
    expected = block(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)

    fresh = randomised(make_block())
    to_hf_sparse_block(layer, fresh)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)


def test_routed_only_loads_the_routed_part_of_qwen2_moe() -> None:
    torch.manual_seed(0)
    block = randomised(qwen2_moe.Qwen2MoeSparseMoeBlock(qwen2_moe_config(False)))
    x = torch.randn(10, D)
    with pytest.raises(ValueError, match="routed_only"):
        to_hf_sparse_block(from_hf_sparse_block(block, routed_only=True), block)
    moe = from_hf_sparse_block(block, routed_only=True)
    assert isinstance(moe, MoE)
    shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    torch.testing.assert_close(moe(x), block(x[None])[0] - shared, rtol=1e-5, atol=1e-6)


def test_whole_mixtral_model_with_moe_layers_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    config = mixtral_config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    expected = model(input_ids=ids).logits
    for layer in model.model.layers:
        layer.mlp = from_hf_sparse_block(layer.mlp)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_block_loads_in_bfloat16() -> None:
    block = randomised(mixtral.MixtralSparseMoeBlock(mixtral_config())).to(torch.bfloat16)
    moe = from_hf_sparse_block(block)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}


class LegacyExpert(nn.Module):
    """transformers 4.x MixtralBlockSparseTop2MLP: w2(act(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class MixtralSparseMoeBlockV4(nn.Module):
    """transformers 4.x layout: a Linear gate and a ModuleList of experts, Mixtral routing."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([LegacyExpert(D, 48) for _ in range(E)])

    def forward(self, x):
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # (..., E, D)
        picked = torch.gather(outputs, -2, chosen[..., None].expand(*chosen.shape, D))
        return (weights[..., None] * picked).sum(dim=-2)


def test_transformers4_layout_loads_and_exports() -> None:
    torch.manual_seed(0)
    block = randomised(MixtralSparseMoeBlockV4())
    x = torch.randn(12, D)
    moe = from_hf_sparse_block(block)
    torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-6)
    fresh = randomised(MixtralSparseMoeBlockV4())
    to_hf_sparse_block(moe, fresh)
    torch.testing.assert_close(fresh(x), block(x), rtol=1e-5, atol=1e-6)


class OtherSparseBlock(MixtralSparseMoeBlockV4):
    """Not Mixtral by name and without norm_topk_prob: whether it renormalises is unknown."""


def test_unknown_parts_and_routing_are_refused() -> None:
    block = OtherSparseBlock()
    with pytest.raises(ValueError, match="pass normalize=True"):
        from_hf_sparse_block(block)
    block.extra_norm = nn.LayerNorm(D)
    with pytest.raises(ValueError, match=r"parameters in \['extra_norm'\]"):
        from_hf_sparse_block(block, normalize=True)
    assert isinstance(from_hf_sparse_block(block, normalize=True, routed_only=True), MoE)


def test_export_refuses_a_layer_of_another_shape() -> None:
    block = randomised(mixtral.MixtralSparseMoeBlock(mixtral_config()))
    with pytest.raises(ValueError, match="top_k=2"):
        to_hf_sparse_block(MoE(D, E, top_k=1, d_hidden=48, activation="swiglu"), block)
    with pytest.raises(ValueError, match="gated experts"):
        to_hf_sparse_block(MoE(D, E, top_k=2, d_hidden=48, activation="gelu"), block)


class FusedExperts(nn.Module):
    """transformers 5 fused experts, with the layout flags its experts interface reads."""

    def __init__(self, transposed: bool, concatenated: bool, d_hidden: int = 12) -> None:
        super().__init__()
        self.is_transposed, self.is_concatenated = transposed, concatenated
        gate_up, down = (E, 2 * d_hidden, D), (E, D, d_hidden)
        if transposed:
            gate_up, down = (E, D, 2 * d_hidden), (E, d_hidden, D)
        self.gate_up_proj = nn.Parameter(0.1 * torch.randn(gate_up))
        self.down_proj = nn.Parameter(0.1 * torch.randn(down))
        self.act_fn = nn.SiLU()

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj[e].t() if self.is_transposed else self.gate_up_proj[e]  # (2F, D)
        down = self.down_proj[e].t() if self.is_transposed else self.down_proj[e]  # (D, F)
        half = gate_up.shape[0] // 2
        gate, up = (gate_up[:half], gate_up[half:]) if self.is_concatenated else (gate_up[0::2], gate_up[1::2])
        return (self.act_fn(x @ gate.t()) * (x @ up.t())) @ down.t()


class FusedBlock(nn.Module):
    def __init__(self, transposed: bool, concatenated: bool) -> None:
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = FusedExperts(transposed, concatenated)


@pytest.mark.parametrize("transposed", [False, True], ids=["stored-out-in", "transposed"])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
def test_fused_layout_flags_are_honoured(transposed: bool, concatenated: bool) -> None:
    torch.manual_seed(0)
    block = FusedBlock(transposed, concatenated)
    moe = from_hf_sparse_block(block, normalize=True)
    x = torch.randn(5, D)
    for e in range(E):
        torch.testing.assert_close(moe.experts.expert_forward(e, x), block.experts.expert(e, x), rtol=1e-5, atol=1e-6)
    fresh = FusedBlock(transposed, concatenated)
    to_hf_sparse_block(moe, fresh)
    assert torch.equal(fresh.experts.gate_up_proj, block.experts.gate_up_proj)
    assert torch.equal(fresh.experts.down_proj, block.experts.down_proj)
    assert torch.equal(fresh.gate.weight, block.gate.weight)


def test_moefy_leaves_existing_sparse_blocks_alone() -> None:
    from lightning_moe.conversion import moefy

    config = transformers.Qwen2MoeConfig(
        hidden_size=D,
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=E,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        decoder_sparse_step=2,  # layer 0 dense, layer 1 sparse
        vocab_size=64,
    )
    model = transformers.Qwen2MoeForCausalLM(config)
    report = moefy(model, num_experts=4, upcycle=True)
    assert [(r.name, r.kind) for r in report] == [("model.layers.0.mlp", "llama")]
    assert isinstance(model.model.layers[1].mlp, qwen2_moe.Qwen2MoeSparseMoeBlock)
    assert isinstance(model.model.layers[1].mlp.shared_expert, qwen2_moe.Qwen2MoeMLP)

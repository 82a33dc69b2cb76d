"""Sparse upcycling of Hugging Face GPT-2, Llama and BERT models built from small configs (no download)."""

from __future__ import annotations

import pytest
import torch

from lightning_moe import MoE
from lightning_moe.conversion import moefy

transformers = pytest.importorskip("transformers")

VOCAB = 100


def gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config), "gpt2", 128, "gelu_tanh"


def llama():
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config), "llama", 64, "swiglu"


def bert():
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB
    )
    return transformers.BertForMaskedLM(config), "bert", 64, "gelu"


MODELS = [pytest.param(gpt2, id="gpt2"), pytest.param(llama, id="llama"), pytest.param(bert, id="bert")]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.mark.parametrize("build", MODELS)
def test_upcycled_model_computes_the_dense_model(build) -> None:
    torch.manual_seed(0)
    model, kind, d_hidden, activation = build()
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    dense_logits = logits(model, ids)
    report = moefy(model, num_experts=4, top_k=2, upcycle=True)
    assert {(r.kind, r.d_model, r.d_hidden, r.activation) for r in report} == {(kind, 32, d_hidden, activation)}
    assert len(report) == 2
    assert sum(isinstance(m, MoE) for m in model.modules()) == 2
    torch.testing.assert_close(logits(model, ids), dense_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", MODELS)
def test_training_moves_the_upcycled_experts_apart(build) -> None:
    torch.manual_seed(0)
    model, *_ = build()
    moefy(model, num_experts=4, top_k=2, upcycle=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (4, 16))
    for _ in range(3):
        optimizer.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
    for layer in (m for m in model.modules() if isinstance(m, MoE)):
        w1 = layer.experts.w1
        assert all(not torch.allclose(w1[0], w1[e]) for e in range(1, 4))

"""Bring your own model: dense blocks to MoE layers (``moefy``, upcycling); Hugging Face sparse blocks in and out.

================  ==================================================================
module            what it does
================  ==================================================================
``dense``         recognises dense feed-forward blocks by their shape
``moefy``         replaces them with MoE layers in place, with a report
``upcycle``       copies a dense block into every expert (sparse upcycling)
``huggingface``   Mixtral / Qwen2-MoE sparse blocks to ``MoE`` and back
================  ==================================================================
"""

from lightning_moe.conversion.huggingface import GatedSharedExpertMoE, from_hf_sparse_block, to_hf_sparse_block
from lightning_moe.conversion.moefy import MoefyReport, Replacement, moefy

__all__ = [
    "GatedSharedExpertMoE",
    "MoefyReport",
    "Replacement",
    "from_hf_sparse_block",
    "moefy",
    "to_hf_sparse_block",
]

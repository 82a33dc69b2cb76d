"""moefy with sparse upcycling inside configure_model trains under MoEStrategy with experts sharded."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.launch import run_on_ranks

pytest.importorskip("transformers")


def test_upcycled_gpt2_trains_with_sharded_experts(tmp_path) -> None:
    from tests.parallel.moefy_scenarios import upcycle_under_strategy

    results = run_on_ranks(2, upcycle_under_strategy, str(tmp_path))
    assert (tmp_path / "expert_load" / "counts.jsonl").exists()
    for rank, result in enumerate(results):
        assert result["local_experts"] == [2, 2] and result["offsets"] == [2 * rank, 2 * rank]
        # At step 0 the upcycled, expert-parallel model computes what the dense model did.
        torch.testing.assert_close(result["upcycled"], result["dense"], rtol=1e-5, atol=1e-5)
        # Training then moves each rank's two experts apart (they see different tokens).
        w1 = result["after"]["w1"]
        assert not torch.equal(w1, result["before"]["w1"])
        assert not torch.allclose(w1[0], w1[1])

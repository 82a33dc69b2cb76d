"""Assertions shared by the router tests: a Routing against a per-token reference."""

from __future__ import annotations

import pytest


def per_token_assignments(routing, num_tokens: int) -> list[dict[int, tuple[float, float]]]:
    result: list[dict[int, tuple[float, float]]] = [{} for _ in range(num_tokens)]
    for t, e, w, p in zip(
        routing.token_ids.tolist(),
        routing.expert_ids.tolist(),
        routing.weights.tolist(),
        routing.priorities.tolist(),
        strict=True,
    ):
        assert e not in result[t], "an expert was assigned twice to one token"
        result[t][e] = (w, p)
    return result


def assert_matches_reference(routing, expected: dict, num_tokens: int) -> None:
    actual = per_token_assignments(routing, num_tokens)
    for t, (got, want) in enumerate(zip(actual, expected["per_token"], strict=True)):
        assert set(got) == set(want), f"token {t}: experts {sorted(got)} != {sorted(want)}"
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5, abs=1e-7), f"token {t}, expert {e}"
    assert routing.aux_loss.item() == pytest.approx(expected["aux"], rel=1e-5, abs=1e-6)
    assert routing.z_loss.item() == pytest.approx(expected["z"], rel=1e-5, abs=1e-6)

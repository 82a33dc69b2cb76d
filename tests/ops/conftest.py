"""Fixtures of the ops tests: the CUDA extension check of the GPU tests, and a random generator."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.ops import extension


@pytest.fixture(scope="module", autouse=True)
def cuda_extension(request: pytest.FixtureRequest) -> None:
    """The kernels must build here: a GPU run that silently fell back would test nothing."""
    if request.node.get_closest_marker("gpu") is None:
        return
    assert extension.load_extension() is not None, "the CUDA extension did not build; see the warning"


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)

"""The grouped linear op's reference and its choice of path, on the CPU.

Shape legend: N rows (sorted by expert), K input features, M output features, E experts.
"""

from __future__ import annotations

import pytest
import torch

from lightning_moe.ops import reference
from lightning_moe.ops.grouped_linear import (
    MAX_ROWS_PER_EXPERT,
    TALL_TILE_MAX_ROWS,
    TALL_TILE_MIN_ROWS,
    TILE_N,
    TILE_N_MIN_WAVES,
    grouped_linear,
    grouped_linear_usable,
    tile_columns,
    tile_rows,
)

SPLITS = [[3, 0, 5], [0, 0, 4], [7], [1, 1, 1, 1], [0, 0]]


@pytest.mark.parametrize("rows_per_expert", SPLITS, ids=["gap", "leading-empty", "one", "ones", "none"])
def test_reference_is_each_experts_matmul(rows_per_expert: list[int], generator: torch.Generator) -> None:
    num_rows, num_experts = sum(rows_per_expert), len(rows_per_expert)
    x_NK = torch.randn(num_rows, 6, generator=generator, dtype=torch.float64)
    w_EMK = torch.randn(num_experts, 5, 6, generator=generator, dtype=torch.float64)
    ends_E = torch.tensor(rows_per_expert).cumsum(0).to(torch.int32)
    blocks, start = [], 0
    for e, count in enumerate(rows_per_expert):
        blocks.append(x_NK[start : start + count] @ w_EMK[e].t())
        start += count
    torch.testing.assert_close(reference.grouped_linear(x_NK, w_EMK, ends_E), torch.cat(blocks))


def test_reference_gradients(generator: torch.Generator) -> None:
    x_NK = torch.randn(7, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    w_EMK = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    ends_E = torch.tensor([2, 2, 7], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda x, w: reference.grouped_linear(x, w, ends_E), (x_NK, w_EMK))


@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    [(64 * 16, 1024, 4096), (64 * MAX_ROWS_PER_EXPERT + 1, 1024, 4096), (64, 1088, 4096), (64, 1024, 4000)],
    ids=["cpu", "too-many-rows", "k-not-multiple-of-128", "m-not-multiple-of-128"],
)
def test_kernels_are_not_chosen_where_they_cannot_run_or_do_not_pay(
    rows: int, in_features: int, out_features: int
) -> None:
    # On the CPU, and for sizes the tiles do not divide or with many rows per expert, whatever the GPU.
    device = torch.device("cpu" if rows == 64 * 16 else "cuda")
    assert not grouped_linear_usable(rows, 64, in_features, out_features, device)


@pytest.mark.parametrize(
    ("row_tiles", "columns", "expected"),
    [
        # Enough wide tiles for every SM: the wide tile.
        (TILE_N_MIN_WAVES * 132, TILE_N, TILE_N),
        (128, 4096, TILE_N),
        # One wide tile short of TILE_N_MIN_WAVES per SM: the narrow one.
        (TILE_N_MIN_WAVES * 132 - 1, TILE_N, 128),
        (16, 4096, 128),
        # Columns the wide tile does not divide.
        (4096, 1408, 128),
    ],
)
def test_tile_width_is_the_wide_one_only_where_it_divides_and_fills_the_sms(
    row_tiles: int, columns: int, expected: int
) -> None:
    assert tile_columns(row_tiles, columns, num_sms=132) == expected


@pytest.mark.parametrize(
    ("rows_per_expert", "tile_n", "expected"),
    [
        # Experts that 128-row tiles would often split in two: 192-row tiles.
        (TALL_TILE_MIN_ROWS + 1, 256, 192),
        (128, 256, 192),
        (TALL_TILE_MAX_ROWS, 256, 192),
        # Few enough rows that one 128-row tile holds nearly every expert, or so many that 192 rows
        # split them too: 128.
        (TALL_TILE_MIN_ROWS, 256, 128),
        (TALL_TILE_MAX_ROWS + 1, 256, 128),
        # Only 256-column tiles come 192 rows tall.
        (128, 128, 128),
    ],
)
def test_tile_height_is_the_tall_one_only_around_128_rows_per_expert(
    rows_per_expert: int, tile_n: int, expected: int
) -> None:
    assert tile_rows(rows_per_expert * 64, 64, tile_n) == expected


@pytest.mark.parametrize(
    ("x_shape", "x_dtype", "message"),
    [
        ((8, 128, 1), torch.bfloat16, "needs x \\(N, K\\)"),
        ((8, 128), torch.float32, "bfloat16"),
        ((8, 128), torch.bfloat16, "CUDA"),
    ],
    ids=["shape", "dtype", "device"],
)
def test_grouped_linear_names_the_input_it_cannot_take(
    x_shape: tuple[int, ...], x_dtype: torch.dtype, message: str
) -> None:
    w_EMK = torch.zeros(2, 128, 128, dtype=torch.bfloat16)
    ends_E = torch.tensor([3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        grouped_linear(torch.zeros(x_shape, dtype=x_dtype), w_EMK, ends_E)

"""The grouped GEMM kernels against ``torch._grouped_mm``, bf16, on one compute capability 9.0 GPU.

Shape legend: N rows (sorted by expert), D model dim, F expert hidden dim, E experts.

For each (D, F, E) and average rows per expert, N = rows * E tokens are spread over the experts
uniformly at random, and the six GEMMs of an expert MLP's forward and backward are timed with CUDA
events (median of --iters calls after a warm-up), ours (``src_cuda/grouped_gemm*.cu``) and torch's:

- ``fwd w1``: (N, D) x w1 (E, F, D) -> (N, F)     - ``fwd w2``: (N, F) x w2 (E, D, F) -> (N, D)
- ``dgrad w2``: (N, D) x w2 -> (N, F)             - ``dgrad w1``: (N, F) x w1 -> (N, D)
- ``wgrad w2``: (N, D)^T x (N, F) -> (E, D, F)     - ``wgrad w1``: (N, F)^T x (N, D) -> (E, F, D)

It prints microseconds per GEMM, torch's time over ours, the bytes each GEMM must move (inputs read
once, output written once) over our time, and checks that both agree. ``--even`` gives every expert
exactly the average rows instead (no expert then needs a second, partly filled 128-row tile);
``--bandwidth`` first prints what a plain copy, read and write of 1 GiB reach on the GPU, the
scale for the GB/s column.

    python benchmarks/grouped_gemm.py [--rows 128,512,1536,4096] [--iters 20] [--tile-n 128]
        [--row-ctas 1] [--wgrad-ctas 1] [--wgrad-runs 1] [--tile-m 128] [--even] [--bandwidth]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from timing import time_ms
from torch import Tensor

from lightning_moe.ops.extension import require_extension

# (D, F, E): moe_layer.py's configs 5 and 4, and 8 experts of config 1's size.
CONFIGS = ((1024, 4096, 64), (2048, 1408, 64), (1024, 4096, 8))


def gemms(
    x_ND: Tensor,
    h_NF: Tensor,
    w1_EFD: Tensor,
    w2_EDF: Tensor,
    ends_E: Tensor,
    tile_n: int,
    row_ctas: int,
    wgrad_ctas: int,
    tile_m: int = 128,
    wgrad_runs: int = 1,
) -> list[tuple[str, Callable[[], Tensor], Callable[[], Tensor], int]]:
    """(name, ours, torch's, operand bytes) for the four row-grouped GEMMs and the two weight gradients; ours with
    ``tile_n``-column tiles where that divides the output's columns, else 128, the row GEMMs on
    ``row_ctas`` and the weight gradients on ``wgrad_ctas`` CTAs per SM (128-column tiles with 2), the
    row GEMMs ``tile_m`` rows tall where their tiles are 256 columns wide.
    The operand bytes are those of the two inputs (the expert weights included), the least a GEMM
    must read."""
    grouped_mm = torch._grouped_mm

    def rows_gemm(a: Tensor, b: Tensor, b_is_kn: bool) -> Tensor:
        columns = b.shape[2] if b_is_kn else b.shape[1]
        tile = tile_n if columns % tile_n == 0 and row_ctas == 1 else 128
        rows = tile_m if tile == 256 else 128
        return require_extension().grouped_gemm_rows(a, b, ends_E, b_is_kn, tile, row_ctas, rows)

    def weight_grad(a: Tensor, b: Tensor) -> Tensor:
        tile = tile_n if b.shape[1] % tile_n == 0 and wgrad_ctas == 1 else 128
        return require_extension().grouped_gemm_weight_grad(a, b, ends_E, tile, wgrad_ctas, wgrad_runs)

    def nbytes(*tensors: Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    return [
        (
            "fwd w1",
            lambda: rows_gemm(x_ND, w1_EFD, False),
            lambda: grouped_mm(x_ND, w1_EFD.transpose(-2, -1), offs=ends_E),
            nbytes(x_ND, w1_EFD),
        ),
        (
            "fwd w2",
            lambda: rows_gemm(h_NF, w2_EDF, False),
            lambda: grouped_mm(h_NF, w2_EDF.transpose(-2, -1), offs=ends_E),
            nbytes(h_NF, w2_EDF),
        ),
        (
            "dgrad w2",
            lambda: rows_gemm(x_ND, w2_EDF, True),
            lambda: grouped_mm(x_ND, w2_EDF, offs=ends_E),
            nbytes(x_ND, w2_EDF),
        ),
        (
            "dgrad w1",
            lambda: rows_gemm(h_NF, w1_EFD, True),
            lambda: grouped_mm(h_NF, w1_EFD, offs=ends_E),
            nbytes(h_NF, w1_EFD),
        ),
        (
            "wgrad w2",
            lambda: weight_grad(x_ND, h_NF),
            lambda: grouped_mm(x_ND.t(), h_NF, offs=ends_E),
            nbytes(x_ND, h_NF),
        ),
        (
            "wgrad w1",
            lambda: weight_grad(h_NF, x_ND),
            lambda: grouped_mm(h_NF.t(), x_ND, offs=ends_E),
            nbytes(h_NF, x_ND),
        ),
    ]


def run(
    d_model: int,
    d_hidden: int,
    num_experts: int,
    rows_per_expert: int,
    iters: int,
    tile_n: int,
    row_ctas: int,
    wgrad_ctas: int,
    even: bool,
    tile_m: int = 128,
    wgrad_runs: int = 1,
) -> None:
    num_rows = rows_per_expert * num_experts
    if even:
        ends_E = torch.arange(1, num_experts + 1, device="cuda", dtype=torch.int32) * rows_per_expert
    else:
        expert_of_row = torch.randint(0, num_experts, (num_rows,), device="cuda")
        ends_E = torch.bincount(expert_of_row, minlength=num_experts).cumsum(0).to(torch.int32)
    x_ND = torch.randn(num_rows, d_model, device="cuda", dtype=torch.bfloat16)
    h_NF = torch.randn(num_rows, d_hidden, device="cuda", dtype=torch.bfloat16)
    w1_EFD = torch.randn(num_experts, d_hidden, d_model, device="cuda", dtype=torch.bfloat16) / d_model**0.5
    w2_EDF = torch.randn(num_experts, d_model, d_hidden, device="cuda", dtype=torch.bfloat16) / d_hidden**0.5
    total_ours = total_torch = 0.0
    total_bytes = 0
    for name, ours, theirs, operand_bytes in gemms(
        x_ND, h_NF, w1_EFD, w2_EDF, ends_E, tile_n, row_ctas, wgrad_ctas, tile_m, wgrad_runs
    ):
        expected = theirs().float()
        error = ((ours().float() - expected).norm() / expected.norm()).item()
        ours_us, torch_us = 1e3 * time_ms(ours, iters), 1e3 * time_ms(theirs, iters)
        total_ours, total_torch = total_ours + ours_us, total_torch + torch_us
        moved = operand_bytes + expected.numel() * 2  # the inputs read, the bf16 output written
        total_bytes += moved
        print(
            f"  {name:9s} ours {ours_us:8.1f} us  torch {torch_us:8.1f} us  "
            f"torch/ours {torch_us / ours_us:5.2f}  ours {gb_per_s(moved, ours_us):6.0f} GB/s  rel. diff {error:.1e}"
        )
    print(
        f"  {'6 GEMMs':9s} ours {total_ours:8.1f} us  torch {total_torch:8.1f} us  "
        f"torch/ours {total_torch / total_ours:5.2f}  ours {gb_per_s(total_bytes, total_ours):6.0f} GB/s"
    )


def gb_per_s(nbytes: int, microseconds: float) -> float:
    """Bytes moved in ``microseconds`` as GB/s (10^9 bytes): against the H200's 4.8 TB/s, how close
    a memory-bound GEMM runs to the memory's speed."""
    return nbytes / microseconds / 1e3


def print_bandwidth() -> None:
    """GB/s of a copy (bytes read + written), a sum (read) and a fill (written) of 1 GiB of bf16."""
    a = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    nbytes = a.numel() * a.element_size()
    copy_us, read_us, write_us = (1e3 * time_ms(step, 20) for step in (lambda: b.copy_(a), a.sum, lambda: b.fill_(1)))
    print(
        f"memory: copy {gb_per_s(2 * nbytes, copy_us):.0f} GB/s, read {gb_per_s(nbytes, read_us):.0f} GB/s, "
        f"write {gb_per_s(nbytes, write_us):.0f} GB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="128,512,1536,4096", help="average rows per expert, comma-separated")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tile-n", type=int, default=128, choices=(128, 256), help="our kernel's tile width")
    parser.add_argument("--row-ctas", type=int, default=1, choices=(1, 2), help="CTAs per SM of our row kernel")
    parser.add_argument(
        "--wgrad-ctas", type=int, default=1, choices=(1, 2), help="CTAs per SM of our weight-gradient kernel"
    )
    parser.add_argument(
        "--tile-m", type=int, default=128, choices=(128, 192), help="rows per tile of our row kernel (192: tile-n 256)"
    )
    parser.add_argument(
        "--wgrad-runs", type=int, default=1, help="tiles per run of our weight-gradient kernel (>1: --wgrad-ctas 2)"
    )
    parser.add_argument("--even", action="store_true", help="exactly --rows rows for every expert")
    parser.add_argument("--bandwidth", action="store_true", help="first print the GPU's plain copy/read/write GB/s")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not require_extension().grouped_gemm_available():
        raise SystemExit(
            "needs a compute capability 9.0 GPU and the CUDA extension (python -m lightning_moe.ops build)"
        )
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.bandwidth:
        print_bandwidth()
    for d_model, d_hidden, num_experts in CONFIGS:
        for rows_per_expert in (int(r) for r in args.rows.split(",")):
            spread = "exactly" if args.even else "on average"
            print(f"D={d_model} F={d_hidden} E={num_experts}, {rows_per_expert} rows per expert {spread}:")
            run(
                d_model,
                d_hidden,
                num_experts,
                rows_per_expert,
                args.iters,
                args.tile_n,
                args.row_ctas,
                args.wgrad_ctas,
                args.even,
                args.tile_m,
                args.wgrad_runs,
            )


if __name__ == "__main__":
    main()

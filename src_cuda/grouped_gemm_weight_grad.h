// The weight gradient of the experts' grouped GEMMs on Hopper tensor cores (TMA, wgmma): for each
// expert, the sum over its rows of a^T b.
#pragma once

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// out[e] = a[rows of e]^T @ b[rows of e], zero for a group without rows; the rows of group e are
// [ends[e - 1], ends[e]) (ends[-1] = 0).
//
// Args:
//   a: (R, M) bfloat16, contiguous, M a multiple of 128.
//   b: (R, N) bfloat16, contiguous, N a multiple of 128.
//   ends: (E,) int32 cumulative row counts, non-decreasing, ends[E - 1] <= R.
//   tile_n: output columns per tile, 128 or 256 (N a multiple of 256).
//   ctas_per_sm: 1, or 2 (tile_n 128): two CTAs of one consumer warpgroup each per SM, so that one
//     CTA's stores run while the other multiplies.
//   run_tiles: 1, or with ctas_per_sm 2 the output tiles a CTA takes in a row that share an
//     expert's a slice: for experts of at most 192 rows that slice is then read once per run
//     instead of once per tile. The bits are the same either way.
//
// Returns:
//   (E, M, N) bfloat16, each element summed in float32 in a fixed order.
at::Tensor grouped_gemm_weight_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends,
                                    int64_t tile_n = 128, int64_t ctas_per_sm = 1, int64_t run_tiles = 1);

}  // namespace lightning_moe

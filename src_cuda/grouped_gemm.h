// The experts' grouped GEMMs (forward and input gradient) on Hopper tensor cores (wgmma), for the
// regime of many experts with few rows each, where reading the expert weights, not the
// arithmetic, sets the time: there they run faster than torch's grouped GEMM, which picks a
// 64-row tile for groups of 128 rows or fewer (benchmarks/RESULTS.md).
//
// The groups are given by ends (E,) int32 on the device: group e owns rows
// [ends[e - 1], ends[e]) (ends[-1] = 0), so no host synchronisation is needed.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// Whether the grouped GEMM kernels were compiled for this process's current CUDA device (compute
// capability 9.0, built with the sm_90a target).
bool grouped_gemm_available();

// out[r] = a[r] @ W_e for the rows r of each group e, where W_e = b[e]^T (b_is_kn false: b is
// (E, N, K), each expert's weight laid out like nn.Linear's) or W_e = b[e] (b_is_kn true: b is
// (E, K, N)).
//
// Args:
//   a: (R, K) bfloat16, contiguous, K a multiple of 64.
//   b: (E, N, K) or (E, K, N) bfloat16, contiguous, N a multiple of 128.
//   ends: (E,) int32 cumulative row counts, non-decreasing, ends[E - 1] <= R.
//   b_is_kn: the layout of b, above.
//   tile_n: output columns per tile, 128 or 256 (N a multiple of 256); 256 suits many rows per
//     group.
//   ctas_per_sm: 1, or 2 (tile_n 128): two CTAs of one consumer warpgroup each per SM, so that one
//     CTA's stores run while the other multiplies.
//   tile_m: output rows per tile, 128, or 192 (tile_n 256, ctas_per_sm 1: three consumer
//     warpgroups). A group of 129-192 rows then takes one tile across, not two that each stream
//     its weight tile through L2.
//
// Returns:
//   (R, N) bfloat16; rows at or past ends[E - 1] are left unwritten.
at::Tensor grouped_gemm_rows(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, bool b_is_kn,
                             int64_t tile_n = 128, int64_t ctas_per_sm = 1, int64_t tile_m = 128);

// For rows that are a permutation of the tokens (one assignment per token, R = T), the epilogues
// that write token rows directly, saving the row kernel that would follow. row_token (R,) int64:
// the token of each sorted row, a permutation of [0, R) (the sort's order); every row must lie in
// a group (ends[E - 1] == R), else token rows stay unwritten. ctas_per_sm must be 1.
//
// grouped_gemm_rows_to_tokens: b (E, K, N) (b_is_kn); out[row_token[r]] = a[r] @ b[e], (T, N): the
// input gradient of the first expert GEMM in token order (the permutation's backward).
at::Tensor grouped_gemm_rows_to_tokens(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends,
                                       const at::Tensor& row_token, int64_t tile_n = 128, int64_t ctas_per_sm = 1,
                                       int64_t tile_m = 128);

// grouped_gemm_rows_and_combine: b (E, N, K); returns (rows, combined): rows as grouped_gemm_rows
// gives them, and combined[t] = token_weight[t] * rows[r] for t = row_token[r], computed in float32
// (fmaf(weight, row, 0)) and rounded to bf16, the unpermute's bits for one assignment per token.
// token_weight: (T,) float32.
std::tuple<at::Tensor, at::Tensor> grouped_gemm_rows_and_combine(const at::Tensor& a, const at::Tensor& b,
                                                                 const at::Tensor& ends, const at::Tensor& row_token,
                                                                 const at::Tensor& token_weight, int64_t tile_n = 128,
                                                                 int64_t ctas_per_sm = 1, int64_t tile_m = 128);

}  // namespace lightning_moe

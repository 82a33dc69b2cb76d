// permute: gather one row per assignment into expert-sorted order, and its backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace lightning_moe {

// x_sorted[inverse[a]] = x[t] for every assignment a of token t.
//
// Args:
//   x: (T, D) float32, bfloat16 or float16 CUDA tensor, contiguous.
//   inverse: (N,) int64, the sorted row of each assignment (a permutation of [0, N)).
//   token_offsets: (T + 1,) int64; token t's assignments are [token_offsets[t], token_offsets[t + 1]),
//     with token_offsets[0] == 0 and token_offsets[T] == N.
//
// Returns:
//   x_sorted (N, D) in x's dtype. Each row of x is read once and written to all its assignments.
at::Tensor permute_forward(const at::Tensor& x, const at::Tensor& inverse, const at::Tensor& token_offsets);

// grad_x[t] = sum over t's assignments a of grad_sorted[inverse[a]], summed in float32 in
// assignment order (deterministic, no atomics) and returned in `x_dtype`.
at::Tensor permute_backward(const at::Tensor& grad_sorted, const at::Tensor& inverse,
                            const at::Tensor& token_offsets, at::ScalarType x_dtype);

}  // namespace lightning_moe

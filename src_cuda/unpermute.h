// unpermute: the weighted sum of each token's expert-sorted rows (the combine), and its backward.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace lightning_moe {

// out[t] = sum over t's assignments a of weights[a] * y_sorted[inverse[a]], summed in float32 in
// assignment order (deterministic, no atomics).
//
// Args:
//   y_sorted: (N, D) float32, bfloat16 or float16 CUDA tensor, contiguous, rows in sorted order.
//   inverse: (N,) int64, the sorted row of each assignment.
//   weights: (N,) float32 combine weight of each assignment.
//   token_offsets: (T + 1,) int64; token t's assignments are [token_offsets[t], token_offsets[t + 1]).
//   out_dtype: float32, bfloat16 or float16.
//
// Returns:
//   (T, D) in out_dtype; tokens without assignments get zeros.
at::Tensor unpermute_forward(const at::Tensor& y_sorted, const at::Tensor& inverse, const at::Tensor& weights,
                             const at::Tensor& token_offsets, at::ScalarType out_dtype);

// Gradients of unpermute_forward for grad_out (T, D):
//   grad_y[inverse[a]] = weights[a] * grad_out[t]   (N, D) in y_sorted's dtype,
//   grad_weights[a] = dot(grad_out[t], y_sorted[inverse[a]])   (N,) float32,
// for every assignment a of token t; each dot is a fixed-order block reduction (deterministic).
std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                      const at::Tensor& inverse, const at::Tensor& weights,
                                                      const at::Tensor& token_offsets);

}  // namespace lightning_moe

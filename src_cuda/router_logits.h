// router_logits: a router's float32 logits x @ w.T and their two gradients, without float32 copies.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace lightning_moe {

// The kernels tile the experts 64 at a time, so any E would run; above this many experts cuBLAS's
// GEMMs on a float32 copy of x are the better choice and the Python wrapper takes them.
constexpr int64_t kRouterLogitsMaxExperts = 256;

// logits[t, e] = sum over d of float(x[t, d]) * weight[e, d], accumulated in float32.
//
// x is read in its own dtype, each element once per 64 experts; with few experts (1 to
// kFewExpertsMax, D a multiple of 8 whose weight fits in shared memory) once, by the kernel of
// router_logits_few.cu, whose order of summation is also fixed. When the tokens alone do not give
// enough blocks to fill the GPU, D is cut into pieces whose partial sums are added in a fixed order
// by a second kernel, so the result is the same on every run.
//
// Args:
//   x: (T, D) float32, bfloat16 or float16 CUDA tensor, contiguous.
//   weight: (E, D) float32, contiguous, on x's device, 1 <= E <= kRouterLogitsMaxExperts.
//
// Returns:
//   (T, E) float32 logits.
at::Tensor router_logits_forward(const at::Tensor& x, const at::Tensor& weight);

// grad_x[t, d] = sum over e of grad_logits[t, e] * weight[e, d], accumulated in float32 and rounded
// once to `x_dtype`; with few experts by the kernel of router_logits_few.cu.
//
// Args:
//   grad_logits: (T, E) float32 CUDA tensor, contiguous.
//   weight: (E, D) float32, contiguous, on the same device.
//   x_dtype: float32, bfloat16 or float16, the dtype of the result.
//
// Returns:
//   (T, D) in x_dtype.
at::Tensor router_logits_grad_x(const at::Tensor& grad_logits, const at::Tensor& weight, at::ScalarType x_dtype);

// grad_weight[e, d] = sum over t of grad_logits[t, e] * float(x[t, d]), accumulated in float32.
//
// The tokens are cut into chunks; each block sums one chunk into its own slice of a
// (chunks, E, D) float32 buffer, and a second kernel adds the chunks in order: no atomics, the
// same result on every run.
//
// Args:
//   grad_logits: (T, E) float32 CUDA tensor, contiguous, 1 <= E <= kRouterLogitsMaxExperts.
//   x: (T, D) float32, bfloat16 or float16, contiguous, on the same device.
//
// Returns:
//   (E, D) float32.
at::Tensor router_logits_grad_weight(const at::Tensor& grad_logits, const at::Tensor& x);

}  // namespace lightning_moe

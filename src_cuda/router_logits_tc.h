// router_logits_tc: a router's float32 logits x @ w.T of bf16 tokens and their two gradients on bf16
// tensor cores, one launch per pass (grad_weight: two, the second adding the chunks of tokens).
//
// The float32 operand (the weight forward, the logit gradient backward) is split inside the kernels
// into bf16 parts, v = v0 + v1 + v2, each the leading 8 significand bits of what the previous parts
// leave (truncation, as lightning_moe.ops.router_logits.bf16_parts cuts them); each product of a bf16
// token and a bf16 part is exact in float32, and the tensor cores add them in float32. The order of
// summation depends on the shapes only, so every run gives the same result.
//
// Inputs the kernels take: bf16 x, a float32 or bf16 weight, a float32 logit gradient, all
// contiguous and 16-byte aligned on one CUDA device; E a multiple of kTensorCoreExpertMultiple in
// [kTensorCoreMinExperts, kTensorCoreMaxExperts]; D a positive multiple of kTensorCoreDimMultiple; any T >= 0.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace lightning_moe {

constexpr int64_t kTensorCoreMinExperts = 8;
constexpr int64_t kTensorCoreMaxExperts = 256;
// The kernels move experts in n8 / k8 slices of the mma tiles: E is a multiple of 8.
constexpr int64_t kTensorCoreExpertMultiple = 8;
// The tiles along D are 32 (forward) and 64 (both gradients) columns wide, with no tail handling.
constexpr int64_t kTensorCoreDimMultiple = 64;

// logits[t, e] = sum over d of x[t, d] * (w0 + w1 + w2)[e, d], float32 accumulation: the exact
// float32 product up to the tensor cores' float32 rounding.
//
// Args:
//   x: (T, D) bfloat16 CUDA tensor.
//   weight: (E, D) float32, or bfloat16 (a model cast whole to bf16): that is its own leading
//     part, w1 = w2 = 0, so only x . w0 is multiplied, in the pipelined kernel (64-expert blocks,
//     k tiles of 64, six stages), with the bits of the float32 kernels on the widened weight.
//   pipelined: for a float32 weight, where the kernel takes 32-expert blocks, copy their k tiles
//     through a cp.async pipeline of four stages rather than one register-staged tile ahead; the
//     same bits either way.
//
// Returns:
//   (T, E) float32 logits.
at::Tensor router_logits_tc_forward(const at::Tensor& x, const at::Tensor& weight, bool pipelined = true);

// grad_x = g0 w0 + g0 w1 + g1 w0 (g = grad_logits and w = weight split into bf16 parts): the terms
// above bf16 rounding of the result, accumulated in float32 and rounded once to bfloat16.
//
// Args:
//   grad_logits: (T, E) float32 CUDA tensor.
//   weight: (E, D) float32 or bfloat16, on the same device. A bf16 weight has w1 = 0: with
//     `persistent` the streamed kernel reads it as it is and leaves out g0 w1; elsewhere it is
//     widened first. The same bits as the float32 weight either way.
//   persistent: for up to 64 experts, blocks that keep part of an operand in shared memory across
//     many output tiles rather than one block per (token tile, column tile): a float32 weight's
//     64-column slice across token tiles; for a bf16 weight, a 64-token tile of the split logit
//     gradient across a run of 64-column chunks, with the weight's and the addend's chunks copied
//     through a cp.async pipeline. The same bits either way.
//   addend: optional (T, D) bfloat16 (another gradient of the same tokens) added to the result:
//     bf16(grad_x + addend), the bits of a bf16 addition of the two, in the persistent and
//     streamed kernels' epilogue (elsewhere by that addition).
//
// Returns:
//   (T, D) bfloat16.
at::Tensor router_logits_tc_grad_x(const at::Tensor& grad_logits, const at::Tensor& weight, bool persistent = true,
                                   const std::optional<at::Tensor>& addend = std::nullopt);

// grad_weight[e, d] = sum over t of (g0 + g1 + g2)[t, e] * x[t, d], float32 accumulation. The tokens
// are cut into chunks by shape alone; each chunk's sums go to its own slice of a float32 buffer and a
// second kernel adds the slices in chunk order (no atomics), rounding the sum to `dtype`.
//
// Args:
//   grad_logits: (T, E) float32 CUDA tensor.
//   x: (T, D) bfloat16, on the same device.
//   pipelined: copy the k tiles through a cp.async pipeline (three or four stages) rather than one
//     register-staged tile ahead; the same bits either way.
//   dtype: float32, bfloat16 or float16, the weight's: the float32 result rounded to nearest, the
//     bits of a cast of it, without a cast's pass.
//
// Returns:
//   (E, D) in `dtype`.
at::Tensor router_logits_tc_grad_weight(const at::Tensor& grad_logits, const at::Tensor& x, bool pipelined = true,
                                        at::ScalarType dtype = at::kFloat);

}  // namespace lightning_moe

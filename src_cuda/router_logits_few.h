// router_logits for routers of at most kFewExpertsMax experts: forward, grad_x and grad_weight as
// single passes over the tokens (router_logits_few.cu). Called by router_logits_forward,
// router_logits_grad_x and router_logits_grad_weight, which check their arguments first.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace lightning_moe {

constexpr int64_t kFewExpertsMax = 8;

// Whether the few-experts kernels take E experts of D columns with these row and weight pointers:
// 1 <= E <= kFewExpertsMax, D a positive multiple of 8 whose padded weight fits in shared memory
// (D <= 4096 for 5 to 8 experts, 8192 for 3 or 4, 16384 for 2, 32768 for 1), rows and weight 16-byte
// aligned.
bool few_experts_kernels_take(int64_t num_experts, int64_t dim, const void* rows, const void* weight);

// logits (T, E) float32 = x (T, D) . weight (E, D)^T, into `logits`.
void few_experts_logits_forward(const at::Tensor& x, const at::Tensor& weight, at::Tensor& logits);

// grad_x (T, D) in its dtype = grad_logits (T, E) . weight (E, D), into `grad_x`.
void few_experts_logits_grad_x(const at::Tensor& grad_logits, const at::Tensor& weight, at::Tensor& grad_x);

// grad_weight (E, D) float32 = grad_logits (T, E)^T . x (T, D), into `grad_weight`: the tokens cut
// into pieces by shape alone, each piece's sums in registers, the pieces added in order.
void few_experts_logits_grad_weight(const at::Tensor& grad_logits, const at::Tensor& x, at::Tensor& grad_weight);

}  // namespace lightning_moe

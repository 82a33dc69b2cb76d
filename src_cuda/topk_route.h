// topk_route: a token-choice router's softmax or sigmoid top-k, its losses' sums, and its backward.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// The kernels hold one token's E logits in registers across a warp, at most 16 per lane.
constexpr int64_t kTopKRouteMaxExperts = 512;

// Scores each token's experts and picks the top k, one warp per token, with no host sync.
//
// scoring "softmax": p = softmax(logits); the experts of the k largest logits (equivalently the k
// largest p) are picked; weights = p / sum of the picked p when normalize, else p; priorities = p;
// prob_sum sums p. scoring "sigmoid": s = sigmoid(logits); the k largest s + bias are picked;
// weights = s / max(sum of the picked s, FLT_MIN) when normalize, else s; priorities = s + bias;
// prob_sum sums s / sum_e(s). Ties go to the lower expert index; the picks are in descending order.
//
// Args:
//   logits: (T, E) float32 CUDA tensor, contiguous, 1 <= E <= kTopKRouteMaxExperts.
//   top_k: K, 1 <= K <= E.
//   scoring: "softmax" or "sigmoid".
//   normalize: renormalise the picked weights of each token to sum to 1.
//   bias: optional (E,) float32 selection bias (sigmoid only; ignored by softmax).
//
// Returns:
//   expert_ids (T, K) int64, weights (T, K) float32, priorities (T, K) float32,
//   tokens_per_expert (E,) int64, prob_sum (E,) float32 (the sum over tokens),
//   lse_sq_sum () float32, the sum over tokens of logsumexp(logits)^2,
//   balance_loss () float32, the Switch balance loss E / (T K T) * sum_e tokens_per_expert[e] prob_sum[e],
//   z_loss () float32, lse_sq_sum / T; both losses are 0 for T = 0.
//   The sums are per-block partials reduced in a fixed order: the same on every run.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
topk_route_forward(
    const at::Tensor& logits, int64_t top_k, const std::string& scoring, bool normalize,
    const std::optional<at::Tensor>& bias);

// The gradient of the logits from those of weights (T, K), prob_sum (E,) and lse_sq_sum (), given
// the forward's logits and expert_ids; one warp per token, no atomics. Returns (T, E) float32. An
// absent grad_prob_sum or grad_lse_sq_sum counts as zeros (the same bits as passing zeros).
at::Tensor topk_route_backward(const at::Tensor& grad_weights, const std::optional<at::Tensor>& grad_prob_sum,
                               const std::optional<at::Tensor>& grad_lse_sq_sum, const at::Tensor& logits,
                               const at::Tensor& expert_ids, const std::string& scoring, bool normalize);

}  // namespace lightning_moe

// Helpers shared by the topk_route kernels (topk_route.cu forward, topk_route_backward.cu): one
// token's row of E logits held across a warp, lane l holding experts l, l + 32, ... (V per lane,
// so loads coalesce), its warp-wide reductions, and the launch-side dispatch and checks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"
#include "topk_route.h"

namespace lightning_moe {
namespace topk_route_rows {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kBlockThreads = kWarp * kWarpsPerBlock;
constexpr unsigned kFullMask = 0xffffffffu;

enum class Scoring { kSoftmax, kSigmoid };

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  // A butterfly: every lane ends with the same, bitwise identical total.
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// As torch.sigmoid computes it for float32 on CUDA, so that the sigmoid picks match bit for bit.
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ bool holds(int i, int lane, int num_experts) { return i * kWarp + lane < num_experts; }

template <int V>
__device__ __forceinline__ void load_row(const float* row, int num_experts, int lane, float (&x)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) x[i] = holds(i, lane, num_experts) ? row[i * kWarp + lane] : -INFINITY;
}

// exp(x - shift) per element and logsumexp of the row, shifted as torch.logsumexp shifts: by the
// max, or by 0 when the max is infinite. Elements past E are -inf and contribute 0.
template <int V>
__device__ __forceinline__ float exp_row(const float (&x)[V], float (&ex)[V], float& total) {
  float row_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < V; ++i) row_max = fmaxf(row_max, x[i]);
  row_max = warp_max(row_max);
  const float shift = isinf(row_max) ? 0.f : row_max;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    ex[i] = expf(x[i] - shift);
    sum += ex[i];
  }
  total = warp_sum(sum);
  return logf(total) + shift;
}

inline Scoring parse_scoring(const std::string& scoring) {
  if (scoring == "softmax") return Scoring::kSoftmax;
  TORCH_CHECK(scoring == "sigmoid", "scoring must be \"softmax\" or \"sigmoid\", got \"", scoring, "\"");
  return Scoring::kSigmoid;
}

// Calls fn(std::integral_constant<int, V>{}, std::integral_constant<Scoring, S>{}) with V the
// logits per lane (a power of two, at least ceil(E / 32)) and S the scoring.
template <typename Fn>
void dispatch_route(int64_t num_experts, Scoring scoring, Fn&& fn) {
  auto with_width = [&](auto width) {
    if (scoring == Scoring::kSoftmax) {
      fn(width, std::integral_constant<Scoring, Scoring::kSoftmax>{});
    } else {
      fn(width, std::integral_constant<Scoring, Scoring::kSigmoid>{});
    }
  };
  const int64_t per_lane = (num_experts + kWarp - 1) / kWarp;
  if (per_lane <= 1) {
    with_width(std::integral_constant<int, 1>{});
  } else if (per_lane <= 2) {
    with_width(std::integral_constant<int, 2>{});
  } else if (per_lane <= 4) {
    with_width(std::integral_constant<int, 4>{});
  } else if (per_lane <= 8) {
    with_width(std::integral_constant<int, 8>{});
  } else {
    with_width(std::integral_constant<int, 16>{});
  }
}

inline void check_logits(const at::Tensor& logits) {
  check_cuda_contiguous(logits, "logits");
  check_dtype(logits, at::kFloat, "logits");
  check_dim(logits, 2, "logits");
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1 && num_experts <= kTopKRouteMaxExperts, "logits must have between 1 and ",
              kTopKRouteMaxExperts, " experts (columns), got ", num_experts);
  TORCH_CHECK(logits.size(0) < (int64_t{1} << 31), "at most 2^31 - 1 tokens are supported, got ", logits.size(0));
}

inline int64_t blocks_for(int64_t num_tokens, int64_t max_blocks) {
  return std::min((num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock, max_blocks);
}

}  // namespace topk_route_rows
}  // namespace lightning_moe

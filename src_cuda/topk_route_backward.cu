// topk_route backward: the gradient of the logits in one launch, one warp per token, no atomics.
//
// Each warp recomputes its token's scores from the logits (see topk_route_rows.cuh), finds each
// expert's slot among the token's picks from expert_ids through a per-warp table in shared memory,
// and writes the token's row of grad_logits from the closed forms below.

#include "topk_route.h"

#include <cfloat>
#include <utility>

#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "topk_route_rows.cuh"

namespace lightning_moe {
namespace {

using namespace topk_route_rows;

constexpr int64_t kMaxBackwardBlocks = int64_t{1} << 16;

// The slot of each of the lane's experts among token t's picks (-1 if not picked), through a
// per-warp table in shared memory indexed by expert.
template <int V>
__device__ __forceinline__ void find_picks(const int64_t* ids_row, int num_experts, int top_k, int lane,
                                           int32_t* slot_of, int (&rank)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (holds(i, lane, num_experts)) slot_of[i * kWarp + lane] = -1;
  }
  __syncwarp();
  for (int pick = lane; pick < top_k; pick += kWarp) {
    const int64_t expert = ids_row[pick];
    CUDA_KERNEL_ASSERT(expert >= 0 && expert < num_experts && "expert id out of range");
    slot_of[expert] = pick;
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < V; ++i) rank[i] = holds(i, lane, num_experts) ? slot_of[i * kWarp + lane] : -1;
}

struct Upstream {
  const float* weights;     // (T, K)
  const float* prob_sum;    // (E,), or null for zeros
  const float* lse_sq_sum;  // (), or null for zero
};

// d/dlogits of sum_k g_k w_k + sum_e G_e p_e + h * lse^2 for one token, softmax scoring:
//   p_e (2 h lse + G_e - <p, G>) + [e picked] term, where the picked term is
//   w_e (g_e - <w, g>) when normalized (the weights are a softmax over the picked logits), and
//   p_e g_e - p_e <p_picked, g> when not.
template <int V>
__device__ __forceinline__ void softmax_grad_row(const float (&x)[V], const int (&rank)[V], const float (&g)[V],
                                                 const float (&grad_mass)[V], float grad_lse_sq, bool normalize,
                                                 float (&grad)[V]) {
  float p[V];
  float total;
  const float lse = exp_row<V>(x, p, total);
  float p_dot_mass = 0.f, picked = 0.f, p_dot_g = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    p[i] /= total;
    p_dot_mass += p[i] * grad_mass[i];
    picked += rank[i] >= 0 ? p[i] : 0.f;
    p_dot_g += rank[i] >= 0 ? p[i] * g[i] : 0.f;
  }
  p_dot_mass = warp_sum(p_dot_mass);
  picked = warp_sum(picked);
  p_dot_g = warp_sum(p_dot_g);
  const float w_dot_g = p_dot_g / picked;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    grad[i] = p[i] * (2.f * grad_lse_sq * lse + grad_mass[i] - p_dot_mass);
    if (normalize) {
      grad[i] += rank[i] >= 0 ? p[i] / picked * (g[i] - w_dot_g) : 0.f;
    } else {
      grad[i] += (rank[i] >= 0 ? p[i] * g[i] : 0.f) - p[i] * p_dot_g;
    }
  }
}

// The same for sigmoid scoring, through s = sigmoid(x) and ds/dx = s (1 - s):
//   dL/ds_e = (G_e - <q, G>) / sum(s) with q = s / sum(s), plus for picked e
//   (g_e - <w, g>) / D with D = max(sum of picked s, FLT_MIN) when normalized (<w, g> drops out
//   where the clamp holds), or g_e when not; the z-loss term 2 h lse softmax(x)_e is added.
template <int V>
__device__ __forceinline__ void sigmoid_grad_row(const float (&x)[V], const int (&rank)[V], const float (&g)[V],
                                                 const float (&grad_mass)[V], float grad_lse_sq, bool normalize,
                                                 int num_experts, int lane, float (&grad)[V]) {
  float q[V];
  float total;
  const float lse = exp_row<V>(x, q, total);
  float s[V];
  float s_sum = 0.f, picked = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    s[i] = holds(i, lane, num_experts) ? sigmoid(x[i]) : 0.f;
    s_sum += s[i];
    picked += rank[i] >= 0 ? s[i] : 0.f;
  }
  s_sum = warp_sum(s_sum);
  picked = warp_sum(picked);
  const float denominator = fmaxf(picked, FLT_MIN);
  float mass_dot_grad = 0.f, w_dot_g = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    mass_dot_grad += s[i] / s_sum * grad_mass[i];
    w_dot_g += rank[i] >= 0 ? s[i] / denominator * g[i] : 0.f;
  }
  mass_dot_grad = warp_sum(mass_dot_grad);
  w_dot_g = picked >= FLT_MIN ? warp_sum(w_dot_g) : 0.f;  // picked is the same in every lane
#pragma unroll
  for (int i = 0; i < V; ++i) {
    float grad_s = (grad_mass[i] - mass_dot_grad) / s_sum;
    if (rank[i] >= 0) grad_s += normalize ? (g[i] - w_dot_g) / denominator : g[i];
    grad[i] = grad_s * s[i] * (1.f - s[i]) + 2.f * grad_lse_sq * lse * (q[i] / total);
  }
}

template <int V, Scoring kScoring>
__global__ void __launch_bounds__(kBlockThreads)
    route_rows_backward_kernel(Upstream upstream, const float* __restrict__ logits,
                               const int64_t* __restrict__ expert_ids, int64_t num_tokens, int num_experts,
                               int top_k, bool normalize, float* __restrict__ grad_logits) {
  extern __shared__ int32_t slot_table[];  // [warps][E]
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  int32_t* slot_of = slot_table + warp * num_experts;
  float grad_mass[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    grad_mass[i] = upstream.prob_sum != nullptr && holds(i, lane, num_experts) ? upstream.prob_sum[i * kWarp + lane] : 0.f;
  }
  const float grad_lse_sq = upstream.lse_sq_sum != nullptr ? *upstream.lse_sq_sum : 0.f;
  for (int64_t t = blockIdx.x * kWarpsPerBlock + warp; t < num_tokens; t += gridDim.x * kWarpsPerBlock) {
    float x[V];
    load_row<V>(logits + t * num_experts, num_experts, lane, x);
    int rank[V];
    find_picks<V>(expert_ids + t * top_k, num_experts, top_k, lane, slot_of, rank);
    float g[V];
#pragma unroll
    for (int i = 0; i < V; ++i) g[i] = rank[i] >= 0 ? upstream.weights[t * top_k + rank[i]] : 0.f;
    float grad[V];
    if (kScoring == Scoring::kSoftmax) {
      softmax_grad_row<V>(x, rank, g, grad_mass, grad_lse_sq, normalize, grad);
    } else {
      sigmoid_grad_row<V>(x, rank, g, grad_mass, grad_lse_sq, normalize, num_experts, lane, grad);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (holds(i, lane, num_experts)) grad_logits[t * num_experts + i * kWarp + lane] = grad[i];
    }
  }
}

}  // namespace

at::Tensor topk_route_backward(const at::Tensor& grad_weights, const std::optional<at::Tensor>& grad_prob_sum,
                               const std::optional<at::Tensor>& grad_lse_sq_sum, const at::Tensor& logits,
                               const at::Tensor& expert_ids, const std::string& scoring, bool normalize) {
  check_logits(logits);
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  check_cuda_contiguous(expert_ids, "expert_ids");
  check_same_device(expert_ids, logits, "expert_ids");
  check_dtype(expert_ids, at::kLong, "expert_ids");
  check_dim(expert_ids, 2, "expert_ids");
  const int64_t top_k = expert_ids.size(1);
  TORCH_CHECK(expert_ids.size(0) == num_tokens && top_k >= 1 && top_k <= num_experts,
              "expert_ids must have shape (T, K) with T = ", text(num_tokens), " and 1 <= K <= E = ",
              text(num_experts), ", got ", text(expert_ids.sizes()));
  const std::pair<const at::Tensor*, const char*> upstream_grads[] = {
      {&grad_weights, "grad_weights"},
      {grad_prob_sum ? &*grad_prob_sum : nullptr, "grad_prob_sum"},
      {grad_lse_sq_sum ? &*grad_lse_sq_sum : nullptr, "grad_lse_sq_sum"}};
  for (const auto& [grad, name] : upstream_grads) {
    if (grad == nullptr) continue;
    check_cuda_contiguous(*grad, name);
    check_same_device(*grad, logits, name);
    check_dtype(*grad, at::kFloat, name);
  }
  TORCH_CHECK(grad_weights.sizes() == expert_ids.sizes(), "grad_weights must have shape ", text(expert_ids.sizes()),
              ", got ", text(grad_weights.sizes()));
  TORCH_CHECK(!grad_prob_sum || (grad_prob_sum->dim() == 1 && grad_prob_sum->size(0) == num_experts),
              "grad_prob_sum must have shape (", text(num_experts), ",), got ",
              text(grad_prob_sum ? grad_prob_sum->sizes() : at::IntArrayRef{}));
  TORCH_CHECK(!grad_lse_sq_sum || grad_lse_sq_sum->numel() == 1, "grad_lse_sq_sum must have one element, got ",
              text(grad_lse_sq_sum ? grad_lse_sq_sum->sizes() : at::IntArrayRef{}));
  const Scoring scoring_kind = parse_scoring(scoring);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad_logits = at::empty_like(logits);
  if (num_tokens == 0) return grad_logits;
  const Upstream upstream{grad_weights.data_ptr<float>(), grad_prob_sum ? grad_prob_sum->data_ptr<float>() : nullptr,
                          grad_lse_sq_sum ? grad_lse_sq_sum->data_ptr<float>() : nullptr};
  const int64_t blocks = blocks_for(num_tokens, kMaxBackwardBlocks);
  const size_t shared_bytes = sizeof(int32_t) * kWarpsPerBlock * num_experts;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_route(num_experts, scoring_kind, [&](auto width, auto kind) {
    route_rows_backward_kernel<decltype(width)::value, decltype(kind)::value>
        <<<static_cast<unsigned>(blocks), kBlockThreads, shared_bytes, stream>>>(
            upstream, logits.data_ptr<float>(), expert_ids.data_ptr<int64_t>(), num_tokens,
            static_cast<int>(num_experts), static_cast<int>(top_k), normalize, grad_logits.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_logits;
}

}  // namespace lightning_moe

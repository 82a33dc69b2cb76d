// topk_route forward: a token-choice router's picks, loss sums and losses in three launches, no host sync.
//
//   1. route_rows: one warp per token (see topk_route_rows.cuh). The warp computes logsumexp and
//      the scores, picks the k largest keys one at a time with a warp-wide argmax (largest key,
//      then lowest expert), and writes the picks. Each lane adds its experts' probability mass and
//      pick counts to its warp's row in shared memory (a lane owns its experts: no atomics); at the
//      end each block sums its warps in warp order into one column of a (E + 1, blocks) partials
//      buffer (the last row holds lse^2).
//   2. reduce_partials: one block per row of the partials, a fixed-order tree sum.
//   3. route_losses: one block, the balance loss and the z-loss from those sums.
//   The number of blocks depends on T only, so every sum is made in the same order on every run
//   and every GPU.
//
// Selection keys: softmax ranks by the logits, which order p exactly as p does but without the
// ties that rounding p creates; sigmoid ranks by s + bias, with s computed as torch.sigmoid does
// on CUDA, so the picks match the reference bit for bit.

#include "topk_route.h"

#include <cfloat>
#include <climits>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "topk_route_rows.cuh"

namespace lightning_moe {
namespace {

using namespace topk_route_rows;

constexpr int kReduceThreads = 128;
constexpr int64_t kMaxForwardBlocks = 1024;  // columns of the partials buffer
constexpr unsigned kNoExpert = UINT_MAX;

// An unsigned key with the order of the floats as torch.sort sees them: NaN above +inf, -0 == +0.
__device__ __forceinline__ uint32_t order_key(float value) {
  if (isnan(value)) return UINT_MAX;
  const uint32_t bits = __float_as_uint(value == 0.f ? 0.f : value);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The expert of the largest key over the warp, the lowest expert among equal keys.
__device__ __forceinline__ unsigned warp_argmax(uint32_t key, unsigned expert) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t best = __reduce_max_sync(kFullMask, key);
  return __reduce_min_sync(kFullMask, key == best ? expert : kNoExpert);
#else
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const uint32_t other_key = __shfl_xor_sync(kFullMask, key, offset);
    const unsigned other_expert = __shfl_xor_sync(kFullMask, expert, offset);
    if (other_key > key || (other_key == key && other_expert < expert)) {
      key = other_key;
      expert = other_expert;
    }
  }
  return expert;
#endif
}

// One token's row, scored: what the weights are made of, what ranks the picks, and its terms of
// the sums.
template <int V>
struct ScoredRow {
  float score[V];          // p (softmax) or s (sigmoid)
  uint32_t key[V];         // order key of the logit (softmax) or of s + bias (sigmoid)
  float mass_denominator;  // prob_sum's term is score / this: 1 (softmax) or sum_e(s) (sigmoid)
  float lse;
};

template <int V, Scoring kScoring>
__device__ __forceinline__ void score_row(const float (&x)[V], const float* bias, int num_experts, int lane,
                                          ScoredRow<V>& row) {
  float ex[V];
  float total;
  row.lse = exp_row<V>(x, ex, total);
  float score_sum = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (kScoring == Scoring::kSoftmax) {
      row.score[i] = ex[i] / total;
      row.key[i] = order_key(x[i]);
    } else {
      const bool valid = holds(i, lane, num_experts);
      row.score[i] = valid ? sigmoid(x[i]) : 0.f;
      row.key[i] = order_key(row.score[i] + (bias != nullptr && valid ? bias[i * kWarp + lane] : 0.f));
      score_sum += row.score[i];
    }
  }
  row.mass_denominator = kScoring == Scoring::kSoftmax ? 1.f : warp_sum(score_sum);
}

// rank[i]: where element i comes among the k picks (largest key first, ties to the lower expert),
// or -1 when it is not picked.
template <int V>
__device__ __forceinline__ void select_top_k(const uint32_t (&key)[V], int num_experts, int top_k, int lane,
                                             int (&rank)[V]) {
  uint32_t available = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    rank[i] = -1;
    if (holds(i, lane, num_experts)) available |= 1u << i;
  }
  for (int pick = 0; pick < top_k; ++pick) {
    uint32_t best_key = 0;
    unsigned best_expert = kNoExpert;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (((available >> i) & 1u) && (best_expert == kNoExpert || key[i] > best_key)) {
        best_key = key[i];
        best_expert = i * kWarp + lane;
      }
    }
    const unsigned winner = warp_argmax(best_key, best_expert);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (static_cast<unsigned>(i * kWarp + lane) == winner) {
        available &= ~(1u << i);
        rank[i] = pick;
      }
    }
  }
}

struct Picks {
  int64_t* expert_ids;
  float* weights;
  float* priorities;
};

template <int V, Scoring kScoring>
__device__ __forceinline__ void write_picks(const ScoredRow<V>& row, const int (&rank)[V], const float* bias,
                                            bool normalize, int64_t token, int top_k, int lane, Picks out) {
  float picked = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) picked += rank[i] >= 0 ? row.score[i] : 0.f;
  picked = warp_sum(picked);
  // Sigmoid clamps the sum so that a token whose picked scores all underflow gets zero weights.
  const float denominator = kScoring == Scoring::kSigmoid ? fmaxf(picked, FLT_MIN) : picked;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (rank[i] < 0) continue;
    const int expert = i * kWarp + lane;
    const int64_t slot = token * top_k + rank[i];
    out.expert_ids[slot] = expert;
    out.weights[slot] = normalize ? row.score[i] / denominator : row.score[i];
    const float biased = row.score[i] + (bias != nullptr ? bias[expert] : 0.f);
    out.priorities[slot] = kScoring == Scoring::kSoftmax ? row.score[i] : biased;
  }
}

// Sums this block's warps in warp order into column blockIdx.x of the partials: row e < E the
// probability mass and picks of expert e, row E the lse^2 of the block's tokens.
__device__ void store_block_partials(const float* warp_mass, const int32_t* warp_counts, const float* warp_lse_sq,
                                     int num_experts, float* partial_sums, int32_t* partial_counts) {
  const int64_t columns = gridDim.x;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    float mass = 0.f;
    int32_t count = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      mass += warp_mass[w * num_experts + e];
      count += warp_counts[w * num_experts + e];
    }
    partial_sums[e * columns + blockIdx.x] = mass;
    partial_counts[e * columns + blockIdx.x] = count;
  }
  if (threadIdx.x == 0) {
    float lse_sq = 0.f;
    for (int w = 0; w < kWarpsPerBlock; ++w) lse_sq += warp_lse_sq[w];
    partial_sums[num_experts * columns + blockIdx.x] = lse_sq;
  }
}

template <int V, Scoring kScoring>
__global__ void __launch_bounds__(kBlockThreads)
    route_rows_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int64_t num_tokens,
                      int num_experts, int top_k, bool normalize, Picks out, float* __restrict__ partial_sums,
                      int32_t* __restrict__ partial_counts) {
  extern __shared__ float shared[];  // mass [warps][E], counts [warps][E], lse^2 [warps]
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  float* mass = shared + warp * num_experts;
  int32_t* counts = reinterpret_cast<int32_t*>(shared + kWarpsPerBlock * num_experts) + warp * num_experts;
  float* warp_lse_sq = shared + 2 * kWarpsPerBlock * num_experts;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (!holds(i, lane, num_experts)) continue;
    mass[i * kWarp + lane] = 0.f;
    counts[i * kWarp + lane] = 0;
  }
  float lse_sq = 0.f;
  for (int64_t t = blockIdx.x * kWarpsPerBlock + warp; t < num_tokens; t += gridDim.x * kWarpsPerBlock) {
    float x[V];
    load_row<V>(logits + t * num_experts, num_experts, lane, x);
    ScoredRow<V> row;
    score_row<V, kScoring>(x, bias, num_experts, lane, row);
    int rank[V];
    select_top_k<V>(row.key, num_experts, top_k, lane, rank);
    write_picks<V, kScoring>(row, rank, bias, normalize, t, top_k, lane, out);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (!holds(i, lane, num_experts)) continue;
      mass[i * kWarp + lane] += row.score[i] / row.mass_denominator;
      counts[i * kWarp + lane] += rank[i] >= 0 ? 1 : 0;
    }
    lse_sq += row.lse * row.lse;
  }
  if (lane == 0) warp_lse_sq[warp] = lse_sq;
  __syncthreads();
  store_block_partials(shared, reinterpret_cast<int32_t*>(shared + kWarpsPerBlock * num_experts), warp_lse_sq,
                       num_experts, partial_sums, partial_counts);
}

// The block's total in thread 0, summed in a fixed order: lanes by butterfly, then warps in order.
template <typename T>
__device__ T block_sum(T value, T* warp_totals) {
  value = warp_sum(value);
  if (threadIdx.x % kWarp == 0) warp_totals[threadIdx.x / kWarp] = value;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kReduceThreads / kWarp; ++w) total += warp_totals[w];
  }
  return total;
}

// One block per row of the (E + 1, columns) partials: rows e < E give prob_sum[e] and
// tokens_per_expert[e], row E gives lse_sq_sum. With no columns (T == 0) every output is 0.
__global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_kernel(const float* __restrict__ partial_sums, const int32_t* __restrict__ partial_counts,
                           int64_t columns, int num_experts, float* __restrict__ prob_sum,
                           int64_t* __restrict__ tokens_per_expert, float* __restrict__ lse_sq_sum) {
  __shared__ float sum_totals[kReduceThreads / kWarp];
  __shared__ long long count_totals[kReduceThreads / kWarp];
  const int row = blockIdx.x;
  float sum = 0.f;
  long long count = 0;
  for (int64_t c = threadIdx.x; c < columns; c += blockDim.x) {
    sum += partial_sums[row * columns + c];
    if (row < num_experts) count += partial_counts[row * columns + c];
  }
  sum = block_sum(sum, sum_totals);
  count = block_sum(count, count_totals);
  if (threadIdx.x != 0) return;
  if (row < num_experts) {
    prob_sum[row] = sum;
    tokens_per_expert[row] = count;
  } else {
    *lse_sq_sum = sum;
  }
}

// The selection bias for sigmoid scoring, checked; nullptr when absent or for softmax.
const float* bias_pointer(const std::optional<at::Tensor>& bias, const at::Tensor& logits, Scoring scoring) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_cuda_contiguous(*bias, "bias");
  check_same_device(*bias, logits, "bias");
  check_dtype(*bias, at::kFloat, "bias");
  check_dim(*bias, 1, "bias");
  TORCH_CHECK(bias->size(0) == logits.size(1), "bias must have E = ", text(logits.size(1)), " entries, got ",
              text(bias->size(0)));
  return scoring == Scoring::kSigmoid ? bias->data_ptr<float>() : nullptr;
}

// One block: the Switch balance loss balance_scale * sum_e tokens_per_expert[e] * prob_sum[e], the
// terms summed in a fixed order, and the z-loss lse_sq_sum / z_divisor (0 for no tokens).
__global__ void __launch_bounds__(kReduceThreads)
    route_losses_kernel(const float* __restrict__ prob_sum, const int64_t* __restrict__ tokens_per_expert,
                        const float* __restrict__ lse_sq_sum, int num_experts, float balance_scale,
                        float z_divisor, float* __restrict__ balance_loss, float* __restrict__ z_loss) {
  __shared__ float warp_totals[kReduceThreads / kWarp];
  float sum = 0.f;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    sum = fmaf(static_cast<float>(tokens_per_expert[e]), prob_sum[e], sum);
  }
  sum = block_sum(sum, warp_totals);
  if (threadIdx.x != 0) return;
  *balance_loss = sum * balance_scale;
  *z_loss = z_divisor > 0.f ? *lse_sq_sum / z_divisor : 0.f;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
topk_route_forward(
    const at::Tensor& logits, int64_t top_k, const std::string& scoring, bool normalize,
    const std::optional<at::Tensor>& bias) {
  check_logits(logits);
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "top_k must be between 1 and E = ", text(num_experts), ", got ",
              text(top_k));
  const Scoring scoring_kind = parse_scoring(scoring);
  const float* bias_ptr = bias_pointer(bias, logits, scoring_kind);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto float_options = logits.options();
  const auto index_options = logits.options().dtype(at::kLong);
  at::Tensor expert_ids = at::empty({num_tokens, top_k}, index_options);
  at::Tensor weights = at::empty({num_tokens, top_k}, float_options);
  at::Tensor priorities = at::empty({num_tokens, top_k}, float_options);
  at::Tensor tokens_per_expert = at::empty({num_experts}, index_options);
  at::Tensor prob_sum = at::empty({num_experts}, float_options);
  at::Tensor lse_sq_sum = at::empty({}, float_options);
  const int64_t columns = blocks_for(num_tokens, kMaxForwardBlocks);
  at::Tensor partial_sums = at::empty({(num_experts + 1) * columns}, float_options);
  at::Tensor partial_counts = at::empty({num_experts * columns}, float_options.dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int experts = static_cast<int>(num_experts);
  const int k = static_cast<int>(top_k);
  if (num_tokens > 0) {
    const Picks out{expert_ids.data_ptr<int64_t>(), weights.data_ptr<float>(), priorities.data_ptr<float>()};
    const size_t shared_bytes = sizeof(float) * (2 * kWarpsPerBlock * num_experts + kWarpsPerBlock);
    dispatch_route(num_experts, scoring_kind, [&](auto width, auto kind) {
      route_rows_kernel<decltype(width)::value, decltype(kind)::value>
          <<<static_cast<unsigned>(columns), kBlockThreads, shared_bytes, stream>>>(
              logits.data_ptr<float>(), bias_ptr, num_tokens, experts, k, normalize, out,
              partial_sums.data_ptr<float>(), partial_counts.data_ptr<int32_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  reduce_partials_kernel<<<experts + 1, kReduceThreads, 0, stream>>>(
      partial_sums.data_ptr<float>(), partial_counts.data_ptr<int32_t>(), columns, experts,
      prob_sum.data_ptr<float>(), tokens_per_expert.data_ptr<int64_t>(), lse_sq_sum.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // E / (T K T): the mean over experts of (fraction of assignments) x (mean probability), times E^2.
  const double tokens = static_cast<double>(num_tokens);
  const double assignments = tokens * static_cast<double>(top_k);
  const float balance_scale =
      num_tokens > 0 ? static_cast<float>(static_cast<double>(num_experts) / (assignments * tokens)) : 0.f;
  at::Tensor balance_loss = at::empty({}, float_options);
  at::Tensor z_loss = at::empty({}, float_options);
  route_losses_kernel<<<1, kReduceThreads, 0, stream>>>(
      prob_sum.data_ptr<float>(), tokens_per_expert.data_ptr<int64_t>(), lse_sq_sum.data_ptr<float>(), experts,
      balance_scale, static_cast<float>(num_tokens), balance_loss.data_ptr<float>(), z_loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {expert_ids, weights, priorities, tokens_per_expert, prob_sum, lse_sq_sum, balance_loss, z_loss};
}

}  // namespace lightning_moe

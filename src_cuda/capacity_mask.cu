// Expert capacity: each expert keeps its `capacity` assignments of highest priority, the earlier
// assignment winning a tie.
//
// The assignments are first sorted by expert (sort_by_expert, stable: each expert's segment keeps
// the original order), and an inclusive scan of the counts gives each segment's end. Then one
// block per expert:
//
//   - a segment that fits in the capacity is kept whole; a zero capacity keeps nothing;
//   - otherwise a radix select finds the threshold, the capacity-th largest priority: four passes
//     over the segment, each counting one 8-bit digit (most significant first) of the priorities'
//     order-preserving uint32 keys in a shared-memory histogram, among the keys that match the
//     digits already chosen;
//   - a last pass keeps every key above the threshold and, of the keys equal to it, the first ones
//     in segment order (a block-wide scan ranks them), as many as the capacity has room for.
//
// Only integer shared-memory atomics, whose counts do not depend on their order, so the mask is
// the same on every run. A full sort by priority (torch.sort) would make several passes over all
// N keys; the select touches each segment five times and never reorders it.

#include "capacity_mask.h"

#include <tuple>

#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "block_scan.cuh"
#include "checks.h"
#include "sort_by_expert.h"

namespace lightning_moe {
namespace {

constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kThreads = kBins;  // one thread per histogram bin when choosing a digit
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;

// A uint32 that orders like the float: a > b exactly when key(a) > key(b). -0.0 shares 0.0's key
// and every NaN gets the largest key, which is how torch.sort compares them.
__device__ __forceinline__ uint32_t priority_key(float priority) {
  if (isnan(priority)) return 0xffffffffu;
  uint32_t bits = __float_as_uint(priority);
  if (bits == 0x80000000u) bits = 0u;  // -0.0
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

struct Threshold {
  uint32_t key;        // the capacity-th largest key of the segment
  int32_t equal_kept;  // how many keys equal to it fit in the capacity (>= 1)
};

// The `rank`-th largest key of the segment [begin, end) (1 <= rank <= end - begin), by four
// histogram passes. The first pass gathers the priorities through `order` and writes their keys
// to keys[begin, end) for the later passes.
__device__ Threshold radix_select(const int64_t* __restrict__ order, const float* __restrict__ priorities,
                                  int64_t begin, int64_t end, int32_t rank, uint32_t* __restrict__ keys,
                                  int32_t* warp_totals) {
  __shared__ int32_t histogram[kBins];
  __shared__ uint32_t chosen_digit;
  __shared__ int32_t chosen_rank;
  uint32_t prefix = 0;  // the digits chosen so far
  uint32_t mask = 0;    // the bits they occupy
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    histogram[threadIdx.x] = 0;
    __syncthreads();
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      uint32_t key;
      if (shift == 32 - kRadixBits) {
        key = priority_key(priorities[order[i]]);
        keys[i] = key;  // read back by this same thread in later passes
      } else {
        key = keys[i];
      }
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & (kBins - 1)], 1);
    }
    __syncthreads();
    // Thread t holds digit kBins - 1 - t, so the scan counts the candidates at or above each digit.
    const uint32_t digit = kBins - 1 - threadIdx.x;
    const int32_t in_digit = histogram[digit];
    const int32_t at_or_above = block_scan<kThreads>(in_digit, warp_totals).inclusive;
    const int32_t above = at_or_above - in_digit;
    if (above < rank && rank <= at_or_above) {  // true for exactly one thread
      chosen_digit = digit;
      chosen_rank = rank - above;
    }
    __syncthreads();
    prefix |= chosen_digit << shift;
    mask |= static_cast<uint32_t>(kBins - 1) << shift;
    rank = chosen_rank;
  }
  return {prefix, rank};
}

__global__ void capacity_mask_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ segment_ends,
                                     const float* __restrict__ priorities, int64_t capacity,
                                     uint32_t* __restrict__ keys, bool* __restrict__ kept) {
  __shared__ int32_t warp_totals[kWarps];
  const int expert = blockIdx.x;
  const int64_t begin = expert > 0 ? segment_ends[expert - 1] : 0;
  const int64_t end = segment_ends[expert];
  if (end - begin <= capacity || capacity == 0) {
    const bool keep = end - begin <= capacity;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) kept[order[i]] = keep;
    return;
  }
  // capacity < end - begin < 2^31 here, so it fits in an int32.
  const Threshold threshold =
      radix_select(order, priorities, begin, end, static_cast<int32_t>(capacity), keys, warp_totals);
  int32_t equal_before = 0;  // keys equal to the threshold in earlier tiles
  for (int64_t tile = begin; tile < end; tile += kThreads) {
    const int64_t i = tile + threadIdx.x;
    const bool valid = i < end;
    const uint32_t key = valid ? keys[i] : 0u;
    const bool equal = valid && key == threshold.key;
    const BlockScan equal_rank = block_scan<kThreads>(equal ? 1 : 0, warp_totals);
    if (valid) {
      kept[order[i]] = key > threshold.key || (equal && equal_before + equal_rank.inclusive <= threshold.equal_kept);
    }
    equal_before += equal_rank.total;
  }
}

}  // namespace

at::Tensor capacity_mask(const at::Tensor& expert_ids, const at::Tensor& priorities, int64_t num_experts,
                         int64_t capacity) {
  check_cuda_contiguous(expert_ids, "expert_ids");
  check_dtype(expert_ids, at::kLong, "expert_ids");
  check_dim(expert_ids, 1, "expert_ids");
  check_cuda_contiguous(priorities, "priorities");
  check_same_device(priorities, expert_ids, "priorities");
  check_dtype(priorities, at::kFloat, "priorities");
  TORCH_CHECK(priorities.sizes() == expert_ids.sizes(), "priorities must have shape ", text(expert_ids.sizes()),
              " like expert_ids, got ", text(priorities.sizes()));
  TORCH_CHECK(capacity >= 0, "capacity must be >= 0, got ", text(capacity));
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  at::Tensor order;
  at::Tensor tokens_per_expert;
  // Checks num_experts and N, even when there are no assignments.
  std::tie(order, std::ignore, tokens_per_expert, std::ignore) = sort_by_expert(expert_ids, num_experts);
  const int64_t n = expert_ids.size(0);
  at::Tensor kept = at::empty({n}, expert_ids.options().dtype(at::kBool));
  if (n == 0) return kept;

  const at::Tensor segment_ends = at::cumsum(tokens_per_expert, 0);
  at::Tensor keys = at::empty({n}, expert_ids.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  capacity_mask_kernel<<<static_cast<unsigned>(num_experts), kThreads, 0, stream>>>(
      order.data_ptr<int64_t>(), segment_ends.data_ptr<int64_t>(), priorities.data_ptr<float>(), capacity,
      reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()), kept.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return kept;
}

}  // namespace lightning_moe

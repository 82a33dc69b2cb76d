// Stable counting sort of assignments by expert, in three launches and no host synchronisation:
//
//   1. chunk_histogram: the assignments are cut into chunks; each block counts its chunk's
//      assignments per expert (shared-memory integer atomics: the counts do not depend on the
//      order of the atomics).
//   2. scan_chunk_counts: one block turns the (E, chunks) counts, read expert-major, into each
//      (expert, chunk) pair's first sorted position, and writes tokens_per_expert and each
//      expert's end (the grouped GEMMs' row ends, so that no cumsum has to follow).
//   3. place_stable: one warp per chunk walks its chunk in order, 32 assignments at a time; lanes
//      with the same expert rank themselves by lane (__match_any_sync), so equal experts keep
//      their original order and the result is the same on every run.
//
// A radix sort (torch.sort) would make several passes over 64-bit keys; the expert count is small,
// so one counting pass is enough.

#include "sort_by_expert.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "block_scan.cuh"
#include "checks.h"

namespace lightning_moe {
namespace {

constexpr int kWarp = 32;
constexpr int kScanThreads = 1024;
constexpr int64_t kMaxExperts = 8192;          // E int32 counters in shared memory (32 KiB)
constexpr int64_t kMaxChunkCounts = 1 << 18;   // bounds the single-block scan's work
constexpr int64_t kMinChunk = 256;

__global__ void chunk_histogram_kernel(const int64_t* __restrict__ expert_ids, int64_t num_assignments,
                                       int64_t chunk, int num_experts, int num_chunks,
                                       int32_t* __restrict__ chunk_counts) {
  extern __shared__ int32_t counts[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(num_assignments, begin + chunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t expert = expert_ids[i];
    CUDA_KERNEL_ASSERT(expert >= 0 && expert < num_experts && "expert id out of range");
    atomicAdd(&counts[expert], 1);
  }
  __syncthreads();
  // Expert-major, so that one exclusive scan gives every (expert, chunk) pair its start.
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    chunk_counts[static_cast<int64_t>(e) * num_chunks + blockIdx.x] = counts[e];
  }
}

// One block: in-place exclusive scan of `counts` (num_experts * num_chunks, expert-major), each
// thread owning one contiguous segment; then tokens_per_expert and expert_ends from the scanned
// starts.
__global__ void scan_chunk_counts_kernel(int32_t* __restrict__ counts, int num_experts, int num_chunks,
                                         int64_t num_assignments, int64_t* __restrict__ tokens_per_expert,
                                         int32_t* __restrict__ expert_ends) {
  __shared__ int32_t warp_totals[kWarp];
  const int64_t size = static_cast<int64_t>(num_experts) * num_chunks;
  const int64_t segment = (size + kScanThreads - 1) / kScanThreads;
  const int64_t begin = min(size, threadIdx.x * segment);
  const int64_t end = min(size, begin + segment);
  int32_t sum = 0;
  for (int64_t i = begin; i < end; ++i) sum += counts[i];
  int32_t running = block_scan<kScanThreads>(sum, warp_totals).inclusive - sum;
  for (int64_t i = begin; i < end; ++i) {
    const int32_t count = counts[i];
    counts[i] = running;
    running += count;
  }
  __syncthreads();  // the block's global writes are visible to the whole block after this
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const int64_t start = counts[static_cast<int64_t>(e) * num_chunks];
    const int64_t stop = e + 1 < num_experts ? counts[static_cast<int64_t>(e + 1) * num_chunks] : num_assignments;
    tokens_per_expert[e] = stop - start;
    expert_ends[e] = static_cast<int32_t>(stop);
  }
}

__global__ void place_stable_kernel(const int64_t* __restrict__ expert_ids, int64_t num_assignments, int64_t chunk,
                                    int num_experts, int num_chunks, const int32_t* __restrict__ chunk_starts,
                                    int64_t* __restrict__ order, int64_t* __restrict__ inverse) {
  extern __shared__ int32_t next_position[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    next_position[e] = chunk_starts[static_cast<int64_t>(e) * num_chunks + blockIdx.x];
  }
  __syncwarp();
  const int lane = threadIdx.x;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(num_assignments, begin + chunk);
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t i = base + lane;
    const bool valid = i < end;
    const int expert = valid ? static_cast<int>(expert_ids[i]) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, expert);
    const int rank = __popc(peers & lanes_below);
    const int32_t first = valid ? next_position[expert] : 0;
    __syncwarp();
    if (valid) {
      const int64_t position = first + rank;
      order[position] = i;
      inverse[i] = position;
      if (rank == __popc(peers) - 1) next_position[expert] = first + __popc(peers);
    }
    __syncwarp();
  }
}

// Chunks of at least kMinChunk assignments, few enough that the scan stays small.
int64_t chunk_size(int64_t num_assignments, int64_t num_experts) {
  const int64_t max_chunks = std::max<int64_t>(1, kMaxChunkCounts / num_experts);
  const int64_t chunks = std::max<int64_t>(1, std::min((num_assignments + kMinChunk - 1) / kMinChunk, max_chunks));
  const int64_t chunk = (num_assignments + chunks - 1) / chunks;
  return (chunk + kWarp - 1) / kWarp * kWarp;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& expert_ids,
                                                                       int64_t num_experts) {
  check_cuda_contiguous(expert_ids, "expert_ids");
  check_dtype(expert_ids, at::kLong, "expert_ids");
  check_dim(expert_ids, 1, "expert_ids");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts must be in [1, ", text(kMaxExperts), "], got ",
              text(num_experts));
  const int64_t n = expert_ids.size(0);
  TORCH_CHECK(n < (int64_t{1} << 31), "at most 2^31 - 1 assignments are supported, got ", text(n));
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const auto index_options = expert_ids.options();
  at::Tensor order = at::empty({n}, index_options);
  at::Tensor inverse = at::empty({n}, index_options);
  if (n == 0) {
    return {order, inverse, at::zeros({num_experts}, index_options),
            at::zeros({num_experts}, index_options.dtype(at::kInt))};
  }
  // The scan writes every expert's count and end: no zero fill (one launch fewer).
  at::Tensor tokens_per_expert = at::empty({num_experts}, index_options);
  at::Tensor expert_ends = at::empty({num_experts}, index_options.dtype(at::kInt));

  const int64_t chunk = chunk_size(n, num_experts);
  const int num_chunks = static_cast<int>((n + chunk - 1) / chunk);
  const int experts = static_cast<int>(num_experts);
  at::Tensor chunk_counts = at::empty({num_experts * num_chunks}, index_options.dtype(at::kInt));
  const size_t shared_bytes = sizeof(int32_t) * num_experts;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  chunk_histogram_kernel<<<num_chunks, 256, shared_bytes, stream>>>(
      expert_ids.data_ptr<int64_t>(), n, chunk, experts, num_chunks, chunk_counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scan_chunk_counts_kernel<<<1, kScanThreads, 0, stream>>>(chunk_counts.data_ptr<int32_t>(), experts, num_chunks, n,
                                                           tokens_per_expert.data_ptr<int64_t>(),
                                                           expert_ends.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  place_stable_kernel<<<num_chunks, kWarp, shared_bytes, stream>>>(
      expert_ids.data_ptr<int64_t>(), n, chunk, experts, num_chunks, chunk_counts.data_ptr<int32_t>(),
      order.data_ptr<int64_t>(), inverse.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {order, inverse, tokens_per_expert, expert_ends};
}

}  // namespace lightning_moe

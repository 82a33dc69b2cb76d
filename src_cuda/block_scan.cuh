// Block-wide inclusive scan of one int32 per thread, shared by the kernels that rank or place
// items across a block (capacity_mask, sort_by_expert). Warp shuffles and a second scan of the
// warp totals by warp 0, in a fixed order: no atomics, the same result on every run.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace lightning_moe {

struct BlockScan {
  int32_t inclusive;  // this thread's value plus those of all lower threads
  int32_t total;      // the whole block's sum
};

// Inclusive scan of one value per thread across a block of kBlockThreads threads; every thread of
// the block must call it. `warp_totals` is kBlockThreads / 32 int32 of shared memory. Ends with a
// barrier, so `warp_totals` may be reused by the next call at once.
template <int kBlockThreads>
__device__ BlockScan block_scan(int32_t value, int32_t* warp_totals) {
  constexpr int kWarpSize = 32;
  constexpr int kWarps = kBlockThreads / kWarpSize;
  static_assert(kBlockThreads % kWarpSize == 0 && kWarps >= 1 && kWarps <= kWarpSize,
                "block_scan needs a whole number of warps, at most 32");
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const int32_t other = __shfl_up_sync(0xffffffffu, value, delta);
    if (lane >= delta) value += other;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = value;
  __syncthreads();
  if (warp == 0) {
    int32_t total = lane < kWarps ? warp_totals[lane] : 0;
#pragma unroll
    for (int delta = 1; delta < kWarpSize; delta *= 2) {
      const int32_t other = __shfl_up_sync(0xffffffffu, total, delta);
      if (lane >= delta) total += other;
    }
    if (lane < kWarps) warp_totals[lane] = total;
  }
  __syncthreads();
  const BlockScan result{warp > 0 ? value + warp_totals[warp - 1] : value, warp_totals[kWarps - 1]};
  __syncthreads();
  return result;
}

}  // namespace lightning_moe

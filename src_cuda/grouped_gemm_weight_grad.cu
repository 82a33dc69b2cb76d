// Weight gradients of the grouped GEMMs on Hopper tensor cores: see grouped_gemm_weight_grad.h.
//
// A persistent kernel: one CTA per SM walks the output tiles (expert, 128 rows of M, 128 columns
// of N) in a fixed round-robin order, n fastest, so CTAs running at once share an expert's rows in
// L2. Each tile sums over its expert's rows in 64-row steps (wgmma m64n128k16, both operands
// MN-major from 128-byte-swizzled shared memory, rows past the expert zero-filled by cp.async).
// The cp.async pipeline runs across tile boundaries, so the next tile's rows load while this one
// multiplies and stores. A finished tile goes to shared memory as bf16 and leaves through bulk
// copies (one per 256-byte row) that the copy engine completes while the CTA moves on; two staging
// buffers alternate. Each output element is written once, its sum in a fixed order.
#include "grouped_gemm_weight_grad.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include "checks.h"
#include "grouped_gemm.h"
#include "wgmma.cuh"

namespace lightning_moe {
namespace {

constexpr int kBK = 64;                       // rows summed per pipeline stage
constexpr int kTile = 128;                    // output rows and columns per tile
constexpr int kStages = 4;
constexpr int kThreads = 256;                 // two warpgroups, 64 output rows each
constexpr int kTileBytes = kBK * kTile * 2;   // one operand's slice per stage (16 KiB)
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kStagingPitch = kTile * 2 + 16; // bytes: 16-byte aligned, conflict-free fragment stores
constexpr int kStagingBytes = kTile * kStagingPitch;
constexpr int kSharedBytes = kStages * kStageBytes + 2 * kStagingBytes + 1024;  // + alignment slack

struct Problem {
  const __nv_bfloat16* a;
  const __nv_bfloat16* b;
  __nv_bfloat16* out;
  const int32_t* ends;
  int m;
  int n;
  int m_tiles;
  int n_tiles;
  int tiles;
};

#ifdef LIGHTNING_MOE_WGMMA
// A position in a CTA's walk: its tile, the tile's expert rows and the 64-row step within them.
struct Cursor {
  int tile;   // >= Problem::tiles once the walk is over
  int step;
  int steps;  // ceil(rows / kBK), at least 1: an expert without rows sums one zero-filled step
  int group;
  int row_start;
  int rows;
  int m0;
  int n0;
};

__device__ __forceinline__ void locate(const Problem& p, Cursor& c) {
  c.step = 0;
  if (c.tile >= p.tiles) return;
  const int rest = c.tile / p.n_tiles;
  c.n0 = (c.tile % p.n_tiles) * kTile;
  c.m0 = (rest % p.m_tiles) * kTile;
  c.group = rest / p.m_tiles;
  c.row_start = c.group == 0 ? 0 : p.ends[c.group - 1];
  c.rows = p.ends[c.group] - c.row_start;
  const int steps = (c.rows + kBK - 1) / kBK;
  c.steps = steps > 1 ? steps : 1;
}

__device__ __forceinline__ void advance(const Problem& p, Cursor& c) {
  if (++c.step < c.steps) return;
  c.tile += gridDim.x;
  locate(p, c);
}

// Step c.step of tile c into the stage at `stage`: a[rows, m0:m0+128] then b[rows, n0:n0+128],
// each as two 64-column MN-major sub-tiles of kBK rows.
__device__ __forceinline__ void load(const Problem& p, const Cursor& c, uint32_t stage, int tid) {
  const int k0 = c.step * kBK;
#pragma unroll
  for (int it = 0; it < kBK * (kTile / 8) / kThreads; ++it) {
    const int i = it * kThreads + tid;
    const int row = i / (kTile / 8), chunk = i % (kTile / 8);
    const bool valid = k0 + row < c.rows;
    const int64_t src_row = valid ? c.row_start + k0 + row : 0;
    const uint32_t offset = (chunk >> 3) * (kBK * kRowBytes) + swizzled(row, chunk & 7);
    copy16(stage + offset, p.a + src_row * p.m + c.m0 + chunk * 8, valid);
    copy16(stage + kTileBytes + offset, p.b + src_row * p.n + c.n0 + chunk * 8, valid);
  }
}

// The finished tile of c: accumulators to bf16 in a staging buffer, then one bulk copy per row.
__device__ __forceinline__ void store_tile(const Problem& p, const Cursor& c, const float (&acc)[64],
                                           uint8_t* staging, uint32_t staging_address, int tid) {
  // The bulk copies issued from this buffer two tiles ago must have read it.
  if (tid < kTile) bulk_wait_read<1>();
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32;  // warps 0-7: rows 16 * warp + lane / 4 (+ 8)
  const int row = warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < kTile / 8; ++j) {
    const int col = j * 8 + (lane % 4) * 2;
    *reinterpret_cast<__nv_bfloat162*>(staging + row * kStagingPitch + col * 2) =
        __floats2bfloat162_rn(acc[4 * j], acc[4 * j + 1]);
    *reinterpret_cast<__nv_bfloat162*>(staging + (row + 8) * kStagingPitch + col * 2) =
        __floats2bfloat162_rn(acc[4 * j + 2], acc[4 * j + 3]);
  }
  // Ordinary stores, read next by the copy engine.
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  if (tid < kTile) {
    __nv_bfloat16* dst = p.out + (static_cast<int64_t>(c.group) * p.m + c.m0 + tid) * p.n + c.n0;
    bulk_store(dst, staging_address + tid * kStagingPitch, kTile * 2);
    bulk_commit();
  }
}
#endif  // LIGHTNING_MOE_WGMMA

__global__ void __launch_bounds__(kThreads, 1) weight_grad_kernel(const Problem p) {
#ifdef LIGHTNING_MOE_WGMMA
  extern __shared__ uint8_t shared_raw[];
  // 1024-byte alignment: the swizzle pattern is taken from address bits 4-9.
  const uint32_t raw_address = shared_address(shared_raw);
  const uint32_t base = (raw_address + 1023u) & ~1023u;
  uint8_t* const staging = shared_raw + (base - raw_address) + kStages * kStageBytes;
  const uint32_t staging_address = base + kStages * kStageBytes;
  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;

  Cursor loading{static_cast<int>(blockIdx.x)}, computing{static_cast<int>(blockIdx.x)};
  locate(p, loading);
  locate(p, computing);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (loading.tile < p.tiles) {
      load(p, loading, base + s * kStageBytes, tid);
      advance(p, loading);
    }
    copy_commit();
  }

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  int stage = 0, parity = 0;
  while (computing.tile < p.tiles) {
    copy_wait<kStages - 2>();
    // cp.async writes shared memory through the generic proxy; wgmma reads it through the async one.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    const uint32_t tile_a = base + stage * kStageBytes;
    const uint32_t tile_b = tile_a + kTileBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      // 16 rows (of 128 bytes) further per k16 step; warpgroup g takes A's sub-tile g (its 64 rows of
      // the output), B's two sub-tiles kBK rows apart.
      const uint64_t desc_a = descriptor(tile_a + warpgroup * kBK * kRowBytes + kk * 16 * kRowBytes,
                                         kBK * kRowBytes, 1024);
      const uint64_t desc_b = descriptor(tile_b + kk * 16 * kRowBytes, kBK * kRowBytes, 1024);
      wgmma_m64n128k16<1, 1>(acc, desc_a, desc_b);
    }
    wgmma_commit();
    // Refill the stage read by the previous step: every warpgroup finished it before the barrier.
    if (loading.tile < p.tiles) {
      load(p, loading, base + ((stage + kStages - 1) % kStages) * kStageBytes, tid);
      advance(p, loading);
    }
    copy_commit();
    wgmma_wait_all(acc);
    stage = (stage + 1) % kStages;
    if (computing.step == computing.steps - 1) {
      store_tile(p, computing, acc, staging + parity * kStagingBytes, staging_address + parity * kStagingBytes, tid);
      parity ^= 1;
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    }
    advance(p, computing);
  }
  if (tid < kTile) bulk_wait_all();  // the staging buffers must outlive the copies reading them
#else
  __trap();  // built without sm_90a: grouped_gemm_available() reports false and no caller launches this
#endif
}

// Validates the operands; returns (M, N). Kept out of the entry point (see grouped_gemm.cu).
std::pair<int64_t, int64_t> check_operands(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends) {
  check_cuda_contiguous(a, "a");
  check_cuda_contiguous(b, "b");
  check_cuda_contiguous(ends, "ends");
  check_same_device(b, a, "b");
  check_same_device(ends, a, "ends");
  check_dtype(a, at::kBFloat16, "a");
  check_dtype(b, at::kBFloat16, "b");
  check_dtype(ends, at::kInt, "ends");
  check_dim(a, 2, "a");
  check_dim(b, 2, "b");
  check_dim(ends, 1, "ends");
  TORCH_CHECK(ends.size(0) >= 1, "ends must name at least one group");
  TORCH_CHECK(b.size(0) == a.size(0), "a and b must have the same rows, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) < (int64_t{1} << 31), "a must have fewer than 2^31 rows, got ", a.size(0));
  const int64_t m = a.size(1), n = b.size(1);
  TORCH_CHECK(m % 128 == 0 && m > 0, "a's columns must be a positive multiple of 128, got ", m);
  TORCH_CHECK(n % 128 == 0 && n > 0, "b's columns must be a positive multiple of 128, got ", n);
  TORCH_CHECK(grouped_gemm_available(), "the grouped GEMM kernels need a compute capability 9.0 GPU and an sm_90a build");
  return {m, n};
}

}  // namespace

at::Tensor grouped_gemm_weight_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends) {
  const auto [m, n] = check_operands(a, b, ends);
  const int64_t groups = ends.size(0);
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0) return at::zeros({groups, m, n}, a.options());
  auto out = at::empty({groups, m, n}, a.options());
  const int64_t tiles = groups * (m / kTile) * (n / kTile);
  TORCH_CHECK(tiles < (int64_t{1} << 31), "too many output tiles: ", tiles);
  const Problem problem{reinterpret_cast<const __nv_bfloat16*>(a.data_ptr()),
                        reinterpret_cast<const __nv_bfloat16*>(b.data_ptr()),
                        reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                        ends.data_ptr<int32_t>(),
                        static_cast<int>(m),
                        static_cast<int>(n),
                        static_cast<int>(m / kTile),
                        static_cast<int>(n / kTile),
                        static_cast<int>(tiles)};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device().index()));
  const int64_t ctas = std::min<int64_t>(tiles, sms);
  C10_CUDA_CHECK(cudaFuncSetAttribute(weight_grad_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes));
  weight_grad_kernel<<<static_cast<unsigned>(ctas), kThreads, kSharedBytes, c10::cuda::getCurrentCUDAStream()>>>(
      problem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace lightning_moe

// Row-grouped GEMMs on Hopper tensor cores, with TMA loads and warp specialisation: see grouped_gemm.h.
//
// A persistent kernel, one CTA of three warpgroups per SM. Warpgroup 0 is the producer: one of its
// warps walks the CTA's output tiles (a group's 128 rows x 128 columns, columns fastest, tiles
// dealt round-robin to the CTAs) and, for each 64-wide K slice, has the TMA unit copy A's rows and
// B's slice into a ring of kStages shared-memory stages in the 128-byte swizzle, each stage's
// arrival counted on its "full" mbarrier. Warpgroups 1 and 2 are the consumers: each multiplies
// its 64 rows of the tile with wgmma m64n128k16 (one group of four in flight while the next
// stage's wait runs), hands each stage back on its "empty" mbarrier once read, and writes its
// rows of the finished tile through a shared-memory staging buffer as 16-byte row vectors.
//
// Two variants change the CTA (wgmma.cuh's CtaLayout): two CTAs per SM of one consumer each, over
// 128 x 128 tiles; and tall tiles, 192 x 256 with three consumers of 64 rows each, so that a group
// of 129-192 rows takes one tile across, not two that each stream the group's weights.
//
// A's rows past a group's last row are the next group's rows (or TMA's zero fill past the end of
// a): they only reach output rows that are not written. No atomics: each output element is
// written by one CTA.
#include "grouped_gemm.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include "checks.h"
#include "tensor_map.h"
#include "wgmma.cuh"

namespace lightning_moe {
namespace {

constexpr int kBK = 64;             // K per stage (128 bytes of bf16: the swizzle span)
constexpr int kRing = 8;            // tiles whose description the producer may have posted ahead
static_assert(kBK == 64, "check_operands' messages name the tile sizes");

// The constants of a CTA (CtaLayout) over tiles kBN columns wide (128, or 256 for many rows per
// group) and kBM rows tall: 128, or 192 with three consumers.
template <int kBN, int kConsumers>
struct Shape : CtaLayout<kBN, kConsumers> {
  using Layout = CtaLayout<kBN, kConsumers>;
  static constexpr int kStages = Layout::kStages;
  static constexpr int kRowHalves = kConsumers == 1 ? 2 : 1;  // 64-row slices of the tile per consumer
  static constexpr int kBM = 64 * kRowHalves * kConsumers;
  static constexpr int kHalves = kBN / 128;  // wgmma n128 products per k16 step
  static constexpr int kTileABytes = kBM * kBK * 2;
  static constexpr int kTileBBytes = kBN * kBK * 2;
  static constexpr int kStageBytes = kTileABytes + kTileBBytes;
  static constexpr int kBarriersBytes = 2 * kStages * 8;
  static constexpr int kRingBytes = kRing * 20;  // sizeof(TileInfo)
  static constexpr int kSharedBytes =
      1024 + kStages * kStageBytes + kConsumers * kStagingBytes + kBarriersBytes + kRingBytes;
  static_assert(Layout::fits(kSharedBytes), "more shared memory than the CTAs of an SM may have");
  static_assert(kRing > kStages, "the producer runs at most kStages stages, so kStages tiles, ahead");
};

struct TileInfo {
  int group;  // -1: no tile left
  int group_start;
  int group_rows;
  int row0;
  int n0;
};

struct Problem {
  const int32_t* ends;
  __nv_bfloat16* out;
  int num_groups;
  int n;
  int k;
  int b_rows_per_group;  // N (b (E, N, K)) or K (b (E, K, N)): rows of b's 2-D view per group
  int tiles_bound;       // slots * n_tiles: an upper bound on the tiles
};

// The kernel's parameters, passed to cudaLaunchKernel from heap storage: a CUtensorMap is
// over-aligned, which a by-value copy on a host thread's stack does not honour everywhere (it
// crashed when launched from a thread other than the main one).
struct Params {
  CUtensorMap map_a;
  CUtensorMap map_b;
  Problem p;
};

static_assert(sizeof(TileInfo) == 20, "Shape::kRingBytes");

#ifdef LIGHTNING_MOE_WGMMA
// Tile `tile` (slot-major, columns fastest; a slot is kBM rows of a group) by one warp: the warp
// scans the groups' tile counts 32 at a time. group = -1 when the tile lies past the last one.
template <int kBM, int kBN>
__device__ TileInfo locate(const Problem& p, int tile, int lane) {
  const int n_tiles = p.n / kBN;
  const int slot = tile / n_tiles;
  TileInfo info{-1, 0, 0, 0, (tile % n_tiles) * kBN};
  if (tile >= p.tiles_bound) return info;
  int carry = 0;
  for (int base = 0; base < p.num_groups; base += 32) {
    const int group = base + lane;
    int start = 0, rows = 0;
    if (group < p.num_groups) {
      start = group == 0 ? 0 : p.ends[group - 1];
      rows = p.ends[group] - start;
    }
    const int tiles = (rows + kBM - 1) / kBM;
    int inclusive = tiles;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    const int first = carry + inclusive - tiles;
    const bool mine = slot >= first && slot < first + tiles;
    const unsigned owner = __ballot_sync(0xffffffffu, mine);
    if (owner != 0) {
      const int src = __ffs(owner) - 1;
      info.group = __shfl_sync(0xffffffffu, group, src);
      info.group_start = __shfl_sync(0xffffffffu, start, src);
      info.group_rows = __shfl_sync(0xffffffffu, rows, src);
      info.row0 = (slot - __shfl_sync(0xffffffffu, first, src)) * kBM;
      return info;
    }
    carry += __shfl_sync(0xffffffffu, inclusive, 31);
  }
  return info;
}
#endif  // LIGHTNING_MOE_WGMMA

// kBKN: b is (E, K, N) (MN-major B tiles, 64-column boxes) rather than (E, N, K). kBN: output
// columns per tile. kConsumers: consumer warpgroups per CTA (see Shape).
template <bool kBKN, int kBN, int kConsumers>
__global__ void __launch_bounds__(Shape<kBN, kConsumers>::kThreads, Shape<kBN, kConsumers>::kCtasPerSm)
    grouped_gemm_kernel(const __grid_constant__ Params params) {
#ifdef LIGHTNING_MOE_WGMMA
  using S = Shape<kBN, kConsumers>;
  constexpr int kStages = S::kStages;
  constexpr int kStageBytes = S::kStageBytes;
  const Problem& p = params.p;
  extern __shared__ uint8_t shared_raw[];
  // 1024-byte alignment: the swizzle pattern is taken from address bits 4-9.
  uint8_t* shared = nullptr;
  const uint32_t base = aligned_shared(shared_raw, shared);
  const uint32_t staging_address = base + kStages * kStageBytes;
  const uint32_t full_bar = staging_address + kConsumers * kStagingBytes;  // kStages full, then kStages empty
  const uint32_t empty_bar = full_bar + kStages * 8;
  TileInfo* const ring = reinterpret_cast<TileInfo*>(shared + kStages * kStageBytes + kConsumers * kStagingBytes +
                                                     S::kBarriersBytes);

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full_bar + s * 8, 1);   // the producer's arrival (+ the TMA bytes)
      mbarrier_init(empty_bar + s * 8, kConsumers);  // one arrival per consumer warpgroup
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int k_steps = p.k / kBK;

  if (warpgroup == 0) {
    producer_registers<kBN, kConsumers>();
    if (tid >= 32) return;  // one producer warp
    const int lane = tid;
    StageRing<kStages> pipe;
    int count = 0;
    for (int tile = blockIdx.x;; tile += gridDim.x, ++count) {
      const TileInfo info = locate<S::kBM, kBN>(p, tile, lane);
      // Wait for the stage, then post the tile (its description travels with its first stage).
      mbarrier_wait(empty_bar + pipe.stage * 8, pipe.phase ^ 1);
      if (lane == 0) ring[count % kRing] = info;
      if (info.group < 0) {
        if (lane == 0) mbarrier_arrive(full_bar + pipe.stage * 8);  // the consumers' signal to stop
        return;
      }
      const int a_row = info.group_start + info.row0;
      const int b_row = info.group * p.b_rows_per_group;
      for (int step = 0; step < k_steps; ++step) {
        if (step > 0) mbarrier_wait(empty_bar + pipe.stage * 8, pipe.phase ^ 1);
        if (lane == 0) {
          const uint32_t bar = full_bar + pipe.stage * 8;
          const uint32_t tile_a = base + pipe.stage * kStageBytes;
          const uint32_t tile_b = tile_a + S::kTileABytes;
          mbarrier_arrive_expect_tx(bar, kStageBytes);
          tma_load_2d(tile_a, &params.map_a, bar, step * kBK, a_row);
          if constexpr (kBKN) {  // b (E * K, N): kBK rows of K, boxes of 64 columns
#pragma unroll
            for (int box = 0; box < kBN / 64; ++box) {
              tma_load_2d(tile_b + box * kBK * kRowBytes, &params.map_b, bar, info.n0 + box * 64,
                          b_row + step * kBK);
            }
          } else {  // b (E * N, K): kBN rows of N, 64 of K
            tma_load_2d(tile_b, &params.map_b, bar, step * kBK, b_row + info.n0);
          }
        }
        __syncwarp();
        pipe.advance();
      }
    }
  }

  // Consumers: with two or three, warpgroup w takes rows 64 (w - 1) to 64 w - 1 of each tile; with
  // one (two CTAs per SM, 128 registers a thread at launch), it takes all 128.
  consumer_registers<kBN, kConsumers>();
  const int half = warpgroup - 1;
  const int ctid = tid % 128;
  __nv_bfloat16* const staging = reinterpret_cast<__nv_bfloat16*>(shared + kStages * kStageBytes + half * kStagingBytes);
  float acc[S::kRowHalves][S::kHalves][64];
  float(&all_acc)[S::kRowHalves * S::kHalves * 64] =
      reinterpret_cast<float(&)[S::kRowHalves * S::kHalves * 64]>(acc);
  StageRing<kStages> pipe;
  for (int count = 0;; ++count) {
    mbarrier_wait(full_bar + pipe.stage * 8, pipe.phase);
    const TileInfo info = ring[count % kRing];
    if (info.group < 0) break;
    ConsumerStages<kStages> stages{pipe, empty_bar, ctid};
    for (int step = 0; step < k_steps; ++step) {
      if (step > 0) mbarrier_wait(full_bar + pipe.stage * 8, pipe.phase);
      const uint32_t tile_a = base + pipe.stage * kStageBytes;
      const uint32_t tile_b = tile_a + S::kTileABytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < S::kRowHalves; ++r) {
          const int rows64 = half * S::kRowHalves + r;  // the tile's 64-row half this product fills
          const uint64_t desc_a = descriptor(tile_a + rows64 * 64 * kRowBytes + kk * 32, 16, 1024);
#pragma unroll
          for (int h = 0; h < S::kHalves; ++h) {
            // Columns 128h on: K-major, B's rows 128h on; MN-major, its 64-column boxes 2h on.
            const uint64_t desc_b =
                kBKN ? descriptor(tile_b + h * 2 * kBK * kRowBytes + kk * 16 * kRowBytes, kBK * kRowBytes, 1024)
                     : descriptor(tile_b + h * 128 * kRowBytes + kk * 32, 16, 1024);
            wgmma_m64n128k16<0, kBKN ? 1 : 0>(acc[r][h], desc_a, desc_b, step > 0 || kk > 0 ? 1 : 0);
          }
        }
      }
      wgmma_commit();
      stages.next(all_acc);
    }
    stages.finish(all_acc);

    // This warpgroup's rows of the tile, 64 at a time, those inside the group.
#pragma unroll
    for (int r = 0; r < S::kRowHalves; ++r) {
      const int row_base = info.row0 + (half * S::kRowHalves + r) * 64;
      const int64_t tile_offset = static_cast<int64_t>(info.group_start + row_base) * p.n + info.n0;
      store_rows(acc[r], staging, ctid, 1 + half, info.group_rows - row_base, [&](int row, int column, uint4 value) {
        *reinterpret_cast<uint4*>(p.out + tile_offset + static_cast<int64_t>(row) * p.n + column) = value;
      });
    }
  }
#else
  __trap();  // built without sm_90a: grouped_gemm_available() reports false and no caller launches this
#endif
}


__global__ void probe_kernel(int* built) {
#ifdef LIGHTNING_MOE_WGMMA
  *built = 1;
#else
  *built = 0;
#endif
}

// Validates grouped_gemm_rows' operands; returns (K, N).
std::pair<int64_t, int64_t> check_operands(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends,
                                           bool b_is_kn, int64_t tile_n) {
  check_grouped_gemm_operands(a, b, ends, 3);
  const int64_t groups = ends.size(0), k = a.size(1);
  TORCH_CHECK(b.size(0) == groups, "b must hold one matrix per group (", text(groups), "), got shape ",
              text(b.sizes()));
  const int64_t n = b_is_kn ? b.size(2) : b.size(1);
  TORCH_CHECK((b_is_kn ? b.size(1) : b.size(2)) == k, "b's contraction dimension must be a's columns (",
              text(k), "), got shape ", text(b.sizes()));
  TORCH_CHECK(k % 64 == 0 && k > 0, "a's columns must be a positive multiple of 64, got ", text(k));
  TORCH_CHECK(n % 128 == 0 && n > 0, "the output columns must be a positive multiple of 128, got ", text(n));
  TORCH_CHECK(tile_n == 128 || (tile_n == 256 && n % 256 == 0),
              "tile_n must be 128, or 256 where the output columns are a multiple of 256");
  TORCH_CHECK(a.size(0) / 128 + groups < (int64_t{1} << 31) / (n / 128), "too many output tiles");
  TORCH_CHECK(grouped_gemm_available(), "the grouped GEMM kernels need a compute capability 9.0 GPU and an sm_90a build");
  return {k, n};
}

}  // namespace

namespace {

// Whether this build holds the sm_90a kernels for `device` (compute capability 9.0).
bool grouped_gemm_built_for(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0) return false;
  // Asked of each device once (one host sync).
  static std::mutex mutex;
  static std::map<int, bool> built;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = built.find(device);
  if (found == built.end()) {
    auto flag = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
    probe_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream(device)>>>(flag.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    found = built.emplace(device, flag.item<int>() == 1).first;
  }
  return found->second;
}

}  // namespace

bool grouped_gemm_available() {
  const int device = c10::cuda::current_device();
  // Every launch asks; the answer for a device does not change, so a thread keeps its last one.
  thread_local int cached_device = -1;
  thread_local bool cached = false;
  if (device == cached_device) return cached;
  cached = grouped_gemm_built_for(device);
  cached_device = device;
  return cached;
}

namespace {

template <bool kBKN, int kBN, int kConsumers>
void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, const at::Tensor& out, int64_t k,
            int64_t n) {
  using S = Shape<kBN, kConsumers>;
  constexpr int kBM = S::kBM;
  const int64_t groups = ends.size(0), rows = a.size(0);
  // At most floor(R / BM) + E row tiles: each group adds at most one partial tile.
  const int64_t slots = rows / kBM + groups;
  const int64_t tiles_bound = slots * (n / kBN);
  auto params = std::make_unique<Params>();
  encode_tensor_map(&params->map_a, a.data_ptr(), rows, k, kBM);
  if constexpr (kBKN) {
    encode_tensor_map(&params->map_b, b.data_ptr(), groups * k, n, kBK);
  } else {
    encode_tensor_map(&params->map_b, b.data_ptr(), groups * n, k, kBN);
  }
  params->p = Problem{ends.data_ptr<int32_t>(),
                      reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                      static_cast<int>(groups),
                      static_cast<int>(n),
                      static_cast<int>(k),
                      static_cast<int>(kBKN ? k : n),
                      static_cast<int>(tiles_bound)};
  const int sms = multiprocessors(a.device().index());
  const unsigned ctas = static_cast<unsigned>(std::min<int64_t>(tiles_bound, int64_t{sms} * S::kCtasPerSm));
  const void* kernel = reinterpret_cast<const void*>(grouped_gemm_kernel<kBKN, kBN, kConsumers>);
  allow_shared_memory(kernel, S::kSharedBytes, a.device().index());
  void* args[] = {params.get()};
  C10_CUDA_CHECK(cudaLaunchKernel(kernel, dim3(ctas), dim3(S::kThreads), args, S::kSharedBytes,
                                  c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

at::Tensor grouped_gemm_rows(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, bool b_is_kn,
                             int64_t tile_n, int64_t ctas_per_sm, int64_t tile_m) {
  const auto [k, n] = check_operands(a, b, ends, b_is_kn, tile_n);
  TORCH_CHECK(ctas_per_sm == 1 || (ctas_per_sm == 2 && tile_n == 128),
              "ctas_per_sm must be 1, or 2 with tile_n 128, got ", text(ctas_per_sm));
  TORCH_CHECK(tile_m == 128 || (tile_m == 192 && tile_n == 256 && ctas_per_sm == 1),
              "tile_m must be 128, or 192 with tile_n 256 and ctas_per_sm 1, got tile_m ", text(tile_m),
              " with tile_n ", text(tile_n), " and ctas_per_sm ", text(ctas_per_sm));
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), n}, a.options());
  if (a.size(0) == 0) return out;
  bind_context(a.device().index());
  if (tile_m == 192) {
    b_is_kn ? launch<true, 256, 3>(a, b, ends, out, k, n) : launch<false, 256, 3>(a, b, ends, out, k, n);
  } else if (ctas_per_sm == 2) {
    b_is_kn ? launch<true, 128, 1>(a, b, ends, out, k, n) : launch<false, 128, 1>(a, b, ends, out, k, n);
  } else if (b_is_kn) {
    tile_n == 256 ? launch<true, 256, 2>(a, b, ends, out, k, n) : launch<true, 128, 2>(a, b, ends, out, k, n);
  } else {
    tile_n == 256 ? launch<false, 256, 2>(a, b, ends, out, k, n) : launch<false, 128, 2>(a, b, ends, out, k, n);
  }
  return out;
}

}  // namespace lightning_moe

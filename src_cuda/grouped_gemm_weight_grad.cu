// Weight gradients of the experts' grouped GEMMs on Hopper: see grouped_gemm_weight_grad.h.
//
// The same design as grouped_gemm.cu: a persistent CTA per SM, one producer warp feeding a ring of
// TMA-filled stages, two consumer warpgroups. An output tile is (expert, 128 rows of M, kBN
// columns of N), tiles dealt round-robin with the columns fastest. Each stage holds kBK (32) of
// the expert's rows of a (two 64-column boxes: the tile's M range) and of b (kBN / 64 boxes), both
// MN-major for wgmma. Consumer warpgroup g owns a's box g, i.e. output rows 64g to 64g + 63.
//
// A stage may run past the expert's last row into the next expert's rows: the consumers zero
// those rows of the stage before multiplying. An expert without rows gets a zero tile.
//
// With two CTAs per SM (128-column tiles), each CTA has one consumer warpgroup, which takes all
// 128 rows of a tile (both of a's boxes): one CTA's epilogue stores then run while the other
// multiplies, where with one CTA per SM the SM's tensor cores wait for the stores.
#include "grouped_gemm_weight_grad.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include "checks.h"
#include "grouped_gemm.h"
#include "tensor_map.h"
#include "wgmma.cuh"

namespace lightning_moe {
namespace {

constexpr int kBM = 128;                      // output rows (of M) per tile
// Expert rows per stage. An expert's last stage is zero-filled past its rows, so 32-row stages load
// and multiply half the padding of 64-row ones. On an H200 the runs kernel took 3-6% less time with
// them at about 128 rows per expert spread at random over 64 experts, the same at exactly 128, and
// the same bits (benchmarks/RESULTS.md, nineteenth session).
constexpr int kBK = 32;
constexpr int kBoxBytes = kBK * kRowBytes;    // one 64-column box of kBK rows
constexpr int kTileABytes = 2 * kBoxBytes;
constexpr int kRing = 16;
// Stages that hold the bytes of the CTA layout's stages of 64 rows.
template <class Layout>
constexpr int stages_of() {
  return Layout::kStages * 64 / kBK;
}

// The constants of a CTA (CtaLayout) over tiles kBN columns wide.
template <int kBN, int kConsumers>
struct Shape : CtaLayout<kBN, kConsumers> {
  using Layout = CtaLayout<kBN, kConsumers>;
  static constexpr int kStages = stages_of<Layout>();
  static constexpr int kBoxes = 2 / kConsumers;  // a's 64-column boxes (64 output rows) per consumer
  static constexpr int kHalves = kBN / 128;
  static constexpr int kStageBytes = kTileABytes + (kBN / 64) * kBoxBytes;
  static constexpr int kSharedBytes =
      1024 + kStages * kStageBytes + kConsumers * kStagingBytes + 2 * kStages * 8 + kRing * 20;
  static_assert(Layout::fits(kSharedBytes), "more shared memory than the CTAs of an SM may have");
  static_assert(kRing > kStages, "the producer runs at most kStages stages, so kStages tiles, ahead");
};

struct TileInfo {
  int group;  // -1: no tile left
  int row_start;
  int rows;
  int m0;
  int n0;
};
static_assert(sizeof(TileInfo) == 20, "Shape::kSharedBytes");

// The output and its tiling, shared by both kernels' problems.
struct Grid {
  const int32_t* ends;
  __nv_bfloat16* out;
  int m;
  int n;
  int m_tiles;
  int n_tiles;
};

struct Problem {
  Grid grid;
  int tiles;
};

// A kernel's parameters, passed to cudaLaunchKernel from heap storage (see launch_persistent).
template <class P>
struct KernelParams {
  CUtensorMap map_a;
  CUtensorMap map_b;
  P p;
};
using Params = KernelParams<Problem>;

#ifdef LIGHTNING_MOE_WGMMA
template <int kBN>
__device__ __forceinline__ TileInfo decode(const Problem& p, int tile) {
  if (tile >= p.tiles) return TileInfo{-1, 0, 0, 0, 0};
  const int rest = tile / p.grid.n_tiles;
  const int group = rest / p.grid.m_tiles;
  const int row_start = group == 0 ? 0 : p.grid.ends[group - 1];
  return TileInfo{group, row_start, p.grid.ends[group] - row_start, (rest % p.grid.m_tiles) * kBM, (tile % p.grid.n_tiles) * kBN};
}

// kSlices k16 slices of one stage into the accumulators of consumer `half`, which owns a's boxes
// kBoxes * half on (64 output rows each).
template <int kBN, int kBoxes, int kSlices>
__device__ __forceinline__ void multiply(float (&acc)[kBoxes][kBN / 128][64], uint32_t tile_a, uint32_t tile_b,
                                         int half, bool first) {
#pragma unroll
  for (int kk = 0; kk < kSlices; ++kk) {
#pragma unroll
    for (int bx = 0; bx < kBoxes; ++bx) {
      const uint64_t desc_a =
          descriptor(tile_a + (half * kBoxes + bx) * kBoxBytes + kk * 16 * kRowBytes, kBoxBytes, 1024);
#pragma unroll
      for (int h = 0; h < kBN / 128; ++h) {
        const uint64_t desc_b = descriptor(tile_b + h * 2 * kBoxBytes + kk * 16 * kRowBytes, kBoxBytes, 1024);
        wgmma_m64n128k16<1, 1>(acc[bx][h], desc_a, desc_b, first && kk == 0 ? 0 : 1);
      }
    }
  }
}
#endif  // LIGHTNING_MOE_WGMMA

template <int kBN, int kConsumers>
__global__ void __launch_bounds__(Shape<kBN, kConsumers>::kThreads, Shape<kBN, kConsumers>::kCtasPerSm)
    weight_grad_kernel(const __grid_constant__ Params params) {
#ifdef LIGHTNING_MOE_WGMMA
  using S = Shape<kBN, kConsumers>;
  constexpr int kStages = S::kStages;
  const Problem& p = params.p;
  extern __shared__ uint8_t shared_raw[];
  uint8_t* shared = nullptr;
  const uint32_t base = aligned_shared(shared_raw, shared);
  const uint32_t full_bar = base + kStages * S::kStageBytes + kConsumers * kStagingBytes;
  const uint32_t empty_bar = full_bar + kStages * 8;
  TileInfo* const ring =
      reinterpret_cast<TileInfo*>(shared + kStages * S::kStageBytes + kConsumers * kStagingBytes + 2 * kStages * 8);

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full_bar + s * 8, 1);
      mbarrier_init(empty_bar + s * 8, kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    producer_registers<kBN, kConsumers>();
    if (tid != 0) return;  // one producer thread
    StageRing<kStages> pipe;
    TileInfo upcoming = decode<kBN>(p, blockIdx.x);
    for (int tile = blockIdx.x, count = 0;; tile += gridDim.x, ++count) {
      const TileInfo info = upcoming;
      // The next tile's expert bounds are read while this tile's stages wait and load.
      upcoming = decode<kBN>(p, tile + gridDim.x);
      mbarrier_wait(empty_bar + pipe.stage * 8, pipe.phase ^ 1);
      ring[count % kRing] = info;
      const int steps = (info.rows + kBK - 1) / kBK;
      if (info.group < 0 || steps == 0) {
        // The end, or an expert without rows: the description alone, on a stage without data.
        mbarrier_arrive(full_bar + pipe.stage * 8);
        if (info.group < 0) return;
        pipe.advance();
        continue;
      }
      for (int step = 0; step < steps; ++step) {
        if (step > 0) mbarrier_wait(empty_bar + pipe.stage * 8, pipe.phase ^ 1);
        const uint32_t bar = full_bar + pipe.stage * 8;
        const uint32_t tile_a = base + pipe.stage * S::kStageBytes;
        const int row = info.row_start + step * kBK;
        mbarrier_arrive_expect_tx(bar, S::kStageBytes);
#pragma unroll
        for (int box = 0; box < 2; ++box) tma_load_2d(tile_a + box * kBoxBytes, &params.map_a, bar, info.m0 + box * 64, row);
#pragma unroll
        for (int box = 0; box < kBN / 64; ++box) {
          tma_load_2d(tile_a + kTileABytes + box * kBoxBytes, &params.map_b, bar, info.n0 + box * 64, row);
        }
        pipe.advance();
      }
    }
  }

  consumer_registers<kBN, kConsumers>();
  const int half = warpgroup - 1;
  const int ctid = tid % 128;
  __nv_bfloat16* const staging =
      reinterpret_cast<__nv_bfloat16*>(shared + kStages * S::kStageBytes + half * kStagingBytes);
  float acc[S::kBoxes][S::kHalves][64];
  float(&all_acc)[S::kBoxes * S::kHalves * 64] = reinterpret_cast<float(&)[S::kBoxes * S::kHalves * 64]>(acc);
  StageRing<kStages> pipe;
  for (int count = 0;; ++count) {
    mbarrier_wait(full_bar + pipe.stage * 8, pipe.phase);
    const TileInfo info = ring[count % kRing];
    if (info.group < 0) break;
    const int steps = (info.rows + kBK - 1) / kBK;
    __nv_bfloat16* const out_rows =
        p.grid.out + (static_cast<int64_t>(info.group) * p.grid.m + info.m0 + half * 64 * S::kBoxes) * p.grid.n + info.n0;
    if (steps == 0) {
      if (ctid == 0) mbarrier_arrive(empty_bar + pipe.stage * 8);
      pipe.advance();
      for (int i = ctid; i < 64 * S::kBoxes * (kBN / 8); i += 128) {
        *reinterpret_cast<uint4*>(out_rows + static_cast<int64_t>(i / (kBN / 8)) * p.grid.n + (i % (kBN / 8)) * 8) =
            make_uint4(0, 0, 0, 0);
      }
      continue;
    }
    ConsumerStages<kStages> stages{pipe, empty_bar, ctid};
    for (int step = 0; step < steps; ++step) {
      if (step > 0) mbarrier_wait(full_bar + pipe.stage * 8, pipe.phase);
      const uint32_t tile_a = base + pipe.stage * S::kStageBytes;
      const uint32_t tile_b = tile_a + kTileABytes;
      const int valid = min(kBK, info.rows - step * kBK);
      if (valid < kBK) {
        // Rows past the expert (the next expert's, or TMA's zero fill): zero them in every box of
        // a and b, so that not even an infinity there reaches this sum. Whole 128-byte rows (the
        // swizzle only permutes chunks within a row); consumer g takes the boxes g, g + kConsumers, ...
        uint8_t* const stage = shared + (tile_a - base);
        for (int box = half; box < 2 + kBN / 64; box += kConsumers) {
          for (int i = ctid; i < (kBK - valid) * 8; i += 128) {
            *reinterpret_cast<uint4*>(stage + box * kBoxBytes + (valid + i / 8) * kRowBytes + (i % 8) * 16) =
                make_uint4(0, 0, 0, 0);
          }
        }
        // Hand the zeros to the async proxy that wgmma reads through; every consumer reads b.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        named_barrier(3, 128 * kConsumers);
      }
      // All the stage's k16 slices, zeros included: skipping them by a run-time count makes ptxas
      // serialise the wgmma instructions.
      wgmma_fence();
      multiply<kBN, S::kBoxes, kBK / 16>(acc, tile_a, tile_b, half, step == 0);
      wgmma_commit();
      stages.next(all_acc);
    }
    stages.finish(all_acc);

#pragma unroll
    for (int bx = 0; bx < S::kBoxes; ++bx) {
      __nv_bfloat16* const box_rows = out_rows + static_cast<int64_t>(bx) * 64 * p.grid.n;
      store_rows(acc[bx], staging, ctid, 1 + half, 64, [&](int row, int column, uint4 value) {
        *reinterpret_cast<uint4*>(box_rows + static_cast<int64_t>(row) * p.grid.n + column) = value;
      });
    }
  }
#else
  __trap();  // built without sm_90a: grouped_gemm_available() reports false and no caller launches this
#endif
}

// The runs kernel (two CTAs per SM, 128 x 128 tiles): a CTA takes a run of up to run_tiles output
// tiles that share an expert and its 128 rows of M, so they share a's slice. For an expert of at
// most kStages * kBK rows, a's slice is loaded into shared memory once per run (its A slots, one
// per kBK-row step) and only b's slice streams through the stages: a run of R tiles reads
// (1 + 1 / R) / 2 of the bytes the one-tile kernel reads from L2. Larger experts stream both, each
// stage in its own A slot, as the one-tile kernel does. Sums are taken in the same order as there,
// so both kernels give the same bits.
struct RunInfo {
  int group;  // -1: no run left
  int row_start;
  int rows;
  int m0;
  int n0;     // first column of the run's first tile
  int tiles;  // tiles in the run, each kRunBN columns further
};
static_assert(sizeof(RunInfo) == 24, "RunShape::kSharedBytes");

constexpr int kRunBN = 128;
constexpr int kRunRing = 16;
constexpr int kRunBBytes = (kRunBN / 64) * kBoxBytes;  // b's boxes of one stage

struct RunShape : CtaLayout<kRunBN, 1> {
  using Layout = CtaLayout<kRunBN, 1>;
  static constexpr int kStages = stages_of<Layout>();
  // A slots, then B slots, then the staging buffer, the mbarriers (full and empty per stage, then
  // a_full and a_free) and the ring of runs.
  static constexpr int kBarriersBytes = (2 * kStages + 2) * 8;
  static constexpr int kSharedBytes =
      1024 + kStages * (kTileABytes + kRunBBytes) + kStagingBytes + kBarriersBytes + kRunRing * 24;
  static_assert(Layout::fits(kSharedBytes), "more shared memory than the CTAs of an SM may have");
  static_assert(kRunRing > kStages, "the producer runs at most kStages stages, so kStages runs, ahead");
};

struct RunProblem {
  Grid grid;
  int runs_per_row;  // runs per (expert, 128 rows of M): ceil(n_tiles / run_tiles)
  int run_tiles;
  int runs;          // all runs
};
using RunParams = KernelParams<RunProblem>;

#ifdef LIGHTNING_MOE_WGMMA
__device__ __forceinline__ RunInfo decode_run(const RunProblem& p, int run) {
  if (run >= p.runs) return RunInfo{-1, 0, 0, 0, 0, 0};
  const int rest = run / p.runs_per_row;
  const int group = rest / p.grid.m_tiles;
  const int first_tile = (run % p.runs_per_row) * p.run_tiles;
  const int row_start = group == 0 ? 0 : p.grid.ends[group - 1];
  return RunInfo{group,
                 row_start,
                 p.grid.ends[group] - row_start,
                 (rest % p.grid.m_tiles) * kBM,
                 first_tile * kRunBN,
                 min(p.run_tiles, p.grid.n_tiles - first_tile)};
}

// Zeroes rows valid to kBK - 1 of `boxes` 64-column boxes from `stage` (all 128 consumer threads).
__device__ __forceinline__ void zero_rows_past(uint8_t* stage, int boxes, int valid, int ctid) {
  for (int box = 0; box < boxes; ++box) {
    for (int i = ctid; i < (kBK - valid) * 8; i += 128) {
      *reinterpret_cast<uint4*>(stage + box * kBoxBytes + (valid + i / 8) * kRowBytes + (i % 8) * 16) =
          make_uint4(0, 0, 0, 0);
    }
  }
}
#endif  // LIGHTNING_MOE_WGMMA

__global__ void __launch_bounds__(RunShape::kThreads, RunShape::kCtasPerSm)
    weight_grad_runs_kernel(const __grid_constant__ RunParams params) {
#ifdef LIGHTNING_MOE_WGMMA
  using S = RunShape;
  constexpr int kStages = S::kStages;
  const RunProblem& p = params.p;
  extern __shared__ uint8_t shared_raw[];
  uint8_t* shared = nullptr;
  const uint32_t base = aligned_shared(shared_raw, shared);
  const uint32_t a_slots = base;
  const uint32_t b_slots = base + kStages * kTileABytes;
  const uint32_t staging_offset = kStages * (kTileABytes + kRunBBytes);
  const uint32_t full_bar = base + staging_offset + kStagingBytes;
  const uint32_t empty_bar = full_bar + kStages * 8;
  const uint32_t a_full_bar = empty_bar + kStages * 8;
  const uint32_t a_free_bar = a_full_bar + 8;
  RunInfo* const ring = reinterpret_cast<RunInfo*>(shared + staging_offset + kStagingBytes + S::kBarriersBytes);

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full_bar + s * 8, 1);
      mbarrier_init(empty_bar + s * 8, 1);
    }
    mbarrier_init(a_full_bar, 1);
    mbarrier_init(a_free_bar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    producer_registers<kRunBN, 1>();
    if (tid != 0) return;  // one producer thread
    StageRing<kStages> pipe;
    // Runs with rows so far: the A slots may be rewritten once the consumer has finished the last.
    uint32_t data_runs = 0;
    RunInfo upcoming = decode_run(p, blockIdx.x);
    for (int run = blockIdx.x, count = 0;; run += gridDim.x, ++count) {
      const RunInfo info = upcoming;
      upcoming = decode_run(p, run + gridDim.x);
      const int steps = (info.rows + kBK - 1) / kBK;
      if (info.group < 0 || steps == 0) {
        // The end, or an expert without rows: the description alone, on a stage without data.
        mbarrier_wait(empty_bar + pipe.stage * 8, pipe.phase ^ 1);
        ring[count % kRunRing] = info;
        mbarrier_arrive(full_bar + pipe.stage * 8);
        if (info.group < 0) return;
        pipe.advance();
        continue;
      }
      const bool resident = steps <= kStages;
      // The consumer has multiplied the previous run's last tile: its A slots are free.
      mbarrier_wait(a_free_bar, (data_runs & 1) ^ 1);
      ++data_runs;
      if (resident) {
        mbarrier_arrive_expect_tx(a_full_bar, steps * kTileABytes);
        for (int step = 0; step < steps; ++step) {
#pragma unroll
          for (int box = 0; box < 2; ++box) {
            tma_load_2d(a_slots + step * kTileABytes + box * kBoxBytes, &params.map_a, a_full_bar, info.m0 + box * 64,
                        info.row_start + step * kBK);
          }
        }
      }
      for (int t = 0; t < info.tiles; ++t) {
        const int n0 = info.n0 + t * kRunBN;
        for (int step = 0; step < steps; ++step) {
          mbarrier_wait(empty_bar + pipe.stage * 8, pipe.phase ^ 1);
          if (t == 0 && step == 0) ring[count % kRunRing] = info;
          const uint32_t bar = full_bar + pipe.stage * 8;
          const int row = info.row_start + step * kBK;
          mbarrier_arrive_expect_tx(bar, resident ? kRunBBytes : kTileABytes + kRunBBytes);
          if (!resident) {
#pragma unroll
            for (int box = 0; box < 2; ++box) {
              tma_load_2d(a_slots + pipe.stage * kTileABytes + box * kBoxBytes, &params.map_a, bar,
                          info.m0 + box * 64, row);
            }
          }
#pragma unroll
          for (int box = 0; box < kRunBN / 64; ++box) {
            tma_load_2d(b_slots + pipe.stage * kRunBBytes + box * kBoxBytes, &params.map_b, bar, n0 + box * 64, row);
          }
          pipe.advance();
        }
      }
    }
  }

  consumer_registers<kRunBN, 1>();
  const int ctid = tid % 128;
  __nv_bfloat16* const staging = reinterpret_cast<__nv_bfloat16*>(shared + staging_offset);
  float acc[2][1][64];  // both of a's boxes: the tile's 128 rows
  float(&all_acc)[2 * 64] = reinterpret_cast<float(&)[2 * 64]>(acc);
  StageRing<kStages> pipe;
  uint32_t resident_runs = 0;
  for (int count = 0;; ++count) {
    mbarrier_wait(full_bar + pipe.stage * 8, pipe.phase);
    const RunInfo info = ring[count % kRunRing];
    if (info.group < 0) break;
    const int steps = (info.rows + kBK - 1) / kBK;
    __nv_bfloat16* const out_rows = p.grid.out + (static_cast<int64_t>(info.group) * p.grid.m + info.m0) * p.grid.n + info.n0;
    if (steps == 0) {
      if (ctid == 0) mbarrier_arrive(empty_bar + pipe.stage * 8);
      pipe.advance();
      for (int i = ctid; i < 128 * (kRunBN / 8) * info.tiles; i += 128) {
        const int tile = i / (128 * (kRunBN / 8)), within = i % (128 * (kRunBN / 8));
        *reinterpret_cast<uint4*>(out_rows + static_cast<int64_t>(within / (kRunBN / 8)) * p.grid.n + tile * kRunBN +
                                  (within % (kRunBN / 8)) * 8) = make_uint4(0, 0, 0, 0);
      }
      continue;
    }
    const bool resident = steps <= kStages;
    if (resident) {
      mbarrier_wait(a_full_bar, resident_runs & 1);
      ++resident_runs;
    }
    const int last_valid = info.rows - (steps - 1) * kBK;  // rows of the last step, 1 to kBK
    for (int t = 0; t < info.tiles; ++t) {
      ConsumerStages<kStages> stages{pipe, empty_bar, ctid};
      for (int step = 0; step < steps; ++step) {
        if (t > 0 || step > 0) mbarrier_wait(full_bar + pipe.stage * 8, pipe.phase);
        const uint32_t tile_a = a_slots + (resident ? step : pipe.stage) * kTileABytes;
        const uint32_t tile_b = b_slots + pipe.stage * kRunBBytes;
        if (step == steps - 1 && last_valid < kBK) {
          // Rows past the expert (the next expert's, or TMA's zero fill): zeroed in a and b so that
          // not even an infinity there reaches this sum. A resident a is zeroed once per run.
          if (!resident || t == 0) zero_rows_past(shared + (tile_a - base), 2, last_valid, ctid);
          zero_rows_past(shared + (tile_b - base), kRunBN / 64, last_valid, ctid);
          // Hand the zeros to the async proxy that wgmma reads through.
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
          named_barrier(3, 128);
        }
        wgmma_fence();
        multiply<kRunBN, 2, kBK / 16>(acc, tile_a, tile_b, 0, step == 0);
        wgmma_commit();
        stages.next(all_acc);
      }
      stages.finish(all_acc);
      // The run's a has been read for the last time: the producer may load the next run's.
      if (t == info.tiles - 1 && ctid == 0) mbarrier_arrive(a_free_bar);
#pragma unroll
      for (int bx = 0; bx < 2; ++bx) {
        __nv_bfloat16* const box_rows = out_rows + static_cast<int64_t>(bx) * 64 * p.grid.n + t * kRunBN;
        store_rows(acc[bx], staging, ctid, 1, 64, [&](int row, int column, uint4 value) {
          *reinterpret_cast<uint4*>(box_rows + static_cast<int64_t>(row) * p.grid.n + column) = value;
        });
      }
    }
  }
#else
  __trap();  // built without sm_90a: grouped_gemm_available() reports false and no caller launches this
#endif
}

// Validates the operands; returns (M, N).
std::pair<int64_t, int64_t> check_operands(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends,
                                           int64_t tile_n, int64_t ctas_per_sm) {
  check_grouped_gemm_operands(a, b, ends, 2);
  TORCH_CHECK(b.size(0) == a.size(0), "a and b must have the same rows, got ", text(a.sizes()), " and ",
              text(b.sizes()));
  const int64_t m = a.size(1), n = b.size(1);
  TORCH_CHECK(m % 128 == 0 && m > 0, "a's columns must be a positive multiple of 128, got ", text(m));
  TORCH_CHECK(n % 128 == 0 && n > 0, "b's columns must be a positive multiple of 128, got ", text(n));
  TORCH_CHECK(tile_n == 128 || (tile_n == 256 && n % 256 == 0), "tile_n must be 128, or 256 dividing b's columns");
  TORCH_CHECK(ctas_per_sm == 1 || (ctas_per_sm == 2 && tile_n == 128),
              "ctas_per_sm must be 1, or 2 with tile_n 128, got ", text(ctas_per_sm));
  TORCH_CHECK(ends.size(0) * (m / 128) * (n / 128) < (int64_t{1} << 30), "too many output tiles");
  TORCH_CHECK(grouped_gemm_available(), "the grouped GEMM kernels need a compute capability 9.0 GPU and an sm_90a build");
  return {m, n};
}

// Encodes a's and b's tensor maps into `params` and launches `kernel` persistently: one CTA per
// unit of work, at most `ctas_per_sm` per SM.
template <class P>
void launch_persistent(const void* kernel, P* params, const at::Tensor& a, const at::Tensor& b, int64_t work,
                       int threads, int ctas_per_sm, int shared_bytes) {
  encode_tensor_map(&params->map_a, a.data_ptr(), a.size(0), a.size(1), kBK);
  encode_tensor_map(&params->map_b, b.data_ptr(), a.size(0), b.size(1), kBK);
  const int sms = multiprocessors(a.device().index());
  const unsigned ctas = static_cast<unsigned>(std::min<int64_t>(work, int64_t{sms} * ctas_per_sm));
  allow_shared_memory(kernel, shared_bytes, a.device().index());
  void* args[] = {params};
  C10_CUDA_CHECK(cudaLaunchKernel(kernel, dim3(ctas), dim3(threads), args, shared_bytes,
                                  c10::cuda::getCurrentCUDAStream()));
}

// The output grid of an (E, m, n) gradient `out` in kBM-row tiles and `n_tiles` column tiles.
Grid grid(const at::Tensor& ends, const at::Tensor& out, int64_t m, int64_t n, int64_t n_tiles) {
  return Grid{ends.data_ptr<int32_t>(), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(m / kBM), static_cast<int>(n_tiles)};
}

template <int kBN, int kConsumers>
void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, const at::Tensor& out) {
  using S = Shape<kBN, kConsumers>;
  const int64_t m = a.size(1), n = b.size(1);
  const int64_t tiles = ends.size(0) * (m / kBM) * (n / kBN);
  auto params = std::make_unique<Params>();
  params->p = Problem{grid(ends, out, m, n, n / kBN), static_cast<int>(tiles)};
  launch_persistent(reinterpret_cast<const void*>(weight_grad_kernel<kBN, kConsumers>), params.get(), a, b, tiles,
                    S::kThreads, S::kCtasPerSm, S::kSharedBytes);
}

void launch_runs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, const at::Tensor& out,
                 int64_t run_tiles) {
  using S = RunShape;
  const int64_t m = a.size(1), n = b.size(1);
  const int64_t n_tiles = n / kRunBN, runs_per_row = (n_tiles + run_tiles - 1) / run_tiles;
  const int64_t runs = ends.size(0) * (m / kBM) * runs_per_row;
  auto params = std::make_unique<RunParams>();
  params->p = RunProblem{grid(ends, out, m, n, n_tiles), static_cast<int>(runs_per_row), static_cast<int>(run_tiles),
                         static_cast<int>(runs)};
  launch_persistent(reinterpret_cast<const void*>(weight_grad_runs_kernel), params.get(), a, b, runs, S::kThreads,
                    S::kCtasPerSm, S::kSharedBytes);
}

}  // namespace

at::Tensor grouped_gemm_weight_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, int64_t tile_n,
                                    int64_t ctas_per_sm, int64_t run_tiles) {
  const auto [m, n] = check_operands(a, b, ends, tile_n, ctas_per_sm);
  TORCH_CHECK(run_tiles >= 1, "run_tiles must be at least 1, got ", text(run_tiles));
  TORCH_CHECK(run_tiles == 1 || ctas_per_sm == 2, "run_tiles above 1 needs ctas_per_sm 2, got ", text(ctas_per_sm));
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(0) == 0) return at::zeros({ends.size(0), m, n}, a.options());
  auto out = at::empty({ends.size(0), m, n}, a.options());
  bind_context(a.device().index());
  if (run_tiles > 1) {
    launch_runs(a, b, ends, out, run_tiles);
  } else if (ctas_per_sm == 2) {
    launch<128, 1>(a, b, ends, out);
  } else {
    tile_n == 256 ? launch<256, 2>(a, b, ends, out) : launch<128, 2>(a, b, ends, out);
  }
  return out;
}

}  // namespace lightning_moe

// Row-grouped GEMMs on Hopper tensor cores, with TMA loads and warp specialisation: see grouped_gemm.h.
//
// A persistent kernel, one CTA of three warpgroups per SM. Warpgroup 0 is the producer: one of its
// warps walks the CTA's output tiles (a group's 128 rows x 128 columns, columns fastest, tiles
// dealt round-robin to the CTAs) and, for each 64-wide K slice, has the TMA unit copy A's rows and
// B's slice into a ring of shared-memory stages (as many as fit) in the 128-byte swizzle, each
// stage's arrival counted on its "full" mbarrier. Warpgroups 1 and 2 are the consumers: each
// multiplies its 64 rows of the tile with wgmma m64n128k16 (one group of four in flight while the
// next stage's wait runs), hands each stage back on its "empty" mbarrier once read, and stores its
// rows of the finished tile straight from its registers (wgmma.cuh's store_rows_direct): without
// a staging buffer, the 192-row tiles below have room for a fourth stage.
//
// Two variants change the CTA (wgmma.cuh's CtaLayout): two CTAs per SM of one consumer each, over
// 128 x 128 tiles; and tall tiles, 192 x 256 with three consumers of 64 rows each, so that a group
// of 129-192 rows takes one tile across, not two that each stream the group's weights.
//
// A is loaded in 64-row boxes, and only the boxes that hold rows of the tile's group
// (live_slices): a group of 128 rows in a 192-row tile leaves the third box unloaded, and its
// consumer hands the stages back unread. Inside a loaded box, rows past the group's last row are
// the next group's rows (or TMA's zero fill past the end of a): they only reach output rows that
// are not written. No atomics: each output element is written by one CTA.
//
// Where the rows are a permutation of the tokens (one assignment per token), two epilogues write
// token rows directly (row r of the sorted rows is token row_token[r]): the input gradient in
// token order (Epilogue::kTokenRows, for the permutation's backward), and the rows together with
// the weighted combine out[t] = weight[t] * row (Epilogue::kRowsAndCombine, for the unpermute),
// each the bits of the row kernel the layer would run next (src_cuda/rows.cuh: fmaf(weight, row,
// 0) rounded to bf16).
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
constexpr int kBoxABytes = 64 * kBK * 2;  // A's 64-row box
static_assert(kBK == 64, "check_operands' messages name the tile sizes");

// The constants of a CTA (CtaLayout) over tiles kBN columns wide (128, or 256 for many rows per
// group) and kBM rows tall: 128, or 192 with three consumers.
template <int kBN, int kConsumers>
struct Shape : CtaLayout<kBN, kConsumers> {
  using Layout = CtaLayout<kBN, kConsumers>;
  static constexpr int kRowHalves = kConsumers == 1 ? 2 : 1;  // 64-row slices of the tile per consumer
  static constexpr int kBM = 64 * kRowHalves * kConsumers;
  static constexpr int kHalves = kBN / 128;  // wgmma n128 products per k16 step
  static constexpr int kTileABytes = kBM * kBK * 2;
  static constexpr int kTileBBytes = kBN * kBK * 2;
  static constexpr int kStageBytes = kTileABytes + kTileBBytes;
  static constexpr int kRingBytes = kRing * 20;  // sizeof(TileInfo)
  static constexpr int shared_bytes(int stages) { return 1024 + stages * (kStageBytes + 2 * 8) + kRingBytes; }
  // As many stages as fit beside the barriers and the tile ring (the consumers store from their
  // registers, with no staging buffer), and fewer than kRing.
  static constexpr int most_stages() {
    int stages = 1;
    while (stages + 1 < kRing && Layout::fits(shared_bytes(stages + 1))) ++stages;
    return stages;
  }
  static constexpr int kStages = most_stages();
  static constexpr int kBarriersBytes = 2 * kStages * 8;
  static constexpr int kSharedBytes = shared_bytes(kStages);
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

// What the consumers write for each finished row (see the top of the file).
enum class Epilogue : int {
  kRows,            // out[r]
  kTokenRows,       // out[row_token[r]]
  kRowsAndCombine,  // out[r], and combined[row_token[r]] = row_weight[row_token[r]] * out[r]
};

struct Problem {
  const int32_t* ends;
  __nv_bfloat16* out;
  const int64_t* row_token;  // kTokenRows, kRowsAndCombine: the token of each sorted row
  const float* token_weight;  // kRowsAndCombine: each token's combine weight
  __nv_bfloat16* combined;    // kRowsAndCombine: (tokens, n)
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
// The 64-row slices of a kBM-row tile that hold rows of its group: only these are loaded (a group
// of 128 rows leaves a 192-row tile's third slice out). A consumer of one slice skips an unloaded
// one; the one consumer of two CTAs per SM multiplies both of its slices whatever they hold, and
// stores only the group's rows.
template <int kBM>
__device__ __forceinline__ int live_slices(const TileInfo& info) {
  return min(kBM / 64, (info.group_rows - info.row0 + 63) / 64);
}

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

// The weighted combine of one 16-byte vector of a sorted row into its token's row, as the
// unpermute's row kernel computes it for one assignment per token: fmaf(weight, value, 0) in
// float32, rounded to bf16.
__device__ __forceinline__ uint4 weighted(uint4 value, float weight) {
  uint32_t words[4] = {value.x, value.y, value.z, value.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
    const __nv_bfloat162 out = __floats2bfloat162_rn(fmaf(weight, pair.x, 0.f), fmaf(weight, pair.y, 0.f));
    words[i] = *reinterpret_cast<const uint32_t*>(&out);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// kBKN: b is (E, K, N) (MN-major B tiles, 64-column boxes) rather than (E, N, K). kBN: output
// columns per tile. kConsumers: consumer warpgroups per CTA (see Shape). kEpilogue: an Epilogue.
template <bool kBKN, int kBN, int kConsumers, int kEpilogue>
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
  const uint32_t full_bar = base + kStages * kStageBytes;  // kStages full, then kStages empty
  const uint32_t empty_bar = full_bar + kStages * 8;
  TileInfo* const ring = reinterpret_cast<TileInfo*>(shared + kStages * kStageBytes + S::kBarriersBytes);

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
      const int live = live_slices<S::kBM>(info);
      const int b_row = info.group * p.b_rows_per_group;
      for (int step = 0; step < k_steps; ++step) {
        if (step > 0) mbarrier_wait(empty_bar + pipe.stage * 8, pipe.phase ^ 1);
        if (lane == 0) {
          const uint32_t bar = full_bar + pipe.stage * 8;
          const uint32_t tile_a = base + pipe.stage * kStageBytes;
          const uint32_t tile_b = tile_a + S::kTileABytes;
          mbarrier_arrive_expect_tx(bar, S::kTileBBytes + live * kBoxABytes);
          for (int box = 0; box < live; ++box) {
            tma_load_2d(tile_a + box * kBoxABytes, &params.map_a, bar, step * kBK, a_row + box * 64);
          }
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
  float acc[S::kRowHalves][S::kHalves][64];
  float(&all_acc)[S::kRowHalves * S::kHalves * 64] =
      reinterpret_cast<float(&)[S::kRowHalves * S::kHalves * 64]>(acc);
  StageRing<kStages> pipe;
  for (int count = 0;; ++count) {
    mbarrier_wait(full_bar + pipe.stage * 8, pipe.phase);
    const TileInfo info = ring[count % kRing];
    if (info.group < 0) break;
    if (S::kRowHalves == 1 && half >= live_slices<S::kBM>(info)) {
      // None of the group's rows is in this warpgroup's slice, which the producer did not load:
      // hand each stage back unread.
      for (int step = 0; step < k_steps; ++step) {
        if (step > 0) mbarrier_wait(full_bar + pipe.stage * 8, pipe.phase);
        if (ctid == 0) mbarrier_arrive(empty_bar + pipe.stage * 8);
        pipe.advance();
      }
      continue;
    }
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
          const int rows64 = half * S::kRowHalves + r;  // the tile's 64-row slice this product fills
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
      const int64_t first_row = info.group_start + row_base;
      store_rows_direct(acc[r], ctid, info.group_rows - row_base, [&](int row, int column, uint4 value) {
        const int64_t sorted_row = first_row + row;
        const int64_t column0 = info.n0 + column;
        if constexpr (kEpilogue != static_cast<int>(Epilogue::kTokenRows)) {
          *reinterpret_cast<uint4*>(p.out + sorted_row * p.n + column0) = value;
        }
        if constexpr (kEpilogue != static_cast<int>(Epilogue::kRows)) {
          const int64_t token = __ldg(p.row_token + sorted_row);
          if constexpr (kEpilogue == static_cast<int>(Epilogue::kTokenRows)) {
            *reinterpret_cast<uint4*>(p.out + token * p.n + column0) = value;
          } else {
            *reinterpret_cast<uint4*>(p.combined + token * p.n + column0) = weighted(value, __ldg(p.token_weight + token));
          }
        }
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

// The pointers of the token epilogues (all null for Epilogue::kRows).
struct TokenRows {
  const int64_t* row_token = nullptr;
  const float* token_weight = nullptr;
  __nv_bfloat16* combined = nullptr;
};

template <bool kBKN, int kBN, int kConsumers, int kEpilogue = static_cast<int>(Epilogue::kRows)>
void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, const at::Tensor& out, int64_t k,
            int64_t n, const TokenRows& tokens = {}) {
  using S = Shape<kBN, kConsumers>;
  constexpr int kBM = S::kBM;
  const int64_t groups = ends.size(0), rows = a.size(0);
  // At most floor(R / BM) + E row tiles: each group adds at most one partial tile.
  const int64_t slots = rows / kBM + groups;
  const int64_t tiles_bound = slots * (n / kBN);
  auto params = std::make_unique<Params>();
  encode_tensor_map(&params->map_a, a.data_ptr(), rows, k, 64);  // 64-row boxes (live_slices)
  if constexpr (kBKN) {
    encode_tensor_map(&params->map_b, b.data_ptr(), groups * k, n, kBK);
  } else {
    encode_tensor_map(&params->map_b, b.data_ptr(), groups * n, k, kBN);
  }
  params->p = Problem{ends.data_ptr<int32_t>(),
                      reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                      tokens.row_token,
                      tokens.token_weight,
                      tokens.combined,
                      static_cast<int>(groups),
                      static_cast<int>(n),
                      static_cast<int>(k),
                      static_cast<int>(kBKN ? k : n),
                      static_cast<int>(tiles_bound)};
  const int sms = multiprocessors(a.device().index());
  const unsigned ctas = static_cast<unsigned>(std::min<int64_t>(tiles_bound, int64_t{sms} * S::kCtasPerSm));
  const void* kernel = reinterpret_cast<const void*>(grouped_gemm_kernel<kBKN, kBN, kConsumers, kEpilogue>);
  allow_shared_memory(kernel, S::kSharedBytes, a.device().index());
  void* args[] = {params.get()};
  C10_CUDA_CHECK(cudaLaunchKernel(kernel, dim3(ctas), dim3(S::kThreads), args, S::kSharedBytes,
                                  c10::cuda::getCurrentCUDAStream()));
}

void check_tiles(int64_t tile_n, int64_t ctas_per_sm, int64_t tile_m) {
  TORCH_CHECK(ctas_per_sm == 1 || (ctas_per_sm == 2 && tile_n == 128),
              "ctas_per_sm must be 1, or 2 with tile_n 128, got ", text(ctas_per_sm));
  TORCH_CHECK(tile_m == 128 || (tile_m == 192 && tile_n == 256 && ctas_per_sm == 1),
              "tile_m must be 128, or 192 with tile_n 256 and ctas_per_sm 1, got tile_m ", text(tile_m),
              " with tile_n ", text(tile_n), " and ctas_per_sm ", text(ctas_per_sm));
}

// The one-CTA-per-SM tile shapes: grouped_gemm_rows at ctas_per_sm 1, and the only shapes the token
// epilogues are built for.
template <bool kBKN, int kEpilogue>
void launch_one_cta(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, const at::Tensor& out,
                    int64_t k, int64_t n, int64_t tile_n, int64_t tile_m, const TokenRows& tokens) {
  if (tile_m == 192) {
    launch<kBKN, 256, 3, kEpilogue>(a, b, ends, out, k, n, tokens);
  } else if (tile_n == 256) {
    launch<kBKN, 256, 2, kEpilogue>(a, b, ends, out, k, n, tokens);
  } else {
    launch<kBKN, 128, 2, kEpilogue>(a, b, ends, out, k, n, tokens);
  }
}

// The checks of the token epilogues: one sorted row per token, every row inside a group.
void check_token_rows(const at::Tensor& a, const at::Tensor& row_token, int64_t ctas_per_sm) {
  TORCH_CHECK(ctas_per_sm == 1, "the token epilogues run with ctas_per_sm 1, got ", text(ctas_per_sm));
  check_index(row_token, a, "row_token");
  TORCH_CHECK(row_token.size(0) == a.size(0), "row_token must name the token of each of a's ", text(a.size(0)),
              " rows, got shape ", text(row_token.sizes()));
}

}  // namespace

at::Tensor grouped_gemm_rows(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, bool b_is_kn,
                             int64_t tile_n, int64_t ctas_per_sm, int64_t tile_m) {
  const auto [k, n] = check_operands(a, b, ends, b_is_kn, tile_n);
  check_tiles(tile_n, ctas_per_sm, tile_m);
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), n}, a.options());
  if (a.size(0) == 0) return out;
  bind_context(a.device().index());
  constexpr int kRows = static_cast<int>(Epilogue::kRows);
  if (ctas_per_sm == 2) {  // 128 x 128 tiles (check_tiles)
    b_is_kn ? launch<true, 128, 1>(a, b, ends, out, k, n) : launch<false, 128, 1>(a, b, ends, out, k, n);
  } else if (b_is_kn) {
    launch_one_cta<true, kRows>(a, b, ends, out, k, n, tile_n, tile_m, {});
  } else {
    launch_one_cta<false, kRows>(a, b, ends, out, k, n, tile_n, tile_m, {});
  }
  return out;
}

at::Tensor grouped_gemm_rows_to_tokens(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends,
                                       const at::Tensor& row_token, int64_t tile_n, int64_t ctas_per_sm,
                                       int64_t tile_m) {
  const auto [k, n] = check_operands(a, b, ends, true, tile_n);
  check_tiles(tile_n, ctas_per_sm, tile_m);
  check_token_rows(a, row_token, ctas_per_sm);
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), n}, a.options());
  if (a.size(0) == 0) return out;
  bind_context(a.device().index());
  TokenRows tokens;
  tokens.row_token = row_token.data_ptr<int64_t>();
  launch_one_cta<true, static_cast<int>(Epilogue::kTokenRows)>(a, b, ends, out, k, n, tile_n, tile_m, tokens);
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_rows_and_combine(const at::Tensor& a, const at::Tensor& b,
                                                                 const at::Tensor& ends, const at::Tensor& row_token,
                                                                 const at::Tensor& token_weight, int64_t tile_n,
                                                                 int64_t ctas_per_sm, int64_t tile_m) {
  const auto [k, n] = check_operands(a, b, ends, false, tile_n);
  check_tiles(tile_n, ctas_per_sm, tile_m);
  check_token_rows(a, row_token, ctas_per_sm);
  check_cuda_contiguous(token_weight, "token_weight");
  check_same_device(token_weight, a, "token_weight");
  check_dtype(token_weight, at::kFloat, "token_weight");
  TORCH_CHECK(token_weight.dim() == 1 && token_weight.size(0) == a.size(0), "token_weight must hold one weight per token (",
              text(a.size(0)), "), got shape ", text(token_weight.sizes()));
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), n}, a.options());
  auto combined = at::empty({a.size(0), n}, a.options());
  if (a.size(0) == 0) return {out, combined};
  bind_context(a.device().index());
  TokenRows tokens;
  tokens.row_token = row_token.data_ptr<int64_t>();
  tokens.token_weight = token_weight.data_ptr<float>();
  tokens.combined = reinterpret_cast<__nv_bfloat16*>(combined.data_ptr());
  launch_one_cta<false, static_cast<int>(Epilogue::kRowsAndCombine)>(a, b, ends, out, k, n, tile_n, tile_m, tokens);
  return {out, combined};
}

}  // namespace lightning_moe

// Grouped GEMMs on Hopper tensor cores: see grouped_gemm.h.
//
// One CTA computes one (64 * kGroups) x 128 tile of one group's output with kGroups warpgroups,
// each issuing wgmma m64n128k16 on its 64 rows. The K loop streams 64-wide slices of A and B
// through a kStages-deep ring of shared-memory buffers filled with cp.async (16-byte copies,
// zero-filled past a group's last row), laid out in the 128-byte swizzle wgmma reads:
//   K-major tile (rows x 64 of K): row r's 16-byte chunk c at r * 128 + ((c ^ (r % 8)) * 16);
//   MN-major tile (64 of K x cols): sub-tiles of 64 columns, each k-row's chunk c likewise.
// Each wgmma descriptor then names its 8-row core-matrix stride (1024 bytes) and, for MN-major
// operands wider than 64, the stride between 64-column sub-tiles.
//
// The output tile goes through shared memory so that each thread writes 16-byte vectors along
// rows. No atomics: each output element is written by one CTA, its sum in a fixed order.
#include "grouped_gemm.h"

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include "checks.h"

namespace lightning_moe {
namespace {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LIGHTNING_MOE_WGMMA 1
#endif

constexpr int kBK = 64;        // K per pipeline stage
constexpr int kBN = 128;       // output columns per CTA
[[maybe_unused]] constexpr int kRowBytes = 128;  // one swizzled shared-memory row: 64 bf16
constexpr int kOutPitch = kBN + 8;  // staging row pitch (elements): conflict-free fragment stores

#ifdef LIGHTNING_MOE_WGMMA
__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Offset of 16-byte chunk `chunk` of row `row` in a 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ void copy16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (all in 16-byte units).
__device__ __forceinline__ uint64_t descriptor(uint32_t address, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | (static_cast<uint64_t>((leading & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride & 0x3FFFF) >> 4) << 32) | (uint64_t{1} << 62);
}

// One wgmma m64n128k16: d += A * B, bf16 inputs read from shared memory through their descriptors,
// float32 accumulators in registers. kTransA / kTransB = 1 mark MN-major A / B (0: K-major).
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, %67, %68;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(1), "n"(kTransA), "n"(kTransB));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all(float (&d)[64]) {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif  // LIGHTNING_MOE_WGMMA

struct Problem {
  const __nv_bfloat16* a;
  const __nv_bfloat16* b;
  __nv_bfloat16* out;
  const int32_t* ends;
  int num_groups;
  int n;  // output columns
  int k;  // contraction length (a's columns)
};

// Where a CTA's tile lies: its group, the group's first row and row count, and the tile's first
// row within the group.
struct Tile {
  int group;
  int group_start;
  int group_rows;
  int row0;
};

#ifdef LIGHTNING_MOE_WGMMA
// Tile slot `slot` of the ceil(rows_e / kBM) tiles of each group in order. Warp 0 scans the
// groups' tile counts 32 at a time; group = -1 when the slot lies past the last tile.
template <int kBM>
__device__ Tile locate_tile(const Problem& p, int slot) {
  __shared__ Tile tile;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    bool found = false;
    for (int base = 0; base < p.num_groups && !found; base += 32) {
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
      if (mine) tile = Tile{group, start, rows, (slot - first) * kBM};
      found = __any_sync(0xffffffffu, mine);
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (!found && lane == 0) tile.group = -1;
  }
  __syncthreads();
  return tile;
}
#endif  // LIGHTNING_MOE_WGMMA

// kBKN: b is (E, K, N) (MN-major B tiles) rather than (E, N, K) (K-major).
template <bool kBKN, int kGroups, int kStages>
__global__ void __launch_bounds__(128 * kGroups) grouped_gemm_kernel(const Problem p) {
#ifdef LIGHTNING_MOE_WGMMA
  static_assert(kGroups == 1 || kGroups == 2, "the copy loops split each tile evenly over 128 or 256 threads");
  constexpr int kBM = 64 * kGroups;
  constexpr int kThreads = 128 * kGroups;
  constexpr int kTileA = kBM * kBK * 2;  // bytes
  constexpr int kTileB = kBN * kBK * 2;
  constexpr int kStageBytes = kTileA + kTileB;

  extern __shared__ uint8_t shared_raw[];
  // 1024-byte alignment: the swizzle pattern is taken from address bits 4-9.
  const uint32_t raw_address = shared_address(shared_raw);
  const uint32_t base = (raw_address + 1023u) & ~1023u;
  uint8_t* const shared = shared_raw + (base - raw_address);

  const int tid = threadIdx.x;
  const int n_tiles = p.n / kBN;
  const int n0 = (blockIdx.x % n_tiles) * kBN;
  const Tile tile = locate_tile<kBM>(p, blockIdx.x / n_tiles);
  if (tile.group < 0) return;
  const int k_steps = p.k / kBK;
  const __nv_bfloat16* const weight = p.b + static_cast<int64_t>(tile.group) * p.n * p.k;

  // Fill pipeline stage `stage` with K slice `step`.
  auto load = [&](int stage, int step) {
    const uint32_t tile_a = base + stage * kStageBytes;
    const uint32_t tile_b = tile_a + kTileA;
    const int k0 = step * kBK;
    // A: the group's rows, K-major; rows past the group are zero-filled.
#pragma unroll
    for (int it = 0; it < kBM * 8 / kThreads; ++it) {
      const int i = it * kThreads + tid;
      const int row = i >> 3, chunk = i & 7;
      const bool valid = tile.row0 + row < tile.group_rows;
      const int64_t src_row = tile.group_start + (valid ? tile.row0 + row : 0);
      copy16(tile_a + swizzled(row, chunk), p.a + src_row * p.k + k0 + chunk * 8, valid);
    }
    if constexpr (!kBKN) {  // b (E, N, K): K-major rows of B^T
#pragma unroll
      for (int it = 0; it < kBN * 8 / kThreads; ++it) {
        const int i = it * kThreads + tid;
        const int row = i >> 3, chunk = i & 7;
        copy16(tile_b + swizzled(row, chunk), weight + static_cast<int64_t>(n0 + row) * p.k + k0 + chunk * 8, true);
      }
    } else {  // b (E, K, N): MN-major, two 64-column sub-tiles of kBK k-rows
#pragma unroll
      for (int it = 0; it < kBK * 16 / kThreads; ++it) {
        const int i = it * kThreads + tid;
        const int row = i >> 4, chunk = i & 15;
        const uint32_t dst = tile_b + (chunk >> 3) * (kBK * kRowBytes) + swizzled(row, chunk & 7);
        copy16(dst, weight + static_cast<int64_t>(k0 + row) * p.n + n0 + chunk * 8, true);
      }
    }
  };

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_steps) load(s, s);
    copy_commit();
  }

  const int warpgroup = tid / 128;  // this warpgroup's 64 rows of the tile
  for (int step = 0; step < k_steps; ++step) {
    copy_wait<kStages - 2>();
    // cp.async writes shared memory through the generic proxy; wgmma reads it through the async one.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    const uint32_t tile_a = base + (step % kStages) * kStageBytes;
    const uint32_t tile_b = tile_a + kTileA;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      // K-major: 16 elements (32 bytes) further along each row per k16 step. MN-major: 16 k-rows
      // (of 128 bytes) further, the two 64-column sub-tiles kBK rows apart.
      const uint64_t desc_a = descriptor(tile_a + warpgroup * 64 * kRowBytes + kk * 32, 16, 1024);
      const uint64_t desc_b = kBKN ? descriptor(tile_b + kk * 16 * kRowBytes, kBK * kRowBytes, 1024)
                                   : descriptor(tile_b + kk * 32, 16, 1024);
      wgmma_m64n128k16<0, kBKN ? 1 : 0>(acc, desc_a, desc_b);
    }
    wgmma_commit();
    // Refill the stage read by the previous step: every warpgroup finished it before the barrier.
    const int next = step + kStages - 1;
    if (next < k_steps) load(next % kStages, next);
    copy_commit();
    wgmma_wait_all(acc);
  }
  copy_wait<0>();
  __syncthreads();

  // Stage the tile in shared memory as bf16 (the accumulator layout of wgmma: warp w of the
  // warpgroup holds rows 16w + lane / 4 and that + 8, two adjacent columns per 8-column chunk),
  // then write 16-byte row vectors.
  __nv_bfloat16* const staging = reinterpret_cast<__nv_bfloat16*>(shared);
  {
    const int warp = (tid / 32) % 4, lane = tid % 32;
    const int row = warpgroup * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      const int col = j * 8 + (lane % 4) * 2;
      *reinterpret_cast<__nv_bfloat162*>(staging + row * kOutPitch + col) =
          __floats2bfloat162_rn(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<__nv_bfloat162*>(staging + (row + 8) * kOutPitch + col) =
          __floats2bfloat162_rn(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
  __syncthreads();
#pragma unroll
  for (int it = 0; it < kBM * (kBN / 8) / kThreads; ++it) {
    const int i = it * kThreads + tid;
    const int row = i / (kBN / 8), chunk = i % (kBN / 8);
    if (tile.row0 + row >= tile.group_rows) continue;
    const uint4 value = *reinterpret_cast<const uint4*>(staging + row * kOutPitch + chunk * 8);
    *reinterpret_cast<uint4*>(p.out + static_cast<int64_t>(tile.group_start + tile.row0 + row) * p.n + n0 +
                              chunk * 8) = value;
  }
#else
  __trap();  // built without sm_90a: grouped_gemm_available() reports false and no caller launches this
#endif
}

template <bool kBKN, int kGroups, int kStages>
void launch(const Problem& problem, int64_t num_ctas) {
  constexpr int kBytes = kStages * (64 * kGroups + kBN) * kBK * 2 + 1024;  // + 1024: alignment slack
  static_assert((64 * kGroups) * kOutPitch * 2 <= kBytes - 1024, "the output staging must fit the pipeline buffers");
  auto kernel = grouped_gemm_kernel<kBKN, kGroups, kStages>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
  kernel<<<static_cast<unsigned>(num_ctas), 128 * kGroups, kBytes, c10::cuda::getCurrentCUDAStream()>>>(problem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void probe_kernel(int* built) {
#ifdef LIGHTNING_MOE_WGMMA
  *built = 1;
#else
  *built = 0;
#endif
}

static_assert(kBK == 64 && kBN == 128, "check_operands' messages name the tile sizes");

// Validates grouped_gemm_rows' operands; returns (K, N).
std::pair<int64_t, int64_t> check_operands(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends,
                                           bool b_is_kn) {
  check_cuda_contiguous(a, "a");
  check_cuda_contiguous(b, "b");
  check_cuda_contiguous(ends, "ends");
  check_same_device(b, a, "b");
  check_same_device(ends, a, "ends");
  check_dtype(a, at::kBFloat16, "a");
  check_dtype(b, at::kBFloat16, "b");
  check_dtype(ends, at::kInt, "ends");
  check_dim(a, 2, "a");
  check_dim(b, 3, "b");
  check_dim(ends, 1, "ends");
  const int64_t groups = ends.size(0), k = a.size(1);
  TORCH_CHECK(groups >= 1, "ends must name at least one group");
  TORCH_CHECK(a.size(0) < (int64_t{1} << 31), "a must have fewer than 2^31 rows, got ", text(a.size(0)));
  TORCH_CHECK(b.size(0) == groups, "b must hold one matrix per group (", text(groups), "), got shape ",
              text(b.sizes()));
  const int64_t n = b_is_kn ? b.size(2) : b.size(1);
  TORCH_CHECK((b_is_kn ? b.size(1) : b.size(2)) == k, "b's contraction dimension must be a's columns (",
              text(k), "), got shape ", text(b.sizes()));
  TORCH_CHECK(k % 64 == 0 && k > 0, "a's columns must be a positive multiple of 64, got ", text(k));
  TORCH_CHECK(n % 128 == 0 && n > 0, "the output columns must be a positive multiple of 128, got ", text(n));
  TORCH_CHECK(grouped_gemm_available(), "the grouped GEMM kernels need a compute capability 9.0 GPU and an sm_90a build");
  return {k, n};
}

}  // namespace

bool grouped_gemm_available() {
  const int device = c10::cuda::current_device();
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0) return false;
  // Whether this build holds the sm_90a kernels, asked of each device once (one host sync).
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

at::Tensor grouped_gemm_rows(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends, bool b_is_kn) {
  const auto [k, n] = check_operands(a, b, ends, b_is_kn);
  const int64_t groups = ends.size(0);
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), n}, a.options());
  if (a.size(0) == 0) return out;
  // 128-row tiles, three stages: the fastest of 64 / 128 rows and three / four stages on an H200 for
  // ~128 rows per group (benchmarks/RESULTS.md).
  constexpr int kGroups = 2;
  const Problem problem{reinterpret_cast<const __nv_bfloat16*>(a.data_ptr()),
                        reinterpret_cast<const __nv_bfloat16*>(b.data_ptr()),
                        reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                        ends.data_ptr<int32_t>(),
                        static_cast<int>(groups),
                        static_cast<int>(n),
                        static_cast<int>(k)};
  // At most floor(R / BM) + E tiles: each group adds at most one partial tile.
  const int64_t slots = a.size(0) / (64 * kGroups) + groups;
  const int64_t ctas = slots * (n / kBN);
  if (b_is_kn) {
    launch<true, kGroups, 3>(problem, ctas);
  } else {
    launch<false, kGroups, 3>(problem, ctas);
  }
  return out;
}

}  // namespace lightning_moe

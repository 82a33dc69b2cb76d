// Device helpers of the Hopper tensor-core kernel (grouped_gemm.cu): TMA loads into
// 128-byte-swizzled shared-memory tiles, mbarriers, named barriers, wgmma shared-memory
// descriptors, and the wgmma m64n128k16 instruction. Defined only in sm_90a device passes
// (LIGHTNING_MOE_WGMMA); elsewhere the kernel compiles to a trap and the host reports it unavailable.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LIGHTNING_MOE_WGMMA 1
#endif

namespace lightning_moe {
// Internal linkage: each kernel file that includes this gets its own copy.
namespace {

[[maybe_unused]] constexpr int kRowBytes = 128;  // one swizzled shared-memory row: 64 bf16
// A consumer warpgroup's output staging buffer: 64 rows of kStagingColumns columns, pitch
// kStagingPitch elements (16-byte aligned rows, conflict-free fragment stores). Narrower than a
// tile, so that its shared memory goes to pipeline stages instead.
[[maybe_unused]] constexpr int kStagingColumns = 64;
[[maybe_unused]] constexpr int kStagingPitch = kStagingColumns + 8;
[[maybe_unused]] constexpr int kStagingBytes = 64 * kStagingPitch * 2;
// The most dynamic shared memory a CTA may have on compute capability 9.0 (227 KiB).
[[maybe_unused]] constexpr int kMaxSharedBytes = 227 * 1024;

// The CTA layout of the TMA kernels: a producer warpgroup and kConsumers consumer warpgroups over
// output tiles kBN columns wide, with the pipeline stages of 64 rows that fit beside them and a
// staging buffer per consumer (the row kernel, which has none, counts its own). 2: one CTA per SM,
// each consumer taking 64 of a tile's 128 rows. 1: two CTAs per SM, the one consumer taking all
// 128 rows, so that one CTA's epilogue runs while the other multiplies. 3 (the row kernel's tall
// tiles): one CTA per SM, each consumer taking 64 of a tile's 192 rows.
template <int kBN, int kConsumers>
struct CtaLayout {
  static_assert(kConsumers == 2 || (kConsumers == 1 && kBN == 128) || (kConsumers == 3 && kBN == 256),
                "two CTAs per SM hold 128-column tiles, tall tiles are 256 columns wide");
  static constexpr int kThreads = 128 * (1 + kConsumers);  // producer warpgroup + consumers
  static constexpr int kCtasPerSm = kConsumers == 1 ? 2 : 1;
  static constexpr int kStages = kConsumers == 1 ? 3 : kConsumers == 3 ? 3 : kBN == 128 ? 6 : 4;
  // Whether CTAs of `shared_bytes` of dynamic shared memory fit: an SM has 228 KiB, of which each
  // resident CTA leaves 1 KiB to the system.
  static constexpr bool fits(int shared_bytes) {
    return shared_bytes <= kMaxSharedBytes && kCtasPerSm * (shared_bytes + 1024) <= 228 * 1024;
  }
};

#ifdef LIGHTNING_MOE_WGMMA
// 128 x 256 tiles, 128 x 128 tiles of one consumer and 192 x 256 tiles of three need more
// registers than the consumers get at launch: the producer warpgroup gives its share up
// (producer_registers) and the consumers take it (consumer_registers). Two CTAs per SM start at 128
// registers a thread, so the producer's 88 spare go to the one consumer; four warpgroups start at
// 128 too, and the producer's 104 spare give each of three consumers 32 more.
template <int kBN, int kConsumers>
__device__ __forceinline__ void producer_registers() {
  if constexpr (kConsumers == 3) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
  } else if constexpr (kBN == 256 || kConsumers == 1) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
  }
}
template <int kBN, int kConsumers>
__device__ __forceinline__ void consumer_registers() {
  if constexpr (kConsumers == 1) asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
  if constexpr (kConsumers == 2 && kBN == 256) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  if constexpr (kConsumers == 3) asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n" ::: "memory");
}

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// The shared-space address of the dynamic shared memory `raw` rounded up to its first 1024-byte
// boundary (the 128-byte swizzle reads address bits 4-9), and `shared`, the same place as a pointer.
__device__ __forceinline__ uint32_t aligned_shared(uint8_t* raw, uint8_t*& shared) {
  const uint32_t raw_address = shared_address(raw);
  const uint32_t base = (raw_address + 1023u) & ~1023u;
  shared = raw + (base - raw_address);
  return base;
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (all in 16-byte units).
__device__ __forceinline__ uint64_t descriptor(uint32_t address, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | (static_cast<uint64_t>((leading & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride & 0x3FFFF) >> 4) << 32) | (uint64_t{1} << 62);
}

// One wgmma m64n128k16: d = A * B + (scale_d ? d : 0), bf16 inputs read from shared memory through
// their descriptors, float32 accumulators in registers; scale_d = 0 starts a tile's sum. kTransA /
// kTransB = 1 mark MN-major A / B (0: K-major).
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
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
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
}

// Waits until at most kPending wgmma groups are in flight; the accumulators `d` are read or
// written after it.
template <int kPending, int kCount>
__device__ __forceinline__ void wgmma_wait(float (&d)[kCount]) {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// mbarriers in shared memory (CTA scope): init with an arrival count; an arrival that also
// expects `bytes` of TMA transactions; a plain arrival; a wait for the phase of parity `parity`.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// A 2-D TMA load of the box at (inner, outer) of the tensor map at `map` (a kernel parameter) into
// shared memory at `dst`; its bytes count as transactions on the mbarrier `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* map, uint32_t bar, int inner, int outer) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::
          "r"(dst),
      "l"(map), "r"(bar), "r"(inner), "r"(outer)
      : "memory");
}

// Synchronises the `threads` threads (a multiple of 32) that use named barrier `id` (1-15).
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// A ring of kStages pipeline stages: the stage in use and the parity of its mbarrier phase.
template <int kStages>
struct StageRing {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// Columns 64q to 64q + 63 of a warpgroup's 64 x 128 accumulators (thread `ctid` of it; warp w holds
// rows 16w + lane / 4 and that + 8, two adjacent columns per 8-column chunk) to bf16 rows of
// `staging`.
__device__ __forceinline__ void stage_accumulators(const float (&acc)[64], int q, __nv_bfloat16* staging, int ctid) {
  const int warp = ctid / 32, lane = ctid % 32;
  const int row = warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < kStagingColumns / 8; ++j) {
    const int col = j * 8 + (lane % 4) * 2;
    const int a = 4 * (q * kStagingColumns / 8 + j);
    *reinterpret_cast<__nv_bfloat162*>(staging + row * kStagingPitch + col) = __floats2bfloat162_rn(acc[a], acc[a + 1]);
    *reinterpret_cast<__nv_bfloat162*>(staging + (row + 8) * kStagingPitch + col) =
        __floats2bfloat162_rn(acc[a + 2], acc[a + 3]);
  }
}

// A consumer warpgroup's finished tile, kHalves x 128 columns of its 64 rows, out through its
// staging buffer (kStagingColumns at a time) as 16-byte vectors of 8 bf16: store(row, column,
// vector) for each vector of the rows below `rows`, column the vector's first column in the tile.
// `barrier` is a named barrier of the warpgroup's own.
template <int kHalves, class Store>
__device__ __forceinline__ void store_rows(const float (&acc)[kHalves][64], __nv_bfloat16* staging, int ctid,
                                           int barrier, int rows, Store store) {
  constexpr int kChunks = kStagingColumns / 8;  // 16-byte vectors per staged row
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int q = 0; q < 128 / kStagingColumns; ++q) {
      named_barrier(barrier, 128);  // the previous columns have left the staging buffer
      stage_accumulators(acc[h], q, staging, ctid);
      named_barrier(barrier, 128);
#pragma unroll
      for (int it = 0; it < 64 * kChunks / 128; ++it) {
        const int i = it * 128 + ctid;
        const int row = i / kChunks, chunk = i % kChunks;
        if (row < rows) {
          store(row, h * 128 + q * kStagingColumns + chunk * 8,
                *reinterpret_cast<const uint4*>(staging + row * kStagingPitch + chunk * 8));
        }
      }
    }
  }
}

// Lanes with `first` set send x0, x1 to their partner lane (lane ^ mask) and take the partner's
// y0, y1 in their place; their partners send y0, y1 and take x0, x1 in theirs.
__device__ __forceinline__ void swap_pairs(bool first, uint32_t& x0, uint32_t& x1, uint32_t& y0, uint32_t& y1,
                                           int mask) {
  const uint32_t r0 = __shfl_xor_sync(0xffffffffu, first ? x0 : y0, mask);
  const uint32_t r1 = __shfl_xor_sync(0xffffffffu, first ? x1 : y1, mask);
  if (first) {
    x0 = r0;
    x1 = r1;
  } else {
    y0 = r0;
    y1 = r1;
  }
}

// The 4 x 4 transpose of 32-bit words across the four lanes of a row quad (lane % 4 = q): lane q
// holds m[c] = M[q][c] and ends with M[c][q]. Lanes q and q ^ 2 first swap the words whose index
// differs from the lane's in bit 1 (lanes 2, 3 words 0, 1 for the partner's 2, 3), then lanes q and
// q ^ 1 those that differ in bit 0 (lanes 1, 3 words 0, 2 for the partner's 1, 3).
__device__ __forceinline__ uint4 transpose_quad(uint32_t m0, uint32_t m1, uint32_t m2, uint32_t m3, int q) {
  swap_pairs(q & 2, m0, m1, m2, m3, 2);
  swap_pairs(q & 1, m0, m2, m1, m3, 1);
  return make_uint4(m0, m1, m2, m3);
}

__device__ __forceinline__ uint32_t bf16_pair(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// What store_rows does, straight from the registers, with no staging buffer and no barrier: each
// warp's row quads (the four lanes that hold one row's columns, two adjacent ones per 8-column
// chunk) swap words so that each lane holds one chunk's 8 columns, a 16-byte vector. A warp's store
// then covers 64 contiguous bytes of each of 8 rows. The bf16 values are those of store_rows. The
// row kernel stores this way; the weight-gradient kernels keep store_rows, which measured faster
// for them (benchmarks/RESULTS.md).
template <int kHalves, class Store>
__device__ __forceinline__ void store_rows_direct(const float (&acc)[kHalves][64], int ctid, int rows, Store store) {
  const int warp = ctid / 32, lane = ctid % 32, q = lane % 4;
  const int row0 = warp * 16 + lane / 4;
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int quad = 0; quad < 4; ++quad) {  // chunks 4 quad to 4 quad + 3 of the 16 in 128 columns
#pragma unroll
      for (int lower = 0; lower < 2; ++lower) {  // rows row0 and row0 + 8
        const float* v = acc[h] + 16 * quad + 2 * lower;  // chunk c's two values at v[4 c], v[4 c + 1]
        const uint4 vector = transpose_quad(bf16_pair(v[0], v[1]), bf16_pair(v[4], v[5]), bf16_pair(v[8], v[9]),
                                            bf16_pair(v[12], v[13]), q);
        const int row = row0 + 8 * lower;
        if (row < rows) store(row, h * 128 + (4 * quad + q) * 8, vector);
      }
    }
  }
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// A consumer warpgroup's stage bookkeeping: after committing the wgmma group of `pipe`'s stage,
// next() waits until at most that group is in flight, so the previous stage's products are done,
// hands that stage back on its "empty" mbarrier (one arrival per warpgroup) and moves on; finish()
// waits for the last group and hands its stage back.
template <int kStages>
struct ConsumerStages {
  StageRing<kStages>& pipe;
  uint32_t empty_bar;
  int ctid;
  int previous = -1;

  template <int kCount>
  __device__ __forceinline__ void next(float (&acc)[kCount]) {
    wgmma_wait<1>(acc);
    if (previous >= 0 && ctid == 0) mbarrier_arrive(empty_bar + previous * 8);
    previous = pipe.stage;
    pipe.advance();
  }
  template <int kCount>
  __device__ __forceinline__ void finish(float (&acc)[kCount]) {
    wgmma_wait<0>(acc);
    if (ctid == 0) mbarrier_arrive(empty_bar + previous * 8);
  }
};
#endif  // LIGHTNING_MOE_WGMMA

}  // namespace
}  // namespace lightning_moe

// router_logits_tc: the router's three GEMMs on bf16 tensor cores, the float32 operand split into
// bf16 parts inside the kernels (router_logits_tc.h states the contract).
//
// Every kernel runs 128 threads, 4 warps in a 2 x 2 grid over its output tile; each warp owns a
// grid of m16n8 accumulator tiles of mma.sync.m16n8k16 (bf16 inputs, float32 accumulation, sm_80+).
// A k tile of both operands is staged in shared memory as bf16: the bf16 operand copied as it is,
// the float32 operand split into its parts by the threads that store it (once per block, not once
// per warp). Tiles are double-buffered: the next k tile is loaded into registers while the current
// one is multiplied, then split and stored into the other buffer, one barrier per k tile. Shared rows
// are padded by 16 bytes so that each ldmatrix phase (8 rows of 16 bytes) hits 32 distinct banks.
//
// - forward, logits (T, E) = x (T, D) . w (E, D)^T: blocks of 64 tokens x 32 or 64 experts, k tiles
//   of 32 along D (the 32-expert blocks also come pipelined: tc_logits_forward_pipelined_kernel,
//   which takes a bf16 weight in 64-expert blocks with k tiles of 64);
//   x . w2 and x . w1 go to one set of accumulators, x . w0 to another, added at the end: the large
//   products are summed exactly as one bf16 GEMM would sum them, and the small ones' rounding stays
//   2^-8 below theirs.
// - grad_x (T, D) = g (T, E) . w (E, D): blocks of 64 tokens x 64 columns, k tiles of 32 experts;
//   one set of accumulators takes g1 w0, g0 w1, then g0 w0 at each k step (the result is rounded to
//   bf16, far above the float32 rounding of the small terms). The persistent variant keeps a column
//   slice of the weight across token tiles; for a bf16 weight, the streamed one keeps a token tile
//   of the gradient across column chunks.
// - grad_weight (E, D) = g^T (E, T) . x (T, D): blocks of 32 or 64 experts x 64 columns over one chunk
//   of tokens, k tiles of 32 tokens, g2 x and g1 x in one set of accumulators, g0 x in another, as
//   in the forward. Each chunk writes its own slice of a float32 buffer and sum_pieces_kernel adds
//   the slices in chunk order.
//
// Each accumulator receives its products in an order fixed by the shapes (k steps in order, parts in
// a fixed order within a step), and the chunks depend on the shapes only, so every run gives the
// same bits. No atomics, no host synchronisation.

#include "router_logits_tc.h"

#include <type_traits>

#include "router_logits_tiles.cuh"
#include "tensor_map.h"

namespace lightning_moe {
namespace {

constexpr int kTcThreads = 128;  // 4 warps, 2 x 2 over the block's output tile
constexpr int kTcPad = 8;        // bf16 elements (16 bytes) of padding at the end of a shared row
// Named in __launch_bounds__ so that ptxas may use up to 255 registers: with the block size alone
// its heuristics capped the 32-expert forward at 96 registers and spilled.
constexpr int kTcMinBlocksPerSm = 2;

// ---------------------------------------------------------------------------------------------
// Device helpers: the bf16 split of float32 values, ldmatrix and mma.

// A float32 with the low 16 bits of its word cleared: its leading 8 significand bits, a bf16 value.
__device__ __forceinline__ float leading_bf16(float value) {
  return __uint_as_float(__float_as_uint(value) & 0xffff0000u);
}

// The leading bf16 bits (high halves of the words) of `lo` and `hi` as one bf16x2 word, `lo` in
// the low half: the element of an mma fragment pair with the lower index.
__device__ __forceinline__ uint32_t pack_leading_bf16(float lo, float hi) {
  return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}

// kParts bf16x2 words of two float32 values: part p is the leading 8 significand bits of what parts
// 0 .. p-1 leave, truncated (as bf16_parts in lightning_moe/ops/router_logits.py cuts them). Each
// subtraction is exact (the leading bits share the value's exponent), so three parts add up to the
// value exactly for |value| >= 2^-103, where no remainder is a subnormal float.
template <int kParts>
__device__ __forceinline__ void split_bf16x2(float lo, float hi, uint32_t (&parts)[kParts]) {
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
    parts[p] = pack_leading_bf16(lo, hi);
    lo -= leading_bf16(lo);
    hi -= leading_bf16(hi);
  }
}

// Four consecutive float32 values split into kParts parts; part p's four bf16 go to
// dst + p * part_stride (8-byte aligned).
template <int kParts>
__device__ __forceinline__ void store_split4(uint16_t* dst, int part_stride, float4 values) {
  uint32_t lo[kParts], hi[kParts];
  split_bf16x2<kParts>(values.x, values.y, lo);
  split_bf16x2<kParts>(values.z, values.w, hi);
#pragma unroll
  for (int p = 0; p < kParts; ++p) *reinterpret_cast<uint2*>(dst + p * part_stride) = make_uint2(lo[p], hi[p]);
}

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Four 8x8 bf16 matrices from shared memory: lane l gives the address of row l % 8 of matrix l / 8;
// register i receives matrix i's row lane / 4, columns 2 (lane % 4) and 2 (lane % 4) + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// The same, transposed: register i receives matrix i's rows 2 (lane % 4) and 2 (lane % 4) + 1 of
// column lane / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// acc += a . b for a 16x16 bf16 A fragment and a 16x8 bf16 B fragment, float32 accumulation.
__device__ __forceinline__ void mma_bf16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// acc[mi][ni] += a[mi] . b[ni] over a kM x kN grid of m16n8 tiles.
template <int kM, int kN>
__device__ __forceinline__ void mma_tiles(float (&acc)[kM][kN][4], const uint32_t (&a)[kM][4],
                                          const uint32_t (&b)[kN][2]) {
#pragma unroll
  for (int mi = 0; mi < kM; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kN; ++ni) mma_bf16(acc[mi][ni], a[mi], b[ni]);
  }
}

// The A fragment (rows m0 .. m0+15, k0 .. k0+15) of a tile stored [m][k] with rows `ld` apart.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* tile, int ld, int m0, int k0, int lane) {
  ldmatrix_x4(a, tile + (m0 + lane % 16) * ld + k0 + lane / 16 * 8);
}

// The A fragment of a tile stored [k][m] (the transpose of A): ldmatrix transposes it.
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const uint16_t* tile, int ld, int m0, int k0,
                                             int lane) {
  ldmatrix_x4_trans(a, tile + (k0 + lane / 16 * 8 + lane % 8) * ld + m0 + lane / 8 % 2 * 8);
}

// The B fragments of two n8 tiles (n0 .. n0+7 and n0+8 .. n0+15, k0 .. k0+15) of a tile stored
// [n][k] with rows `ld` apart.
__device__ __forceinline__ void load_b_pair(uint32_t (&b0)[2], uint32_t (&b1)[2], const uint16_t* tile, int ld, int n0,
                                            int k0, int lane) {
  uint32_t r[4];
  ldmatrix_x4(r, tile + (n0 + lane / 16 * 8 + lane % 8) * ld + k0 + lane / 8 % 2 * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// The same for a tile stored [k][n] (row-major B): ldmatrix transposes it.
__device__ __forceinline__ void load_b_pair_trans(uint32_t (&b0)[2], uint32_t (&b1)[2], const uint16_t* tile, int ld,
                                                  int n0, int k0, int lane) {
  uint32_t r[4];
  ldmatrix_x4_trans(r, tile + (k0 + lane / 8 % 2 * 8 + lane % 8) * ld + n0 + lane / 16 * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// Calls f(i, row, col) for the kLoads vectors of kVec elements that thread `tid` moves of a tile
// with kColumns columns: vector tid + i * kTcThreads, row by row.
template <int kLoads, int kColumns, int kVec, typename F>
__device__ __forceinline__ void for_each_vector(int tid, F&& f) {
  static_assert(kColumns % kVec == 0);
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int v = tid + i * kTcThreads;
    f(i, v / (kColumns / kVec), v % (kColumns / kVec) * kVec);
  }
}

// The k loop of every kernel, over k tiles double-buffered in shared memory: fetch(kt) loads k
// tile kt into registers, stage(buffer) stores (splits) them into that buffer, multiply(buffer, kt)
// multiplies the tile held there. Tile kt + 1 is loaded while tile kt is multiplied, then stored
// into the other buffer; one barrier per tile.
template <typename Fetch, typename Stage, typename Multiply>
__device__ __forceinline__ void double_buffered(int64_t k_tiles, Fetch&& fetch, Stage&& stage, Multiply&& multiply) {
  fetch(0);
  stage(0);
  __syncthreads();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int buffer = static_cast<int>(kt % 2);
    const bool more = kt + 1 < k_tiles;
    if (more) fetch(kt + 1);
    multiply(buffer, kt);
    if (more) stage(buffer ^ 1);
    __syncthreads();
  }
}

// Two float32 values rounded to nearest bf16, packed with `lo` in the low half.
__device__ __forceinline__ uint32_t round_bf16x2(float lo, float hi) {
  uint32_t out;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(out) : "f"(hi), "f"(lo));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Forward: logits = x . (w0 + w1 + w2)^T.

// 64 tokens x kBN experts per block; warp (warp_m, warp_n) holds tokens 32 warp_m .. + 31 (two m16
// tiles) x experts warp_n kBN / 2 .. + kBN / 2 - 1 (kNTiles n8 tiles).
template <int kNTiles>
struct ForwardTcTiles {
  static constexpr int kBM = 64;
  static constexpr int kBN = 2 * 8 * kNTiles;
  static constexpr int kBK = 32;
  static constexpr int kLd = kBK + kTcPad;
  static constexpr int kXLoads = kBM * kBK / 8 / kTcThreads;  // 16-byte vectors of 8 bf16
  static constexpr int kWLoads = kBN * kBK / 4 / kTcThreads;  // float4s
  static_assert(kNTiles % 2 == 0 && kXLoads * 8 * kTcThreads == kBM * kBK && kWLoads * 4 * kTcThreads == kBN * kBK);
};

// Writes acc_lead + acc_rest, a warp's kM x kN m16n8 float32 accumulator tiles, to `out` (row-major,
// `ld` floats a row) from row row0 and column col0 on. Accumulator c of tile (mi, ni) holds row
// 16 mi + lane / 4 (+ 8 for c = 2, 3) and column 8 ni + 2 (lane % 4) + c % 2. Rows at or past `rows`
// are skipped, and with kBoundColumns columns at or past `cols` too.
template <int kM, int kN, bool kBoundColumns>
__device__ __forceinline__ void store_sums(float* out, int64_t ld, const float (&acc_lead)[kM][kN][4],
                                           const float (&acc_rest)[kM][kN][4], int64_t row0, int64_t col0,
                                           int64_t rows, int64_t cols, int lane) {
#pragma unroll
  for (int mi = 0; mi < kM; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kN; ++ni) {
      const int64_t col = col0 + ni * 8 + 2 * (lane % 4);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row0 + mi * 16 + lane / 4 + 8 * half;
        if (row < rows && (!kBoundColumns || col < cols)) {
          const float2 sums = make_float2(acc_lead[mi][ni][2 * half] + acc_rest[mi][ni][2 * half],
                                          acc_lead[mi][ni][2 * half + 1] + acc_rest[mi][ni][2 * half + 1]);
          *reinterpret_cast<float2*>(out + row * ld + col) = sums;
        }
      }
    }
  }
}

// acc += a . b for the two-part splits a = a[0] + a[1] and b = b[0] + b[1] of a warp's 2 x 4 m16n8
// tiles, the terms above bf16 rounding only (a1 b0, a0 b1, a0 b0), the smaller ones first. With
// kBParts = 1, b is a bf16 operand (b[1] = 0) and a0 b1, which would add exact zeros, is not made.
template <int kBParts = 2>
__device__ __forceinline__ void mma_split_terms(float (&acc)[2][4][4], const uint32_t (&a)[2][2][4],
                                                const uint32_t (&b)[kBParts][4][2]) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      mma_bf16(acc[mi][ni], a[1][mi], b[0][ni]);
      if constexpr (kBParts == 2) mma_bf16(acc[mi][ni], a[0][mi], b[1][ni]);
      mma_bf16(acc[mi][ni], a[0][mi], b[0][ni]);
    }
  }
}

// The float32 values of the two bf16 halves of a bf16x2 word.
__device__ __forceinline__ float low_bf16(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float high_bf16(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }

// Calls f(mi, ni, half, row, col) for each bf16x2 pair of a warp's 2 x 4 m16n8 tiles from row row0
// and column col0 on (the layout of store_sums): accumulators 2 half and 2 half + 1 of tile (mi, ni)
// sit at (row, col) and (row, col + 1).
template <typename F>
__device__ __forceinline__ void for_each_fragment_pair(int64_t row0, int64_t col0, int lane, F&& f) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int64_t col = col0 + ni * 8 + 2 * (lane % 4);
#pragma unroll
      for (int half = 0; half < 2; ++half) f(mi, ni, half, row0 + mi * 16 + lane / 4 + 8 * half, col);
    }
  }
}

// The bf16x2 words of the bf16 matrix `src` (`ld` elements a row) at a warp's 2 x 4 m16n8 tiles
// from row row0 and column col0 on (for_each_fragment_pair); zeros for rows at or past `rows`.
__device__ __forceinline__ void load_bf16_pairs(uint32_t (&pairs)[2][4][2], const uint16_t* __restrict__ src,
                                                int64_t ld, int64_t row0, int64_t col0, int64_t rows, int lane) {
  for_each_fragment_pair(row0, col0, lane, [&](int mi, int ni, int half, int64_t row, int64_t col) {
    pairs[mi][ni][half] = row < rows ? *reinterpret_cast<const uint32_t*>(src + row * ld + col) : 0u;
  });
}

// Writes a warp's 2 x 4 m16n8 accumulator tiles, rounded to bf16, to the bf16 matrix `out` (`ld`
// elements a row) from row row0 and column col0 on (for_each_fragment_pair), skipping rows at or
// past `rows`. With kAdd, `added` holds the bf16x2 words of an addend at these places (from
// load_bf16_pairs), and each rounded value v is written as bf16(v + addend), the float32 sum rounded
// to nearest: the bits of a bf16 addition of the two.
template <bool kAdd = false>
__device__ __forceinline__ void store_bf16_rows(uint16_t* out, int64_t ld, const float (&acc)[2][4][4], int64_t row0,
                                                int64_t col0, int64_t rows, int lane,
                                                const uint32_t (&added)[2][4][2] = {}) {
  for_each_fragment_pair(row0, col0, lane, [&](int mi, int ni, int half, int64_t row, int64_t col) {
    if (row >= rows) return;
    uint32_t value = round_bf16x2(acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
    if constexpr (kAdd) {
      const uint32_t other = added[mi][ni][half];
      value = round_bf16x2(low_bf16(value) + low_bf16(other), high_bf16(value) + high_bf16(other));
    }
    *reinterpret_cast<uint32_t*>(out + row * ld + col) = value;
  });
}

template <int kNTiles>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocksPerSm)
    tc_logits_forward_kernel(const uint16_t* __restrict__ x, const float* __restrict__ weight,
                             float* __restrict__ logits, int64_t num_tokens, int64_t num_experts, int64_t dim) {
  using Tiles = ForwardTcTiles<kNTiles>;
  constexpr int kBM = Tiles::kBM, kBN = Tiles::kBN, kBK = Tiles::kBK, kLd = Tiles::kLd;
  __shared__ __align__(16) uint16_t x_tile[2][kBM * kLd];     // [buffer][token][k]
  __shared__ __align__(16) uint16_t w_tile[2][3][kBN * kLd];  // [buffer][part][expert][k]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % 2, warp_n = warp / 2;
  // Expert tiles vary fastest, so the blocks that read the same tokens run together (L2 hits).
  const int64_t expert_tiles = ceil_div(num_experts, kBN);
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) % expert_tiles * kBN;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) / expert_tiles * kBM;

  uint4 x_next[Tiles::kXLoads];
  float4 w_next[Tiles::kWLoads];
  auto fetch = [&](int64_t kt) {
    const int64_t k0 = kt * kBK;
    for_each_vector<Tiles::kXLoads, kBK, 8>(tid, [&](int i, int row, int col) {
      const int64_t t = t0 + row;
      x_next[i] = t < num_tokens ? *reinterpret_cast<const uint4*>(x + t * dim + k0 + col) : make_uint4(0, 0, 0, 0);
    });
    for_each_vector<Tiles::kWLoads, kBK, 4>(tid, [&](int i, int row, int col) {
      const int64_t e = e0 + row;
      w_next[i] = e < num_experts ? *reinterpret_cast<const float4*>(weight + e * dim + k0 + col)
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
    });
  };
  auto stage = [&](int buffer) {
    for_each_vector<Tiles::kXLoads, kBK, 8>(tid, [&](int i, int row, int col) {
      *reinterpret_cast<uint4*>(x_tile[buffer] + row * kLd + col) = x_next[i];
    });
    for_each_vector<Tiles::kWLoads, kBK, 4>(tid, [&](int i, int row, int col) {
      store_split4<3>(w_tile[buffer][0] + row * kLd + col, kBN * kLd, w_next[i]);
    });
  };

  float acc_lead[2][kNTiles][4] = {};  // x . w0
  float acc_rest[2][kNTiles][4] = {};  // x . w2 + x . w1
  const int m_base = warp_m * 32, n_base = warp_n * (kBN / 2);
  const bool warp_has_experts = e0 + n_base < num_experts;  // else its tiles are all zero weights
  const int64_t k_tiles = dim / kBK;
  double_buffered(k_tiles, fetch, stage, [&](int buffer, int64_t kt) {
    if (warp_has_experts) {
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 16) {
        uint32_t a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) load_a(a[mi], x_tile[buffer], kLd, m_base + mi * 16, ks, lane);
#pragma unroll
        for (int p = 2; p >= 0; --p) {  // the smallest part first
          uint32_t b[kNTiles][2];
#pragma unroll
          for (int j = 0; j < kNTiles; j += 2) load_b_pair(b[j], b[j + 1], w_tile[buffer][p], kLd, n_base + j * 8, ks, lane);
          mma_tiles(p == 0 ? acc_lead : acc_rest, a, b);
        }
      }
    }
  });

  store_sums<2, kNTiles, true>(logits, num_experts, acc_lead, acc_rest, t0 + m_base, e0 + n_base, num_tokens,
                               num_experts, lane);
}

template <int kNTiles>
void launch_tc_forward(const at::Tensor& x, const at::Tensor& weight, at::Tensor& logits, cudaStream_t stream) {
  using Tiles = ForwardTcTiles<kNTiles>;
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = weight.size(0);
  const int64_t blocks = ceil_div(num_tokens, Tiles::kBM) * ceil_div(num_experts, Tiles::kBN);
  tc_logits_forward_kernel<kNTiles><<<static_cast<unsigned>(blocks), kTcThreads, 0, stream>>>(
      reinterpret_cast<const uint16_t*>(x.data_ptr()), weight.data_ptr<float>(), logits.data_ptr<float>(), num_tokens,
      num_experts, dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Forward, pipelined: the 64-token x 32-expert blocks of tc_logits_forward_kernel<2>, with the k
// tiles copied by cp.async into a ring of kStages shared-memory stages (dynamic shared memory),
// kStages - 1 of them in flight while one is multiplied (the register-staged kernel has one: its
// time is the latency of D / 32 loads one after another). A float32 weight stays float32 in shared
// memory and each warp splits its B fragments as it loads them; the parts, and the order of the
// products into each accumulator, are those of tc_logits_forward_kernel<2>, so the logits are the
// same bits. A bf16 weight (W = uint16_t) is its own leading part, its other two parts zero: its
// tile is staged as it is, like x's, and only the x . w0 products are made. The zero parts'
// products would add exact zeros to acc_rest, which stays 0 here as well, so the logits are the
// bits of the float32 kernel on the widened weight (up to the sign of a zero logit), at a third of
// the products and without the per-fragment split. Its blocks are wider (PipelinedForwardTiles):
// the k steps of each logit stay in order, so the tile shape does not change the bits.

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  // src-size 0 fills the 16 bytes with zeros and reads nothing.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// A ring of kStages shared-memory stages over `count` tiles copied by cp.async: start() issues the
// first kStages - 1 tiles; run() then calls step(i, stage) for each tile i once it has landed (every
// thread's copies), with up to kStages - 1 later tiles in flight, and waits for the last copies.
// load(i, stage) issues tile i's copies into a stage, which run() refills only after a barrier
// (every warp is done reading it). A group is committed even when empty, so that the count of
// groups in flight stays kStages - 1 at every wait.
template <int kStages>
struct CpAsyncRing {
  template <typename Load>
  __device__ __forceinline__ static void start(int64_t count, Load&& load) {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < count) load(s, s);
      cp_async_commit();
    }
  }
  template <typename Load, typename Step>
  __device__ __forceinline__ static void run(int64_t count, Load&& load, Step&& step) {
    for (int64_t i = 0; i < count; ++i) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      const int64_t next = i + kStages - 1;
      if (next < count) load(next, static_cast<int>(next % kStages));
      cp_async_commit();
      step(i, static_cast<int>(i % kStages));
    }
    cp_async_wait<0>();
  }
};

template <typename W>  // the weight's element: float (float32) or uint16_t (bf16)
struct PipelinedForwardTiles {
  static constexpr bool kFloatWeight = std::is_same_v<W, float>;
  static constexpr int kBM = 64;
  // A bf16 weight: 64-expert blocks (x read once at up to 64 experts) with k tiles of 64 and six
  // stages, five in flight: at one block per SM, enough bytes in flight to cover the loads' latency.
  static constexpr int kBN = kFloatWeight ? 32 : 64;
  static constexpr int kBK = kFloatWeight ? 32 : 64;
  static constexpr int kStages = kFloatWeight ? 4 : 6;
  static constexpr int kMinBlocksPerSm = kFloatWeight ? 4 : 2;  // __launch_bounds__
  static constexpr int kNTiles = kBN / 16;  // n8 tiles per warp: the warp's half of the experts
  static constexpr int kXLd = kBK + kTcPad;  // bf16: rows 16 bytes past a multiple of 128
  // float32: 160-byte rows, 8 banks apart, so that a half-warp's float2 loads of four rows (eight
  // consecutive floats each) hit 32 distinct banks. bf16: the rows of x.
  static constexpr int kWLd = kFloatWeight ? kBK + 8 : kXLd;
  static constexpr int kWElems = 16 / sizeof(W);  // elements per 16-byte chunk
  static constexpr int kXChunks = kBM * kBK / 8 / kTcThreads;  // 16-byte chunks per thread
  static constexpr int kWChunks = kBN * kBK / kWElems / kTcThreads;
  static constexpr int kXStageBytes = kBM * kXLd * 2;
  static constexpr int kWStageBytes = kBN * kWLd * static_cast<int>(sizeof(W));
  static constexpr int kSharedBytes = kStages * (kXStageBytes + kWStageBytes);  // dynamic shared memory
  static_assert(kXChunks * 8 * kTcThreads == kBM * kBK && kWChunks * kWElems * kTcThreads == kBN * kBK);
  static_assert(kXStageBytes % 16 == 0 && kWStageBytes % 16 == 0 && kNTiles % 2 == 0);
};

// W: float (a float32 weight) or uint16_t (a bf16 one).
template <typename W>
__global__ void __launch_bounds__(kTcThreads, PipelinedForwardTiles<W>::kMinBlocksPerSm)
    tc_logits_forward_pipelined_kernel(const uint16_t* __restrict__ x, const W* __restrict__ weight,
                                       float* __restrict__ logits, int64_t num_tokens, int64_t num_experts,
                                       int64_t dim) {
  using P = PipelinedForwardTiles<W>;
  constexpr int kBM = P::kBM, kBN = P::kBN, kBK = P::kBK, kStages = P::kStages, kXLd = P::kXLd;
  constexpr int kWLd = P::kWLd, kWElems = P::kWElems, kNTiles = P::kNTiles;
  constexpr bool kFloatWeight = P::kFloatWeight;
  extern __shared__ __align__(16) uint8_t forward_shared[];
  // [stage][token][k] of x, then [stage][expert][k] of the weight.
  auto x_tile = reinterpret_cast<uint16_t(*)[kBM * kXLd]>(forward_shared);
  auto w_tile = reinterpret_cast<W(*)[kBN * kWLd]>(forward_shared + kStages * P::kXStageBytes);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % 2, warp_n = warp / 2;
  // Expert tiles vary fastest, so the blocks that read the same tokens run together (L2 hits).
  const int64_t expert_tiles = ceil_div(num_experts, kBN);
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) % expert_tiles * kBN;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) / expert_tiles * kBM;
  const int64_t k_tiles = dim / kBK;

  auto load = [&](int64_t kt, int stage) {
    const int64_t k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < P::kXChunks; ++i) {
      const int v = tid + i * kTcThreads, row = v / (kBK / 8), col = v % (kBK / 8) * 8;
      const int64_t t = t0 + row;
      cp_async16(x_tile[stage] + row * kXLd + col, x + (t < num_tokens ? t : 0) * dim + k0 + col, t < num_tokens);
    }
#pragma unroll
    for (int i = 0; i < P::kWChunks; ++i) {
      const int v = tid + i * kTcThreads, row = v / (kBK / kWElems), col = v % (kBK / kWElems) * kWElems;
      const int64_t e = e0 + row;
      cp_async16(w_tile[stage] + row * kWLd + col, weight + (e < num_experts ? e : 0) * dim + k0 + col,
                 e < num_experts);
    }
  };

  using Ring = CpAsyncRing<kStages>;
  Ring::start(k_tiles, load);

  float acc_lead[2][kNTiles][4] = {};  // x . w0
  float acc_rest[2][kNTiles][4] = {};  // x . w2 + x . w1
  const int m_base = warp_m * 32, n_base = warp_n * (kBN / 2);
  const bool warp_has_experts = e0 + n_base < num_experts;  // else its tiles are all zero weights
  Ring::run(k_tiles, load, [&](int64_t, int stage) {
    if (warp_has_experts) {
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 16) {
        uint32_t a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) load_a(a[mi], x_tile[stage], kXLd, m_base + mi * 16, ks, lane);
        if constexpr (kFloatWeight) {
          // B fragment of n8 tile ni: rows k = 2 (lane % 4) (+ 8) of column n = lane / 4, as ldmatrix
          // gives them from a bf16 [n][k] tile.
          uint32_t b[3][kNTiles][2];
#pragma unroll
          for (int ni = 0; ni < kNTiles; ++ni) {
            const float* row = w_tile[stage] + (n_base + ni * 8 + lane / 4) * kWLd + ks + 2 * (lane % 4);
            const float2 lo = *reinterpret_cast<const float2*>(row);
            const float2 hi = *reinterpret_cast<const float2*>(row + 8);
            uint32_t parts_lo[3], parts_hi[3];
            split_bf16x2<3>(lo.x, lo.y, parts_lo);
            split_bf16x2<3>(hi.x, hi.y, parts_hi);
#pragma unroll
            for (int p = 0; p < 3; ++p) b[p][ni][0] = parts_lo[p], b[p][ni][1] = parts_hi[p];
          }
#pragma unroll
          for (int p = 2; p >= 0; --p) {  // the smallest part first
            mma_tiles(p == 0 ? acc_lead : acc_rest, a, b[p]);
          }
        } else {
          uint32_t b[kNTiles][2];
#pragma unroll
          for (int j = 0; j < kNTiles; j += 2) load_b_pair(b[j], b[j + 1], w_tile[stage], kWLd, n_base + j * 8, ks, lane);
          mma_tiles(acc_lead, a, b);
        }
      }
    }
  });

  store_sums<2, kNTiles, true>(logits, num_experts, acc_lead, acc_rest, t0 + m_base, e0 + n_base, num_tokens,
                               num_experts, lane);
}

// Calls f with the weight's data as the element type of the kernels' W parameter: const float* for a
// float32 weight, const uint16_t* (bf16 bits) for a bf16 one.
template <typename F>
void with_weight_data(const at::Tensor& weight, F&& f) {
  if (weight.scalar_type() == at::kFloat) {
    f(weight.data_ptr<float>());
  } else {
    f(reinterpret_cast<const uint16_t*>(weight.data_ptr()));
  }
}

void launch_tc_forward_pipelined(const at::Tensor& x, const at::Tensor& weight, at::Tensor& logits,
                                 cudaStream_t stream) {
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = weight.size(0);
  with_weight_data(weight, [&](const auto* weight_data) {
    using W = std::remove_cv_t<std::remove_pointer_t<decltype(weight_data)>>;
    using P = PipelinedForwardTiles<W>;
    const int64_t blocks = ceil_div(num_tokens, P::kBM) * ceil_div(num_experts, static_cast<int64_t>(P::kBN));
    const auto kernel = tc_logits_forward_pipelined_kernel<W>;
    allow_shared_memory(reinterpret_cast<const void*>(kernel), P::kSharedBytes, x.device().index());
    kernel<<<static_cast<unsigned>(blocks), kTcThreads, P::kSharedBytes, stream>>>(
        reinterpret_cast<const uint16_t*>(x.data_ptr()), weight_data, logits.data_ptr<float>(), num_tokens,
        num_experts, dim);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// grad_x = g0 w0 + g0 w1 + g1 w0.

// 64 tokens x 64 columns per block, k tiles of 32 experts; warp (warp_m, warp_n) holds tokens
// 32 warp_m .. + 31 (two m16 tiles) x columns 32 warp_n .. + 31 (four n8 tiles).
struct GradXTcTiles {
  static constexpr int kBM = 64;
  static constexpr int kBN = 64;
  static constexpr int kBK = 32;
  static constexpr int kGLd = kBK + kTcPad;
  static constexpr int kWLd = kBN + kTcPad;
  static constexpr int kGLoads = kBM * kBK / 4 / kTcThreads;  // float4s
  static constexpr int kWLoads = kBK * kBN / 4 / kTcThreads;  // float4s
};

__global__ void __launch_bounds__(kTcThreads, kTcMinBlocksPerSm)
    tc_logits_grad_x_kernel(const float* __restrict__ grad, const float* __restrict__ weight,
                            uint16_t* __restrict__ grad_x, int64_t num_tokens, int64_t num_experts, int64_t dim) {
  using Tiles = GradXTcTiles;
  constexpr int kBM = Tiles::kBM, kBN = Tiles::kBN, kBK = Tiles::kBK, kGLd = Tiles::kGLd, kWLd = Tiles::kWLd;
  __shared__ __align__(16) uint16_t g_tile[2][2][kBM * kGLd];  // [buffer][part][token][expert]
  __shared__ __align__(16) uint16_t w_tile[2][2][kBK * kWLd];  // [buffer][part][expert][column]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % 2, warp_n = warp / 2;
  const int64_t column_tiles = dim / kBN;
  const int64_t d0 = static_cast<int64_t>(blockIdx.x) % column_tiles * kBN;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) / column_tiles * kBM;

  float4 g_next[Tiles::kGLoads];
  float4 w_next[Tiles::kWLoads];
  auto fetch = [&](int64_t kt) {
    const int64_t k0 = kt * kBK;
    for_each_vector<Tiles::kGLoads, kBK, 4>(tid, [&](int i, int row, int col) {
      const int64_t t = t0 + row, e = k0 + col;
      g_next[i] = t < num_tokens && e < num_experts ? *reinterpret_cast<const float4*>(grad + t * num_experts + e)
                                                    : make_float4(0.f, 0.f, 0.f, 0.f);
    });
    for_each_vector<Tiles::kWLoads, kBN, 4>(tid, [&](int i, int row, int col) {
      const int64_t e = k0 + row;
      w_next[i] = e < num_experts ? *reinterpret_cast<const float4*>(weight + e * dim + d0 + col)
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
    });
  };
  auto stage = [&](int buffer) {
    for_each_vector<Tiles::kGLoads, kBK, 4>(tid, [&](int i, int row, int col) {
      store_split4<2>(g_tile[buffer][0] + row * kGLd + col, kBM * kGLd, g_next[i]);
    });
    for_each_vector<Tiles::kWLoads, kBN, 4>(tid, [&](int i, int row, int col) {
      store_split4<2>(w_tile[buffer][0] + row * kWLd + col, kBK * kWLd, w_next[i]);
    });
  };

  float acc[2][4][4] = {};
  const int m_base = warp_m * 32, n_base = warp_n * 32;
  const int64_t k_tiles = ceil_div(num_experts, kBK);
  double_buffered(k_tiles, fetch, stage, [&](int buffer, int64_t kt) {
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      if (kt * kBK + ks >= num_experts) break;  // E a multiple of 8: the last k tile may hold 8 to 24
      uint32_t a[2][2][4];                      // [part][m16 tile]
      uint32_t b[2][4][2];                      // [part][n8 tile]
#pragma unroll
      for (int p = 0; p < 2; ++p) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) load_a(a[p][mi], g_tile[buffer][p], kGLd, m_base + mi * 16, ks, lane);
#pragma unroll
        for (int j = 0; j < 4; j += 2) load_b_pair_trans(b[p][j], b[p][j + 1], w_tile[buffer][p], kWLd, n_base + j * 8, ks, lane);
      }
      mma_split_terms(acc, a, b);
    }
  });

  store_bf16_rows(grad_x, dim, acc, t0 + m_base, d0 + n_base, num_tokens, lane);
}

// ---------------------------------------------------------------------------------------------
// grad_x, persistent, for up to 64 experts: a block keeps one 64-column slice of the weight, split
// into its two parts, in shared memory for all of its token tiles (every token tile of that column
// slice, strided by the grid's slices), and loads each next tile of the logit gradient into
// registers while it multiplies the current one. Per output tile the products are those of
// tc_logits_grad_x_kernel in the same order, so grad_x is the same bits. (A bf16 weight takes
// tc_logits_grad_x_streamed_kernel below.)

constexpr int kPersistentMaxExperts = 64;

struct PersistentGradXTiles {
  static constexpr int kBM = 64;   // tokens per tile
  static constexpr int kBN = 64;   // columns of the block's slice
  static constexpr int kBK = 32;   // experts per k step, as in GradXTcTiles
  static constexpr int kMaxE = kPersistentMaxExperts;
  static constexpr int kGLd = kMaxE + kTcPad;  // bf16 [token][expert]
  static constexpr int kWLd = kBN + kTcPad;    // bf16 [expert][column]
  static constexpr int kGLoads = kBM * kMaxE / 4 / kTcThreads;  // float4s per thread
  static constexpr int kWLoads = kMaxE * kBN / 4 / kTcThreads;
  static constexpr int kBlocksPerSm = 3;
};

__global__ void __launch_bounds__(kTcThreads, PersistentGradXTiles::kBlocksPerSm)
    tc_logits_grad_x_persistent_kernel(const float* __restrict__ grad, const float* __restrict__ weight,
                                       const uint16_t* __restrict__ addend, uint16_t* __restrict__ grad_x,
                                       int64_t num_tokens, int64_t num_experts, int64_t dim) {
  using P = PersistentGradXTiles;
  constexpr int kBM = P::kBM, kBN = P::kBN, kBK = P::kBK, kMaxE = P::kMaxE, kGLd = P::kGLd, kWLd = P::kWLd;
  __shared__ __align__(16) uint16_t g_tile[2][kBM * kGLd];          // [part][token][expert]
  __shared__ __align__(16) uint16_t w_tile[2][kMaxE * kWLd];  // [part][expert][column]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % 2, warp_n = warp / 2;
  const int64_t d0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t token_tiles = ceil_div(num_tokens, kBM);

  // The weight slice, experts past E as zeros.
#pragma unroll
  for (int i = 0; i < P::kWLoads; ++i) {
    const int v = tid + i * kTcThreads, row = v / (kBN / 4), col = v % (kBN / 4) * 4;
    const float4 value = row < num_experts ? *reinterpret_cast<const float4*>(weight + row * dim + d0 + col)
                                           : make_float4(0.f, 0.f, 0.f, 0.f);
    store_split4<2>(w_tile[0] + row * kWLd + col, kMaxE * kWLd, value);
  }

  float4 g_next[P::kGLoads];
  auto fetch = [&](int64_t tile) {  // tokens 64 tile on, experts past E as zeros
    const int64_t t0 = tile * kBM;
#pragma unroll
    for (int i = 0; i < P::kGLoads; ++i) {
      const int v = tid + i * kTcThreads, row = v / (kMaxE / 4), col = v % (kMaxE / 4) * 4;
      const int64_t t = t0 + row;
      g_next[i] = t < num_tokens && col < num_experts ? *reinterpret_cast<const float4*>(grad + t * num_experts + col)
                                                      : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  auto stage = [&] {
#pragma unroll
    for (int i = 0; i < P::kGLoads; ++i) {
      const int v = tid + i * kTcThreads, row = v / (kMaxE / 4), col = v % (kMaxE / 4) * 4;
      store_split4<2>(g_tile[0] + row * kGLd + col, kBM * kGLd, g_next[i]);
    }
  };

  const int m_base = warp_m * 32, n_base = warp_n * 32;
  const int64_t k_tiles = ceil_div(num_experts, kBK);
  int64_t tile = blockIdx.y;
  if (tile < token_tiles) {
    fetch(tile);
    stage();
  }
  __syncthreads();
  for (; tile < token_tiles; tile += gridDim.y) {
    const int64_t next = tile + gridDim.y;
    if (next < token_tiles) fetch(next);  // in flight while this tile is multiplied
    const int64_t t0 = tile * kBM;
    // The addend's words of this tile, loaded while the products are made.
    uint32_t added[2][4][2];
    if (addend != nullptr) load_bf16_pairs(added, addend, dim, t0 + m_base, d0 + n_base, num_tokens, lane);
    float acc[2][4][4] = {};
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 16) {
        const int k = static_cast<int>(kt * kBK) + ks;
        if (k >= num_experts) break;  // E a multiple of 8: the last k tile may hold 8 to 24
        uint32_t a[2][2][4];          // [part][m16 tile]
        uint32_t b[2][4][2];          // [part][n8 tile]
#pragma unroll
        for (int p = 0; p < 2; ++p) {
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) load_a(a[p][mi], g_tile[p], kGLd, m_base + mi * 16, k, lane);
        }
#pragma unroll
        for (int p = 0; p < 2; ++p) {
#pragma unroll
          for (int j = 0; j < 4; j += 2) load_b_pair_trans(b[p][j], b[p][j + 1], w_tile[p], kWLd, n_base + j * 8, k, lane);
        }
        mma_split_terms(acc, a, b);
      }
    }
    if (addend != nullptr) {
      store_bf16_rows<true>(grad_x, dim, acc, t0 + m_base, d0 + n_base, num_tokens, lane, added);
    } else {
      store_bf16_rows(grad_x, dim, acc, t0 + m_base, d0 + n_base, num_tokens, lane);
    }
    __syncthreads();  // every warp is done with this tile's gradient in shared memory
    if (next < token_tiles) {
      stage();
      __syncthreads();
    }
  }
}

void launch_tc_grad_x_persistent(const at::Tensor& grad_logits, const at::Tensor& weight, const uint16_t* addend,
                                 at::Tensor& grad_x, cudaStream_t stream) {
  using P = PersistentGradXTiles;
  const int64_t num_tokens = grad_logits.size(0), num_experts = weight.size(0), dim = weight.size(1);
  const int64_t column_slices = dim / P::kBN, token_tiles = ceil_div(num_tokens, P::kBM);
  // Enough blocks for every SM to hold kBlocksPerSm, each with at least one token tile.
  const int64_t token_slices =
      std::clamp<int64_t>(ceil_div(kNominalSms * P::kBlocksPerSm, column_slices), 1, token_tiles);
  const dim3 grid(static_cast<unsigned>(column_slices), static_cast<unsigned>(token_slices));
  tc_logits_grad_x_persistent_kernel<<<grid, kTcThreads, 0, stream>>>(
      grad_logits.data_ptr<float>(), weight.data_ptr<float>(), addend, reinterpret_cast<uint16_t*>(grad_x.data_ptr()),
      num_tokens, num_experts, dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// grad_x, streamed, for a bf16 weight of up to 64 experts: a block takes one tile of 64 tokens and
// a run of 64-column chunks of the output. Its tile of the logit gradient is split once into two
// parts and each warp keeps its A fragments of it in registers for every chunk; the weight's chunk
// (a bf16 [expert][column] slice, its own leading part) and the addend's chunk are copied by
// cp.async through a ring of kStages stages, kStages - 1 in flight while one is multiplied. Per
// output tile the products are those of tc_logits_grad_x_kernel in the same order, g1 w0 then g0 w0
// at each k16 step (g0 w1 is an exact zero, not made), so grad_x is the same bits as the float32
// kernels on the widened weight, up to the sign of a zero.

struct StreamedGradXTiles {
  static constexpr int kBM = 64;  // tokens per block
  static constexpr int kBN = 64;  // columns per chunk
  static constexpr int kMaxE = kPersistentMaxExperts;
  static constexpr int kKSteps = kMaxE / 16;
  static constexpr int kStages = 4;
  static constexpr int kLd = 64 + kTcPad;  // bf16 rows of every shared tile (g: experts; w, addend: columns)
  static constexpr int kTileBytes = 64 * kLd * 2;
  static constexpr int kGLoads = kBM * kMaxE / 4 / kTcThreads;  // float4s per thread
  static constexpr int kChunkCopies = 64 * kBN / 8 / kTcThreads;  // 16-byte copies per thread per tile
  static constexpr int kBlocksPerSm = 2;
  // The split gradient (two parts), then per stage the weight's chunk and the addend's.
  static constexpr int kSharedBytes = 2 * kTileBytes + kStages * 2 * kTileBytes;
  static_assert(kGLoads * 4 * kTcThreads == kBM * kMaxE && kChunkCopies * 8 * kTcThreads == 64 * kBN);
};

__global__ void __launch_bounds__(kTcThreads, StreamedGradXTiles::kBlocksPerSm)
    tc_logits_grad_x_streamed_kernel(const float* __restrict__ grad, const uint16_t* __restrict__ weight,
                                     const uint16_t* __restrict__ addend, uint16_t* __restrict__ grad_x,
                                     int64_t num_tokens, int64_t num_experts, int64_t dim,
                                     int64_t chunks_per_block) {
  using P = StreamedGradXTiles;
  constexpr int kBM = P::kBM, kBN = P::kBN, kMaxE = P::kMaxE, kLd = P::kLd, kStages = P::kStages;
  constexpr int kTileElems = P::kTileBytes / 2;
  extern __shared__ __align__(16) uint8_t streamed_shared[];
  uint16_t* const g_tile = reinterpret_cast<uint16_t*>(streamed_shared);  // [part][token][expert]
  uint16_t* const stages = g_tile + 2 * kTileElems;  // [stage][weight, addend][row][column]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % 2, warp_n = warp / 2;
  const int64_t column_chunks = dim / kBN;
  const int64_t groups = ceil_div(column_chunks, chunks_per_block);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) / groups * kBM;
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.x) % groups * chunks_per_block;
  const int64_t chunks = std::min(column_chunks - chunk_begin, chunks_per_block);
  const bool add = addend != nullptr;

  auto load = [&](int64_t c, int stage) {  // chunk chunk_begin + c: the weight's rows, the addend's
    const int64_t d0 = (chunk_begin + c) * kBN;
    uint16_t* const w_stage = stages + stage * 2 * kTileElems;
#pragma unroll
    for (int i = 0; i < P::kChunkCopies; ++i) {
      const int v = tid + i * kTcThreads, row = v / (kBN / 8), col = v % (kBN / 8) * 8;
      const bool expert = row < num_experts;
      cp_async16(w_stage + row * kLd + col, weight + (expert ? row * dim + d0 + col : 0), expert);
      if (add) {
        const int64_t t = t0 + row;
        cp_async16(w_stage + kTileElems + row * kLd + col, addend + (t < num_tokens ? t * dim + d0 + col : 0),
                   t < num_tokens);
      }
    }
  };
  using Ring = CpAsyncRing<kStages>;
  Ring::start(chunks, load);  // in flight while the gradient is split

  // The block's gradient tile split into two parts, experts past E (and tokens past T) as zeros.
#pragma unroll
  for (int i = 0; i < P::kGLoads; ++i) {
    const int v = tid + i * kTcThreads, row = v / (kMaxE / 4), col = v % (kMaxE / 4) * 4;
    const int64_t t = t0 + row;
    const float4 value = t < num_tokens && col < num_experts
                             ? *reinterpret_cast<const float4*>(grad + t * num_experts + col)
                             : make_float4(0.f, 0.f, 0.f, 0.f);
    store_split4<2>(g_tile + row * kLd + col, kTileElems, value);
  }
  __syncthreads();
  const int m_base = warp_m * 32, n_base = warp_n * 32;
  uint32_t a[P::kKSteps][2][2][4];  // [k16 step][part][m16 tile]: the same for every chunk
#pragma unroll
  for (int ks = 0; ks < P::kKSteps; ++ks) {
    if (ks * 16 >= num_experts) break;  // E a multiple of 8: the last k16 step may hold 8 experts
#pragma unroll
    for (int p = 0; p < 2; ++p) {
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) load_a(a[ks][p][mi], g_tile + p * kTileElems, kLd, m_base + mi * 16, ks * 16, lane);
    }
  }

  Ring::run(chunks, load, [&](int64_t c, int stage) {
    const uint16_t* const w_stage = stages + stage * 2 * kTileElems;
    float acc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < P::kKSteps; ++ks) {
      if (ks * 16 >= num_experts) break;
      uint32_t b[1][4][2];
#pragma unroll
      for (int j = 0; j < 4; j += 2) load_b_pair_trans(b[0][j], b[0][j + 1], w_stage, kLd, n_base + j * 8, ks * 16, lane);
      mma_split_terms<1>(acc, a[ks], b);
    }
    const int64_t d0 = (chunk_begin + c) * kBN;
    if (add) {
      uint32_t added[2][4][2];
      for_each_fragment_pair(m_base, n_base, lane, [&](int mi, int ni, int half, int64_t row, int64_t col) {
        added[mi][ni][half] = *reinterpret_cast<const uint32_t*>(w_stage + kTileElems + row * kLd + col);
      });
      store_bf16_rows<true>(grad_x, dim, acc, t0 + m_base, d0 + n_base, num_tokens, lane, added);
    } else {
      store_bf16_rows(grad_x, dim, acc, t0 + m_base, d0 + n_base, num_tokens, lane);
    }
  });
}

void launch_tc_grad_x_streamed(const at::Tensor& grad_logits, const at::Tensor& weight, const uint16_t* addend,
                               at::Tensor& grad_x, cudaStream_t stream) {
  using P = StreamedGradXTiles;
  const int64_t num_tokens = grad_logits.size(0), num_experts = weight.size(0), dim = weight.size(1);
  const int64_t token_tiles = ceil_div(num_tokens, P::kBM), column_chunks = dim / P::kBN;
  // The columns split into as many runs as keep the blocks within one wave of kBlocksPerSm per SM.
  const int64_t runs = std::clamp<int64_t>(kNominalSms * P::kBlocksPerSm / token_tiles, 1, column_chunks);
  const int64_t chunks_per_block = ceil_div(column_chunks, runs);
  const int64_t blocks = token_tiles * ceil_div(column_chunks, chunks_per_block);
  const auto kernel = tc_logits_grad_x_streamed_kernel;
  allow_shared_memory(reinterpret_cast<const void*>(kernel), P::kSharedBytes, grad_logits.device().index());
  kernel<<<static_cast<unsigned>(blocks), kTcThreads, P::kSharedBytes, stream>>>(
      grad_logits.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr()), addend,
      reinterpret_cast<uint16_t*>(grad_x.data_ptr()), num_tokens, num_experts, dim, chunks_per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// grad_weight = (g0 + g1 + g2)^T . x.

// kBM experts x 64 columns per block over one chunk of tokens, k tiles of 32 tokens; warp
// (warp_m, warp_n) holds experts kBM / 2 warp_m .. (kMTiles m16 tiles) x columns 32 warp_n .. + 31
// (four n8 tiles).
template <int kMTiles>
struct GradWeightTcTiles {
  static constexpr int kBM = 2 * 16 * kMTiles;
  static constexpr int kBN = 64;
  static constexpr int kBK = 32;
  static constexpr int kGLd = kBM + kTcPad;
  static constexpr int kXLd = kBN + kTcPad;
  static constexpr int kGLoads = kBK * kBM / 4 / kTcThreads;  // float4s
  static constexpr int kXLoads = kBK * kBN / 8 / kTcThreads;  // 16-byte vectors of 8 bf16
  // Resident blocks per SM the chunks are sized for (36 KiB of shared memory a block at most).
  static constexpr int kBlocksPerSm = 2;
};

// The output tile and the chunk of tokens of a grad_weight block (both grad_weight kernels): expert
// tiles vary fastest along blockIdx.x, so the blocks that read the same tokens run together (L2
// hits), and blockIdx.y is the chunk.
struct GradWeightBlock {
  int64_t e0, d0, t_begin, t_end;
  __device__ GradWeightBlock(int bm, int bn, int64_t num_tokens, int64_t num_experts, int64_t tokens_per_chunk) {
    const int64_t expert_tiles = ceil_div(num_experts, bm);
    e0 = static_cast<int64_t>(blockIdx.x) % expert_tiles * bm;
    d0 = static_cast<int64_t>(blockIdx.x) / expert_tiles * bn;
    t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_chunk;
    t_end = std::min(num_tokens, t_begin + tokens_per_chunk);
  }
};

template <int kMTiles>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocksPerSm)
    tc_logits_grad_weight_kernel(const float* __restrict__ grad, const uint16_t* __restrict__ x,
                                 float* __restrict__ out, int64_t num_tokens, int64_t num_experts, int64_t dim,
                                 int64_t tokens_per_chunk) {
  using Tiles = GradWeightTcTiles<kMTiles>;
  constexpr int kBM = Tiles::kBM, kBN = Tiles::kBN, kBK = Tiles::kBK, kGLd = Tiles::kGLd, kXLd = Tiles::kXLd;
  __shared__ __align__(16) uint16_t g_tile[2][3][kBK * kGLd];  // [buffer][part][token][expert]
  __shared__ __align__(16) uint16_t x_tile[2][kBK * kXLd];     // [buffer][token][column]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % 2, warp_n = warp / 2;
  const GradWeightBlock block(kBM, kBN, num_tokens, num_experts, tokens_per_chunk);
  const int64_t e0 = block.e0, d0 = block.d0, t_begin = block.t_begin, t_end = block.t_end;

  float4 g_next[Tiles::kGLoads];
  uint4 x_next[Tiles::kXLoads];
  auto fetch = [&](int64_t kt) {  // the tokens of k tile kt
    const int64_t k0 = t_begin + kt * kBK;
    for_each_vector<Tiles::kGLoads, kBM, 4>(tid, [&](int i, int row, int col) {
      const int64_t t = k0 + row, e = e0 + col;
      g_next[i] = t < t_end && e < num_experts ? *reinterpret_cast<const float4*>(grad + t * num_experts + e)
                                               : make_float4(0.f, 0.f, 0.f, 0.f);
    });
    for_each_vector<Tiles::kXLoads, kBN, 8>(tid, [&](int i, int row, int col) {
      const int64_t t = k0 + row;
      x_next[i] = t < t_end ? *reinterpret_cast<const uint4*>(x + t * dim + d0 + col) : make_uint4(0, 0, 0, 0);
    });
  };
  auto stage = [&](int buffer) {
    for_each_vector<Tiles::kGLoads, kBM, 4>(tid, [&](int i, int row, int col) {
      store_split4<3>(g_tile[buffer][0] + row * kGLd + col, kBK * kGLd, g_next[i]);
    });
    for_each_vector<Tiles::kXLoads, kBN, 8>(tid, [&](int i, int row, int col) {
      *reinterpret_cast<uint4*>(x_tile[buffer] + row * kXLd + col) = x_next[i];
    });
  };

  float acc_lead[kMTiles][4][4] = {};  // g0 . x
  float acc_rest[kMTiles][4][4] = {};  // g2 . x + g1 . x
  const int m_base = warp_m * (kBM / 2), n_base = warp_n * 32;
  const bool warp_has_experts = e0 + m_base < num_experts;  // else its tiles are all zero gradients
  const int64_t k_tiles = ceil_div(t_end - t_begin, kBK);
  double_buffered(k_tiles, fetch, stage, [&](int buffer, int64_t kt) {
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      // Past the chunk's last token the tiles hold zeros: skip whole k16 steps of them.
      if (!warp_has_experts || t_begin + kt * kBK + ks >= t_end) break;
      uint32_t b[4][2];
#pragma unroll
      for (int j = 0; j < 4; j += 2) load_b_pair_trans(b[j], b[j + 1], x_tile[buffer], kXLd, n_base + j * 8, ks, lane);
#pragma unroll
      for (int p = 2; p >= 0; --p) {  // the smallest part first
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) load_a_trans(a[mi], g_tile[buffer][p], kGLd, m_base + mi * 16, ks, lane);
        mma_tiles(p == 0 ? acc_lead : acc_rest, a, b);
      }
    }
  });

  float* chunk_out = out + static_cast<int64_t>(blockIdx.y) * num_experts * dim;  // this chunk's slice
  store_sums<kMTiles, 4, false>(chunk_out, dim, acc_lead, acc_rest, e0 + m_base, d0 + n_base, num_experts, dim, lane);
}

// grad_weight, pipelined: the blocks, chunks and tiles of tc_logits_grad_weight_kernel, with the k
// tiles (32 tokens) copied by cp.async into a ring of kStages stages, kStages - 1 in flight while
// one is multiplied. The logit gradient stays float32 in shared memory, [token][expert], and each
// warp builds and splits its A fragments from it (A = g^T: a fragment pair is two tokens of one
// expert); the products go to each accumulator in the per-tile kernel's order: the same bits.
template <int kMTiles>
struct PipelinedGradWeightTiles {
  static constexpr int kBM = 2 * 16 * kMTiles;  // experts
  static constexpr int kBN = 64;                // columns
  static constexpr int kBK = 32;                // tokens per k tile
  static constexpr int kStages = kMTiles == 2 ? 3 : 4;
  // float32, 4 banks past a multiple of 32: the scalar loads of an A fragment (tokens 2 (lane % 4)
  // (+ 1), expert lane / 4) hit 32 distinct banks.
  static constexpr int kGLd = kBM + 4;
  static constexpr int kXLd = kBN + kTcPad;  // bf16
  static constexpr int kGChunks = kBK * kBM / 4 / kTcThreads;  // 16-byte chunks per thread
  static constexpr int kXChunks = kBK * kBN / 8 / kTcThreads;
  static_assert(kGChunks * 4 * kTcThreads == kBK * kBM && kXChunks * 8 * kTcThreads == kBK * kBN);
};

template <int kMTiles>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocksPerSm)
    tc_logits_grad_weight_pipelined_kernel(const float* __restrict__ grad, const uint16_t* __restrict__ x,
                                           float* __restrict__ out, int64_t num_tokens, int64_t num_experts,
                                           int64_t dim, int64_t tokens_per_chunk) {
  using P = PipelinedGradWeightTiles<kMTiles>;
  constexpr int kBM = P::kBM, kBN = P::kBN, kBK = P::kBK, kStages = P::kStages, kGLd = P::kGLd, kXLd = P::kXLd;
  __shared__ __align__(16) float g_tile[kStages][kBK * kGLd];     // [stage][token][expert]
  __shared__ __align__(16) uint16_t x_tile[kStages][kBK * kXLd];  // [stage][token][column]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % 2, warp_n = warp / 2;
  const GradWeightBlock block(kBM, kBN, num_tokens, num_experts, tokens_per_chunk);
  const int64_t e0 = block.e0, d0 = block.d0, t_begin = block.t_begin, t_end = block.t_end;
  const int64_t k_tiles = ceil_div(t_end - t_begin, kBK);

  auto load = [&](int64_t kt, int stage) {
    const int64_t k0 = t_begin + kt * kBK;
#pragma unroll
    for (int i = 0; i < P::kGChunks; ++i) {
      const int v = tid + i * kTcThreads, row = v / (kBM / 4), col = v % (kBM / 4) * 4;
      const int64_t t = k0 + row, e = e0 + col;
      const bool valid = t < t_end && e < num_experts;
      cp_async16(g_tile[stage] + row * kGLd + col, grad + (valid ? t * num_experts + e : 0), valid);
    }
#pragma unroll
    for (int i = 0; i < P::kXChunks; ++i) {
      const int v = tid + i * kTcThreads, row = v / (kBN / 8), col = v % (kBN / 8) * 8;
      const int64_t t = k0 + row;
      cp_async16(x_tile[stage] + row * kXLd + col, x + (t < t_end ? t * dim + d0 + col : 0), t < t_end);
    }
  };
  using Ring = CpAsyncRing<kStages>;
  Ring::start(k_tiles, load);

  float acc_lead[kMTiles][4][4] = {};  // g0 . x
  float acc_rest[kMTiles][4][4] = {};  // g2 . x + g1 . x
  const int m_base = warp_m * (kBM / 2), n_base = warp_n * 32;
  const bool warp_has_experts = e0 + m_base < num_experts;  // else its tiles are all zero gradients
  Ring::run(k_tiles, load, [&](int64_t kt, int stage) {
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      // Past the chunk's last token the tiles hold zeros: skip whole k16 steps of them.
      if (!warp_has_experts || t_begin + kt * kBK + ks >= t_end) break;
      uint32_t b[4][2];
#pragma unroll
      for (int j = 0; j < 4; j += 2) load_b_pair_trans(b[j], b[j + 1], x_tile[stage], kXLd, n_base + j * 8, ks, lane);
      // A fragment of m16 tile mi: experts r = lane / 4 (+ 8), tokens c = 2 (lane % 4) (+ 1) (+ 8);
      // registers (r, c), (r + 8, c), (r, c + 8), (r + 8, c + 8), each a pair of tokens.
      uint32_t a[3][kMTiles][4];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        const float* column = g_tile[stage] + (ks + 2 * (lane % 4)) * kGLd + m_base + mi * 16 + lane / 4;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float* at = column + (r & 1) * 8 + (r >> 1) * 8 * kGLd;
          uint32_t parts[3];
          split_bf16x2<3>(at[0], at[kGLd], parts);
#pragma unroll
          for (int p = 0; p < 3; ++p) a[p][mi][r] = parts[p];
        }
      }
#pragma unroll
      for (int p = 2; p >= 0; --p) {  // the smallest part first
        mma_tiles(p == 0 ? acc_lead : acc_rest, a[p], b);
      }
    }
  });

  float* chunk_out = out + static_cast<int64_t>(blockIdx.y) * num_experts * dim;  // this chunk's slice
  store_sums<kMTiles, 4, false>(chunk_out, dim, acc_lead, acc_rest, e0 + m_base, d0 + n_base, num_experts, dim, lane);
}

// After the pass: where pieces_output gave a buffer, its pieces added in order into `result` (any of
// the row dtypes, the float32 sum rounded to it); nothing where the pass wrote `result` itself.
void finish_pieces(const at::Tensor& buffer, const at::Tensor& result, cudaStream_t stream) {
  if (!buffer.defined()) return;
  dispatch_row_dtype(result.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_sum_pieces(buffer.data_ptr<float>(), result.data_ptr<T>(), result.numel(), buffer.size(0), stream);
  });
}

// Writes grad_weight, of any of the row dtypes, through pieces_output and finish_pieces.
template <int kMTiles>
void launch_tc_grad_weight(const at::Tensor& grad_logits, const at::Tensor& x, at::Tensor& grad_weight,
                           cudaStream_t stream, bool pipelined) {
  using Tiles = GradWeightTcTiles<kMTiles>;
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = grad_logits.size(1);
  const int64_t tiles = ceil_div(num_experts, Tiles::kBM) * (dim / Tiles::kBN);
  // Chunks of at least 4 k tiles, at most 64 of them; chosen from the shapes alone.
  const int64_t max_chunks = std::clamp<int64_t>(num_tokens / (4 * Tiles::kBK), 1, 64);
  const int64_t chosen = choose_pieces(tiles, kNominalSms * Tiles::kBlocksPerSm, max_chunks);
  const int64_t tokens_per_chunk = ceil_div(ceil_div(num_tokens, chosen), Tiles::kBK) * Tiles::kBK;
  const int64_t chunks = ceil_div(num_tokens, tokens_per_chunk);
  at::Tensor buffer;
  float* out = pieces_output(grad_weight, chunks, buffer);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
  const auto kernel = pipelined ? tc_logits_grad_weight_pipelined_kernel<kMTiles> : tc_logits_grad_weight_kernel<kMTiles>;
  kernel<<<grid, kTcThreads, 0, stream>>>(grad_logits.data_ptr<float>(), reinterpret_cast<const uint16_t*>(x.data_ptr()),
                                          out, num_tokens, num_experts, dim, tokens_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_pieces(buffer, grad_weight, stream);
}

// ---------------------------------------------------------------------------------------------
// Host checks.

void check_tc_experts(int64_t num_experts, const char* what) {
  TORCH_CHECK(num_experts >= kTensorCoreMinExperts && num_experts <= kTensorCoreMaxExperts &&
                  num_experts % kTensorCoreExpertMultiple == 0,
              what, " (experts) must be a multiple of ", text(kTensorCoreExpertMultiple), " from ",
              text(kTensorCoreMinExperts), " to ", text(kTensorCoreMaxExperts),
              " for the tensor-core router kernels, got ", text(num_experts));
}

void check_tc_dim(int64_t dim, const char* what) {
  TORCH_CHECK(dim > 0 && dim % kTensorCoreDimMultiple == 0, what, " (D) must be a positive multiple of ",
              text(kTensorCoreDimMultiple), " for the tensor-core router kernels, got ", text(dim));
}

// A contiguous 2-D CUDA tensor of `dtype` (or, with `or_bf16`, bfloat16) whose data starts on 16
// bytes (the kernels' vector loads).
void check_tc_operand(const at::Tensor& t, at::ScalarType dtype, const char* name, bool or_bf16 = false) {
  check_cuda_contiguous(t, name);
  TORCH_CHECK(t.scalar_type() == dtype || (or_bf16 && t.scalar_type() == at::kBFloat16), name, " must have dtype ",
              dtype, or_bf16 ? " or BFloat16" : "", ", got ", t.scalar_type());
  check_dim(t, 2, name);
  TORCH_CHECK(aligned16(t.data_ptr()), name,
              " must start on a 16-byte boundary for the tensor-core router kernels (a view at an offset may "
              "not; pass a copy)");
}

}  // namespace

at::Tensor router_logits_tc_forward(const at::Tensor& x, const at::Tensor& weight, bool pipelined) {
  check_tc_operand(x, at::kBFloat16, "x");
  check_tc_operand(weight, at::kFloat, "weight", true);
  check_same_device(weight, x, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have D = ", text(x.size(1)), " columns like x, got ",
              text(weight.size(1)));
  check_tc_experts(weight.size(0), "weight's rows");
  check_tc_dim(x.size(1), "x's columns");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t num_tokens = x.size(0), num_experts = weight.size(0);
  at::Tensor logits = at::empty({num_tokens, num_experts}, weight.options().dtype(at::kFloat));
  if (num_tokens == 0) return logits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // A bf16 weight: the pipelined 32-expert kernel, which takes it as it is.
  if (weight.scalar_type() == at::kBFloat16) {
    launch_tc_forward_pipelined(x, weight, logits, stream);
    return logits;
  }
  // 32-expert tiles up to 32 experts, and wherever 64-expert tiles would give fewer than two
  // blocks per SM (one block of 4 warps cannot hide its loads: (8192, 1024, 64) took 33 us).
  using WideTiles = ForwardTcTiles<4>;
  const int64_t wide_blocks =
      ceil_div(num_tokens, WideTiles::kBM) * ceil_div(num_experts, static_cast<int64_t>(WideTiles::kBN));
  if (num_experts <= 32 || wide_blocks < 2 * kNominalSms) {
    pipelined ? launch_tc_forward_pipelined(x, weight, logits, stream) : launch_tc_forward<2>(x, weight, logits, stream);
  } else {
    launch_tc_forward<4>(x, weight, logits, stream);
  }
  return logits;
}

at::Tensor router_logits_tc_grad_x(const at::Tensor& grad_logits, const at::Tensor& weight_in, bool persistent,
                                   const std::optional<at::Tensor>& addend) {
  check_tc_operand(grad_logits, at::kFloat, "grad_logits");
  check_tc_operand(weight_in, at::kFloat, "weight", true);
  if (addend.has_value()) {
    check_tc_operand(*addend, at::kBFloat16, "addend");
    check_same_device(*addend, grad_logits, "addend");
    TORCH_CHECK(addend->size(0) == grad_logits.size(0) && addend->size(1) == weight_in.size(1),
                "addend must have the shape (T, D) = (", text(grad_logits.size(0)), ", ", text(weight_in.size(1)),
                ") of grad_x, got ", text(addend->sizes()));
  }
  const bool persistent_kernel = persistent && weight_in.size(0) <= kPersistentMaxExperts;
  // A bf16 weight that the persistent kernel does not take is widened for the float32 kernel.
  const at::Tensor weight =
      weight_in.scalar_type() == at::kBFloat16 && !persistent_kernel ? weight_in.to(at::kFloat) : weight_in;
  check_same_device(weight, grad_logits, "weight");
  TORCH_CHECK(weight.size(0) == grad_logits.size(1), "weight must have E = ", text(grad_logits.size(1)),
              " rows like grad_logits' columns, got ", text(weight.size(0)));
  check_tc_experts(weight.size(0), "weight's rows");
  check_tc_dim(weight.size(1), "weight's columns");
  const c10::cuda::CUDAGuard guard(grad_logits.device());
  const int64_t num_tokens = grad_logits.size(0), num_experts = weight.size(0), dim = weight.size(1);
  at::Tensor grad_x = at::empty({num_tokens, dim}, weight.options().dtype(at::kBFloat16));
  if (num_tokens == 0) return grad_x;
  if (persistent_kernel) {
    const auto* addend_data = addend.has_value() ? reinterpret_cast<const uint16_t*>(addend->data_ptr()) : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (weight.scalar_type() == at::kBFloat16) {
      launch_tc_grad_x_streamed(grad_logits, weight, addend_data, grad_x, stream);
    } else {
      launch_tc_grad_x_persistent(grad_logits, weight, addend_data, grad_x, stream);
    }
    return grad_x;
  }
  const int64_t blocks = ceil_div(num_tokens, GradXTcTiles::kBM) * (dim / GradXTcTiles::kBN);
  tc_logits_grad_x_kernel<<<static_cast<unsigned>(blocks), kTcThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad_logits.data_ptr<float>(), weight.data_ptr<float>(), reinterpret_cast<uint16_t*>(grad_x.data_ptr()),
      num_tokens, num_experts, dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (addend.has_value()) grad_x.add_(*addend);  // a bf16 addition: the bits of the persistent kernel's
  return grad_x;
}

at::Tensor router_logits_tc_grad_weight(const at::Tensor& grad_logits, const at::Tensor& x, bool pipelined,
                                        at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dtype must be float32, bfloat16 or float16 for the tensor-core router kernels, got ", dtype);
  check_tc_operand(grad_logits, at::kFloat, "grad_logits");
  check_tc_operand(x, at::kBFloat16, "x");
  check_same_device(x, grad_logits, "x");
  TORCH_CHECK(x.size(0) == grad_logits.size(0), "x must have T = ", text(grad_logits.size(0)),
              " rows like grad_logits, got ", text(x.size(0)));
  check_tc_experts(grad_logits.size(1), "grad_logits' columns");
  check_tc_dim(x.size(1), "x's columns");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t num_tokens = x.size(0), num_experts = grad_logits.size(1), dim = x.size(1);
  if (num_tokens == 0) return at::zeros({num_experts, dim}, grad_logits.options().dtype(dtype));
  at::Tensor grad_weight = at::empty({num_experts, dim}, grad_logits.options().dtype(dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (num_experts <= 32) {
    launch_tc_grad_weight<1>(grad_logits, x, grad_weight, stream, pipelined);
  } else {
    launch_tc_grad_weight<2>(grad_logits, x, grad_weight, stream, pipelined);
  }
  return grad_weight;
}

}  // namespace lightning_moe

// router_logits: the three GEMMs of a router's float32 logits, reading x in its own dtype.
//
// With E small (1 to 256) each product is a tall, skinny GEMM. In PyTorch it also needs float32
// copies of x (T, D) around a cuBLAS float32 GEMM; here x is read once per 64 experts, 16 bytes per
// load, converted to float32 on its way into shared memory, and grad_x is written once, in x's
// dtype. Each kernel stages tiles of its two operands in shared memory as float32 and each thread
// accumulates a register tile of outputs with FMAs, in an order fixed by the shapes:
//
// - forward, logits (T, E) = x (T, D) . w (E, D)^T: blocks of 128 tokens x 8-64 experts, k tiles
//   of 32 along D, the next tile loaded into registers while the current one is multiplied; both
//   tiles keep D contiguous in shared memory, rows padded by 4 floats so that the float4 reads of
//   8 consecutive rows hit 32 different banks;
// - grad_x (T, D) = g (T, E) . w (E, D): blocks of 128 tokens x 128 columns, k tiles of 32 experts;
// - grad_weight (E, D) = g^T (E, T) . x (T, D): blocks of 8-64 experts x 128-512 columns over one
//   chunk of tokens, k tiles of 8-16 tokens, prefetched like the forward's.
//
// The forward (over D) and grad_weight (over T) cut their reduction into pieces when the output
// tiles alone would leave the GPU idle; each piece writes its own slice of a float32 buffer, and
// sum_pieces_kernel adds the slices in piece order. The cut depends on the shapes only (sized for a
// 132-SM GPU), never on timing or on the GPU, so results are the same on every run. No atomics, no
// host synchronisation.
//
// Rows whose start is not 16-byte aligned (D not a multiple of 16 bytes of x, or an offset view)
// take the same kernels with element-by-element loads.

#include "router_logits.h"

#include <algorithm>
#include <cstdint>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "rows.cuh"

namespace lightning_moe {
namespace {

// The GPU the pieces are sized for (H100 / H200 SXM); a fixed number, so results do not depend on
// the GPU they are computed on.
constexpr int64_t kNominalSms = 132;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// row[k .. k + N) as a vector, zeros past `limit` or for an invalid row: one 16-byte load when
// kVector (the caller has checked that rows start on 16 bytes and `limit` is a multiple of N),
// element by element otherwise. Two kernels rather than a runtime branch: the branch would cost
// the vector kernel registers.
template <typename T, int N, bool kVector>
__device__ __forceinline__ Vec<T, N> load_vec(const T* row, int64_t k, int64_t limit, bool valid) {
  Vec<T, N> out;
  if constexpr (kVector) {
    if (valid && k + N <= limit) return *reinterpret_cast<const Vec<T, N>*>(row + k);
#pragma unroll
    for (int i = 0; i < N; ++i) out.v[i] = static_cast<T>(0.f);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out.v[i] = valid && k + i < limit ? row[k + i] : static_cast<T>(0.f);
  }
  return out;
}

// A vector of N (a multiple of 4) elements to float32 in shared memory at a 16-byte aligned `dst`.
template <typename T, int N>
__device__ __forceinline__ void stage_floats(float* dst, const Vec<T, N>& vec) {
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 floats = make_float4(static_cast<float>(vec.v[i]), static_cast<float>(vec.v[i + 1]),
                                      static_cast<float>(vec.v[i + 2]), static_cast<float>(vec.v[i + 3]));
    *reinterpret_cast<float4*>(dst + i) = floats;
  }
}

__device__ __forceinline__ float component(const float4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Four floats to dst[0 .. 4) in one store when `vector` and all fit in `room`, else those that fit
// one by one.
template <typename T>
__device__ __forceinline__ void store4(T* dst, const float (&values)[4], int64_t room, bool vector) {
  if (vector && room >= 4) {
    store_floats<T, 4>(dst, values);
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i < room) dst[i] = static_cast<T>(values[i]);
  }
}

// How many pieces to cut a reduction into, for `tiles` blocks per piece on `slots` resident
// blocks: time is modelled as waves / pieces; more pieces are taken only for a 5% gain, since each
// costs buffer traffic.
int64_t choose_pieces(int64_t tiles, int64_t slots, int64_t max_pieces) {
  int64_t best = 1;
  double best_time = static_cast<double>(ceil_div(tiles, slots));
  for (int64_t pieces = 2; pieces <= max_pieces; ++pieces) {
    const double time = static_cast<double>(ceil_div(tiles * pieces, slots)) / static_cast<double>(pieces);
    if (time < 0.95 * best_time) {
      best = pieces;
      best_time = time;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Forward: logits = x . w^T.

// 128 tokens x BN experts per block, k tiles of 32 along D; a thread holds TM tokens (ty + i * kRows)
// x 4 experts (tx + j * kCols), so that the float4 reads of a warp fall on distinct banks.
template <typename T, int BN, int TM>
struct ForwardTiles {
  static constexpr int kBM = 128;
  static constexpr int kBK = 32;
  static constexpr int kTN = 4;
  static constexpr int kLd = kBK + 4;  // a padded row of a tile, in floats
  static constexpr int kCols = BN / kTN;
  static constexpr int kRows = kBM / TM;
  static constexpr int kThreads = kCols * kRows;
  // Resident blocks per SM, enforced by __launch_bounds__: registers for the wider register tiles,
  // occupancy for the narrow, memory-bound ones.
  static constexpr int kBlocksPerSm = kThreads == 256 ? 2 : (BN <= 16 ? 4 : 3);
  static constexpr int kXVec = 16 / sizeof(T);
  static constexpr int kXLoads = kBM * kBK / kXVec / kThreads;
  static constexpr int kWVectors = BN * kBK / 4;
  static constexpr int kWLoads = (kWVectors + kThreads - 1) / kThreads;
  static_assert(kBM * kBK % (kXVec * kThreads) == 0, "the x tile must split evenly over the threads");
};

template <typename T, int BN, int TM, bool kVector>
__global__ void __launch_bounds__(ForwardTiles<T, BN, TM>::kThreads, ForwardTiles<T, BN, TM>::kBlocksPerSm)
    logits_forward_kernel(const T* __restrict__ x, const float* __restrict__ weight, float* __restrict__ out,
                          int64_t num_tokens, int64_t num_experts, int64_t dim, int64_t dim_per_piece) {
  using Tiles = ForwardTiles<T, BN, TM>;
  constexpr int kBK = Tiles::kBK, kLd = Tiles::kLd, kXVec = Tiles::kXVec, kThreads = Tiles::kThreads;
  __shared__ __align__(16) float x_tile[Tiles::kBM * kLd];  // [token][k]
  __shared__ __align__(16) float w_tile[BN * kLd];          // [expert][k]
  const int tid = threadIdx.x;
  const int tx = tid % Tiles::kCols;
  const int ty = tid / Tiles::kCols;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * Tiles::kBM;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * dim_per_piece;
  const int64_t k_end = std::min(dim, k_begin + dim_per_piece);

  // The next k tile waits in registers while the current one is multiplied.
  Vec<T, kXVec> x_next[Tiles::kXLoads];
  Vec<float, 4> w_next[Tiles::kWLoads];
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < Tiles::kXLoads; ++i) {
      const int v = tid + i * kThreads;
      const int64_t t = t0 + v / (kBK / kXVec);
      const int64_t k = k0 + v % (kBK / kXVec) * kXVec;
      x_next[i] = load_vec<T, kXVec, kVector>(x + std::min(t, num_tokens - 1) * dim, k, k_end, t < num_tokens);
    }
#pragma unroll
    for (int i = 0; i < Tiles::kWLoads; ++i) {
      const int v = tid + i * kThreads;
      const int64_t e = e0 + v / (kBK / 4);
      const int64_t k = k0 + v % (kBK / 4) * 4;
      const bool valid = v < Tiles::kWVectors && e < num_experts;
      w_next[i] = load_vec<float, 4, kVector>(weight + std::min(e, num_experts - 1) * dim, k, k_end, valid);
    }
  };
  auto stage = [&]() {
#pragma unroll
    for (int i = 0; i < Tiles::kXLoads; ++i) {
      const int v = tid + i * kThreads;
      stage_floats(x_tile + v / (kBK / kXVec) * kLd + v % (kBK / kXVec) * kXVec, x_next[i]);
    }
#pragma unroll
    for (int i = 0; i < Tiles::kWLoads; ++i) {
      const int v = tid + i * kThreads;
      if (v < Tiles::kWVectors) stage_floats(w_tile + v / (kBK / 4) * kLd + v % (kBK / 4) * 4, w_next[i]);
    }
  };

  float acc[TM][Tiles::kTN] = {};
  fetch(k_begin);
  stage();
  __syncthreads();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    const bool more = k0 + kBK < k_end;
    if (more) fetch(k0 + kBK);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 4) {
      float4 b[Tiles::kTN];
#pragma unroll
      for (int j = 0; j < Tiles::kTN; ++j) {
        b[j] = *reinterpret_cast<const float4*>(w_tile + (tx + j * Tiles::kCols) * kLd + kk);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float4 a = *reinterpret_cast<const float4*>(x_tile + (ty + i * Tiles::kRows) * kLd + kk);
#pragma unroll
        for (int j = 0; j < Tiles::kTN; ++j) {
          acc[i][j] = fmaf(a.x, b[j].x, acc[i][j]);
          acc[i][j] = fmaf(a.y, b[j].y, acc[i][j]);
          acc[i][j] = fmaf(a.z, b[j].z, acc[i][j]);
          acc[i][j] = fmaf(a.w, b[j].w, acc[i][j]);
        }
      }
    }
    __syncthreads();
    if (more) {
      stage();
      __syncthreads();
    }
  }

  float* piece_out = out + static_cast<int64_t>(blockIdx.z) * num_tokens * num_experts;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t t = t0 + ty + i * Tiles::kRows;
#pragma unroll
    for (int j = 0; j < Tiles::kTN; ++j) {
      const int64_t e = e0 + tx + j * Tiles::kCols;
      if (t < num_tokens && e < num_experts) piece_out[t * num_experts + e] = acc[i][j];
    }
  }
}

// out[i] = sum over p of pieces[p, i] for i < n, in a fixed order: thread row y of a block sums
// pieces y, y + blockDim.y, ... in turn, then row 0 adds the rows in order.
__global__ void __launch_bounds__(1024) sum_pieces_kernel(const float* __restrict__ pieces, float* __restrict__ out,
                                                          int64_t n, int64_t num_pieces) {
  __shared__ float partial[32][33];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (i < n) {
    for (int64_t p = threadIdx.y; p < num_pieces; p += blockDim.y) acc += pieces[p * n + i];
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && i < n) {
    float total = partial[0][threadIdx.x];
    for (unsigned y = 1; y < blockDim.y; ++y) total += partial[y][threadIdx.x];
    out[i] = total;
  }
}

void launch_sum_pieces(const float* pieces, float* out, int64_t n, int64_t num_pieces, cudaStream_t stream) {
  const dim3 block(32, static_cast<unsigned>(std::min<int64_t>(num_pieces, 32)));
  sum_pieces_kernel<<<static_cast<unsigned>(ceil_div(n, 32)), block, 0, stream>>>(pieces, out, n, num_pieces);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BN, int TM>
void launch_forward(const T* x, const float* weight, at::Tensor& logits, int64_t dim, cudaStream_t stream) {
  using Tiles = ForwardTiles<T, BN, TM>;
  constexpr int64_t kElementBytes = sizeof(T);
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  const int64_t token_tiles = ceil_div(num_tokens, Tiles::kBM), expert_tiles = ceil_div(num_experts, BN);
  const int64_t k_tiles = ceil_div(dim, Tiles::kBK);
  // At least 4 k tiles a piece, and a buffer no larger than x.
  const int64_t max_pieces =
      std::clamp<int64_t>(std::min(k_tiles / 4, dim * kElementBytes / (4 * num_experts)), 1, 32);
  const int64_t slots = kNominalSms * Tiles::kBlocksPerSm;
  const int64_t chosen = choose_pieces(token_tiles * expert_tiles, slots, max_pieces);
  const int64_t dim_per_piece = ceil_div(k_tiles, chosen) * Tiles::kBK;
  const int64_t pieces = ceil_div(dim, dim_per_piece);
  at::Tensor buffer;
  float* out = logits.data_ptr<float>();
  if (pieces > 1) {
    buffer = at::empty({pieces, num_tokens, num_experts}, logits.options());
    out = buffer.data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(token_tiles), static_cast<unsigned>(expert_tiles),
                  static_cast<unsigned>(pieces));
  if (dim % Tiles::kXVec == 0 && aligned16(x) && aligned16(weight)) {
    logits_forward_kernel<T, BN, TM, true>
        <<<grid, Tiles::kThreads, 0, stream>>>(x, weight, out, num_tokens, num_experts, dim, dim_per_piece);
  } else {
    logits_forward_kernel<T, BN, TM, false>
        <<<grid, Tiles::kThreads, 0, stream>>>(x, weight, out, num_tokens, num_experts, dim, dim_per_piece);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (pieces > 1) launch_sum_pieces(out, logits.data_ptr<float>(), num_tokens * num_experts, pieces, stream);
}
// ---------------------------------------------------------------------------------------------
// grad_x = g . w.

// 128 tokens x 128 columns per block, k tiles of 32 experts; a thread holds 8 tokens (ty + 16 i)
// x 8 columns (4 tx .. 4 tx + 3, and the same 64 further on), so that a warp's float4 reads of
// the w tile are contiguous. The k loop is short (E / 32 tiles), so tiles are not prefetched.
constexpr int kGradXBM = 128;
constexpr int kGradXBN = 128;
constexpr int kGradXBK = 32;
constexpr int kGradXLd = kGradXBK + 1;  // g tile rows one bank apart
constexpr int kGradXThreads = 256;

template <typename T, bool kVector>
__global__ void __launch_bounds__(kGradXThreads, 2)
    logits_grad_x_kernel(const float* __restrict__ grad, const float* __restrict__ weight, T* __restrict__ grad_x,
                         int64_t num_tokens, int64_t num_experts, int64_t dim) {
  __shared__ float g_tile[kGradXBM * kGradXLd];              // [token][expert]
  __shared__ __align__(16) float w_tile[kGradXBK * kGradXBN];  // [expert][column]
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kGradXBM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kGradXBN;

  float acc[8][8] = {};
  for (int64_t k0 = 0; k0 < num_experts; k0 += kGradXBK) {
#pragma unroll
    for (int i = 0; i < kGradXBM * kGradXBK / kGradXThreads; ++i) {
      const int v = tid + i * kGradXThreads;
      const int64_t t = t0 + v / kGradXBK;
      const int64_t e = k0 + v % kGradXBK;
      const bool valid = t < num_tokens && e < num_experts;
      g_tile[v / kGradXBK * kGradXLd + v % kGradXBK] = valid ? grad[t * num_experts + e] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kGradXBK * kGradXBN / 4 / kGradXThreads; ++i) {
      const int v = tid + i * kGradXThreads;
      const int64_t e = k0 + v / (kGradXBN / 4);
      const int c = v % (kGradXBN / 4) * 4;
      const float* row = weight + std::min(e, num_experts - 1) * dim;
      const auto w = load_vec<float, 4, kVector>(row, d0 + c, dim, e < num_experts);
      stage_floats(w_tile + v / (kGradXBN / 4) * kGradXBN + c, w);
    }
    __syncthreads();
    // Steps of 4 experts: past E the tiles hold zeros, which add nothing.
    const int k_len = static_cast<int>(std::min<int64_t>(kGradXBK, num_experts - k0));
    for (int kk = 0; kk < k_len; kk += 4) {
#pragma unroll
      for (int q = kk; q < kk + 4; ++q) {
        const float4 b0 = *reinterpret_cast<const float4*>(w_tile + q * kGradXBN + 4 * tx);
        const float4 b1 = *reinterpret_cast<const float4*>(w_tile + q * kGradXBN + 4 * tx + 64);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float g = g_tile[(ty + 16 * i) * kGradXLd + q];
          acc[i][0] = fmaf(g, b0.x, acc[i][0]);
          acc[i][1] = fmaf(g, b0.y, acc[i][1]);
          acc[i][2] = fmaf(g, b0.z, acc[i][2]);
          acc[i][3] = fmaf(g, b0.w, acc[i][3]);
          acc[i][4] = fmaf(g, b1.x, acc[i][4]);
          acc[i][5] = fmaf(g, b1.y, acc[i][5]);
          acc[i][6] = fmaf(g, b1.z, acc[i][6]);
          acc[i][7] = fmaf(g, b1.w, acc[i][7]);
        }
      }
    }
    __syncthreads();
  }

  const bool vector_out = dim % 4 == 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t t = t0 + ty + 16 * i;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t d = d0 + 4 * tx + 64 * half;
      const float values[4] = {acc[i][4 * half], acc[i][4 * half + 1], acc[i][4 * half + 2], acc[i][4 * half + 3]};
      if (t < num_tokens && d < dim) store4(grad_x + t * dim + d, values, dim - d, vector_out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// grad_weight = g^T . x.

// BM experts x BN columns per block of 128 threads, k tiles of BK tokens; a thread holds TM experts
// (4 ty .. 4 ty + 3, and the same BM / kMG further on) x TN columns (likewise, BN / kNG apart).
template <typename T, int BM, int BN, int TM, int TN, int BK>
struct GradWeightTiles {
  static constexpr int kThreads = 128;
  static constexpr int kBlocksPerSm = BM <= 8 ? 4 : 3;  // as in ForwardTiles
  static constexpr int kMG = TM / 4;
  static constexpr int kNG = TN / 4;
  static constexpr int kCols = BN / TN;
  static constexpr int kXVec = 16 / sizeof(T);
  static constexpr int kXLoads = BK * BN / kXVec / kThreads;
  static constexpr int kGLoads = (BK * BM + kThreads - 1) / kThreads;
  static_assert((BM / TM) * kCols == kThreads, "the register tiles must cover the block tile");
  static_assert(BK * BN % (kXVec * kThreads) == 0, "the x tile must split evenly over the threads");
};

template <typename T, int BM, int BN, int TM, int TN, int BK, bool kVector>
__global__ void __launch_bounds__(128, (GradWeightTiles<T, BM, BN, TM, TN, BK>::kBlocksPerSm))
    logits_grad_weight_kernel(const float* __restrict__ grad, const T* __restrict__ x, float* __restrict__ out,
                              int64_t num_tokens, int64_t num_experts, int64_t dim, int64_t tokens_per_chunk) {
  using Tiles = GradWeightTiles<T, BM, BN, TM, TN, BK>;
  constexpr int kXVec = Tiles::kXVec, kThreads = Tiles::kThreads;
  __shared__ __align__(16) float g_tile[BK * BM];  // [token][expert]
  __shared__ __align__(16) float x_tile[BK * BN];  // [token][column]
  const int tid = threadIdx.x;
  const int tx = tid % Tiles::kCols;
  const int ty = tid / Tiles::kCols;
  const int64_t d0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * tokens_per_chunk;
  const int64_t t_end = std::min(num_tokens, t_begin + tokens_per_chunk);

  Vec<T, kXVec> x_next[Tiles::kXLoads];
  float g_next[Tiles::kGLoads];
  auto fetch = [&](int64_t t0) {
#pragma unroll
    for (int i = 0; i < Tiles::kXLoads; ++i) {
      const int v = tid + i * kThreads;
      const int64_t t = t0 + v / (BN / kXVec);
      const int64_t d = d0 + v % (BN / kXVec) * kXVec;
      x_next[i] = load_vec<T, kXVec, kVector>(x + std::min(t, num_tokens - 1) * dim, d, dim, t < t_end);
    }
#pragma unroll
    for (int i = 0; i < Tiles::kGLoads; ++i) {
      const int v = tid + i * kThreads;
      const int64_t t = t0 + v / BM;
      const int64_t e = e0 + v % BM;
      g_next[i] = v < BK * BM && t < t_end && e < num_experts ? grad[t * num_experts + e] : 0.f;
    }
  };
  auto stage = [&]() {
#pragma unroll
    for (int i = 0; i < Tiles::kXLoads; ++i) {
      const int v = tid + i * kThreads;
      stage_floats(x_tile + v / (BN / kXVec) * BN + v % (BN / kXVec) * kXVec, x_next[i]);
    }
#pragma unroll
    for (int i = 0; i < Tiles::kGLoads; ++i) {
      const int v = tid + i * kThreads;
      if (v < BK * BM) g_tile[v] = g_next[i];
    }
  };

  float acc[TM][TN] = {};
  fetch(t_begin);
  stage();
  __syncthreads();
  for (int64_t t0 = t_begin; t0 < t_end; t0 += BK) {
    const bool more = t0 + BK < t_end;
    if (more) fetch(t0 + BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float4 a[Tiles::kMG], b[Tiles::kNG];
#pragma unroll
      for (int g = 0; g < Tiles::kMG; ++g) {
        a[g] = *reinterpret_cast<const float4*>(g_tile + kk * BM + 4 * ty + g * (BM / Tiles::kMG));
      }
#pragma unroll
      for (int g = 0; g < Tiles::kNG; ++g) {
        b[g] = *reinterpret_cast<const float4*>(x_tile + kk * BN + 4 * tx + g * (BN / Tiles::kNG));
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float g_te = component(a[i / 4], i % 4);
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(g_te, component(b[j / 4], j % 4), acc[i][j]);
      }
    }
    __syncthreads();
    if (more) {
      stage();
      __syncthreads();
    }
  }

  float* chunk_out = out + static_cast<int64_t>(blockIdx.z) * num_experts * dim;
  const bool vector_out = dim % 4 == 0;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t e = e0 + 4 * ty + i / 4 * (BM / Tiles::kMG) + i % 4;
#pragma unroll
    for (int g = 0; g < Tiles::kNG; ++g) {
      const int64_t d = d0 + 4 * tx + g * (BN / Tiles::kNG);
      const float values[4] = {acc[i][4 * g], acc[i][4 * g + 1], acc[i][4 * g + 2], acc[i][4 * g + 3]};
      if (e < num_experts && d < dim) store4(chunk_out + e * dim + d, values, dim - d, vector_out);
    }
  }
}

template <typename T, int BM, int BN, int TM, int TN, int BK>
void launch_grad_weight(const float* grad, const T* x, at::Tensor& grad_weight, int64_t num_tokens,
                        cudaStream_t stream) {
  using Tiles = GradWeightTiles<T, BM, BN, TM, TN, BK>;
  constexpr int64_t kElementBytes = sizeof(T);
  const int64_t num_experts = grad_weight.size(0), dim = grad_weight.size(1);
  const int64_t column_tiles = ceil_div(dim, BN), expert_tiles = ceil_div(num_experts, BM);
  // At least 4 k tiles a chunk, and a buffer no larger than x.
  const int64_t max_chunks =
      std::clamp<int64_t>(std::min(num_tokens / (4 * BK), num_tokens * kElementBytes / (4 * num_experts)), 1, 1024);
  const int64_t slots = kNominalSms * Tiles::kBlocksPerSm;
  const int64_t chunks = choose_pieces(column_tiles * expert_tiles, slots, max_chunks);
  const int64_t tokens_per_chunk = ceil_div(ceil_div(num_tokens, chunks), BK) * BK;
  const int64_t num_chunks = ceil_div(num_tokens, tokens_per_chunk);
  at::Tensor buffer;
  float* out = grad_weight.data_ptr<float>();
  if (num_chunks > 1) {
    buffer = at::empty({num_chunks, num_experts, dim}, grad_weight.options());
    out = buffer.data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(column_tiles), static_cast<unsigned>(expert_tiles),
                  static_cast<unsigned>(num_chunks));
  if (dim % Tiles::kXVec == 0 && aligned16(x)) {
    logits_grad_weight_kernel<T, BM, BN, TM, TN, BK, true>
        <<<grid, Tiles::kThreads, 0, stream>>>(grad, x, out, num_tokens, num_experts, dim, tokens_per_chunk);
  } else {
    logits_grad_weight_kernel<T, BM, BN, TM, TN, BK, false>
        <<<grid, Tiles::kThreads, 0, stream>>>(grad, x, out, num_tokens, num_experts, dim, tokens_per_chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_chunks > 1) launch_sum_pieces(out, grad_weight.data_ptr<float>(), num_experts * dim, num_chunks, stream);
}

void check_weight(const at::Tensor& weight, const at::Tensor& ref, const char* name) {
  check_cuda_contiguous(weight, name);
  check_same_device(weight, ref, name);
  check_dtype(weight, at::kFloat, name);
  check_dim(weight, 2, name);
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(0) <= kRouterLogitsMaxExperts, name, " must have 1 to ",
              kRouterLogitsMaxExperts, " rows (experts), got ", weight.size(0));
}

}  // namespace

at::Tensor router_logits_forward(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda_contiguous(x, "x");
  check_row_dtype(x.scalar_type(), "x");
  check_dim(x, 2, "x");
  check_weight(weight, x, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have D = ", x.size(1), " columns like x, got ",
              weight.size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = weight.size(0);
  if (num_tokens == 0 || dim == 0) return at::zeros({num_tokens, num_experts}, weight.options());
  at::Tensor logits = at::empty({num_tokens, num_experts}, weight.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* w = weight.data_ptr<float>();
  dispatch_row_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    if (num_experts <= 8) {
      launch_forward<T, 8, 2>(xp, w, logits, dim, stream);
    } else if (num_experts <= 16) {
      launch_forward<T, 16, 4>(xp, w, logits, dim, stream);
    } else if (num_experts <= 32) {
      launch_forward<T, 32, 8>(xp, w, logits, dim, stream);
    } else {
      launch_forward<T, 64, 8>(xp, w, logits, dim, stream);
    }
  });
  return logits;
}

at::Tensor router_logits_grad_x(const at::Tensor& grad_logits, const at::Tensor& weight, at::ScalarType x_dtype) {
  check_cuda_contiguous(grad_logits, "grad_logits");
  check_dtype(grad_logits, at::kFloat, "grad_logits");
  check_dim(grad_logits, 2, "grad_logits");
  check_weight(weight, grad_logits, "weight");
  check_row_dtype(x_dtype, "x_dtype");
  TORCH_CHECK(weight.size(0) == grad_logits.size(1), "weight must have E = ", grad_logits.size(1),
              " rows like grad_logits, got ", weight.size(0));
  const c10::cuda::CUDAGuard guard(grad_logits.device());
  const int64_t num_tokens = grad_logits.size(0), num_experts = weight.size(0), dim = weight.size(1);
  at::Tensor grad_x = at::empty({num_tokens, dim}, weight.options().dtype(x_dtype));
  if (num_tokens == 0 || dim == 0) return grad_x;
  const float* g = grad_logits.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const dim3 grid(static_cast<unsigned>(ceil_div(num_tokens, kGradXBM)),
                  static_cast<unsigned>(ceil_div(dim, kGradXBN)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_row_dtype(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = grad_x.data_ptr<T>();
    if (dim % 4 == 0 && aligned16(w)) {
      logits_grad_x_kernel<T, true><<<grid, kGradXThreads, 0, stream>>>(g, w, out, num_tokens, num_experts, dim);
    } else {
      logits_grad_x_kernel<T, false><<<grid, kGradXThreads, 0, stream>>>(g, w, out, num_tokens, num_experts, dim);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

at::Tensor router_logits_grad_weight(const at::Tensor& grad_logits, const at::Tensor& x) {
  check_cuda_contiguous(grad_logits, "grad_logits");
  check_dtype(grad_logits, at::kFloat, "grad_logits");
  check_dim(grad_logits, 2, "grad_logits");
  check_cuda_contiguous(x, "x");
  check_same_device(x, grad_logits, "x");
  check_row_dtype(x.scalar_type(), "x");
  check_dim(x, 2, "x");
  TORCH_CHECK(x.size(0) == grad_logits.size(0), "x must have T = ", grad_logits.size(0),
              " rows like grad_logits, got ", x.size(0));
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = grad_logits.size(1);
  TORCH_CHECK(num_experts >= 1 && num_experts <= kRouterLogitsMaxExperts, "grad_logits must have 1 to ",
              kRouterLogitsMaxExperts, " columns (experts), got ", num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  if (num_tokens == 0 || dim == 0) return at::zeros({num_experts, dim}, grad_logits.options());
  at::Tensor grad_weight = at::empty({num_experts, dim}, grad_logits.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* g = grad_logits.data_ptr<float>();
  dispatch_row_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    if (num_experts <= 8) {
      launch_grad_weight<T, 8, 512, 8, 4, 8>(g, xp, grad_weight, num_tokens, stream);
    } else if (num_experts <= 16) {
      launch_grad_weight<T, 16, 512, 8, 8, 8>(g, xp, grad_weight, num_tokens, stream);
    } else if (num_experts <= 32) {
      launch_grad_weight<T, 32, 256, 8, 8, 16>(g, xp, grad_weight, num_tokens, stream);
    } else {
      launch_grad_weight<T, 64, 128, 8, 8, 16>(g, xp, grad_weight, num_tokens, stream);
    }
  });
  return grad_weight;
}

}  // namespace lightning_moe

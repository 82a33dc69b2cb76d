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

#include "router_logits_few.h"
#include "router_logits_tiles.cuh"

namespace lightning_moe {
namespace {

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
  float* out = pieces_output(logits, pieces, buffer);
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
}  // namespace

at::Tensor router_logits_forward(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda_contiguous(x, "x");
  check_row_dtype(x.scalar_type(), "x");
  check_dim(x, 2, "x");
  check_weight(weight, x, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have D = ", text(x.size(1)), " columns like x, got ",
              text(weight.size(1)));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = weight.size(0);
  if (num_tokens == 0 || dim == 0) return at::zeros({num_tokens, num_experts}, weight.options());
  at::Tensor logits = at::empty({num_tokens, num_experts}, weight.options());
  if (few_experts_kernels_take(num_experts, dim, x.data_ptr(), weight.data_ptr())) {
    few_experts_logits_forward(x, weight, logits);
    return logits;
  }
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

}  // namespace lightning_moe

// The router logits' gradients, grad_x = g . w and grad_weight = g^T . x; router_logits.cu describes
// the design the three kernels share.

#include "router_logits_few.h"
#include "router_logits_tiles.cuh"

namespace lightning_moe {
namespace {

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
  float* out = pieces_output(grad_weight, num_chunks, buffer);
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

}  // namespace

at::Tensor router_logits_grad_x(const at::Tensor& grad_logits, const at::Tensor& weight, at::ScalarType x_dtype) {
  check_cuda_contiguous(grad_logits, "grad_logits");
  check_dtype(grad_logits, at::kFloat, "grad_logits");
  check_dim(grad_logits, 2, "grad_logits");
  check_weight(weight, grad_logits, "weight");
  check_row_dtype(x_dtype, "x_dtype");
  TORCH_CHECK(weight.size(0) == grad_logits.size(1), "weight must have E = ", text(grad_logits.size(1)),
              " rows like grad_logits, got ", text(weight.size(0)));
  const c10::cuda::CUDAGuard guard(grad_logits.device());
  const int64_t num_tokens = grad_logits.size(0), num_experts = weight.size(0), dim = weight.size(1);
  at::Tensor grad_x = at::empty({num_tokens, dim}, weight.options().dtype(x_dtype));
  if (num_tokens == 0 || dim == 0) return grad_x;
  if (few_experts_kernels_take(num_experts, dim, grad_x.data_ptr(), weight.data_ptr())) {
    few_experts_logits_grad_x(grad_logits, weight, grad_x);
    return grad_x;
  }
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
  TORCH_CHECK(x.size(0) == grad_logits.size(0), "x must have T = ", text(grad_logits.size(0)),
              " rows like grad_logits, got ", text(x.size(0)));
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = grad_logits.size(1);
  TORCH_CHECK(num_experts >= 1 && num_experts <= kRouterLogitsMaxExperts, "grad_logits must have 1 to ",
              text(kRouterLogitsMaxExperts), " columns (experts), got ", text(num_experts));
  const c10::cuda::CUDAGuard guard(x.device());
  if (num_tokens == 0 || dim == 0) return at::zeros({num_experts, dim}, grad_logits.options());
  at::Tensor grad_weight = at::empty({num_experts, dim}, grad_logits.options());
  if (few_experts_kernels_take(num_experts, dim, x.data_ptr(), grad_weight.data_ptr())) {
    few_experts_logits_grad_weight(grad_logits, x, grad_weight);
    return grad_weight;
  }
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

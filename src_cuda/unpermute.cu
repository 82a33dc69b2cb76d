// unpermute (combine): expert-sorted rows back to token order, weighted, and its backward.
//
// Both directions run one block per token and visit the token's assignments in order, so every
// sum has a fixed order and no atomics are needed: the results are the same on every run.

#include "unpermute.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "rows.cuh"

namespace lightning_moe {
namespace {

constexpr int kWarp = 32;

// Sum of `value` over the block (blockDim.x a multiple of 32), valid in thread 0. The tree is fixed
// by blockDim.x, so the rounding is the same on every run.
__device__ float block_sum(float value, float* warp_sums) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) value += __shfl_xor_sync(0xffffffffu, value, delta);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  __syncthreads();  // the previous call's readers are done with warp_sums
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  float total = 0.f;
  if (warp == 0) {
    total = lane < blockDim.x / kWarp ? warp_sums[lane] : 0.f;
#pragma unroll
    for (int delta = kWarp / 2; delta > 0; delta /= 2) total += __shfl_xor_sync(0xffffffffu, total, delta);
  }
  return total;
}

template <typename G, typename Y, int N>
__global__ void unpermute_backward_kernel(const G* __restrict__ grad_out, const Y* __restrict__ y_sorted,
                                          const int64_t* __restrict__ inverse, const float* __restrict__ weights,
                                          const int64_t* __restrict__ token_offsets, Y* __restrict__ grad_y,
                                          float* __restrict__ grad_weights, int64_t num_tokens, int64_t dim) {
  __shared__ float warp_sums[kWarp];
  const int64_t vectors = dim / N;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t end = token_offsets[t + 1];
    for (int64_t a = token_offsets[t]; a < end; ++a) {
      const int64_t row = inverse[a];
      const float weight = weights[a];
      float dot = 0.f;
      for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
        float grad[N];
        float y[N];
        float scaled[N];
        // grad_out[t] is re-read for each assignment; after the first it comes from cache.
        load_floats<G, N>(grad_out + t * dim + v * N, grad);
        load_floats<Y, N>(y_sorted + row * dim + v * N, y);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          scaled[i] = weight * grad[i];
          dot = fmaf(grad[i], y[i], dot);
        }
        store_floats<Y, N>(grad_y + row * dim + v * N, scaled);
      }
      dot = block_sum(dot, warp_sums);
      if (threadIdx.x == 0) grad_weights[a] = dot;
    }
  }
}

template <typename G, typename Y>
void launch_unpermute_backward(const G* grad_out, const Y* y_sorted, const int64_t* inverse, const float* weights,
                               const int64_t* token_offsets, Y* grad_y, float* grad_weights, int64_t num_tokens,
                               int64_t dim, cudaStream_t stream) {
  if (num_tokens == 0) return;
  constexpr int kVec = vector_width<G, Y>();
  const bool vectorized =
      rows_vectorizable(dim, kVec, {{grad_out, sizeof(G)}, {y_sorted, sizeof(Y)}, {grad_y, sizeof(Y)}});
  const int64_t vectors = vectorized ? dim / kVec : dim;
  const dim3 grid(row_grid(num_tokens));
  const dim3 block(row_block_threads(vectors));
  if (vectorized) {
    unpermute_backward_kernel<G, Y, kVec><<<grid, block, 0, stream>>>(
        grad_out, y_sorted, inverse, weights, token_offsets, grad_y, grad_weights, num_tokens, dim);
  } else {
    unpermute_backward_kernel<G, Y, 1><<<grid, block, 0, stream>>>(
        grad_out, y_sorted, inverse, weights, token_offsets, grad_y, grad_weights, num_tokens, dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_assignments(const at::Tensor& y_sorted, const at::Tensor& inverse, const at::Tensor& weights,
                       const at::Tensor& token_offsets) {
  check_cuda_contiguous(y_sorted, "y_sorted");
  check_row_dtype(y_sorted.scalar_type(), "y_sorted");
  check_dim(y_sorted, 2, "y_sorted");
  check_index(inverse, y_sorted, "inverse");
  TORCH_CHECK(inverse.size(0) == y_sorted.size(0), "inverse has ", text(inverse.size(0)),
              " entries but y_sorted has ", text(y_sorted.size(0)), " rows");
  check_cuda_contiguous(weights, "weights");
  check_same_device(weights, y_sorted, "weights");
  check_dtype(weights, at::kFloat, "weights");
  check_dim(weights, 1, "weights");
  TORCH_CHECK(weights.size(0) == inverse.size(0), "weights has ", text(weights.size(0)),
              " entries but inverse has ", text(inverse.size(0)));
  check_token_offsets(token_offsets, y_sorted, inverse.size(0));
}

}  // namespace

at::Tensor unpermute_forward(const at::Tensor& y_sorted, const at::Tensor& inverse, const at::Tensor& weights,
                             const at::Tensor& token_offsets, at::ScalarType out_dtype) {
  check_assignments(y_sorted, inverse, weights, token_offsets);
  check_row_dtype(out_dtype, "out_dtype");
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t num_tokens = token_offsets.size(0) - 1;
  at::Tensor out = at::empty({num_tokens, y_sorted.size(1)}, y_sorted.options().dtype(out_dtype));
  dispatch_row_dtype(y_sorted.scalar_type(), [&](auto src_tag) {
    dispatch_row_dtype(out_dtype, [&](auto dst_tag) {
      using Src = decltype(src_tag);
      using Dst = decltype(dst_tag);
      launch_reduce_rows<Src, Dst>(y_sorted.data_ptr<Src>(), inverse.data_ptr<int64_t>(),
                                   token_offsets.data_ptr<int64_t>(), weights.data_ptr<float>(), out.data_ptr<Dst>(),
                                   num_tokens, y_sorted.size(1), c10::cuda::getCurrentCUDAStream());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                      const at::Tensor& inverse, const at::Tensor& weights,
                                                      const at::Tensor& token_offsets) {
  check_assignments(y_sorted, inverse, weights, token_offsets);
  check_cuda_contiguous(grad_out, "grad_out");
  check_same_device(grad_out, y_sorted, "grad_out");
  check_row_dtype(grad_out.scalar_type(), "grad_out");
  check_dim(grad_out, 2, "grad_out");
  TORCH_CHECK(grad_out.size(0) == token_offsets.size(0) - 1 && grad_out.size(1) == y_sorted.size(1),
              "grad_out must have shape (T, D) = (", text(token_offsets.size(0) - 1), ", ",
              text(y_sorted.size(1)), "), got ", text(grad_out.sizes()));
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  at::Tensor grad_y = at::empty_like(y_sorted);
  at::Tensor grad_weights = at::empty_like(weights);
  dispatch_row_dtype(grad_out.scalar_type(), [&](auto grad_tag) {
    dispatch_row_dtype(y_sorted.scalar_type(), [&](auto y_tag) {
      using G = decltype(grad_tag);
      using Y = decltype(y_tag);
      launch_unpermute_backward<G, Y>(grad_out.data_ptr<G>(), y_sorted.data_ptr<Y>(), inverse.data_ptr<int64_t>(),
                                      weights.data_ptr<float>(), token_offsets.data_ptr<int64_t>(),
                                      grad_y.data_ptr<Y>(), grad_weights.data_ptr<float>(), grad_out.size(0),
                                      y_sorted.size(1), c10::cuda::getCurrentCUDAStream());
    });
  });
  return {grad_y, grad_weights};
}

}  // namespace lightning_moe

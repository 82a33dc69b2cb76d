// permute: token rows to expert-sorted assignment rows (forward), and the sum back (backward).
//
// The forward runs one block per token: it reads the token's row once and stores it to each of its
// K sorted rows, so x is read T times rather than N = T * K times. Rows move 16 bytes per thread
// when D and the pointers allow it.

#include "permute.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "rows.cuh"

namespace lightning_moe {
namespace {

template <typename T, int N>
__global__ void permute_forward_kernel(const T* __restrict__ x, const int64_t* __restrict__ inverse,
                                       const int64_t* __restrict__ token_offsets, T* __restrict__ x_sorted,
                                       int64_t num_tokens, int64_t dim) {
  const int64_t vectors = dim / N;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t begin = token_offsets[t];
    const int64_t end = token_offsets[t + 1];
    if (begin == end) continue;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      // A raw copy, not a float round trip: the sorted rows are bit-identical to x's.
      const Vec<T, N> row = *reinterpret_cast<const Vec<T, N>*>(x + t * dim + v * N);
      for (int64_t a = begin; a < end; ++a) {
        *reinterpret_cast<Vec<T, N>*>(x_sorted + inverse[a] * dim + v * N) = row;
      }
    }
  }
}

template <typename T>
void launch_permute_forward(const T* x, const int64_t* inverse, const int64_t* token_offsets, T* x_sorted,
                            int64_t num_tokens, int64_t dim, cudaStream_t stream) {
  if (num_tokens == 0 || dim == 0) return;
  constexpr int kVec = vector_width<T, T>();
  const bool vectorized = rows_vectorizable(dim, kVec, {{x, sizeof(T)}, {x_sorted, sizeof(T)}});
  const int64_t vectors = vectorized ? dim / kVec : dim;
  const dim3 grid(row_grid(num_tokens));
  const dim3 block(row_block_threads(vectors));
  if (vectorized) {
    permute_forward_kernel<T, kVec><<<grid, block, 0, stream>>>(x, inverse, token_offsets, x_sorted, num_tokens, dim);
  } else {
    permute_forward_kernel<T, 1><<<grid, block, 0, stream>>>(x, inverse, token_offsets, x_sorted, num_tokens, dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor permute_forward(const at::Tensor& x, const at::Tensor& inverse, const at::Tensor& token_offsets) {
  check_cuda_contiguous(x, "x");
  check_row_dtype(x.scalar_type(), "x");
  check_dim(x, 2, "x");
  check_index(inverse, x, "inverse");
  check_token_offsets(token_offsets, x, inverse.size(0));
  TORCH_CHECK(token_offsets.size(0) == x.size(0) + 1, "token_offsets must have T + 1 = ", text(x.size(0) + 1),
              " entries, got ", text(token_offsets.size(0)));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_sorted = at::empty({inverse.size(0), x.size(1)}, x.options());
  dispatch_row_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_permute_forward<T>(x.data_ptr<T>(), inverse.data_ptr<int64_t>(), token_offsets.data_ptr<int64_t>(),
                              x_sorted.data_ptr<T>(), x.size(0), x.size(1), c10::cuda::getCurrentCUDAStream());
  });
  return x_sorted;
}

at::Tensor permute_backward(const at::Tensor& grad_sorted, const at::Tensor& inverse,
                            const at::Tensor& token_offsets, at::ScalarType x_dtype) {
  check_cuda_contiguous(grad_sorted, "grad_sorted");
  check_row_dtype(grad_sorted.scalar_type(), "grad_sorted");
  check_row_dtype(x_dtype, "x_dtype");
  check_dim(grad_sorted, 2, "grad_sorted");
  check_index(inverse, grad_sorted, "inverse");
  TORCH_CHECK(inverse.size(0) == grad_sorted.size(0), "inverse has ", text(inverse.size(0)),
              " entries but grad_sorted has ", text(grad_sorted.size(0)), " rows");
  check_token_offsets(token_offsets, grad_sorted, inverse.size(0));
  const c10::cuda::CUDAGuard guard(grad_sorted.device());
  const int64_t num_tokens = token_offsets.size(0) - 1;
  at::Tensor grad_x = at::empty({num_tokens, grad_sorted.size(1)}, grad_sorted.options().dtype(x_dtype));
  dispatch_row_dtype(grad_sorted.scalar_type(), [&](auto src_tag) {
    dispatch_row_dtype(x_dtype, [&](auto dst_tag) {
      using Src = decltype(src_tag);
      using Dst = decltype(dst_tag);
      launch_reduce_rows<Src, Dst>(grad_sorted.data_ptr<Src>(), inverse.data_ptr<int64_t>(),
                                   token_offsets.data_ptr<int64_t>(), nullptr, grad_x.data_ptr<Dst>(), num_tokens,
                                   grad_sorted.size(1), c10::cuda::getCurrentCUDAStream());
    });
  });
  return grad_x;
}

}  // namespace lightning_moe

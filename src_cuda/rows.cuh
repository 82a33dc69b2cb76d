// Device helpers shared by the row-moving kernels (permute, unpermute): 16-byte vectors of row
// elements, their conversion to float32 lanes, and dtype dispatch.
#pragma once

#include <cstdint>

#include <initializer_list>
#include <utility>

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace lightning_moe {

// N consecutive elements moved as one load or store (16 bytes for the widest type of a kernel).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[N]) {
  const Vec<T, N> vec = *reinterpret_cast<const Vec<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(vec.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* ptr, const float (&in)[N]) {
  Vec<T, N> vec;
#pragma unroll
  for (int i = 0; i < N; ++i) vec.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(ptr) = vec;
}

// Elements per vector when a kernel reads A and writes B: 16 bytes of the wider of the two.
template <typename A, typename B>
constexpr int vector_width() {
  return 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}

// Whether rows of `dim` elements at these base pointers can be moved `width` elements at a time.
inline bool rows_vectorizable(int64_t dim, int width, std::initializer_list<std::pair<const void*, size_t>> ptrs) {
  if (dim % width != 0) return false;
  for (const auto& [ptr, elem_size] : ptrs) {
    if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % (elem_size * width) != 0) return false;
  }
  return true;
}

// Threads per block for rows of `vectors` vectors: one vector per thread up to 256 threads.
inline int row_block_threads(int64_t vectors) {
  int64_t threads = (vectors + 31) / 32 * 32;
  return static_cast<int>(threads < 32 ? 32 : (threads > 256 ? 256 : threads));
}

// Blocks for one block per row, capped; kernels loop when there are more rows than blocks.
inline unsigned int row_grid(int64_t rows) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  return static_cast<unsigned int>(rows < kMaxBlocks ? rows : kMaxBlocks);
}

// Calls fn(T{}) with a value of the C++ type of a float32, bfloat16 or float16 ScalarType.
template <typename Fn>
void dispatch_row_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      break;
    case at::kHalf:
      fn(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "unsupported row dtype ", dtype, "; expected float32, bfloat16 or float16");
  }
}

// out[t] = sum over t's assignments a of weights[a] * src[inverse[a]] (weights of 1 when null),
// summed in float32 in assignment order, so the result is the same on every run. Token t's
// assignments are [token_offsets[t], token_offsets[t + 1]). One block per token, one vector of
// N elements per thread; every row of `out` is written, tokens without assignments with zeros.
template <typename Src, typename Dst, int N>
__global__ void reduce_rows_kernel(const Src* __restrict__ src, const int64_t* __restrict__ inverse,
                                   const int64_t* __restrict__ token_offsets, const float* __restrict__ weights,
                                   Dst* __restrict__ out, int64_t num_tokens, int64_t dim) {
  const int64_t vectors = dim / N;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t begin = token_offsets[t];
    const int64_t end = token_offsets[t + 1];
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      float acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0.f;
#pragma unroll 4
      for (int64_t a = begin; a < end; ++a) {
        float row[N];
        load_floats<Src, N>(src + inverse[a] * dim + v * N, row);
        const float weight = weights == nullptr ? 1.f : weights[a];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = fmaf(weight, row[i], acc[i]);
      }
      store_floats<Dst, N>(out + t * dim + v * N, acc);
    }
  }
}

template <typename Src, typename Dst>
void launch_reduce_rows(const Src* src, const int64_t* inverse, const int64_t* token_offsets, const float* weights,
                        Dst* out, int64_t num_tokens, int64_t dim, cudaStream_t stream) {
  if (num_tokens == 0 || dim == 0) return;
  constexpr int kVec = vector_width<Src, Dst>();
  const bool vectorized = rows_vectorizable(dim, kVec, {{src, sizeof(Src)}, {out, sizeof(Dst)}});
  const int64_t vectors = vectorized ? dim / kVec : dim;
  const dim3 grid(row_grid(num_tokens));
  const dim3 block(row_block_threads(vectors));
  if (vectorized) {
    reduce_rows_kernel<Src, Dst, kVec>
        <<<grid, block, 0, stream>>>(src, inverse, token_offsets, weights, out, num_tokens, dim);
  } else {
    reduce_rows_kernel<Src, Dst, 1>
        <<<grid, block, 0, stream>>>(src, inverse, token_offsets, weights, out, num_tokens, dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lightning_moe

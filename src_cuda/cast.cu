// Bfloat16 and float16 to float32 in one vectorised pass, optionally added to a float32 tensor:
// see cast.h.
//
// PyTorch casts a narrower float to float32 with its elementwise kernel that converts one element
// at a time (its vectorised copy serves one dtype throughout, and float32 to bfloat16); on an H200
// that moved about 2 TB/s on the expert weights' gradients, which mixed precision casts back to
// the float32 weights' dtype at every backward pass. Here each thread reads one 16-byte vector and
// writes two (reading two more of the addend when there is one). The elements past the last whole
// vector take a scalar tail.
//
// cast_to_float_square_sums also sums the squares of the float32 results, one partial sum per
// block, for the gradient norm of clipping: the results are then not read again to take it.

#include "cast.h"

#include <algorithm>
#include <cstdint>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "rows.cuh"

namespace lightning_moe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;
constexpr int kN = 8;  // elements per thread and step: 16 bytes read, 32 written

// The sum of every thread's value, in thread 0 (a fixed order: the same bits on every run).
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  return total;
}

// out = float(in), plus addend where kAdd; where kSquares, partials[block] = the block's sum of
// out's squares.
template <typename T, bool kAdd, bool kSquares = false>
__global__ void __launch_bounds__(kThreads) cast_to_float_kernel(const T* __restrict__ in,
                                                                 const float* __restrict__ addend,
                                                                 float* __restrict__ out, int64_t count,
                                                                 float* __restrict__ partials = nullptr) {
  float squares = 0.0f;
  const int64_t vectors = count / kN;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (int64_t v = first; v < vectors; v += stride) {
    float values[kN];
    load_floats<T, kN>(in + v * kN, values);
    float lo[kN / 2], hi[kN / 2];
    if constexpr (kAdd) {
      load_floats<float, kN / 2>(addend + v * kN, lo);
      load_floats<float, kN / 2>(addend + v * kN + kN / 2, hi);
    }
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) {
      lo[i] = kAdd ? lo[i] + values[i] : values[i];
      hi[i] = kAdd ? hi[i] + values[i + kN / 2] : values[i + kN / 2];
    }
    store_floats<float, kN / 2>(out + v * kN, lo);
    store_floats<float, kN / 2>(out + v * kN + kN / 2, hi);
    if constexpr (kSquares) {
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) squares += lo[i] * lo[i] + hi[i] * hi[i];
    }
  }
  for (int64_t i = vectors * kN + first; i < count; i += stride) {
    const float value = static_cast<float>(in[i]);
    out[i] = kAdd ? addend[i] + value : value;
    if constexpr (kSquares) squares += out[i] * out[i];
  }
  if constexpr (kSquares) {
    const float total = block_sum(squares);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
  }
}

int64_t block_count(int64_t count) {
  const int64_t threads_needed = std::max<int64_t>(count / kN, 1);
  return std::min((threads_needed + kThreads - 1) / kThreads, kMaxBlocks);
}

// The checks of x that both entry points make.
void check_input(const at::Tensor& x) {
  check_cuda_contiguous(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must have dtype bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "x must start on a 16-byte boundary; cast a view that does not with x.float()");
}

// Launches the kernel for x's dtype over its count (> 0) elements: plus `addend` unless null, and
// where kSquares (no addend) with the blocks' partial sums of squares into `partials`.
template <bool kSquares>
void launch(const at::Tensor& x, const float* addend, float* out, int64_t blocks, float* partials = nullptr) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t count = x.numel();
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    const T* in = static_cast<const T*>(x.data_ptr());
    if constexpr (kSquares) {
      cast_to_float_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(in, nullptr, out, count, partials);
    } else if (addend != nullptr) {
      cast_to_float_kernel<T, true><<<blocks, kThreads, 0, stream>>>(in, addend, out, count);
    } else {
      cast_to_float_kernel<T, false><<<blocks, kThreads, 0, stream>>>(in, nullptr, out, count);
    }
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(c10::BFloat16{});
  } else {
    run(c10::Half{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cast_to_float_square_sums(const at::Tensor& x) {
  check_input(x);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t count = x.numel();
  const int64_t blocks = count == 0 ? 0 : block_count(count);
  at::Tensor partials = at::empty({blocks}, x.options().dtype(at::kFloat));
  if (count > 0) launch<true>(x, nullptr, out.data_ptr<float>(), blocks, partials.data_ptr<float>());
  return {out, partials};
}

at::Tensor cast_to_float(const at::Tensor& x, const std::optional<at::Tensor>& addend) {
  check_input(x);
  const float* add = nullptr;
  if (addend.has_value()) {
    check_cuda_contiguous(*addend, "addend");
    check_dtype(*addend, at::kFloat, "addend");
    check_same_device(*addend, x, "addend");
    TORCH_CHECK(addend->sizes() == x.sizes(), "addend must have x's shape ", text(x.sizes()), ", got ",
                text(addend->sizes()));
    TORCH_CHECK(reinterpret_cast<uintptr_t>(addend->data_ptr()) % 16 == 0,
                "addend must start on a 16-byte boundary; add a view that does not with addend + x.float()");
    add = addend->data_ptr<float>();
  }
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t count = x.numel();
  if (count > 0) launch<false>(x, add, out.data_ptr<float>(), block_count(count));
  return out;
}

}  // namespace lightning_moe

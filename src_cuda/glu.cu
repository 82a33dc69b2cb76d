// glu: h = act(a) * b for SwiGLU and GeGLU experts, forward and backward, one elementwise launch each.
//
// Eager PyTorch runs the activation and the product as separate kernels forward and about four
// backward, each a pass over (N, F) tensors. Here each thread reads 16 bytes of every input, does
// the maths in float32 and writes 16 bytes of every output; act(a) is recomputed in the backward
// instead of being kept from the forward. The tensors are treated as flat arrays: the vector loop
// covers the largest multiple of the vector width, and a scalar tail the rest.

#include "glu.h"

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "rows.cuh"

namespace lightning_moe {
namespace {

enum class GluKind { kSwiGLU, kGeGLU };

GluKind parse_kind(const std::string& kind) {
  if (kind == "swiglu") return GluKind::kSwiGLU;
  TORCH_CHECK(kind == "geglu", "kind must be \"swiglu\" or \"geglu\", got \"", kind, "\"");
  return GluKind::kGeGLU;
}

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// act(a), and act'(a) when `slope` is not null.
template <GluKind K>
__device__ __forceinline__ float activate(float a, float* slope) {
  if constexpr (K == GluKind::kSwiGLU) {
    const float sigmoid = 1.f / (1.f + expf(-a));
    if (slope != nullptr) *slope = sigmoid * (1.f + a * (1.f - sigmoid));
    return a * sigmoid;
  } else {
    constexpr float kInvSqrt2 = 0.70710678118654752440f;
    constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
    const float cdf = 0.5f * (1.f + erff(a * kInvSqrt2));
    if (slope != nullptr) *slope = cdf + a * kInvSqrt2Pi * expf(-0.5f * a * a);
    return a * cdf;
  }
}

// Elements [0, vectors * N) as vectors of N, then the tail [vectors * N, count) one at a time.
template <typename T, int N, GluKind K>
__global__ void glu_forward_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ h,
                                   int64_t count) {
  const int64_t vectors = count / N;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (int64_t v = first; v < vectors; v += stride) {
    float a_vec[N], b_vec[N], h_vec[N];
    load_floats<T, N>(a + v * N, a_vec);
    load_floats<T, N>(b + v * N, b_vec);
#pragma unroll
    for (int i = 0; i < N; ++i) h_vec[i] = activate<K>(a_vec[i], nullptr) * b_vec[i];
    store_floats<T, N>(h + v * N, h_vec);
  }
  for (int64_t i = vectors * N + first; i < count; i += stride) {
    h[i] = static_cast<T>(activate<K>(static_cast<float>(a[i]), nullptr) * static_cast<float>(b[i]));
  }
}

template <typename T, int N, GluKind K>
__global__ void glu_backward_kernel(const T* __restrict__ grad_h, const T* __restrict__ a, const T* __restrict__ b,
                                    T* __restrict__ grad_a, T* __restrict__ grad_b, int64_t count) {
  const int64_t vectors = count / N;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (int64_t v = first; v < vectors; v += stride) {
    float g_vec[N], a_vec[N], b_vec[N], grad_a_vec[N], grad_b_vec[N];
    load_floats<T, N>(grad_h + v * N, g_vec);
    load_floats<T, N>(a + v * N, a_vec);
    load_floats<T, N>(b + v * N, b_vec);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float slope;
      grad_b_vec[i] = g_vec[i] * activate<K>(a_vec[i], &slope);
      grad_a_vec[i] = g_vec[i] * b_vec[i] * slope;
    }
    store_floats<T, N>(grad_a + v * N, grad_a_vec);
    store_floats<T, N>(grad_b + v * N, grad_b_vec);
  }
  for (int64_t i = vectors * N + first; i < count; i += stride) {
    const float g = static_cast<float>(grad_h[i]);
    float slope;
    grad_b[i] = static_cast<T>(g * activate<K>(static_cast<float>(a[i]), &slope));
    grad_a[i] = static_cast<T>(g * static_cast<float>(b[i]) * slope);
  }
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* ptr : ptrs) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  return true;
}

// Calls fn(kVectorWidth or 1 as an integral_constant, kind as an integral_constant).
template <typename T, typename Fn>
void dispatch_glu(bool vectorized, GluKind kind, Fn&& fn) {
  constexpr int kVec = vector_width<T, T>();
  auto with_kind = [&](auto width) {
    if (kind == GluKind::kSwiGLU) {
      fn(width, std::integral_constant<GluKind, GluKind::kSwiGLU>{});
    } else {
      fn(width, std::integral_constant<GluKind, GluKind::kGeGLU>{});
    }
  };
  if (vectorized) {
    with_kind(std::integral_constant<int, kVec>{});
  } else {
    with_kind(std::integral_constant<int, 1>{});
  }
}

unsigned int glu_grid(int64_t count, int width) {
  const int64_t blocks = (count / width + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

void check_glu_input(const at::Tensor& t, const at::Tensor& a, const char* name) {
  check_cuda_contiguous(t, name);
  check_same_device(t, a, name);
  check_dtype(t, a.scalar_type(), name);
  TORCH_CHECK(t.sizes() == a.sizes(), name, " must have a's shape ", a.sizes(), ", got ", t.sizes());
}

}  // namespace

at::Tensor glu_forward(const at::Tensor& a, const at::Tensor& b, const std::string& kind) {
  const GluKind glu_kind = parse_kind(kind);
  check_cuda_contiguous(a, "a");
  check_row_dtype(a.scalar_type(), "a");
  check_glu_input(b, a, "b");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor h = at::empty_like(a);
  const int64_t count = a.numel();
  if (count == 0) return h;
  dispatch_row_dtype(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* a_ptr = a.data_ptr<T>();
    const T* b_ptr = b.data_ptr<T>();
    T* h_ptr = h.data_ptr<T>();
    const bool vectorized = all_aligned({a_ptr, b_ptr, h_ptr});
    dispatch_glu<T>(vectorized, glu_kind, [&](auto width, auto kind_tag) {
      glu_forward_kernel<T, decltype(width)::value, decltype(kind_tag)::value>
          <<<glu_grid(count, width), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a_ptr, b_ptr, h_ptr, count);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> glu_backward(const at::Tensor& grad_h, const at::Tensor& a, const at::Tensor& b,
                                                const std::string& kind) {
  const GluKind glu_kind = parse_kind(kind);
  check_cuda_contiguous(a, "a");
  check_row_dtype(a.scalar_type(), "a");
  check_glu_input(b, a, "b");
  check_glu_input(grad_h, a, "grad_h");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor grad_a = at::empty_like(a);
  at::Tensor grad_b = at::empty_like(b);
  const int64_t count = a.numel();
  if (count == 0) return {grad_a, grad_b};
  dispatch_row_dtype(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* grad_h_ptr = grad_h.data_ptr<T>();
    const T* a_ptr = a.data_ptr<T>();
    const T* b_ptr = b.data_ptr<T>();
    T* grad_a_ptr = grad_a.data_ptr<T>();
    T* grad_b_ptr = grad_b.data_ptr<T>();
    const bool vectorized = all_aligned({grad_h_ptr, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr});
    dispatch_glu<T>(vectorized, glu_kind, [&](auto width, auto kind_tag) {
      glu_backward_kernel<T, decltype(width)::value, decltype(kind_tag)::value>
          <<<glu_grid(count, width), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              grad_h_ptr, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr, count);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a, grad_b};
}

}  // namespace lightning_moe

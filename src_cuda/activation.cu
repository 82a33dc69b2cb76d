// The experts' activations, plain (h = act(a)) or gated (h = act(a) * gate, SwiGLU and GeGLU),
// forward and backward, one elementwise launch each.
//
// Eager PyTorch runs a GLU's activation and product as separate kernels forward and about four
// backward, each a pass over (N, F) tensors. Here each thread reads 16 bytes of every input, does
// the maths in float32 and writes 16 bytes of every output; act(a) is recomputed in the backward
// instead of being kept from the forward. The erf GELU takes Phi from one exponential and a
// reciprocal (the exponential is the one its derivative needs too) rather than from erff, whose
// branches make PyTorch's GELU bound by arithmetic rather than by memory. The tensors are treated
// as flat arrays: the vector loop covers the largest multiple of the vector width, and a scalar
// tail the rest.

#include "activation.h"

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

enum class Act { kSilu, kGelu, kGeluTanh, kRelu };

Act parse_activation(const std::string& name) {
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(name == "relu", "activation must be \"silu\", \"gelu\", \"gelu_tanh\" or \"relu\", got \"", name,
              "\"");
  return Act::kRelu;
}

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// Phi(a), the standard normal CDF, and when `density` is not null phi(a) = exp(-a^2 / 2) / sqrt(2 pi).
// Phi(a) = 1 - erfc(a / sqrt 2) / 2 for a >= 0 and erfc(|a| / sqrt 2) / 2 below, with
// erfc(z) = t * poly(t) * exp(-z^2), t = 1 / (1 + p z), to within 1.5e-7 (Abramowitz & Stegun
// 7.1.26); exp(-z^2) is the exponential of phi as well.
__device__ __forceinline__ float normal_cdf(float a, float* density) {
  constexpr float kInvSqrt2 = 0.70710678118654752440f;
  constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
  const float z = fabsf(a) * kInvSqrt2;
  const float t = __fdividef(1.f, fmaf(0.3275911f, z, 1.f));
  const float gaussian = __expf(-z * z);
  float poly = 1.061405429f;
  poly = fmaf(poly, t, -1.453152027f);
  poly = fmaf(poly, t, 1.421413741f);
  poly = fmaf(poly, t, -0.284496736f);
  poly = fmaf(poly, t, 0.254829592f);
  const float half_erfc = 0.5f * t * poly * gaussian;
  if (density != nullptr) *density = kInvSqrt2Pi * gaussian;
  return a >= 0.f ? 1.f - half_erfc : half_erfc;
}

// act(a), and act'(a) when `slope` is not null.
template <Act A>
__device__ __forceinline__ float activate(float a, float* slope) {
  if constexpr (A == Act::kSilu) {
    const float sigmoid = __fdividef(1.f, 1.f + __expf(-a));
    if (slope != nullptr) *slope = sigmoid * (1.f + a * (1.f - sigmoid));
    return a * sigmoid;
  } else if constexpr (A == Act::kGelu) {
    float density;
    const float cdf = normal_cdf(a, slope != nullptr ? &density : nullptr);
    if (slope != nullptr) *slope = cdf + a * density;
    return a * cdf;
  } else if constexpr (A == Act::kGeluTanh) {
    constexpr float kSqrt2OverPi = 0.79788456080286535588f;
    constexpr float kCubic = 0.044715f;
    const float tanh_value = tanhf(kSqrt2OverPi * a * fmaf(kCubic * a, a, 1.f));
    if (slope != nullptr) {
      const float inner_slope = kSqrt2OverPi * fmaf(3.f * kCubic * a, a, 1.f);
      *slope = 0.5f * (1.f + tanh_value) + 0.5f * a * (1.f - tanh_value * tanh_value) * inner_slope;
    }
    return 0.5f * a * (1.f + tanh_value);
  } else {
    if (slope != nullptr) *slope = a > 0.f ? 1.f : 0.f;
    return isnan(a) ? a : fmaxf(a, 0.f);  // NaN passes through, as in PyTorch
  }
}

// Elements [0, vectors * N) as vectors of N, then the tail [vectors * N, count) one at a time.
// Without a gate each thread loads two vectors (a grid stride apart) before computing either: the
// arithmetic of the erf GELU would otherwise leave too few loads in flight to keep memory busy.
// With a gate (whose loads are already two a vector) one. Without kGated, `gate` is not read.
template <bool kGated>
inline constexpr int kForwardVectors = kGated ? 1 : 2;

template <typename T, int N, Act A, bool kGated>
__global__ void activation_forward_kernel(const T* __restrict__ a, const T* __restrict__ gate, T* __restrict__ h,
                                          int64_t count) {
  const int64_t vectors = count / N;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  constexpr int kPerThread = kForwardVectors<kGated>;
  for (int64_t v = first; v < vectors; v += kPerThread * stride) {
    float a_vec[kPerThread][N], gate_vec[kPerThread][N];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t index = v + j * stride;
      if (index >= vectors) continue;
      load_floats<T, N>(a + index * N, a_vec[j]);
      if constexpr (kGated) load_floats<T, N>(gate + index * N, gate_vec[j]);
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t index = v + j * stride;
      if (index >= vectors) continue;
      float h_vec[N];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        h_vec[i] = activate<A>(a_vec[j][i], nullptr);
        if constexpr (kGated) h_vec[i] *= gate_vec[j][i];
      }
      store_floats<T, N>(h + index * N, h_vec);
    }
  }
  for (int64_t i = vectors * N + first; i < count; i += stride) {
    float value = activate<A>(static_cast<float>(a[i]), nullptr);
    if constexpr (kGated) value *= static_cast<float>(gate[i]);
    h[i] = static_cast<T>(value);
  }
}

// Without kGated, `gate` and `grad_gate` are not touched.
template <typename T, int N, Act A, bool kGated>
__global__ void activation_backward_kernel(const T* __restrict__ grad_h, const T* __restrict__ a,
                                           const T* __restrict__ gate, T* __restrict__ grad_a,
                                           T* __restrict__ grad_gate, int64_t count) {
  const int64_t vectors = count / N;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (int64_t v = first; v < vectors; v += stride) {
    float g_vec[N], a_vec[N], gate_vec[N], grad_a_vec[N], grad_gate_vec[N];
    load_floats<T, N>(grad_h + v * N, g_vec);
    load_floats<T, N>(a + v * N, a_vec);
    if constexpr (kGated) load_floats<T, N>(gate + v * N, gate_vec);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float slope;
      const float act = activate<A>(a_vec[i], &slope);
      if constexpr (kGated) {
        grad_gate_vec[i] = g_vec[i] * act;
        grad_a_vec[i] = g_vec[i] * gate_vec[i] * slope;
      } else {
        grad_a_vec[i] = g_vec[i] * slope;
      }
    }
    store_floats<T, N>(grad_a + v * N, grad_a_vec);
    if constexpr (kGated) store_floats<T, N>(grad_gate + v * N, grad_gate_vec);
  }
  for (int64_t i = vectors * N + first; i < count; i += stride) {
    const float g = static_cast<float>(grad_h[i]);
    float slope;
    const float act = activate<A>(static_cast<float>(a[i]), &slope);
    if constexpr (kGated) {
      grad_gate[i] = static_cast<T>(g * act);
      grad_a[i] = static_cast<T>(g * static_cast<float>(gate[i]) * slope);
    } else {
      grad_a[i] = static_cast<T>(g * slope);
    }
  }
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* ptr : ptrs) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  return true;
}

// Calls fn(width, act, gated) with the vector width (kVec or 1), the activation and whether a
// gate is given, each as an integral_constant.
template <typename T, typename Fn>
void dispatch_activation(bool vectorized, Act act, bool gated, Fn&& fn) {
  constexpr int kVec = vector_width<T, T>();
  auto with_gate = [&](auto width, auto act_tag) {
    if (gated) {
      fn(width, act_tag, std::true_type{});
    } else {
      fn(width, act_tag, std::false_type{});
    }
  };
  auto with_act = [&](auto width) {
    switch (act) {
      case Act::kSilu:
        return with_gate(width, std::integral_constant<Act, Act::kSilu>{});
      case Act::kGelu:
        return with_gate(width, std::integral_constant<Act, Act::kGelu>{});
      case Act::kGeluTanh:
        return with_gate(width, std::integral_constant<Act, Act::kGeluTanh>{});
      case Act::kRelu:
        return with_gate(width, std::integral_constant<Act, Act::kRelu>{});
    }
  };
  if (vectorized) {
    with_act(std::integral_constant<int, kVec>{});
  } else {
    with_act(std::integral_constant<int, 1>{});
  }
}

// Blocks for `count` elements at `width` elements a vector and `per_thread` vectors a thread.
unsigned int activation_grid(int64_t count, int width, int per_thread) {
  const int64_t threads = (count / width + per_thread - 1) / per_thread;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

void check_like_a(const at::Tensor& t, const at::Tensor& a, const char* name) {
  check_cuda_contiguous(t, name);
  check_same_device(t, a, name);
  check_dtype(t, a.scalar_type(), name);
  TORCH_CHECK(t.sizes() == a.sizes(), name, " must have a's shape ", text(a.sizes()), ", got ", text(t.sizes()));
}

// The gate's data, or null without a gate.
template <typename T>
const T* gate_data(const std::optional<at::Tensor>& gate) {
  return gate.has_value() ? gate->data_ptr<T>() : nullptr;
}

void check_inputs(const at::Tensor& a, const std::optional<at::Tensor>& gate) {
  check_cuda_contiguous(a, "a");
  check_row_dtype(a.scalar_type(), "a");
  if (gate.has_value()) check_like_a(*gate, a, "gate");
}

}  // namespace

at::Tensor activation_forward(const at::Tensor& a, const std::optional<at::Tensor>& gate,
                              const std::string& activation) {
  const Act act = parse_activation(activation);
  check_inputs(a, gate);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor h = at::empty_like(a);
  const int64_t count = a.numel();
  if (count == 0) return h;
  dispatch_row_dtype(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* a_ptr = a.data_ptr<T>();
    const T* gate_ptr = gate_data<T>(gate);
    T* h_ptr = h.data_ptr<T>();
    const bool vectorized = all_aligned({a_ptr, gate_ptr, h_ptr});
    dispatch_activation<T>(vectorized, act, gate.has_value(), [&](auto width, auto act_tag, auto gated) {
      constexpr bool kGated = decltype(gated)::value;
      const unsigned int blocks = activation_grid(count, width, kForwardVectors<kGated>);
      activation_forward_kernel<T, decltype(width)::value, decltype(act_tag)::value, kGated>
          <<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a_ptr, gate_ptr, h_ptr, count);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> activation_backward(const at::Tensor& grad_h, const at::Tensor& a,
                                                       const std::optional<at::Tensor>& gate,
                                                       const std::string& activation) {
  const Act act = parse_activation(activation);
  check_inputs(a, gate);
  check_like_a(grad_h, a, "grad_h");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor grad_a = at::empty_like(a);
  at::Tensor grad_gate = gate.has_value() ? at::empty_like(a) : at::Tensor();
  const int64_t count = a.numel();
  if (count == 0) return {grad_a, grad_gate};
  dispatch_row_dtype(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* grad_h_ptr = grad_h.data_ptr<T>();
    const T* a_ptr = a.data_ptr<T>();
    const T* gate_ptr = gate_data<T>(gate);
    T* grad_a_ptr = grad_a.data_ptr<T>();
    T* grad_gate_ptr = gate.has_value() ? grad_gate.data_ptr<T>() : nullptr;
    const bool vectorized = all_aligned({grad_h_ptr, a_ptr, gate_ptr, grad_a_ptr, grad_gate_ptr});
    dispatch_activation<T>(vectorized, act, gate.has_value(), [&](auto width, auto act_tag, auto gated) {
      activation_backward_kernel<T, decltype(width)::value, decltype(act_tag)::value, decltype(gated)::value>
          <<<activation_grid(count, width, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              grad_h_ptr, a_ptr, gate_ptr, grad_a_ptr, grad_gate_ptr, count);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a, grad_gate};
}

}  // namespace lightning_moe

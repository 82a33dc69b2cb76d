// router_logits for routers of at most 8 experts: the forward and grad_x passes as streams over x.
//
// With E <= 8 each pass is bound by moving x (or grad_x) through memory; the tiled kernels of
// router_logits.cu spend more time staging float32 tiles in shared memory than reading x. Here the
// whole float32 weight sits in shared memory (kE * D floats, kE the expert count rounded up to a
// power of two, zero rows past E) and x is read straight from global memory: a group of eight
// lanes takes two tokens, lane j the 8-element chunks j, j + 8, ... of both rows, so a group reads
// 128 contiguous bytes (bf16) of each row per step. Per chunk a lane reads the kE weight rows at
// that chunk as float4 pairs, laid out [expert][half][chunk] so that a group's reads are 128
// contiguous bytes too, and uses them for both tokens: at E = 8 the weight moves 32 bytes from
// shared memory per element of x, which one token per read would make the bound.
//
// forward: each lane sums its chunks in order, then the group adds its lanes' sums by a fixed
// butterfly (xor 4, 2, 1); grad_x: each chunk of grad_x is sum over e of g[t, e] * w[e, chunk], e in
// order. Every output element is computed by one lane in an order fixed by the shapes: the results
// are the same on every run and for every launch configuration.

#include "router_logits_few.h"

#include <array>
#include <mutex>

#include <c10/cuda/CUDAFunctions.h>

#include "router_logits_tiles.cuh"

namespace lightning_moe {
namespace {

// Both kernels: 256 threads a block, registers for 3 blocks an SM (85 each).
constexpr int kFewThreads = 256;
constexpr int kFewMinBlocks = 3;
constexpr int kGroupLanes = 8;  // lanes per group of tokens
constexpr int kRows = 2;        // tokens per group: each weight chunk read from shared memory serves both
constexpr int kChunk = 8;       // elements of a row per lane per step
constexpr int kTokensPerWarp = 32 / kGroupLanes * kRows;
constexpr int kTokensPerBlock = kFewThreads / kGroupLanes * kRows;
// Shared memory for the weight: at most 8 x 4096 floats.
constexpr int64_t kFewMaxWeightBytes = int64_t{128} << 10;

template <int kE>
constexpr int64_t weight_bytes(int64_t dim) {
  return int64_t{kE} * dim * static_cast<int64_t>(sizeof(float));
}

// The weight to shared memory as [expert][half][chunk] float4s, rows kE > e >= E zero.
template <int kE>
__device__ __forceinline__ void stage_weight(float4* w_s, const float* __restrict__ weight, int num_experts,
                                             int chunks) {
  const int total = kE * 2 * chunks;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int e = i / (2 * chunks);
    const int rest = i % (2 * chunks);
    const int half = rest / chunks;
    const int c = rest % chunks;
    w_s[i] = e < num_experts ? *reinterpret_cast<const float4*>(weight + static_cast<int64_t>(e) * chunks * kChunk +
                                                                 c * kChunk + half * 4)
                             : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __syncthreads();
}

// 8 elements of a row as loaded: one 16-byte vector for bf16 / fp16, two for float32.
template <typename T>
struct RawChunk {
  static constexpr int kPerVector = 16 / sizeof(T);
  static constexpr int kVectors = kChunk / kPerVector;
  uint4 vectors[kVectors];
};

template <typename T>
__device__ __forceinline__ RawChunk<T> load_chunk(const T* ptr) {
  RawChunk<T> chunk;
#pragma unroll
  for (int i = 0; i < RawChunk<T>::kVectors; ++i) chunk.vectors[i] = reinterpret_cast<const uint4*>(ptr)[i];
  return chunk;
}

template <typename T>
__device__ __forceinline__ void to_floats(const RawChunk<T>& chunk, float (&out)[kChunk]) {
  constexpr int kPer = RawChunk<T>::kPerVector;
#pragma unroll
  for (int i = 0; i < RawChunk<T>::kVectors; ++i) {
    const T* values = reinterpret_cast<const T*>(&chunk.vectors[i]);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[i * kPer + j] = static_cast<float>(values[j]);
  }
}

// One 16-byte store to global memory (left to itself, the compiler splits some into four).
__device__ __forceinline__ void store16(void* ptr, const uint4& value) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(value.x), "r"(value.y), "r"(value.z),
               "r"(value.w)
               : "memory");
}

// 8 floats to a row in T, as whole 16-byte stores.
template <typename T>
__device__ __forceinline__ void store_chunk(T* ptr, const float (&in)[kChunk]) {
  constexpr int kPer = RawChunk<T>::kPerVector;
#pragma unroll
  for (int i = 0; i < RawChunk<T>::kVectors; ++i) {
    Vec<T, kPer> vec;
#pragma unroll
    for (int j = 0; j < kPer; ++j) vec.v[j] = static_cast<T>(in[i * kPer + j]);
    store16(reinterpret_cast<uint4*>(ptr) + i, *reinterpret_cast<const uint4*>(&vec));
  }
}

// The group of a thread covers tokens first + kRows * (threadIdx / 8) + r, r < kRows, then the same
// one stride on; the loop bounds are warp-uniform so that every lane reaches the shuffles.
template <typename T, int kE>
__global__ void __launch_bounds__(kFewThreads, kFewMinBlocks) few_experts_logits_forward_kernel(
    const T* __restrict__ x, const float* __restrict__ weight, float* __restrict__ out, int64_t num_tokens,
    int num_experts, int64_t dim) {
  extern __shared__ float4 w_s[];
  const int chunks = static_cast<int>(dim / kChunk);
  stage_weight<kE>(w_s, weight, num_experts, chunks);
  const int lane = threadIdx.x % kGroupLanes;
  const int warp = threadIdx.x / 32;
  const int group = threadIdx.x % 32 / kGroupLanes;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + warp * kTokensPerWarp; base < num_tokens;
       base += static_cast<int64_t>(gridDim.x) * kTokensPerBlock) {
    const int64_t t0 = base + group * kRows;
    float acc[kRows][kE] = {};
    const T* rows[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) rows[r] = x + std::min(t0 + r, num_tokens - 1) * dim;
    if (t0 < num_tokens) {
      // The next chunk of each row waits in registers, as loaded, while this one is multiplied.
      RawChunk<T> ahead[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (lane < chunks) ahead[r] = load_chunk(rows[r] + lane * kChunk);
      }
#pragma unroll 1
      for (int c = lane; c < chunks; c += kGroupLanes) {
        float xs[kRows][kChunk];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          to_floats(ahead[r], xs[r]);
          if (c + kGroupLanes < chunks) ahead[r] = load_chunk(rows[r] + (c + kGroupLanes) * kChunk);
        }
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const float4 lo = w_s[(2 * e) * chunks + c];
          const float4 hi = w_s[(2 * e + 1) * chunks + c];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            float sum = acc[r][e];
            sum = fmaf(xs[r][0], lo.x, sum);
            sum = fmaf(xs[r][1], lo.y, sum);
            sum = fmaf(xs[r][2], lo.z, sum);
            sum = fmaf(xs[r][3], lo.w, sum);
            sum = fmaf(xs[r][4], hi.x, sum);
            sum = fmaf(xs[r][5], hi.y, sum);
            sum = fmaf(xs[r][6], hi.z, sum);
            sum = fmaf(xs[r][7], hi.w, sum);
            acc[r][e] = sum;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int e = 0; e < kE; ++e) {
#pragma unroll
        for (int delta = kGroupLanes / 2; delta > 0; delta /= 2) {
          acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], delta);
        }
      }
      // Lane j of the group writes expert j.
      float mine = acc[r][0];
#pragma unroll
      for (int e = 1; e < kE; ++e) mine = lane == e ? acc[r][e] : mine;
      const int64_t t = t0 + r;
      if (t < num_tokens && lane < num_experts) out[t * num_experts + lane] = mine;
    }
  }
}

template <typename T, int kE>
__global__ void __launch_bounds__(kFewThreads, kFewMinBlocks) few_experts_logits_grad_x_kernel(
    const float* __restrict__ grad, const float* __restrict__ weight, T* __restrict__ grad_x, int64_t num_tokens,
    int num_experts, int64_t dim) {
  extern __shared__ float4 w_s[];
  const int chunks = static_cast<int>(dim / kChunk);
  stage_weight<kE>(w_s, weight, num_experts, chunks);
  const int lane = threadIdx.x % kGroupLanes;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + threadIdx.x / kGroupLanes * kRows;
  for (int64_t t0 = first; t0 < num_tokens; t0 += static_cast<int64_t>(gridDim.x) * kTokensPerBlock) {
    float g[kRows][kE];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t t = std::min(t0 + r, num_tokens - 1);
#pragma unroll
      for (int e = 0; e < kE; ++e) g[r][e] = e < num_experts ? grad[t * num_experts + e] : 0.f;
    }
#pragma unroll 2
    for (int c = lane; c < chunks; c += kGroupLanes) {
      float sums[kRows][kChunk] = {};
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const float4 lo = w_s[(2 * e) * chunks + c];
        const float4 hi = w_s[(2 * e + 1) * chunks + c];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          sums[r][0] = fmaf(g[r][e], lo.x, sums[r][0]);
          sums[r][1] = fmaf(g[r][e], lo.y, sums[r][1]);
          sums[r][2] = fmaf(g[r][e], lo.z, sums[r][2]);
          sums[r][3] = fmaf(g[r][e], lo.w, sums[r][3]);
          sums[r][4] = fmaf(g[r][e], hi.x, sums[r][4]);
          sums[r][5] = fmaf(g[r][e], hi.y, sums[r][5]);
          sums[r][6] = fmaf(g[r][e], hi.z, sums[r][6]);
          sums[r][7] = fmaf(g[r][e], hi.w, sums[r][7]);
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (t0 + r < num_tokens) store_chunk<T>(grad_x + (t0 + r) * dim + c * kChunk, sums[r]);
      }
    }
  }
}

// Raises a kernel's dynamic shared memory limit to kFewMaxWeightBytes, once per device.
template <auto kKernel>
void allow_weight_in_shared_memory() {
  static std::array<std::once_flag, 64> once;
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device < static_cast<int>(once.size()), "device index ", device, " out of range");
  std::call_once(once[device], [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kFewMaxWeightBytes)));
  });
}

// What bounds the blocks of one SM, read once per device.
struct SmLimits {
  int sms = 0;
  int64_t shared_bytes = 0;
  int64_t reserved_per_block = 0;
};

const SmLimits& sm_limits() {
  static std::array<SmLimits, 64> limits;
  static std::array<std::once_flag, 64> once;
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device < static_cast<int>(once.size()), "device index ", device, " out of range");
  std::call_once(once[device], [device] {
    int shared = 0, reserved = 0;
    SmLimits& out = limits[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&out.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
    out.shared_bytes = shared;
    out.reserved_per_block = reserved;
  });
  return limits[device];
}

// Blocks for `num_tokens`: enough to give every token a group, at most as many as fit on the GPU
// at once (the kernels loop over the rest).
unsigned few_grid(int64_t num_tokens, int64_t smem) {
  const SmLimits& sm = sm_limits();
  const int64_t by_memory = sm.shared_bytes / (smem + sm.reserved_per_block);
  const int64_t per_sm = std::clamp<int64_t>(by_memory, 1, kFewMinBlocks);
  return static_cast<unsigned>(std::min(ceil_div(num_tokens, kTokensPerBlock), per_sm * sm.sms));
}

// Calls fn(std::integral_constant<int, kE>{}) with E rounded up to 1, 2, 4 or 8.
template <typename Fn>
void dispatch_few_experts(int64_t num_experts, Fn&& fn) {
  if (num_experts <= 1) {
    fn(std::integral_constant<int, 1>{});
  } else if (num_experts <= 2) {
    fn(std::integral_constant<int, 2>{});
  } else if (num_experts <= 4) {
    fn(std::integral_constant<int, 4>{});
  } else {
    fn(std::integral_constant<int, 8>{});
  }
}

int64_t padded_experts(int64_t num_experts) {
  int64_t padded = 1;
  while (padded < num_experts) padded *= 2;
  return padded;
}

}  // namespace

bool few_experts_kernels_take(int64_t num_experts, int64_t dim, const void* rows, const void* weight) {
  return num_experts >= 1 && num_experts <= kFewExpertsMax && dim > 0 && dim % kChunk == 0 &&
         padded_experts(num_experts) * dim * static_cast<int64_t>(sizeof(float)) <= kFewMaxWeightBytes &&
         aligned16(rows) && aligned16(weight);
}

void few_experts_logits_forward(const at::Tensor& x, const at::Tensor& weight, at::Tensor& logits) {
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = weight.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_row_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_few_experts(num_experts, [&](auto experts) {
      constexpr int kE = decltype(experts)::value;
      constexpr auto kernel = few_experts_logits_forward_kernel<T, kE>;
      const int64_t smem = weight_bytes<kE>(dim);
      allow_weight_in_shared_memory<kernel>();
      kernel<<<few_grid(num_tokens, smem), kFewThreads, smem, stream>>>(
          x.data_ptr<T>(), weight.data_ptr<float>(), logits.data_ptr<float>(), num_tokens,
          static_cast<int>(num_experts), dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void few_experts_logits_grad_x(const at::Tensor& grad_logits, const at::Tensor& weight, at::Tensor& grad_x) {
  const int64_t num_tokens = grad_logits.size(0), num_experts = weight.size(0), dim = weight.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_row_dtype(grad_x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_few_experts(num_experts, [&](auto experts) {
      constexpr int kE = decltype(experts)::value;
      constexpr auto kernel = few_experts_logits_grad_x_kernel<T, kE>;
      const int64_t smem = weight_bytes<kE>(dim);
      allow_weight_in_shared_memory<kernel>();
      kernel<<<few_grid(num_tokens, smem), kFewThreads, smem, stream>>>(
          grad_logits.data_ptr<float>(), weight.data_ptr<float>(), grad_x.data_ptr<T>(), num_tokens,
          static_cast<int>(num_experts), dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace lightning_moe

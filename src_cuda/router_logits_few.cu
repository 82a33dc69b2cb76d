// router_logits for routers of at most 8 experts: the forward, grad_x and grad_weight passes as
// streams over x (grad_weight is described at its kernel).
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

// grad_weight (E, D) = g^T (E, T) . x (T, D): a block takes 32 chunks of columns (a lane each) over
// one piece of the tokens, in tiles of kGradTile tokens whose gradient rows it first copies to
// shared memory; its 8 warps take tokens w, w + 8, ... of a tile, kInFlight tokens' chunks loaded
// before any is used, so that each warp has that many reads in flight. Each lane keeps the kE x 8
// sums of its chunk in registers, adding tokens in order. The warps' sums are added in warp order
// through shared memory, the pieces by sum_pieces_kernel in piece order.
constexpr int kGradWeightWarps = kFewThreads / 32;
constexpr int kGradTile = 256;

template <typename T, int kE>
__global__ void __launch_bounds__(kFewThreads, 2) few_experts_logits_grad_weight_kernel(
    const float* __restrict__ grad, const T* __restrict__ x, float* __restrict__ out, int64_t num_tokens,
    int num_experts, int64_t dim, int64_t tokens_per_piece) {
  // Four 16-byte reads in flight per lane for bf16 / fp16 rows, two 32-byte ones for float32.
  constexpr int kInFlight = sizeof(T) == 4 ? 2 : 4;
  constexpr int kStride = kGradWeightWarps;
  __shared__ __align__(16) float g_s[kGradTile][kE];
  __shared__ __align__(16) float warp_sums[kGradWeightWarps][32][kChunk];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int chunks = static_cast<int>(dim / kChunk);
  const int c = blockIdx.x * 32 + lane;
  const bool active = c < chunks;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_piece;
  const int64_t t_end = std::min(num_tokens, t_begin + tokens_per_piece);
  const T* x_c = x + c * kChunk;

  float acc[kE][kChunk] = {};
  auto accumulate = [&](int r, const RawChunk<T>& raw) {
    float xs[kChunk];
    to_floats(raw, xs);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const float g = g_s[r][e];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) acc[e][i] = fmaf(g, xs[i], acc[e][i]);
    }
  };
#pragma unroll 1
  for (int64_t tile = t_begin; tile < t_end; tile += kGradTile) {
    const int rows = static_cast<int>(std::min<int64_t>(kGradTile, t_end - tile));
    __syncthreads();  // the previous tile's rows are used up
    for (int i = threadIdx.x; i < kGradTile * kE; i += kFewThreads) {
      const int r = i / kE;
      const int e = i % kE;
      g_s[r][e] = r < rows && e < num_experts ? grad[(tile + r) * num_experts + e] : 0.f;
    }
    __syncthreads();
    int r = warp;
#pragma unroll 1
    for (; r + (kInFlight - 1) * kStride < rows; r += kInFlight * kStride) {
      RawChunk<T> raw[kInFlight];
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) {
        if (active) raw[j] = load_chunk(x_c + (tile + r + j * kStride) * dim);
      }
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) accumulate(r + j * kStride, raw[j]);
    }
#pragma unroll 1
    for (; r < rows; r += kStride) {
      RawChunk<T> raw{};
      if (active) raw = load_chunk(x_c + (tile + r) * dim);
      accumulate(r, raw);
    }
  }

  float* piece_out = out + static_cast<int64_t>(blockIdx.y) * num_experts * dim;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) warp_sums[warp][lane][i] = acc[e][i];
    __syncthreads();
    if (warp == 0 && active && e < num_experts) {
      float total[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) total[i] = warp_sums[0][lane][i];
      for (int w = 1; w < kGradWeightWarps; ++w) {
#pragma unroll
        for (int i = 0; i < kChunk; ++i) total[i] += warp_sums[w][lane][i];
      }
      store_chunk<float>(piece_out + e * dim + c * kChunk, total);
    }
    __syncthreads();
  }
}

// Raises a kernel's dynamic shared memory limit to kFewMaxWeightBytes, once per device.
template <auto kKernel>
void allow_weight_in_shared_memory() {
  static std::array<std::once_flag, 64> once;
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device < static_cast<int>(once.size()), "device index ", text(device), " out of range");
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
  TORCH_CHECK(device < static_cast<int>(once.size()), "device index ", text(device), " out of range");
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

// Calls fn(T{}, std::integral_constant<int, kE>{}) for the C++ type T of `dtype` and E rounded up
// to kE = 1, 2, 4 or 8.
template <typename Fn>
void dispatch_rows_and_experts(at::ScalarType dtype, int64_t num_experts, Fn&& fn) {
  dispatch_row_dtype(dtype, [&](auto tag) {
    if (num_experts <= 1) {
      fn(tag, std::integral_constant<int, 1>{});
    } else if (num_experts <= 2) {
      fn(tag, std::integral_constant<int, 2>{});
    } else if (num_experts <= 4) {
      fn(tag, std::integral_constant<int, 4>{});
    } else {
      fn(tag, std::integral_constant<int, 8>{});
    }
  });
}

// Launches kKernel, which holds a kE x D weight in dynamic shared memory, over `num_tokens` tokens.
template <auto kKernel, int kE, typename... Args>
void launch_with_weight(int64_t num_tokens, int64_t dim, Args... args) {
  const int64_t smem = weight_bytes<kE>(dim);
  allow_weight_in_shared_memory<kKernel>();
  kKernel<<<few_grid(num_tokens, smem), kFewThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  dispatch_rows_and_experts(x.scalar_type(), num_experts, [&](auto tag, auto experts) {
    using T = decltype(tag);
    constexpr int kE = decltype(experts)::value;
    launch_with_weight<few_experts_logits_forward_kernel<T, kE>, kE>(
        num_tokens, dim, x.data_ptr<T>(), weight.data_ptr<float>(), logits.data_ptr<float>(), num_tokens,
        static_cast<int>(num_experts), dim);
  });
}

void few_experts_logits_grad_x(const at::Tensor& grad_logits, const at::Tensor& weight, at::Tensor& grad_x) {
  const int64_t num_tokens = grad_logits.size(0), num_experts = weight.size(0), dim = weight.size(1);
  dispatch_rows_and_experts(grad_x.scalar_type(), num_experts, [&](auto tag, auto experts) {
    using T = decltype(tag);
    constexpr int kE = decltype(experts)::value;
    launch_with_weight<few_experts_logits_grad_x_kernel<T, kE>, kE>(
        num_tokens, dim, grad_logits.data_ptr<float>(), weight.data_ptr<float>(), grad_x.data_ptr<T>(), num_tokens,
        static_cast<int>(num_experts), dim);
  });
}

void few_experts_logits_grad_weight(const at::Tensor& grad_logits, const at::Tensor& x, at::Tensor& grad_weight) {
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = grad_logits.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t column_blocks = ceil_div(dim / kChunk, 32);
  // Pieces enough for two blocks on each of kNominalSms SMs, of at least 16 tokens a warp: a
  // function of the shapes only, so the sums are the same on every GPU and run.
  const int64_t min_tokens = int64_t{16} * kGradWeightWarps;
  const int64_t wanted = std::clamp<int64_t>(ceil_div(2 * kNominalSms, column_blocks), 1,
                                             std::max<int64_t>(1, num_tokens / min_tokens));
  const int64_t tokens_per_piece = ceil_div(ceil_div(num_tokens, wanted), kGradWeightWarps) * kGradWeightWarps;
  const int64_t pieces = ceil_div(num_tokens, tokens_per_piece);
  at::Tensor buffer;
  float* out = pieces_output(grad_weight, pieces, buffer);
  const dim3 grid(static_cast<unsigned>(column_blocks), static_cast<unsigned>(pieces));
  dispatch_rows_and_experts(x.scalar_type(), num_experts, [&](auto tag, auto experts) {
    using T = decltype(tag);
    constexpr int kE = decltype(experts)::value;
    few_experts_logits_grad_weight_kernel<T, kE><<<grid, kFewThreads, 0, stream>>>(
        grad_logits.data_ptr<float>(), x.data_ptr<T>(), out, num_tokens, static_cast<int>(num_experts), dim,
        tokens_per_piece);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (pieces > 1) launch_sum_pieces(out, grad_weight.data_ptr<float>(), num_experts * dim, pieces, stream);
}

}  // namespace lightning_moe

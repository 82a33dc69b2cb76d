// Shared by the router_logits kernels (router_logits.cu, router_logits_backward.cu): loads of x in
// its own dtype, stores, the choice of pieces, the fixed-order sum of pieces, the weight checks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "rows.cuh"

#include "router_logits.h"

namespace lightning_moe {
// Internal linkage: each kernel file that includes this gets its own copy.
namespace {

// The GPU the pieces are sized for (H100 / H200 SXM); a fixed number, so results do not depend on
// the GPU they are computed on.
constexpr int64_t kNominalSms = 132;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// row[k .. k + N) as a vector, zeros past `limit` or for an invalid row: one 16-byte load when
// kVector (the caller has checked that rows start on 16 bytes and `limit` is a multiple of N),
// element by element otherwise. Two kernels rather than a runtime branch: the branch would cost
// the vector kernel registers.
template <typename T, int N, bool kVector>
__device__ __forceinline__ Vec<T, N> load_vec(const T* row, int64_t k, int64_t limit, bool valid) {
  Vec<T, N> out;
  if constexpr (kVector) {
    if (valid && k + N <= limit) return *reinterpret_cast<const Vec<T, N>*>(row + k);
#pragma unroll
    for (int i = 0; i < N; ++i) out.v[i] = static_cast<T>(0.f);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out.v[i] = valid && k + i < limit ? row[k + i] : static_cast<T>(0.f);
  }
  return out;
}

// A vector of N (a multiple of 4) elements to float32 in shared memory at a 16-byte aligned `dst`.
template <typename T, int N>
__device__ __forceinline__ void stage_floats(float* dst, const Vec<T, N>& vec) {
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 floats = make_float4(static_cast<float>(vec.v[i]), static_cast<float>(vec.v[i + 1]),
                                      static_cast<float>(vec.v[i + 2]), static_cast<float>(vec.v[i + 3]));
    *reinterpret_cast<float4*>(dst + i) = floats;
  }
}

__device__ __forceinline__ float component(const float4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Four floats to dst[0 .. 4) in one store when `vector` and all fit in `room`, else those that fit
// one by one.
template <typename T>
__device__ __forceinline__ void store4(T* dst, const float (&values)[4], int64_t room, bool vector) {
  if (vector && room >= 4) {
    store_floats<T, 4>(dst, values);
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i < room) dst[i] = static_cast<T>(values[i]);
  }
}

// How many pieces to cut a reduction into, for `tiles` blocks per piece on `slots` resident
// blocks: time is modelled as waves / pieces; more pieces are taken only for a 5% gain, since each
// costs buffer traffic.
int64_t choose_pieces(int64_t tiles, int64_t slots, int64_t max_pieces) {
  int64_t best = 1;
  double best_time = static_cast<double>(ceil_div(tiles, slots));
  for (int64_t pieces = 2; pieces <= max_pieces; ++pieces) {
    const double time = static_cast<double>(ceil_div(tiles * pieces, slots)) / static_cast<double>(pieces);
    if (time < 0.95 * best_time) {
      best = pieces;
      best_time = time;
    }
  }
  return best;
}

// out[i] = sum over p of pieces[p, i] for i < n, in a fixed order: thread row y of a block sums
// pieces y, y + blockDim.y, ... in turn, then row 0 adds the rows in order. The float32 sum is
// rounded once to T (to nearest, as a cast of the float32 sum would round it).
template <typename T>
__global__ void __launch_bounds__(1024) sum_pieces_kernel(const float* __restrict__ pieces, T* __restrict__ out,
                                                          int64_t n, int64_t num_pieces) {
  __shared__ float partial[32][33];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (i < n) {
    for (int64_t p = threadIdx.y; p < num_pieces; p += blockDim.y) acc += pieces[p * n + i];
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && i < n) {
    float total = partial[0][threadIdx.x];
    for (unsigned y = 1; y < blockDim.y; ++y) total += partial[y][threadIdx.x];
    out[i] = static_cast<T>(total);
  }
}

template <typename T>
void launch_sum_pieces(const float* pieces, T* out, int64_t n, int64_t num_pieces, cudaStream_t stream) {
  const dim3 block(32, static_cast<unsigned>(std::min<int64_t>(num_pieces, 32)));
  sum_pieces_kernel<<<static_cast<unsigned>(ceil_div(n, 32)), block, 0, stream>>>(pieces, out, n, num_pieces);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Where a pass cut into `pieces` writes its float32 sums: a float32 `result` itself for one piece,
// else a new float32 (pieces, *result.sizes()) buffer, held in `buffer`, whose pieces are then added
// into `result` (launch_sum_pieces rounds them to its dtype).
float* pieces_output(const at::Tensor& result, int64_t pieces, at::Tensor& buffer) {
  if (pieces == 1 && result.scalar_type() == at::kFloat) return result.data_ptr<float>();
  std::vector<int64_t> sizes{pieces};
  sizes.insert(sizes.end(), result.sizes().begin(), result.sizes().end());
  buffer = at::empty(sizes, result.options().dtype(at::kFloat));
  return buffer.data_ptr<float>();
}

void check_weight(const at::Tensor& weight, const at::Tensor& ref, const char* name) {
  check_cuda_contiguous(weight, name);
  check_same_device(weight, ref, name);
  check_dtype(weight, at::kFloat, name);
  check_dim(weight, 2, name);
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(0) <= kRouterLogitsMaxExperts, name, " must have 1 to ",
              text(kRouterLogitsMaxExperts), " rows (experts), got ", text(weight.size(0)));
}

}  // namespace
}  // namespace lightning_moe

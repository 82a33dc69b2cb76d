// One AdamW step over many float32 tensors in one pass: see adamw.h.
//
// An AdamW step is bound by memory: per element it reads the parameter, the gradient and the two
// moments and writes three of them back. One launch covers up to kMaxTensors tensors, each split
// into chunks of kChunk elements, one chunk per block; a block finds its tensor in the launch's
// table of cumulative block counts. Each thread takes one 16-byte vector of every stream. On an
// H200, over the large GPT's parameters, that (small blocks, 28 registers a thread, many blocks
// resident) moved 4.0 TB/s; two or four vectors a thread, 3.9 TB/s; streaming cache hints or a
// persistent grid of blocks, 3.6-3.8 TB/s.
//
// Under mixed precision the experts' float32 weights are cast to bfloat16 at every forward pass,
// a read of 4 bytes and a write of 2 per weight. Where a copy is given the step writes the updated
// parameter's cast instead (2 bytes, while the parameter is in registers), and the next forward
// pass uses it (lightning_moe.ops.cast). Unlike torch's fused step under a gradient divisor, the
// divided gradient is not stored back: 4 bytes less per element.

#include "adamw.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "rows.cuh"

namespace lightning_moe {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // float32 elements per 16-byte vector: one per thread and stream
constexpr int64_t kChunk = int64_t{kThreads} * kVec;
constexpr int kMaxTensors = 32;

enum CopyType : int { kNoCopy = 0, kBFloat16Copy = 1, kHalfCopy = 2 };

// A tensor's step constants, rounded to float32 as torch's single-tensor step rounds its scalars.
struct Hyper {
  float decay;        // 1 - lr * weight_decay
  float lerp_weight;  // 1 - beta1
  bool lerp_from_start;
  float beta2;
  float one_minus_beta2;
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;
  float eps;
};

struct Batch {
  float* param[kMaxTensors];
  const float* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  void* copy[kMaxTensors];
  int64_t numel[kMaxTensors];
  Hyper hyper[kMaxTensors];
  int block_end[kMaxTensors];  // blocks of tensors 0..i together
  int copy_type[kMaxTensors];
  bool vectors[kMaxTensors];  // all five streams start on a vector boundary
  int count;
};

__device__ __forceinline__ void update(float& p, float g, float& m, float& v, const Hyper& h) {
  p = p * h.decay;
  // torch's lerp: from the start for weights below 0.5, from the end otherwise.
  m = h.lerp_from_start ? m + h.lerp_weight * (g - m) : g - (g - m) * (1.0f - h.lerp_weight);
  v = v * h.beta2 + h.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / h.bias_correction2_sqrt + h.eps;
  p = p + h.neg_step_size * (m / denom);
}

// Writes N updated parameter values from element i to tensor t's copy, in the copy's dtype, if it
// has one.
template <int N>
__device__ __forceinline__ void write_copy(const Batch& b, int t, int64_t i, const float (&values)[N]) {
  if (b.copy_type[t] == kBFloat16Copy) {
    store_floats<c10::BFloat16, N>(static_cast<c10::BFloat16*>(b.copy[t]) + i, values);
  } else if (b.copy_type[t] == kHalfCopy) {
    store_floats<c10::Half, N>(static_cast<c10::Half*>(b.copy[t]) + i, values);
  }
}

__device__ __forceinline__ void update_scalar(const Batch& b, int t, int64_t i, float divisor) {
  float p[1] = {b.param[t][i]};
  float m = b.exp_avg[t][i], v = b.exp_avg_sq[t][i];
  update(p[0], b.grad[t][i] / divisor, m, v, b.hyper[t]);
  b.param[t][i] = p[0];
  b.exp_avg[t][i] = m;
  b.exp_avg_sq[t][i] = v;
  write_copy(b, t, i, p);
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(const __grid_constant__ Batch b,
                                                        const float* __restrict__ grad_divisor) {
  int t = 0;
  while (static_cast<int>(blockIdx.x) >= b.block_end[t]) ++t;
  const int first_block = t == 0 ? 0 : b.block_end[t - 1];
  const int64_t base = (static_cast<int64_t>(blockIdx.x) - first_block) * kChunk;
  const int64_t numel = b.numel[t];
  const float divisor = grad_divisor == nullptr ? 1.0f : *grad_divisor;
  if (!b.vectors[t]) {
    for (int64_t i = base + threadIdx.x; i < base + kChunk && i < numel; i += kThreads) update_scalar(b, t, i, divisor);
    return;
  }
  const int64_t i = base + int64_t{threadIdx.x} * kVec;
  if (i + kVec > numel) {
    for (int64_t j = i; j < numel; ++j) update_scalar(b, t, j, divisor);  // the last partial vector
    return;
  }
  float p[kVec], g[kVec], m[kVec], v[kVec];
  load_floats<float, kVec>(b.param[t] + i, p);
  load_floats<float, kVec>(b.grad[t] + i, g);
  load_floats<float, kVec>(b.exp_avg[t] + i, m);
  load_floats<float, kVec>(b.exp_avg_sq[t] + i, v);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const float grad = grad_divisor == nullptr ? g[k] : g[k] / divisor;
    update(p[k], grad, m[k], v[k], b.hyper[t]);
  }
  store_floats<float, kVec>(b.param[t] + i, p);
  store_floats<float, kVec>(b.exp_avg[t] + i, m);
  store_floats<float, kVec>(b.exp_avg_sq[t] + i, v);
  write_copy(b, t, i, p);
}

bool on_boundary(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

std::string nth(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

Hyper hyper(double lr, double weight_decay, double beta1, double beta2, double eps, double step) {
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  Hyper h;
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.lerp_weight = static_cast<float>(1.0 - beta1);
  h.lerp_from_start = 1.0 - beta1 < 0.5;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  h.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  h.eps = static_cast<float>(eps);
  return h;
}

}  // namespace

void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<std::optional<at::Tensor>>& copies, const std::vector<double>& lr,
                const std::vector<double>& weight_decay, const std::vector<double>& beta1,
                const std::vector<double>& beta2, const std::vector<double>& eps, const std::vector<double>& steps,
                const std::optional<at::Tensor>& grad_divisor) {
  const size_t n = params.size();
  for (const size_t length : {grads.size(), exp_avgs.size(), exp_avg_sqs.size(), copies.size(), lr.size(),
                              weight_decay.size(), beta1.size(), beta2.size(), eps.size(), steps.size()}) {
    TORCH_CHECK(length == n, "every list must have one entry per parameter (", text(n), "), got one of ",
                text(length));
  }
  if (n == 0) return;
  const at::Tensor& first = params[0];
  for (size_t i = 0; i < n; ++i) {
    for (const auto& [list, name] : {std::pair{&params, "params"}, std::pair{&grads, "grads"},
                                     std::pair{&exp_avgs, "exp_avgs"}, std::pair{&exp_avg_sqs, "exp_avg_sqs"}}) {
      const at::Tensor& tensor = (*list)[i];
      const std::string label = nth(name, i);
      check_cuda_contiguous(tensor, label.c_str());
      check_dtype(tensor, at::kFloat, label.c_str());
      check_same_device(tensor, first, label.c_str());
      TORCH_CHECK(tensor.sizes() == params[i].sizes(), label, " must have params[", text(i), "]'s shape ",
                  text(params[i].sizes()), ", got ", text(tensor.sizes()));
    }
    if (copies[i].has_value()) {
      const at::Tensor& copy = *copies[i];
      const std::string label = nth("copies", i);
      check_cuda_contiguous(copy, label.c_str());
      check_same_device(copy, first, label.c_str());
      TORCH_CHECK(copy.scalar_type() == at::kBFloat16 || copy.scalar_type() == at::kHalf, label,
                  " must have dtype bfloat16 or float16, got ", copy.scalar_type());
      TORCH_CHECK(copy.sizes() == params[i].sizes(), label, " must have params[", text(i), "]'s shape ",
                  text(params[i].sizes()), ", got ", text(copy.sizes()));
    }
    TORCH_CHECK(steps[i] >= 1, "steps[", text(i), "] must be at least 1 (the count including this step)");
  }
  const float* divisor = nullptr;
  if (grad_divisor.has_value()) {
    check_cuda_contiguous(*grad_divisor, "grad_divisor");
    check_dtype(*grad_divisor, at::kFloat, "grad_divisor");
    check_same_device(*grad_divisor, first, "grad_divisor");
    TORCH_CHECK(grad_divisor->numel() == 1, "grad_divisor must have one element, got shape ",
                text(grad_divisor->sizes()));
    divisor = grad_divisor->data_ptr<float>();
  }

  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Batch batch{};
  int64_t blocks = 0;
  const auto launch = [&] {
    if (batch.count == 0) return;
    adamw_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(batch, divisor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    batch = Batch{};
    blocks = 0;
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const int64_t tensor_blocks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(tensor_blocks <= INT_MAX, "params[", text(i), "] has too many elements: ", text(numel));
    if (batch.count == kMaxTensors || blocks + tensor_blocks > INT_MAX) launch();
    const int t = batch.count++;
    batch.param[t] = params[i].data_ptr<float>();
    batch.grad[t] = grads[i].data_ptr<float>();
    batch.exp_avg[t] = exp_avgs[i].data_ptr<float>();
    batch.exp_avg_sq[t] = exp_avg_sqs[i].data_ptr<float>();
    batch.numel[t] = numel;
    batch.hyper[t] = hyper(lr[i], weight_decay[i], beta1[i], beta2[i], eps[i], steps[i]);
    bool vectors = on_boundary(batch.param[t], 16) && on_boundary(batch.grad[t], 16) &&
                   on_boundary(batch.exp_avg[t], 16) && on_boundary(batch.exp_avg_sq[t], 16);
    batch.copy_type[t] = kNoCopy;
    batch.copy[t] = nullptr;
    if (copies[i].has_value()) {
      batch.copy[t] = copies[i]->data_ptr();
      batch.copy_type[t] = copies[i]->scalar_type() == at::kBFloat16 ? kBFloat16Copy : kHalfCopy;
      vectors = vectors && on_boundary(batch.copy[t], 8);
    }
    batch.vectors[t] = vectors;
    blocks += tensor_blocks;
    batch.block_end[t] = static_cast<int>(blocks);
  }
  launch();
}

}  // namespace lightning_moe

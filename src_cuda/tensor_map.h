// Host helpers of the TMA kernels: tensor maps of bf16 matrices, and the context they need.
#pragma once

#include <cstdint>
#include <map>
#include <utility>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

namespace lightning_moe {

// Writes to `map` a 2-D tensor map of the bf16 matrix at `data` (rows x cols, row-major), boxes of
// box_rows x 64 columns in the 128-byte swizzle; reads past its edges fill zeros.
inline void encode_tensor_map(CUtensorMap* map, const void* data, int64_t rows, int64_t cols, int box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr, "the CUDA driver lacks cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(data), dims, strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed");
}

// The SM count of `device`, asked of the runtime once per thread and device.
inline int multiprocessors(int device) {
  thread_local std::map<int, int> counts;
  const auto found = counts.find(device);
  if (found != counts.end()) return found->second;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  counts.emplace(device, sms);
  return sms;
}

// Lets `kernel` take `bytes` of dynamic shared memory on `device`: set once per thread, kernel and
// device rather than on every launch.
inline void allow_shared_memory(const void* kernel, int bytes, int device) {
  thread_local std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes
  const auto key = std::make_pair(kernel, device);
  const auto found = allowed.find(key);
  if (found != allowed.end() && found->second == bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  allowed[key] = bytes;
}

// Makes the primary context of `device` current on this thread, once per thread and device:
// cuTensorMapEncodeTiled needs one, and the runtime binds it lazily (a thread that has made no
// other CUDA call has none).
inline void bind_context(int device) {
  thread_local int bound_device = -1;
  if (bound_device != device) {
    C10_CUDA_CHECK(cudaFree(nullptr));
    bound_device = device;
  }
}

}  // namespace lightning_moe

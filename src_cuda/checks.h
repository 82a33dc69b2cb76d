// Host-side input checks shared by the kernels' entry points.
//
// Every entry point validates device, dtype, shape and contiguity of each input with TORCH_CHECK,
// so a wrong call fails with a Python RuntimeError that names the argument instead of faulting
// inside a kernel. Numbers and shapes enter the messages as strings made by text(): on the GPU
// machine's toolchain a failed check whose message streamed an integer crashed the process instead
// of raising, while messages of strings raised as they should.
#pragma once

#include <cstddef>
#include <string>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace lightning_moe {

// An integer as text, for a TORCH_CHECK message.
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline std::string text(T value) {
  return std::to_string(value);
}

// A shape as text, "[2, 3]" like torch prints it, for a TORCH_CHECK message.
inline std::string text(c10::IntArrayRef shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

inline void check_cuda_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", text(dim), " dims, got shape ", text(t.sizes()));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

inline bool is_row_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

inline void check_row_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK(is_row_dtype(dtype), name, " must be float32, bfloat16 or float16, got ", dtype);
}

// An index vector: 1-D, int64, contiguous, on the device of `ref`.
inline void check_index(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_cuda_contiguous(t, name);
  check_same_device(t, ref, name);
  check_dtype(t, at::kLong, name);
  check_dim(t, 1, name);
}

// (T + 1,) int64 token offsets: rows of token t are assignments [offsets[t], offsets[t + 1]).
inline void check_token_offsets(const at::Tensor& token_offsets, const at::Tensor& ref, int64_t num_assignments) {
  check_index(token_offsets, ref, "token_offsets");
  TORCH_CHECK(token_offsets.size(0) >= 1, "token_offsets must have T + 1 >= 1 entries");
  TORCH_CHECK(num_assignments < (int64_t{1} << 31), "at most 2^31 - 1 assignments are supported, got ",
              text(num_assignments));
}

}  // namespace lightning_moe

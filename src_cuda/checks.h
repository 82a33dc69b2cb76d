// Host-side input checks shared by the kernels' entry points.
//
// Every entry point validates device, dtype, shape and contiguity of each input with TORCH_CHECK,
// so a wrong call fails with a Python RuntimeError that names the argument instead of faulting
// inside a kernel. Numbers and shapes enter the messages as strings made by text(): on the GPU
// machine's toolchain a failed check whose message streamed an integer crashed the process instead
// of raising, while messages of strings raised as they should.
#pragma once

#include <cstddef>
#include <cstdint>
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

// The operands of a grouped GEMM: a (R, *) and b (b_dims dims) bfloat16, ends (E,) int32 with
// E >= 1, all contiguous on a's device, R < 2^31, a and b 16-byte aligned (the TMA unit reads them).
inline void check_grouped_gemm_operands(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends,
                                        int64_t b_dims) {
  check_cuda_contiguous(a, "a");
  check_cuda_contiguous(b, "b");
  check_cuda_contiguous(ends, "ends");
  check_same_device(b, a, "b");
  check_same_device(ends, a, "ends");
  check_dtype(a, at::kBFloat16, "a");
  check_dtype(b, at::kBFloat16, "b");
  check_dtype(ends, at::kInt, "ends");
  check_dim(a, 2, "a");
  check_dim(b, b_dims, "b");
  check_dim(ends, 1, "ends");
  TORCH_CHECK(ends.size(0) >= 1, "ends must name at least one group");
  TORCH_CHECK(a.size(0) < (int64_t{1} << 31), "a must have fewer than 2^31 rows");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0,
              "a and b must be 16-byte aligned (the TMA unit reads them)");
}

}  // namespace lightning_moe

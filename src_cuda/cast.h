// Bfloat16 and float16 tensors cast to float32, as x.float() does, in one vectorised pass.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// x.float(), or addend + x.float() when an addend is given (one float32 addition per element, as
// PyTorch's add rounds it): every bfloat16 and float16 value is exactly a float32 value.
//
// Args:
//   x: bfloat16 or float16 CUDA tensor, contiguous, starting on a 16-byte boundary, of any shape.
//   addend: None, or a float32 tensor of x's shape and device, contiguous, starting on a 16-byte
//     boundary.
//
// Returns:
//   A new float32 tensor of x's shape.
at::Tensor cast_to_float(const at::Tensor& x, const std::optional<at::Tensor>& addend);

// (x.float(), partials): partials (a float32 vector, one entry per block of the kernel, empty for
// an empty x) sums to the sum of the squares of x.float(), for the gradient norm of clipping. The
// partials, and so their sum in a fixed order, are the same on every run.
//
// Args:
//   x: bfloat16 or float16 CUDA tensor, contiguous, starting on a 16-byte boundary, of any shape.
std::tuple<at::Tensor, at::Tensor> cast_to_float_square_sums(const at::Tensor& x);

}  // namespace lightning_moe

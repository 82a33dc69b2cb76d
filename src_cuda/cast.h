// Bfloat16 and float16 tensors cast to float32, as x.float() does, in one vectorised pass.
#pragma once

#include <optional>

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

}  // namespace lightning_moe

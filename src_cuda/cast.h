// Bfloat16 and float16 tensors cast to float32, as x.float() does, in one vectorised pass.
#pragma once

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// x.float(): every bfloat16 and float16 value is exactly a float32 value.
//
// Args:
//   x: bfloat16 or float16 CUDA tensor, contiguous, starting on a 16-byte boundary, of any shape.
//
// Returns:
//   A new float32 tensor of x's shape.
at::Tensor cast_to_float(const at::Tensor& x);

}  // namespace lightning_moe

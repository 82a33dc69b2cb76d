// glu: the gated activation of GLU experts, h = act(a) * b, and its backward, one launch each.
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// h = act(a) * b elementwise, act SiLU (kind "swiglu": a * sigmoid(a)) or the erf GELU (kind
// "geglu": a * Phi(a)), computed in float32 and rounded once to the inputs' dtype.
//
// Args:
//   a: (N, F) float32, bfloat16 or float16 CUDA tensor, contiguous (any shape works: the kernel
//     is elementwise over all elements).
//   b: the same shape, dtype and device as a, contiguous.
//   kind: "swiglu" or "geglu".
//
// Returns:
//   h in a's shape and dtype.
at::Tensor glu_forward(const at::Tensor& a, const at::Tensor& b, const std::string& kind);

// grad_a = grad_h * b * act'(a) and grad_b = grad_h * act(a), act recomputed from a rather than
// saved; float32 maths, each result rounded once. Elementwise, so the same on every run.
//
// Args:
//   grad_h, a, b: the same shape, dtype and device, contiguous, as in glu_forward.
//   kind: "swiglu" or "geglu".
//
// Returns:
//   grad_a and grad_b in a's shape and dtype.
std::tuple<at::Tensor, at::Tensor> glu_backward(const at::Tensor& grad_h, const at::Tensor& a, const at::Tensor& b,
                                                const std::string& kind);

}  // namespace lightning_moe

// The experts' elementwise activations, plain (h = act(a)) or gated as in GLU experts
// (h = act(a) * gate), forward and backward, one launch each.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// h = act(a), or act(a) * gate when a gate is given, elementwise, computed in float32 and rounded
// once to the inputs' dtype. act is one of
//   "silu"      a * sigmoid(a)
//   "gelu"      a * Phi(a), Phi the standard normal CDF (the erf GELU), with erf evaluated to
//               within 1.5e-7 (Abramowitz & Stegun 7.1.26), below float32's resolution of values
//               near 1
//   "gelu_tanh" 0.5 * a * (1 + tanh(sqrt(2 / pi) * (a + 0.044715 * a^3)))
//   "relu"      max(a, 0)
//
// Args:
//   a: float32, bfloat16 or float16 CUDA tensor, contiguous, of any shape (the kernel is
//     elementwise over all elements).
//   gate: None, or a tensor of a's shape, dtype and device, contiguous (SwiGLU is "silu" with a
//     gate, GeGLU "gelu" with a gate).
//   activation: one of the names above.
//
// Returns:
//   h in a's shape and dtype.
at::Tensor activation_forward(const at::Tensor& a, const std::optional<at::Tensor>& gate,
                              const std::string& activation);

// grad_a = grad_h * act'(a) (times gate when gated) and, when gated, grad_gate = grad_h * act(a);
// act is recomputed from a rather than saved. float32 maths, each result rounded once;
// elementwise, so the same on every run.
//
// Args:
//   grad_h, a, gate: as in activation_forward, grad_h of a's shape, dtype and device, contiguous.
//   activation: as in activation_forward.
//
// Returns:
//   grad_a, and grad_gate (undefined, None in Python, without a gate), in a's shape and dtype.
std::tuple<at::Tensor, at::Tensor> activation_backward(const at::Tensor& grad_h, const at::Tensor& a,
                                                       const std::optional<at::Tensor>& gate,
                                                       const std::string& activation);

}  // namespace lightning_moe

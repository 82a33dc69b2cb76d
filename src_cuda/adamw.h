// One AdamW step over many float32 tensors in one pass, optionally writing each updated parameter's
// bfloat16 or float16 copy.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// Updates params, exp_avgs and exp_avg_sqs in place by one step of AdamW (decoupled weight decay),
// with the arithmetic of torch.optim.AdamW's single-tensor step: for each element,
//   g = grad / grad_divisor                      (grad as it is without a divisor)
//   p = p * (1 - lr * weight_decay)
//   m = m + (1 - beta1) * (g - m)
//   v = v * beta2 + (1 - beta2) * g * g
//   p = p - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
// and, where copies[i] is given, copies[i] = p rounded to the copy's dtype. The gradients are only
// read. A tensor's five streams (parameter, gradient, two moments, copy) move as 16-byte vectors
// (8 for the copy) when all start on such a boundary, else element by element.
//
// Args:
//   params, grads, exp_avgs, exp_avg_sqs: Equally long lists of float32 CUDA tensors on one device,
//     contiguous; the i-th of each has one shape.
//   copies: None, or a contiguous bfloat16 or float16 tensor of params[i]'s shape, for each i.
//   lr, weight_decay, beta1, beta2, eps: Each tensor's hyperparameters (the lists' length).
//   steps: Each tensor's step count including this step (at least 1).
//   grad_divisor: None, or a float32 scalar tensor on the device that every gradient is divided by
//     (gradient clipping's max(1, norm / max_norm)).
void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<std::optional<at::Tensor>>& copies, const std::vector<double>& lr,
                const std::vector<double>& weight_decay, const std::vector<double>& beta1,
                const std::vector<double>& beta2, const std::vector<double>& eps, const std::vector<double>& steps,
                const std::optional<at::Tensor>& grad_divisor);

}  // namespace lightning_moe

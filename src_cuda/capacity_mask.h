// capacity_mask: which assignments each expert keeps when it may take at most `capacity`.
#pragma once

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// Each expert keeps its `capacity` assignments of highest priority; of equal priorities the
// earlier assignment wins. With token-major assignments (tokens in non-decreasing order) that is
// the lower token index. -0.0 equals 0.0 and NaN ranks above every number, as in torch.sort.
// Deterministic, without a host synchronisation.
//
// Args:
//   expert_ids: (N,) int64 CUDA tensor, the expert of each assignment, each in [0, num_experts).
//   priorities: (N,) float32 CUDA tensor, the selection score of each assignment.
//   num_experts: E, at most 8192 (the limit of sort_by_expert).
//   capacity: assignments each expert may keep, >= 0.
//
// Returns:
//   kept (N,) bool: true where the assignment fits in its expert's capacity.
at::Tensor capacity_mask(const at::Tensor& expert_ids, const at::Tensor& priorities, int64_t num_experts,
                         int64_t capacity);

}  // namespace lightning_moe

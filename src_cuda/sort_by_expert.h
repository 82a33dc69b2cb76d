// sort_by_expert: a stable counting sort of assignments by expert.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace lightning_moe {

// Sorts assignments by expert, keeping the original order within each expert, without a host
// synchronisation.
//
// Args:
//   expert_ids: (N,) int64 CUDA tensor, the expert of each assignment, each in [0, num_experts).
//   num_experts: E, at most 8192.
//
// Returns:
//   order (N,) int64: the assignment at each sorted position, so expert_ids[order] is sorted.
//   inverse (N,) int64: the sorted position of each assignment, inverse[order[r]] == r.
//   tokens_per_expert (E,) int64: how many assignments each expert received.
//   expert_ends (E,) int32: the sorted position past each expert's last assignment, the
//     cumulative sum of tokens_per_expert (the row ends the grouped GEMMs take).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& expert_ids,
                                                                       int64_t num_experts);

}  // namespace lightning_moe

// Python bindings of the lightning_moe CUDA kernels. Only binds: the checks and launches live in
// each kernel's .cu file, the torch.library registration in lightning_moe/ops/.

#include <torch/csrc/utils/pybind.h>

#include "activation.h"
#include "adamw.h"
#include "capacity_mask.h"
#include "cast.h"
#include "grouped_gemm.h"
#include "grouped_gemm_weight_grad.h"
#include "permute.h"
#include "router_logits.h"
#include "router_logits_tc.h"
#include "sort_by_expert.h"
#include "topk_route.h"
#include "unpermute.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_moe CUDA kernels: sort_by_expert, permute, unpermute, routing, router logits, activations, grouped GEMMs, casts, AdamW step";
  m.def("sort_by_expert", &lightning_moe::sort_by_expert, py::arg("expert_ids"), py::arg("num_experts"));
  m.def("capacity_mask", &lightning_moe::capacity_mask, py::arg("expert_ids"), py::arg("priorities"),
        py::arg("num_experts"), py::arg("capacity"));
  m.def("permute_forward", &lightning_moe::permute_forward, py::arg("x"), py::arg("inverse"),
        py::arg("token_offsets"));
  m.def("permute_backward", &lightning_moe::permute_backward, py::arg("grad_sorted"), py::arg("inverse"),
        py::arg("token_offsets"), py::arg("x_dtype"));
  m.def("unpermute_forward", &lightning_moe::unpermute_forward, py::arg("y_sorted"), py::arg("inverse"),
        py::arg("weights"), py::arg("token_offsets"), py::arg("out_dtype"));
  m.def("unpermute_backward", &lightning_moe::unpermute_backward, py::arg("grad_out"), py::arg("y_sorted"),
        py::arg("inverse"), py::arg("weights"), py::arg("token_offsets"));
  m.def("topk_route_forward", &lightning_moe::topk_route_forward, py::arg("logits"), py::arg("top_k"),
        py::arg("scoring"), py::arg("normalize"), py::arg("bias"));
  m.def("topk_route_backward", &lightning_moe::topk_route_backward, py::arg("grad_weights"),
        py::arg("grad_prob_sum").none(true), py::arg("grad_lse_sq_sum").none(true), py::arg("logits"),
        py::arg("expert_ids"), py::arg("scoring"), py::arg("normalize"));
  m.def("router_logits_forward", &lightning_moe::router_logits_forward, py::arg("x"), py::arg("weight"));
  m.def("router_logits_grad_x", &lightning_moe::router_logits_grad_x, py::arg("grad_logits"), py::arg("weight"),
        py::arg("x_dtype"));
  m.def("router_logits_grad_weight", &lightning_moe::router_logits_grad_weight, py::arg("grad_logits"),
        py::arg("x"));
  m.def("router_logits_tc_forward", &lightning_moe::router_logits_tc_forward, py::arg("x"), py::arg("weight"),
        py::arg("pipelined") = true);
  m.def("router_logits_tc_grad_x", &lightning_moe::router_logits_tc_grad_x, py::arg("grad_logits"), py::arg("weight"),
        py::arg("persistent") = true, py::arg("addend").none(true) = py::none());
  m.def("router_logits_tc_grad_weight", &lightning_moe::router_logits_tc_grad_weight, py::arg("grad_logits"),
        py::arg("x"), py::arg("pipelined") = true, py::arg("dtype") = at::kFloat);
  m.def("activation_forward", &lightning_moe::activation_forward, py::arg("a"), py::arg("gate"),
        py::arg("activation"));
  m.def("activation_backward", &lightning_moe::activation_backward, py::arg("grad_h"), py::arg("a"),
        py::arg("gate"), py::arg("activation"));
  m.def("cast_to_float", &lightning_moe::cast_to_float, py::arg("x"),
        py::arg("addend").none(true) = py::none());
  m.def("cast_to_float_square_sums", &lightning_moe::cast_to_float_square_sums, py::arg("x"));
  m.def("adamw_step", &lightning_moe::adamw_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("copies"), py::arg("lr"), py::arg("weight_decay"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("steps"), py::arg("grad_divisor").none(true) = py::none());
  m.def("grouped_gemm_available", &lightning_moe::grouped_gemm_available);
  m.def("grouped_gemm_rows", &lightning_moe::grouped_gemm_rows, py::arg("a"), py::arg("b"), py::arg("ends"),
        py::arg("b_is_kn"), py::arg("tile_n") = 128, py::arg("ctas_per_sm") = 1, py::arg("tile_m") = 128);
  m.def("grouped_gemm_rows_to_tokens", &lightning_moe::grouped_gemm_rows_to_tokens, py::arg("a"), py::arg("b"),
        py::arg("ends"), py::arg("row_token"), py::arg("tile_n") = 128, py::arg("ctas_per_sm") = 1,
        py::arg("tile_m") = 128);
  m.def("grouped_gemm_rows_and_combine", &lightning_moe::grouped_gemm_rows_and_combine, py::arg("a"), py::arg("b"),
        py::arg("ends"), py::arg("row_token"), py::arg("token_weight"), py::arg("tile_n") = 128,
        py::arg("ctas_per_sm") = 1, py::arg("tile_m") = 128);
  m.def("grouped_gemm_weight_grad", &lightning_moe::grouped_gemm_weight_grad, py::arg("a"), py::arg("b"),
        py::arg("ends"), py::arg("tile_n") = 128, py::arg("ctas_per_sm") = 1, py::arg("run_tiles") = 1);
}

// Python bindings of the lightning_moe CUDA kernels. Only binds: the checks and launches live in
// each kernel's .cu file, the torch.library registration in lightning_moe/ops/.

#include <torch/csrc/utils/pybind.h>

#include "permute.h"
#include "sort_by_expert.h"
#include "unpermute.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_moe CUDA kernels: sort_by_expert, permute, unpermute";
  m.def("sort_by_expert", &lightning_moe::sort_by_expert, py::arg("expert_ids"), py::arg("num_experts"));
  m.def("permute_forward", &lightning_moe::permute_forward, py::arg("x"), py::arg("inverse"),
        py::arg("token_offsets"));
  m.def("permute_backward", &lightning_moe::permute_backward, py::arg("grad_sorted"), py::arg("inverse"),
        py::arg("token_offsets"), py::arg("x_dtype"));
  m.def("unpermute_forward", &lightning_moe::unpermute_forward, py::arg("y_sorted"), py::arg("inverse"),
        py::arg("weights"), py::arg("token_offsets"), py::arg("out_dtype"));
  m.def("unpermute_backward", &lightning_moe::unpermute_backward, py::arg("grad_out"), py::arg("y_sorted"),
        py::arg("inverse"), py::arg("weights"), py::arg("token_offsets"));
}

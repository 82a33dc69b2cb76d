"""The grouped GEMM kernels (``src_cuda/grouped_gemm.cu``) against their reference and a float64
oracle, on a compute capability 9.0 GPU.

Shape legend: N rows (sorted by expert), K input features, M output features, E experts.
"""

from __future__ import annotations

import importlib
import threading

import pytest
import torch
from torch import Tensor

from lightning_moe.layers.experts import GroupedExperts, _run_grouped
from lightning_moe.ops import reference
from lightning_moe.ops.extension import require_extension
from lightning_moe.ops.grouped_linear import grouped_linear, grouped_linear_usable
from tests.ops.gpu_checks import GPU_MARKS, assert_close_to_gpu_oracle, poison_float_blocks

# The module, not the function of the same name that lightning_moe.ops exports.
grouped_linear_module = importlib.import_module("lightning_moe.ops.grouped_linear")
# (tile_n, ctas_per_sm) of the kernels: one CTA per SM at both tile widths, and two CTAs per SM.
KERNEL_CHOICES = {"tile128": (128, 1), "tile256": (256, 1), "two_ctas": (128, 2)}
# (tile_n, ctas_per_sm, tile_m) of the row kernel: those, and 192-row tiles of three consumers.
ROW_KERNEL_CHOICES = {**{name: (*choice, 128) for name, choice in KERNEL_CHOICES.items()}, "tall": (256, 1, 192)}


def _kernels_here() -> bool:
    return torch.cuda.is_available() and grouped_linear_usable(64, 1, 128, 128, torch.device("cuda"))


pytestmark = [*GPU_MARKS, pytest.mark.skipif(not _kernels_here(), reason="needs the sm_90a grouped GEMM kernels")]

SPLITS = {
    "mixed": [0, 5, 64, 0, 130, 1, 127, 128, 129, 0],
    "all-on-one": [0, 0, 300, 0],
    "one-row": [1],
    "empty-last": [10, 0],
    "64-experts": [int(n) for n in torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(5))],
    # Either side of one and two 192-row tiles.
    "tall-edges": [191, 192, 193, 0, 385, 64, 384],
}


def make_inputs(split: list[int], k: int, m: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows, weights of nn.Linear's scale, the int32 ends and an upstream gradient, on the GPU."""
    rows = sum(split)
    x_NK = torch.randn(rows, k, generator=generator).to("cuda", torch.bfloat16)
    w_EMK = (torch.randn(len(split), m, k, generator=generator) / k**0.5).to("cuda", torch.bfloat16)
    ends_E = torch.tensor(split).cumsum(0).to("cuda", torch.int32)
    grad_NM = torch.randn(rows, m, generator=generator).to("cuda", torch.bfloat16)
    return x_NK, w_EMK, ends_E, grad_NM


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize(("k", "m"), [(128, 256), (384, 128)], ids=["128x256", "384x128"])
def test_grouped_linear_matches_the_oracle(split: list[int], k: int, m: int, generator: torch.Generator) -> None:
    x_NK, w_EMK, ends_E, grad_NM = make_inputs(split, k, m, generator)
    inputs = (x_NK.requires_grad_(), w_EMK.requires_grad_())
    poison_float_blocks()
    y_NM = grouped_linear(*inputs, ends_E)
    poison_float_blocks()
    grads = torch.autograd.grad(y_NM, inputs, grad_NM)
    torch_y = reference.grouped_linear(*inputs, ends_E)
    torch_grads = torch.autograd.grad(torch_y, inputs, grad_NM)
    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    oracle_y = reference.grouped_linear(*inputs64, ends_E)
    oracle_grads = torch.autograd.grad(oracle_y, inputs64, grad_NM.double())
    assert y_NM.dtype == torch.bfloat16 and y_NM.shape == (sum(split), m)
    assert_close_to_gpu_oracle(y_NM, torch_y, oracle_y.detach())
    for got, torch_grad, oracle_grad in zip(grads, torch_grads, oracle_grads, strict=True):
        assert_close_to_gpu_oracle(got, torch_grad, oracle_grad)


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("b_is_kn", [False, True], ids=["b-nk", "b-kn"])
@pytest.mark.parametrize(
    ("tile_n", "ctas_per_sm", "tile_m"), ROW_KERNEL_CHOICES.values(), ids=ROW_KERNEL_CHOICES.keys()
)
def test_row_kernel_matches_the_oracle(
    split: list[int], b_is_kn: bool, tile_n: int, ctas_per_sm: int, tile_m: int, generator: torch.Generator
) -> None:
    # K = 192: three K stages; 256 output columns: two 128-column tiles or one 256-column tile.
    x_NK, w_EMK, ends_E, _ = make_inputs(split, 192, 256, generator)
    b = w_EMK.transpose(1, 2).contiguous() if b_is_kn else w_EMK
    poison_float_blocks()
    got_NM = require_extension().grouped_gemm_rows(x_NK, b, ends_E, b_is_kn, tile_n, ctas_per_sm, tile_m)
    torch_NM = reference.grouped_linear(x_NK, w_EMK, ends_E)
    oracle_NM = reference.grouped_linear(x_NK.double(), w_EMK.double(), ends_E)
    assert got_NM.shape == (sum(split), 256)
    assert_close_to_gpu_oracle(got_NM, torch_NM, oracle_NM)


# The row kernel's shapes on one CTA per SM, which the token epilogues are built for.
ONE_CTA_ROW_CHOICES = {name: choice for name, choice in ROW_KERNEL_CHOICES.items() if choice[1] == 1}


def _token_order(rows: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random permutation: the token of each sorted row (order) and the row of each token."""
    order = torch.randperm(rows, generator=generator).cuda()
    return order, order.argsort()


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize(
    ("tile_n", "ctas_per_sm", "tile_m"), ONE_CTA_ROW_CHOICES.values(), ids=ONE_CTA_ROW_CHOICES.keys()
)
def test_token_epilogues_write_the_row_kernels_bits_in_token_order(
    split: list[int], tile_n: int, ctas_per_sm: int, tile_m: int, generator: torch.Generator
) -> None:
    """Rows that are a permutation of the tokens: the input gradient written to token rows is the
    row kernel's output permuted, and the combine is the unpermute's (fmaf(weight, row, 0) in
    float32, then bf16) of the row kernel's rows; every token row is written (memory poisoned)."""
    x_NK, w_EMK, ends_E, _ = make_inputs(split, 192, 256, generator)
    order, row_of_token = _token_order(x_NK.shape[0], generator)
    weights = torch.rand(x_NK.shape[0], generator=generator).cuda()
    weights[: min(3, weights.shape[0])] = torch.tensor([0.0, 1.0, -2.5])[: weights.shape[0]].cuda()
    extension = require_extension()
    shapes = (tile_n, ctas_per_sm, tile_m)
    w_EKM = w_EMK.transpose(1, 2).contiguous()
    rows_kn = extension.grouped_gemm_rows(x_NK, w_EKM, ends_E, True, *shapes)
    rows_nk = extension.grouped_gemm_rows(x_NK, w_EMK, ends_E, False, *shapes)
    poison_float_blocks()
    to_tokens = extension.grouped_gemm_rows_to_tokens(x_NK, w_EKM, ends_E, order, *shapes)
    poison_float_blocks()
    rows, combined = extension.grouped_gemm_rows_and_combine(x_NK, w_EMK, ends_E, order, weights, *shapes)
    assert torch.equal(to_tokens, rows_kn[row_of_token])
    assert torch.equal(rows, rows_nk)
    expected = (weights[:, None] * rows_nk[row_of_token].float()).bfloat16()
    assert combined.dtype == torch.bfloat16 and torch.equal(combined, expected)


def test_token_epilogues_reject_what_they_cannot_write(generator: torch.Generator) -> None:
    x_NK, w_EMK, ends_E, _ = make_inputs([5, 3], 64, 128, generator)
    order, _ = _token_order(8, generator)
    extension = require_extension()
    w_EKM = w_EMK.transpose(1, 2).contiguous()
    with pytest.raises(RuntimeError, match="row_token must name the token of each of a's 8 rows"):
        extension.grouped_gemm_rows_to_tokens(x_NK, w_EKM, ends_E, order[:7])
    with pytest.raises(RuntimeError, match="the token epilogues run with ctas_per_sm 1"):
        extension.grouped_gemm_rows_to_tokens(x_NK, w_EKM, ends_E, order, 128, 2)
    with pytest.raises(RuntimeError, match="token_weight must hold one weight per token"):
        extension.grouped_gemm_rows_and_combine(x_NK, w_EMK, ends_E, order, torch.ones(3, device="cuda"))
    with pytest.raises(RuntimeError, match="row_token must have dtype"):
        extension.grouped_gemm_rows_and_combine(x_NK, w_EMK, ends_E, order.int(), torch.ones(8, device="cuda"))


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize(
    ("tile_n", "ctas_per_sm", "k", "run_tiles"),
    [(128, 1, 384, 1), (256, 1, 512, 1), (128, 2, 384, 1), (128, 2, 384, 2), (128, 2, 512, 4)],
    ids=["tile128", "tile256", "two_ctas", "runs2", "runs4"],
)
def test_weight_grad_kernel_matches_the_oracle(
    split: list[int], tile_n: int, ctas_per_sm: int, k: int, run_tiles: int, generator: torch.Generator
) -> None:
    # Experts of 1, 5, 127-130 and 300 rows: stages that run past an expert into the next one's rows.
    rows = sum(split)
    a_NM = torch.randn(rows, 256, generator=generator).to("cuda", torch.bfloat16)
    b_NK = torch.randn(rows, k, generator=generator).to("cuda", torch.bfloat16)
    ends_E = torch.tensor(split).cumsum(0).to("cuda", torch.int32)
    poison_float_blocks()
    got_EMK = require_extension().grouped_gemm_weight_grad(a_NM, b_NK, ends_E, tile_n, ctas_per_sm, run_tiles)
    starts = [0, *ends_E.tolist()]
    blocks = [(a_NM[s:e].double().t() @ b_NK[s:e].double()) for s, e in zip(starts[:-1], starts[1:], strict=True)]
    oracle_EMK = torch.stack(blocks)
    torch_EMK = torch._grouped_mm(a_NM.t(), b_NK, offs=ends_E)
    assert got_EMK.shape == (len(split), 256, k) and got_EMK.dtype == torch.bfloat16
    for e, count in enumerate(split):
        if count == 0:
            assert (got_EMK[e] == 0).all(), "an expert without rows has a zero gradient"
    assert_close_to_gpu_oracle(got_EMK, torch_EMK, oracle_EMK)


@pytest.mark.parametrize(
    ("tile_n", "ctas_per_sm", "run_tiles"),
    [(*choice, 1) for choice in KERNEL_CHOICES.values()] + [(128, 2, 2)],
    ids=[*KERNEL_CHOICES.keys(), "runs2"],
)
def test_weight_grad_kernel_keeps_each_expert_to_its_rows(
    tile_n: int, ctas_per_sm: int, run_tiles: int, generator: torch.Generator
) -> None:
    # Expert 0's 3 rows share a 64-row stage with expert 1's, which hold infinities.
    a_NM = torch.randn(8, 128, generator=generator).to("cuda", torch.bfloat16)
    b_NK = torch.randn(8, 256, generator=generator).to("cuda", torch.bfloat16)
    a_NM[3:], b_NK[3:] = float("inf"), float("inf")
    ends_E = torch.tensor([3, 8], dtype=torch.int32, device="cuda")
    got_EMK = require_extension().grouped_gemm_weight_grad(a_NM, b_NK, ends_E, tile_n, ctas_per_sm, run_tiles)
    expected_MK = (a_NM[:3].double().t() @ b_NK[:3].double()).to(torch.bfloat16)
    torch.testing.assert_close(got_EMK[0], expected_MK, rtol=1e-2, atol=1e-2)
    assert got_EMK[1].isinf().all()


@pytest.mark.parametrize("run_tiles", [2, 3, 4, 32])
@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_weight_grad_runs_give_the_bits_of_single_tiles(
    split: list[int], run_tiles: int, generator: torch.Generator
) -> None:
    # Runs read each expert's slice of a once per run (experts of at most 192 rows) or per stage
    # (larger ones), and must sum in the same order as the one-tile kernel.
    rows = sum(split)
    a_NM = torch.randn(rows, 384, generator=generator).to("cuda", torch.bfloat16)
    b_NK = torch.randn(rows, 1024, generator=generator).to("cuda", torch.bfloat16)
    ends_E = torch.tensor(split).cumsum(0).to("cuda", torch.int32)
    expected_EMK = require_extension().grouped_gemm_weight_grad(a_NM, b_NK, ends_E, 128, 2, 1)
    poison_float_blocks()
    got_EMK = require_extension().grouped_gemm_weight_grad(a_NM, b_NK, ends_E, 128, 2, run_tiles)
    assert torch.equal(got_EMK, expected_EMK)


def test_weight_grad_runs_need_two_ctas_per_sm() -> None:
    x = torch.zeros(8, 128, device="cuda", dtype=torch.bfloat16)
    ends_E = torch.tensor([8], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="run_tiles above 1 needs ctas_per_sm 2"):
        require_extension().grouped_gemm_weight_grad(x, x, ends_E, 128, 1, 2)
    with pytest.raises(RuntimeError, match="run_tiles must be at least 1"):
        require_extension().grouped_gemm_weight_grad(x, x, ends_E, 128, 2, 0)


def test_row_kernel_launched_from_another_thread_matches_the_main_thread(generator: torch.Generator) -> None:
    # Autograd runs the input gradient on its own thread; the kernel's parameters must survive that.
    x_NK, w_EMK, ends_E, _ = make_inputs(SPLITS["mixed"], 128, 256, generator)
    expected_NM = require_extension().grouped_gemm_rows(x_NK, w_EMK, ends_E, False)
    results: list[Tensor] = []
    worker = threading.Thread(
        target=lambda: results.append(require_extension().grouped_gemm_rows(x_NK, w_EMK, ends_E, False))
    )
    worker.start()
    worker.join()
    assert len(results) == 1 and torch.equal(results[0], expected_NM)


def test_grouped_linear_under_torch_compile(generator: torch.Generator) -> None:
    x_NK, w_EMK, ends_E, grad_NM = make_inputs(SPLITS["mixed"], 128, 256, generator)
    compiled = torch.compile(grouped_linear, fullgraph=True)
    inputs = (x_NK.requires_grad_(), w_EMK.requires_grad_())
    y_NM = compiled(*inputs, ends_E)
    grads = torch.autograd.grad(y_NM, inputs, grad_NM)
    eager_y = grouped_linear(*inputs, ends_E)
    eager_grads = torch.autograd.grad(eager_y, inputs, grad_NM)
    torch.testing.assert_close(y_NM, eager_y, rtol=0, atol=0)  # the same kernels, so the same bits
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_opcheck_of_the_grouped_linear_ops(generator: torch.Generator) -> None:
    x_NK, w_EMK, ends_E, grad_NM = make_inputs([3, 0, 9], 128, 128, generator)
    torch.library.opcheck(torch.ops.lightning_moe.grouped_linear.default, (x_NK.requires_grad_(), w_EMK, ends_E))
    torch.library.opcheck(torch.ops.lightning_moe.grouped_linear_input_grad.default, (grad_NM, w_EMK, ends_E))
    # The gradient ops have no gradients of their own: inputs that do not require one.
    weight_grad_args = (grad_NM, x_NK.detach(), ends_E)
    torch.library.opcheck(torch.ops.lightning_moe.grouped_linear_weight_grad.default, weight_grad_args)


def test_row_kernel_rejects_tall_tiles_it_does_not_have(generator: torch.Generator) -> None:
    x_NK, w_EMK, ends_E, _ = make_inputs([4, 4], 128, 256, generator)
    for tile_n, ctas_per_sm in [(128, 1), (128, 2)]:
        with pytest.raises(RuntimeError, match="tile_m must be 128, or 192 with tile_n 256 and ctas_per_sm 1"):
            require_extension().grouped_gemm_rows(x_NK, w_EMK, ends_E, False, tile_n, ctas_per_sm, 192)
    with pytest.raises(RuntimeError, match="tile_m must be"):
        require_extension().grouped_gemm_rows(x_NK, w_EMK, ends_E, False, 256, 1, 64)


@pytest.mark.parametrize(
    ("change", "message"),
    [("float32", "bfloat16"), ("k=192", "multiples of 128"), ("m=64", "multiples of 128"), ("ends", "one \\(M, K\\)")],
)
def test_grouped_linear_rejects_bad_input_by_name(change: str, message: str, generator: torch.Generator) -> None:
    x_NK, w_EMK, ends_E, _ = make_inputs([4, 4], 128, 128, generator)
    if change == "float32":
        x_NK = x_NK.float()
    elif change == "k=192":
        x_NK, w_EMK = torch.cat([x_NK, x_NK[:, :64]], 1), torch.cat([w_EMK, w_EMK[:, :, :64]], 2)
    elif change == "m=64":
        w_EMK = w_EMK[:, :64].contiguous()
    else:
        ends_E = ends_E[:1]
    with pytest.raises(ValueError, match=message):
        grouped_linear(x_NK, w_EMK, ends_E)


@pytest.mark.parametrize("kernel", ["one_cta", "two_ctas", "tall", "wgrad_runs"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_experts_with_few_rows_each_take_the_kernels_and_match_the_loop(
    activation: str, kernel: str, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctas_per_sm = 2 if kernel in ("two_ctas", "wgrad_runs") else 1
    monkeypatch.setattr(grouped_linear_module, "ROW_CTAS_PER_SM", ctas_per_sm)
    monkeypatch.setattr(grouped_linear_module, "WEIGHT_GRAD_CTAS_PER_SM", ctas_per_sm)
    monkeypatch.setattr(grouped_linear_module, "WEIGHT_GRAD_RUN_TILES", 2 if kernel == "wgrad_runs" else 1)
    if kernel == "tall":  # 256-column tiles wherever they divide the columns, and 192 rows
        monkeypatch.setattr(grouped_linear_module, "TALL_ROW_TILES", True)
        monkeypatch.setattr(grouped_linear_module, "TALL_TILE_MIN_ROWS", 0)
        monkeypatch.setattr(grouped_linear_module, "TALL_TILE_MAX_ROWS", 1 << 30)
        monkeypatch.setattr(grouped_linear_module, "_num_sms", lambda device_index: 1)
    experts = GroupedExperts(16, 128, 256, activation=activation, seed=3).to("cuda", torch.bfloat16)
    tokens_per_expert = torch.randint(0, 40, (16,), generator=generator).cuda()
    tokens_per_expert[3] = 0
    rows = int(tokens_per_expert.sum())
    x_ND = torch.randn(rows, 128, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    assert grouped_linear_usable(rows, 16, 128, 256, x_ND.device), "the kernels should run these experts"
    out = experts(x_ND, tokens_per_expert)
    loop = _run_grouped(experts.expert_forward, x_ND, tokens_per_expert)
    torch.testing.assert_close(out, loop, rtol=2e-2, atol=2e-2)
    params = [x_ND, experts.w1, experts.w2] + ([experts.w3] if experts.w3 is not None else [])
    grads = torch.autograd.grad(out.float().square().sum(), params)
    loop_grads = torch.autograd.grad(loop.float().square().sum(), params)
    for got, want in zip(grads, loop_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())

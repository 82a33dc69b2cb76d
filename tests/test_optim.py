"""lightning_moe.optim.AdamW off the GPU: torch's AdamW step, state and hooks; with a gradient
divisor, clipping then stepping. The kernel step is compared in tests/ops/test_adamw_cuda.py."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.ops.cast import kept_cast
from lightning_moe.optim import AdamW


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def make_params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in ((4, 3), (7,), (2, 2, 5))]


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-2}]


def set_grads(params_lists: list[list[torch.nn.Parameter]], generator: torch.Generator) -> None:
    for tensors in zip(*params_lists, strict=True):
        grad = torch.randn(tensors[0].shape, generator=generator)
        for p in tensors:
            p.grad = grad.clone()


@pytest.mark.parametrize("options", [{}, {"foreach": True}, {"fused": True}, {"amsgrad": True}])
def test_on_cpu_it_steps_as_torch_adamw_and_saves_its_state(options: dict, generator: torch.Generator) -> None:
    ours, theirs = make_params(0), make_params(0)
    optimizer = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), **options)
    reference = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), **options)
    assert not optimizer.kernel_step_applies()
    for _ in range(3):
        set_grads([ours, theirs], generator)
        optimizer.step()
        reference.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
    state, reference_state = optimizer.state_dict(), reference.state_dict()
    assert state["param_groups"] == reference_state["param_groups"]
    for key, value in reference_state["state"].items():
        assert value.keys() == state["state"][key].keys()
        for name in value:
            assert torch.equal(value[name], state["state"][key][name])
    # A checkpoint of either loads into the other.
    reference.load_state_dict(state)
    AdamW(groups(make_params(0)), lr=1e-2, betas=(0.9, 0.95), **options).load_state_dict(reference_state)


def test_a_gradient_divisor_clips_then_steps_and_hooks_run_once(generator: torch.Generator) -> None:
    torch.optim.AdamW(make_params(1))  # a torch AdamW instance wraps AdamW.step with the hook runner
    ours, theirs = make_params(0), make_params(0)
    optimizer = AdamW(groups(ours), lr=1e-2)
    reference = torch.optim.AdamW(groups(theirs), lr=1e-2)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    for _ in range(2):
        set_grads([ours, theirs], generator)
        divisor = torch.tensor(4.0)
        optimizer.grad_scale = divisor
        optimizer.step()
        assert optimizer.grad_scale is divisor  # left for its owner to take away
        for q in theirs:
            q.grad /= 4.0
        reference.step()
    assert calls == ["pre", "post"] * 2
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(p.grad, q.grad)  # torch's step divides the gradients in place


def test_a_closure_is_evaluated_with_gradients_enabled() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = AdamW([w], lr=0.1)

    def closure() -> float:
        optimizer.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss.item()

    assert optimizer.step(closure) == 3.0
    assert torch.all(w < 1.0)


def test_parameters_are_registered_for_kept_casts_unless_turned_off() -> None:
    from lightning_moe.ops.cast import _KEPT_CASTS

    kept, not_kept = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    half = torch.nn.Parameter(torch.randn(3).half())
    AdamW([kept, half])
    AdamW([not_kept], keep_casts=False)
    assert kept in _KEPT_CASTS and half not in _KEPT_CASTS and not_kept not in _KEPT_CASTS
    assert kept_cast(kept) is None  # registered; nothing cast yet
    later = torch.nn.Parameter(torch.randn(2))
    optimizer = AdamW([kept])
    optimizer.add_param_group({"params": [later]})
    assert later in _KEPT_CASTS

"""The AdamW step's reference (``adamw_step_reference``, what the kernel is checked against, and the
CPU path of :class:`lightning_moe.optim.AdamW`) against a float64 element-by-element loop and
torch's single-tensor AdamW step."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.ops.adamw import AdamWHyperparameters, adamw_step, adamw_step_reference


def brute_force_adamw(p, g, m, v, *, lr, weight_decay, beta1, beta2, eps, step, divisor):
    """One AdamW step of one element, in Python floats (float64), from its definition."""
    g = g / divisor
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    return p - lr * m_hat / (math.sqrt(v_hat) + eps), m, v


def random_case(sizes, generator):
    params = [torch.randn(n, generator=generator) for n in sizes]
    grads = [torch.randn(n, generator=generator) * 1e-2 for n in sizes]
    exp_avgs = [torch.randn(n, generator=generator) * 1e-2 for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=generator) * 1e-4 for n in sizes]
    return params, grads, exp_avgs, exp_avg_sqs


@pytest.mark.parametrize("divide", [False, True])
def test_reference_is_the_definition_in_float64(divide: bool, generator: torch.Generator) -> None:
    sizes = [1, 7, 33]
    params, grads, exp_avgs, exp_avg_sqs = random_case(sizes, generator)
    hyper = dict(
        lr=[1e-2, 3e-3, 0.1],
        weight_decay=[0.1, 0.0, 0.01],
        beta1=[0.9, 0.3, 0.8],  # 0.3: torch's lerp takes its other branch
        beta2=[0.95, 0.999, 0.9],
        eps=[1e-8, 1e-6, 1e-3],
        steps=[1.0, 7.0, 1000.0],
    )
    divisor = torch.tensor(3.5) if divide else None
    want = []
    for i in range(len(sizes)):
        columns = (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i])
        elements = zip(*(t.tolist() for t in columns), strict=True)
        scalars = {k: v[i] for k, v in hyper.items() if k != "steps"}
        want.append(
            [brute_force_adamw(*e, **scalars, step=hyper["steps"][i], divisor=3.5 if divide else 1.0) for e in elements]
        )
    grads_before = [g.clone() for g in grads]
    copies = [None, torch.empty(7, dtype=torch.bfloat16), torch.empty(33, dtype=torch.float16)]
    adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, copies, AdamWHyperparameters(**hyper), divisor)
    for i in range(len(sizes)):
        p_want, m_want, v_want = (torch.tensor(column, dtype=torch.float64) for column in zip(*want[i], strict=True))
        torch.testing.assert_close(params[i].double(), p_want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(exp_avgs[i].double(), m_want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(exp_avg_sqs[i].double(), v_want, rtol=1e-6, atol=1e-12)
        assert torch.equal(grads[i], grads_before[i])  # only read
        if copies[i] is not None:
            assert torch.equal(copies[i], params[i].to(copies[i].dtype))


def test_reference_gives_the_bits_of_torch_single_tensor_adamw(generator: torch.Generator) -> None:
    sizes = [5, 64, 3]
    n = len(sizes)
    params = [torch.randn(size, generator=generator) for size in sizes]
    exp_avgs = [torch.zeros(size) for size in sizes]  # torch starts from zero moments
    exp_avg_sqs = [torch.zeros(size) for size in sizes]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = torch.optim.AdamW(torch_params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    hyper = dict(lr=[3e-3] * n, weight_decay=[0.1] * n, beta1=[0.9] * n, beta2=[0.95] * n, eps=[1e-8] * n)
    for step in (1.0, 2.0, 3.0):
        grads = [torch.randn(size, generator=generator) for size in sizes]
        for p, g in zip(torch_params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        hyper_now = AdamWHyperparameters(**hyper, steps=[step] * n)
        adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, [None] * n, hyper_now)
    for p, m, v, q in zip(params, exp_avgs, exp_avg_sqs, torch_params, strict=True):
        state = optimizer.state[q]
        assert torch.equal(p, q.detach())
        assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"])


def test_step_on_cpu_runs_the_reference(generator: torch.Generator) -> None:
    params, grads, exp_avgs, exp_avg_sqs = random_case([10], generator)
    expected = [t[0].clone() for t in (params, exp_avgs, exp_avg_sqs)]
    hyper = AdamWHyperparameters(lr=[1e-2], weight_decay=[0.1], beta1=[0.9], beta2=[0.99], eps=[1e-8], steps=[3.0])
    adamw_step_reference([expected[0]], grads, [expected[1]], [expected[2]], [None], hyper)
    adamw_step(params, grads, exp_avgs, exp_avg_sqs, [None], hyper)
    assert torch.equal(params[0], expected[0]) and torch.equal(exp_avgs[0], expected[1])


def test_lists_of_different_lengths_and_step_zero_are_refused() -> None:
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="one entry per parameter"):
        hyper = AdamWHyperparameters(lr=[1.0, 2.0], weight_decay=[0], beta1=[0.9], beta2=[0.9], eps=[0], steps=[1])
        adamw_step(p, p, p, p, [None], hyper)
    with pytest.raises(ValueError, match="at least 1"):
        hyper = AdamWHyperparameters(lr=[1.0], weight_decay=[0], beta1=[0.9], beta2=[0.9], eps=[0], steps=[0])
        adamw_step(p, p, p, p, [None], hyper)

"""The AdamW kernel against the AdamW step computed in float64, and lightning_moe.optim.AdamW's
kernel step against torch's AdamW and with its casts kept, on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_moe import MoE, ops
from lightning_moe.ops.adamw import AdamWHyperparameters, adamw_step, adamw_step_reference
from lightning_moe.ops.cast import forget_casts, kept_cast
from lightning_moe.optim import AdamW
from tests.models.test_gpt import fit_on_bytes
from tests.ops.gpu_checks import GPU_MARKS

pytestmark = GPU_MARKS

# Around the kernel's 4-element vectors and 1024-element chunks, and an expert weight stack.
SIZES = [0, 1, 3, 4, 5, 1023, 1024, 1025, 3 * 1024 + 7, 8 * 1024 * 1408]


def random_tensors(sizes, generator, offset=0):
    """Parameters, gradients and moments on the GPU; ``offset`` > 0 starts each off a 16-byte
    boundary (the kernel's element-by-element path)."""

    def make(size, scale, positive=False):
        t = (torch.rand if positive else torch.randn)(size + offset, generator=generator) * scale
        return t.cuda()[offset:]

    return (
        [make(n, 1.0) for n in sizes],
        [make(n, 1e-2) for n in sizes],
        [make(n, 1e-2) for n in sizes],
        [make(n, 1e-4, positive=True) for n in sizes],
    )


def hyperparameters(n, generator):
    pick = lambda values: [values[i] for i in torch.randint(len(values), (n,), generator=generator).tolist()]  # noqa: E731
    return AdamWHyperparameters(
        lr=pick([1e-3, 3e-2]),
        weight_decay=pick([0.0, 0.1]),
        beta1=pick([0.9, 0.3]),  # 0.3: torch's lerp from the end
        beta2=pick([0.95, 0.999]),
        eps=pick([1e-8, 1e-6]),
        steps=pick([1.0, 2.0, 1000.0]),
    )


def assert_within_twice_torchs_error(got: torch.Tensor, same_dtype_torch: torch.Tensor, oracle: torch.Tensor) -> None:
    """``got`` no further from the float64 ``oracle`` than twice PyTorch's float32 result, plus two
    float32 ulps of the largest value (the tensor's rounding unit)."""
    if got.numel() == 0:
        return
    error = (got.double() - oracle).abs().max().item()
    torch_error = (same_dtype_torch.double() - oracle).abs().max().item()
    allowed = 2 * torch_error + 2 * torch.finfo(torch.float32).eps * oracle.abs().max().item()
    assert error <= allowed, (error, torch_error)


@pytest.mark.parametrize("divide", [False, True], ids=["no-divisor", "divisor"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_kernel_step_is_the_float64_step(divide: bool, offset: int, generator: torch.Generator) -> None:
    sizes = SIZES * 4  # 40 tensors: more than one launch's 32
    params, grads, exp_avgs, exp_avg_sqs = random_tensors(sizes, generator, offset)
    hyper = hyperparameters(len(sizes), generator)
    dtypes = [None, torch.bfloat16, torch.float16]
    copies = [  # poisoned: an element the kernel does not write stays NaN
        None if (dtype := dtypes[i % 3]) is None else torch.full((n + offset,), float("nan"), dtype=dtype).cuda()
        for i, n in enumerate(sizes)
    ]
    copies = [None if c is None else c[offset:] for c in copies]
    divisor = torch.tensor([2.5], device="cuda") if divide else None
    grads_before = [g.clone() for g in grads]
    oracle = [[t.double() for t in tensors] for tensors in (params, exp_avgs, exp_avg_sqs)]
    adamw_step_reference(
        oracle[0], [g.double() for g in grads], oracle[1], oracle[2], [None] * len(sizes), hyper,
        None if divisor is None else divisor.double(),
    )  # fmt: skip
    torch32 = [[t.clone() for t in tensors] for tensors in (params, exp_avgs, exp_avg_sqs)]
    adamw_step_reference(*torch32[:1], grads, *torch32[1:], [None] * len(sizes), hyper, divisor)
    adamw_step(params, grads, exp_avgs, exp_avg_sqs, copies, hyper, divisor)
    assert ops.cuda_kernels_available()
    for i in range(len(sizes)):
        for got, same_dtype_torch, want in zip((params, exp_avgs, exp_avg_sqs), torch32, oracle, strict=True):
            assert_within_twice_torchs_error(got[i], same_dtype_torch[i], want[i])
        assert torch.equal(grads[i], grads_before[i])  # only read
        if copies[i] is not None:  # every element written, and rounded as torch rounds
            assert torch.equal(copies[i], params[i].to(copies[i].dtype))


def test_kernel_refuses_tensors_it_cannot_step() -> None:
    p = torch.zeros(8, device="cuda")
    one = dict(lr=[1e-3], weight_decay=[0.0], beta1=[0.9], beta2=[0.9], eps=[1e-8], steps=[1.0])
    extension = ops.load_extension()
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have dtype"):
        extension.adamw_step([p], [p.half()], [p], [p], [None], *one.values(), None)
    with pytest.raises(RuntimeError, match=r"copies\[0\] must have dtype bfloat16 or float16"):
        extension.adamw_step([p], [p], [p], [p], [p.clone()], *one.values(), None)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] must have params\[0\]'s shape"):
        extension.adamw_step([p], [p], [p[:4]], [p], [None], *one.values(), None)
    with pytest.raises(RuntimeError, match="grad_divisor must have one element"):
        extension.adamw_step([p], [p], [p], [p], [None], *one.values(), p)


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), MoE(64, 4, top_k=2, d_hidden=128)).cuda()


def test_kernel_step_follows_torch_adamw_and_leaves_the_gradients() -> None:
    ours, theirs = make_model(0), make_model(0)
    optimizer = AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    x = torch.randn(256, 64, device="cuda")
    for step in range(5):
        for model in (ours, theirs):
            model.zero_grad()
            model(x).square().mean().backward()
        grads = [p.grad.clone() for p in ours.parameters()]
        if step % 2:  # clipping's divisor, as MoELightningModule sets it
            optimizer.grad_scale = torch.tensor(3.0, device="cuda")
            for p in theirs.parameters():
                p.grad /= 3.0
        assert optimizer.kernel_step_applies()
        optimizer.step()
        optimizer.__dict__.pop("grad_scale", None)
        reference.step()
        for p, grad in zip(ours.parameters(), grads, strict=True):
            assert torch.equal(p.grad, grad)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert optimizer.state[p]["step"].device.type == "cpu"
        assert optimizer.state[p]["step"].item() == 5
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], reference.state[q]["exp_avg"], rtol=1e-5, atol=1e-8)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[torch.Tensor]:
    x = torch.randn(512, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def test_kept_casts_give_the_bits_of_casting_afresh() -> None:
    kept, fresh = make_model(0), make_model(0)
    kept_optimizer = AdamW(kept.parameters(), lr=1e-2)
    fresh_optimizer = AdamW(fresh.parameters(), lr=1e-2, keep_casts=False)
    losses = train(kept, kept_optimizer, 4), train(fresh, fresh_optimizer, 4)
    assert torch.equal(torch.stack(losses[0]), torch.stack(losses[1]))
    for p, q in zip(kept.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    experts = kept[1].experts
    w1 = experts.w1
    kept = kept_cast(w1)
    assert kept is not None and kept.dtype == torch.bfloat16 and torch.equal(kept, w1.detach().bfloat16())
    assert kept_cast(fresh[1].experts.w1) is None
    # The next forward pass takes the step's copy instead of casting.
    assert ops.cast(w1, torch.bfloat16).data_ptr() == kept.data_ptr()


def test_a_weight_changed_after_the_step_is_cast_afresh() -> None:
    model = make_model(0)
    optimizer = AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 2)
    w1 = model[1].experts.w1
    kept = kept_cast(w1)
    with torch.no_grad():
        w1.mul_(0.5)  # counted in the version
    cast = ops.cast(w1, torch.bfloat16)
    assert cast.data_ptr() != kept.data_ptr() and torch.equal(cast, w1.detach().bfloat16())
    train(model, optimizer, 1)
    w1.data.mul_(0.5)  # not counted: the documented forget_casts
    forget_casts([w1])
    assert torch.equal(ops.cast(w1, torch.bfloat16), w1.detach().bfloat16())


def test_a_fused_optimizers_checkpoint_resumes_on_the_kernel_step() -> None:
    ours, theirs = make_model(0), make_model(0)
    fused = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    train(theirs, fused, 2)
    ours.load_state_dict(theirs.state_dict())
    optimizer = AdamW(ours.parameters(), lr=1e-2)
    optimizer.load_state_dict(copy.deepcopy(fused.state_dict()))  # its steps are GPU tensors
    assert not optimizer.kernel_step_applies()  # the checkpoint's groups ask for torch's fused step
    for group in optimizer.param_groups:
        group["fused"] = None
    losses = train(ours, optimizer, 2), train(theirs, fused, 2)
    torch.testing.assert_close(torch.stack(losses[0]), torch.stack(losses[1]), rtol=1e-4, atol=1e-6)
    assert all(optimizer.state[p]["step"].device.type == "cpu" for p in ours.parameters())


def test_gpt_clips_by_the_norm_of_the_backward_square_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    # MoEGPTModule on one GPU under bf16-mixed: lightning_moe.optim.AdamW's kernel step, clipping by
    # norm inside it, the norm taken from the square sums of the experts' gradient casts.
    import lightning as L

    from lightning_moe import module as module_file
    from lightning_moe.models import MoEGPTModule
    from lightning_moe.ops.cast import _KEPT_CASTS

    clip, seen = 1e-3, {"from_sums": [], "norms": [], "divisors": []}
    norm_of = module_file.kept_casts_gradient_norm

    def counting_norm(params):
        params = list(params)
        sums = [p for p in params if p in _KEPT_CASTS and _KEPT_CASTS[p].gradient_square_sums(p) is not None]
        seen["from_sums"].append(len(sums))
        return norm_of(params)

    monkeypatch.setattr(module_file, "kept_casts_gradient_norm", counting_norm)

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["norms"].append(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]).item())
            if len(seen["norms"]) == 1:
                optimizer.register_step_post_hook(
                    lambda opt, *_: seen["divisors"].append((opt.grad_scale.item(), opt.kernel_step_applies()))
                )

    torch.manual_seed(0)
    gpt = MoEGPTModule(block_size=64, n_layer=2, n_head=2, d_model=64, num_experts=4, top_k=2, d_hidden=128)
    trainer = fit_on_bytes(
        gpt, "gpu", devices=1, precision="bf16-mixed", max_steps=3, gradient_clip_val=clip, callbacks=[Record()]
    )
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, AdamW)
    assert seen["from_sums"] == [4] * 3  # both layers' two expert weights, at every step
    assert min(seen["norms"]) > 10 * clip
    for (divisor, kernel_step), norm in zip(seen["divisors"], seen["norms"], strict=True):
        assert kernel_step and divisor == pytest.approx(norm / clip, rel=1e-4)

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lightning_moe import MoE
from lightning_moe.models import MoEGPT, MoEGPTModule

TINY = dict(block_size=16, n_layer=2, n_head=2, d_model=32, num_experts=4, top_k=2, d_hidden=64)


def tiny_model(**overrides) -> MoEGPT:
    torch.manual_seed(0)
    return MoEGPT(**{**TINY, **overrides})


def fit_on_bytes(module, accelerator="cpu", **trainer_kwargs):
    """Fit ``module`` (on the CPU unless told otherwise) on the built-in byte corpus, 16-token blocks
    of batch 4, without logger, checkpoints or validation; the Trainer."""
    import lightning as L

    from lightning_moe.data import ByteCorpusDataModule

    trainer = L.Trainer(
        accelerator=accelerator,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=ByteCorpusDataModule(block_size=16, batch_size=4))
    return trainer


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_shared_experts": 1}, {"activation": "swiglu"}, {"top_k": 1, "dropout": 0.1}],
    ids=["default", "shared-expert", "swiglu", "top1-dropout"],
)
def test_logits_shape(overrides):
    model = tiny_model(**overrides)
    idx = torch.randint(0, 256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    assert sum(isinstance(m, MoE) for m in model.modules()) == TINY["n_layer"]


def test_embeddings_are_tied():
    model = tiny_model()
    assert model.lm_head.weight is model.token_embedding.weight


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny_model().eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        logits, changed_logits = model(idx), model(changed)
    torch.testing.assert_close(changed_logits[:, :10], logits[:, :10])
    assert not torch.allclose(changed_logits[:, 10:], logits[:, 10:])


def test_initial_loss_is_close_to_uniform():
    model = tiny_model()
    idx = torch.randint(0, 256, (8, 16))
    targets = torch.randint(0, 256, (8, 16))
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(256)) < 0.15


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 16))
    targets = torch.roll(idx, -1, dims=1)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_router_weights_receive_gradient():
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 16))
    model(idx).sum().backward()
    for block in model.blocks:
        assert block.moe.router.weight.grad is not None


def test_generate_appends_tokens_and_crops_long_prompts():
    model = tiny_model().eval()
    prompt = torch.randint(0, 256, (2, 20))  # longer than block_size=16
    out = model.generate(prompt, max_new_tokens=5, temperature=0.8, top_k=10)
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :20], prompt)
    assert out.dtype == torch.int64 and int(out.min()) >= 0 and int(out.max()) < 256


def test_greedy_generation_is_deterministic():
    model = tiny_model().eval()
    prompt = torch.randint(0, 256, (1, 4))
    assert torch.equal(model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30, "n_head": 4}, "not divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be a positive int"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"top_k": 5}, "top_k=5 is larger than num_experts=4"),
    ],
    ids=["heads", "layers", "dropout", "top-k"],
)
def test_invalid_arguments_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="larger block_size"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


def test_module_loss_and_hyperparameters():
    module = MoEGPTModule(**TINY, learning_rate=1e-3)
    assert module.hparams.learning_rate == 1e-3 and module.hparams.num_experts == 4
    idx = torch.randint(0, 256, (2, 16))
    loss = module.next_token_loss((idx, torch.roll(idx, -1, dims=1)))
    assert loss.ndim == 0 and abs(loss.item() - math.log(256)) < 0.15


@pytest.mark.parametrize(
    ("total_steps", "step", "factor"),
    [(100, 0, 0.1), (100, 9, 1.0), (100, 10, 1.0), (100, 55, 0.55), (100, 100, 0.1), (float("inf"), 50, 1.0)],
    ids=["warmup-start", "warmup-end", "peak", "cosine-middle", "cosine-end", "no-step-limit"],
)
def test_learning_rate_schedule(total_steps, step, factor):
    module = MoEGPTModule(**TINY, warmup_steps=10, min_lr_ratio=0.1)
    module.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    assert module._lr_factor(step) == pytest.approx(factor)


def test_invalid_optimizer_settings_are_rejected():
    with pytest.raises(ValueError, match="learning_rate > 0"):
        MoEGPTModule(**TINY, learning_rate=0.0)


@pytest.mark.parametrize(
    ("clip", "precision"),
    [(None, "32-true"), (1e-3, "32-true"), (1e-3, "bf16-mixed")],
    ids=["no-clip", "clip", "clip-bf16-mixed"],
)
def test_fused_adamw_trains_and_gradient_clipping_still_applies(clip, precision):
    # Under bf16-mixed, Lightning itself refuses to clip for a fused optimizer; the module clips.
    import lightning as L

    norms = []

    class RecordClippedNorm(L.Callback):
        # After the step the gradients are still those the optimizer used, clipped.
        def on_train_batch_end(self, trainer, module, *args):
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    module = MoEGPTModule(**TINY)
    trainer = fit_on_bytes(
        module, precision=precision, max_steps=3, gradient_clip_val=clip, callbacks=[RecordClippedNorm()]
    )
    (optimizer,) = trainer.optimizers
    assert all(group["fused"] for group in optimizer.param_groups)
    assert len(norms) == 3
    if clip is None:
        assert min(norms) > 1e-2  # unclipped gradients are far larger than the clip value below
    else:
        assert max(norms) <= clip * (1 + 1e-3)


def test_fused_adamw_clips_by_value_under_bf16_mixed():
    # Lightning refuses any clipping for a fused optimizer under bf16-mixed; the module clips.
    import lightning as L

    clip = 1e-4
    largest = []

    class RecordLargest(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            largest.append(max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None))

    fit_on_bytes(
        MoEGPTModule(**TINY),
        precision="bf16-mixed",
        max_steps=2,
        gradient_clip_val=clip,
        gradient_clip_algorithm="value",
        callbacks=[RecordLargest()],
    )
    assert largest == [pytest.approx(clip, rel=1e-6)] * 2  # every gradient within the bound, some at it


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_adamw_clips_in_its_step_as_clipping_then_stepping_would(precision, monkeypatch):
    # lightning_moe's AdamW and torch's fused step divide the gradients by max(1, norm / clip)
    # themselves; the reference clips them with Lightning's own clipping before a plain (for-each)
    # torch AdamW step. (On the CPU lightning_moe's AdamW runs torch's step after dividing the
    # gradients; its kernel step is compared in tests/ops/test_adamw_cuda.py.)
    import lightning as L

    from lightning_moe.models import gpt

    clip = 1e-3
    seen = {}

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            seen.setdefault("norms", []).append(torch.nn.utils.get_total_norm(grads).item())
            # This hook runs inside the step, before the clipping; a post-hook registered now runs
            # after the update, before the module's own post-hook takes the divisor away.
            if "hooked" not in seen:
                seen["hooked"] = optimizer.register_step_post_hook(
                    lambda opt, *_: seen.setdefault("divisors", []).append(getattr(opt, "grad_scale", None))
                )

    runs = {}
    variants = {
        "torch-fused": (gpt.AdamW, True),
        "lightning_moe": (gpt.AdamW, False),
        "reference": (torch.optim.AdamW, False),
    }
    for name, (optimizer_class, fused) in variants.items():
        monkeypatch.setattr(gpt, "AdamW", optimizer_class)
        monkeypatch.setattr(MoEGPTModule, "_fused_optimizer", lambda self, fused=fused: fused)
        seen.clear()
        torch.manual_seed(0)
        module = MoEGPTModule(**TINY)
        trainer = fit_on_bytes(module, precision=precision, max_steps=3, gradient_clip_val=clip, callbacks=[Record()])
        (optimizer,) = trainer.optimizers
        assert type(optimizer) is optimizer_class
        assert all(bool(group["fused"]) == fused for group in optimizer.param_groups)
        assert min(seen["norms"]) > 10 * clip  # every step clips
        if name != "reference":
            divisors = seen["divisors"]
            assert len(divisors) == 3 and all(d is not None for d in divisors)
            for divisor, norm in zip(divisors, seen["norms"], strict=True):
                assert divisor.item() == pytest.approx(norm / clip, rel=1e-4)
            assert not hasattr(optimizer, "grad_scale")  # taken away after each step
        else:
            assert seen["divisors"] == [None, None, None]
        state = [optimizer.state[p] for p in module.parameters()]
        runs[name] = (
            [p.detach().clone() for p in module.parameters()],
            [s["exp_avg"].clone() for s in state],  # scales with the clipped gradients, unlike the update
            [p.grad.clone() for p in module.parameters()],  # clipped, in all three
        )
    for name in ("torch-fused", "lightning_moe"):
        for got, want in zip(runs[name], runs["reference"], strict=True):
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_compiled_model_gives_the_eager_loss_and_gradients_and_keeps_checkpoint_keys():
    torch.manual_seed(0)
    eager = MoEGPTModule(**TINY)
    compiled = MoEGPTModule(**TINY, compile_model=True)
    compiled.load_state_dict(eager.state_dict())  # the same keys: nothing wraps the model
    idx = torch.randint(0, 256, (2, 16))
    batch = (idx, torch.roll(idx, -1, dims=1))
    results = []
    for module in (eager, compiled):
        loss = module.next_token_loss(batch)
        results.append(
            (loss, *torch.autograd.grad(loss, [module.model.lm_head.weight, module.model.blocks[0].moe.router.weight]))
        )
    assert compiled.model._compiled_call_impl is not None
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("compile_model", "kwargs"), [(True, {}), ("reduce-overhead", {"mode": "reduce-overhead"})])
def test_compile_model_takes_a_torch_compile_mode(
    compile_model: bool | str, kwargs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(MoEGPT, "compile", lambda self, **options: calls.append(options))
    MoEGPTModule(**TINY, compile_model=compile_model)
    assert calls == [kwargs]


def test_an_unknown_compile_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="reduce-overhead"):
        MoEGPTModule(**TINY, compile_model="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("trainer_every", "accumulate", "expected_steps"),
    [(3, 1, [3, 6, 8]), (3, 2, [3, 3, 6, 6, 8, 8]), (1, 1, [1, 2, 3, 4, 5, 6, 7, 8])],
    ids=["every3", "every3-accumulate2", "every-step"],
)
def test_train_loss_is_logged_at_the_logger_steps_and_the_last(trainer_every, accumulate, expected_steps):
    """train_loss goes to the logger and progress bar at the optimizer steps whose step metrics
    Lightning writes, and at the run's last batch; not at every batch, where reading it would make
    the host wait for the GPU."""

    class RecordingModule(MoEGPTModule):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.losses, self.logged = [], []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.item())
            return loss

        def log(self, name, value, *args, **kwargs):
            if name == "train_loss":
                # The optimizer step (1-based) this batch's gradients go to.
                self.logged.append((self.trainer.global_step + 1, value.item(), kwargs.get("prog_bar")))
            super().log(name, value, *args, **kwargs)

    module = RecordingModule(**TINY)
    trainer = fit_on_bytes(module, max_steps=8, accumulate_grad_batches=accumulate, log_every_n_steps=trainer_every)
    assert len(module.losses) == 8 * accumulate
    assert [step for step, _, _ in module.logged] == expected_steps
    assert all(prog_bar for _, _, prog_bar in module.logged)
    assert trainer.progress_bar_metrics["train_loss"] == pytest.approx(module.losses[-1])


def test_training_step_runs_outside_a_trainer():
    module = MoEGPTModule(**TINY)
    inputs = torch.randint(0, 256, (2, 16))
    loss = module.training_step((inputs, inputs.roll(-1, dims=1)), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)

"""ExpertLoadMonitor in short Trainer runs: counts, metrics, heatmaps on disk and in TensorBoard."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE, MoELightningModule
from lightning_moe.callbacks import ExpertLoadMonitor, routing_entropy
from lightning_moe.plotting import plot_load
from lightning_moe.routers import SigmoidRouter

BATCH, E, TOP_K = 8, 4, 2


class TwoLayers(MoELightningModule):
    """A dropless layer and a layer with a small capacity, so one drops and the other does not."""

    def __init__(self) -> None:
        super().__init__()
        self.moes = torch.nn.ModuleList(
            [MoE(6, E, TOP_K, d_hidden=8), MoE(6, E, TOP_K, d_hidden=8, capacity_factor=0.5)]
        )

    def training_step(self, batch, batch_idx):
        (x,) = batch
        for moe in self.moes:
            x = x + moe(x)
        return x.square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, max_steps: int, every_n_steps: int, accumulate: int = 1, logger=None) -> Trainer:
    torch.manual_seed(0)
    x = torch.randn(BATCH * max_steps * accumulate, 6)
    trainer = Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        logger=logger if logger is not None else CSVLogger(tmp_path),
        callbacks=[ExpertLoadMonitor(every_n_steps=every_n_steps)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TwoLayers(), DataLoader(TensorDataset(x), batch_size=BATCH))
    return trainer


def read_records(trainer: Trainer) -> list[dict]:
    path = Path(trainer.log_dir) / "expert_load" / "counts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counts_metrics_and_pngs_every_n_steps(tmp_path: Path) -> None:
    trainer = fit(tmp_path, max_steps=5, every_n_steps=2, accumulate=2)
    records = read_records(trainer)
    # Steps 2 and 4, then the remainder (step 5) at the end of training.
    assert [(r["first_step"], r["step"]) for r in records] == [(1, 2), (3, 4), (5, 5)]
    for record, steps in zip(records, (2, 2, 1), strict=True):
        assert record["layers"] == ["moes.0", "moes.1"]
        expected = steps * 2 * BATCH * TOP_K  # two micro-batches per step
        assert [sum(row) for row in record["tokens_per_expert"]] == [expected, expected]
        assert record["assignments"] == [expected, expected]
        assert record["dropped"][0] == 0 and record["dropped"][1] > 0
        assert all(0 < h <= math.log(E) + 1e-6 for h in record["router_entropy"])
    pngs = sorted(p.name for p in (Path(trainer.log_dir) / "expert_load").glob("*.png"))
    assert pngs == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]

    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    logged = {int(row["step"]): row for row in rows if row.get("moe/layer1/drop_rate")}
    assert sorted(logged) == [2, 4, 5]
    assert float(logged[2]["moe/layer0/drop_rate"]) == 0.0
    assert float(logged[2]["moe/layer1/drop_rate"]) == records[0]["dropped"][1] / records[0]["assignments"][1]
    assert float(logged[4]["moe/layer0/router_entropy"]) == pytest.approx(records[1]["router_entropy"][0])

    assert plot_load(tmp_path, tmp_path / "again.png", step=4).stat().st_size > 0


def test_tensorboard_gets_the_image_and_no_png_is_written(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path)
    images = []
    monkeypatch.setattr(
        logger.experiment,
        "add_image",
        lambda tag, image, step, dataformats: images.append((tag, image, step, dataformats)),
    )
    trainer = fit(tmp_path, max_steps=2, every_n_steps=1, logger=logger)
    assert [(tag, step, fmt) for tag, _, step, fmt in images] == [
        ("moe/expert_load", 1, "HWC"),
        ("moe/expert_load", 2, "HWC"),
    ]
    assert images[0][1].dtype == torch.uint8 and images[0][1].shape[-1] == 3
    directory = Path(trainer.log_dir) / "expert_load"
    assert not list(directory.glob("*.png")) and len(read_records(trainer)) == 2


def test_routing_entropy_is_log_e_for_a_uniform_router() -> None:
    for router in (MoE(6, E, TOP_K).router, SigmoidRouter(6, E, TOP_K)):
        with torch.no_grad():
            router.weight.zero_()
        torch.testing.assert_close(routing_entropy(router, torch.randn(5, 6)), torch.full((5,), math.log(E)))


def test_every_n_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        ExpertLoadMonitor(every_n_steps=0)

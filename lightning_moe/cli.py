"""The ``lightning-moe`` command: LightningCLI over the built-in MoE GPT and byte corpus.

``lightning-moe fit`` with no other argument trains :class:`~lightning_moe.models.MoEGPTModule`
on Python's help topics (:class:`~lightning_moe.data.ByteCorpusDataModule`) in a few minutes on
a laptop CPU, or on a GPU when there is one. Every LightningCLI option works as usual:
``--config``, ``--print_config``, ``--trainer.*``, ``--model.*``, ``--data.*``, and the
``validate``/``test``/``predict`` subcommands. Logs, checkpoints and the resolved ``config.yaml``
go to ``lightning_logs/version_N/``.

Two tools share the command:

- ``lightning-moe consolidate IN OUT`` writes a sharded MoEStrategy checkpoint as one file with
  every expert, for single-device inference or fine-tuning.
- ``lightning-moe plot-load LOGDIR [--out PNG] [--step N]`` draws again the expert-load heatmap
  that :class:`~lightning_moe.callbacks.ExpertLoadMonitor` logged under ``LOGDIR``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_moe.data import ByteCorpusDataModule
from lightning_moe.models import MoEGPTModule

# Sized by measurement: the default model reaches a validation loss well under 2.5 nats per byte
# (from ln 256 = 5.5 at initialisation) in a few minutes on two CPU cores.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "max_steps": 400,
    # The validation tail is small (12 batches of the default corpus), so it is evaluated whole.
    "val_check_interval": 50,
    "log_every_n_steps": 10,
    "gradient_clip_val": 1.0,
}

SEED = 1337


class MoECLI(LightningCLI):
    """LightningCLI whose model context length follows the data's window length."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One setting for the window length, so the data can never outgrow the position embedding.
        parser.link_arguments("data.block_size", "model.block_size")


def main(args: list[str] | dict[str, Any] | None = None) -> None:
    """Run the ``lightning-moe`` command.

    Args:
        args: Command-line arguments, e.g. ``["fit", "--trainer.max_steps", "10"]``; ``None``
            reads ``sys.argv``.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] and argv[0] in TOOLS:
        TOOLS[argv[0]](argv[1:])
        return
    MoECLI(
        MoEGPTModule,
        ByteCorpusDataModule,
        seed_everything_default=SEED,
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
    )


def consolidate_main(args: list[str]) -> None:
    """``lightning-moe consolidate IN OUT``: one checkpoint file with all experts."""
    from lightning_moe.checkpoint import write_consolidated

    parser = argparse.ArgumentParser(
        prog="lightning-moe consolidate",
        description="Write a sharded MoEStrategy checkpoint as one Lightning checkpoint file with every expert.",
    )
    parser.add_argument("checkpoint", help="the checkpoint directory MoEStrategy wrote")
    parser.add_argument("out", help="the file to write")
    options = parser.parse_args(args)
    try:
        write_consolidated(options.checkpoint, options.out)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {options.out}")


def plot_load_main(args: list[str]) -> None:
    """``lightning-moe plot-load LOGDIR [--out PNG] [--step N]``: draw a logged expert-load heatmap again."""
    from lightning_moe.plotting import plot_load

    parser = argparse.ArgumentParser(
        prog="lightning-moe plot-load", description="Draw the expert-load heatmap logged by ExpertLoadMonitor."
    )
    parser.add_argument("logdir", help="a run's log directory, a directory above it (newest run), or a counts.jsonl")
    parser.add_argument("--out", default="expert_load.png", help="the PNG to write (default: expert_load.png)")
    parser.add_argument("--step", type=int, default=None, help="the logged step to draw (default: the last one)")
    options = parser.parse_args(args)
    try:
        written = plot_load(options.logdir, options.out, options.step)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {written}")


TOOLS: dict[str, Callable[[list[str]], None]] = {"consolidate": consolidate_main, "plot-load": plot_load_main}


if __name__ == "__main__":
    main()

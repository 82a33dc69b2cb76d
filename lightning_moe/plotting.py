"""Expert-load heatmaps: layers x experts, coloured by each expert's share of its layer's tokens.

:class:`~lightning_moe.callbacks.ExpertLoadMonitor` appends one record per logging interval to
``<log dir>/expert_load/counts.jsonl``; :func:`plot_load` (the ``lightning-moe plot-load``
command) draws any of them again afterwards. Pictures are drawn with matplotlib when it is
installed, and otherwise by a small built-in rasteriser (its own 5x7 pixel font, PNG written with
``zlib``), so a heatmap can always be produced.

The colours diverge around the balanced share ``1/E``: white is balanced, red overloaded, blue
underloaded, so an imbalanced layer stands out at a glance.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LOAD_DIRNAME = "expert_load"
COUNTS_FILENAME = "counts.jsonl"

_BLUE, _WHITE, _RED, _GREY = (33, 102, 172), (247, 247, 247), (178, 24, 43), (200, 200, 200)


def load_shares(tokens_per_expert: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each layer's counts divided by the layer's total (all zeros stay zero)."""
    return [[count / max(sum(row), 1e-12) for count in row] for row in tokens_per_expert]


def record_title(record: dict[str, Any]) -> str:
    """The heatmap title of a logged record: its step range."""
    first, last = record.get("first_step", record["step"]), record["step"]
    steps = f"step {last}" if first >= last else f"steps {first}-{last}"
    return f"Expert load, training {steps}"


def render_load_heatmap(tokens_per_expert: Sequence[Sequence[float]], title: str) -> Tensor:
    """Draw the layers x experts heatmap of token shares.

    Args:
        tokens_per_expert: One row of counts per MoE layer (rows may differ in length).
        title: Title above the picture.

    Returns:
        (H, W, 3) uint8 image.
    """
    shares = load_shares(tokens_per_expert)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _render_raster(shares, title)
    return _render_matplotlib(shares, title)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 image as a PNG file, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path


def encode_png(image: Tensor) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image (8-bit RGB, no filtering, zlib-compressed)."""
    height, width, _ = image.shape
    data = image.contiguous().cpu().numpy().tobytes()
    row_bytes = 3 * width
    raw = b"".join(b"\x00" + data[y * row_bytes : (y + 1) * row_bytes] for y in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def read_load_records(logdir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """The records of the newest ``expert_load/counts.jsonl`` under ``logdir`` (or that file itself)."""
    logdir = Path(logdir)
    if logdir.is_file():
        found = [logdir]
    else:
        found = sorted(logdir.rglob(f"{LOAD_DIRNAME}/{COUNTS_FILENAME}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"No {LOAD_DIRNAME}/{COUNTS_FILENAME} under {logdir}; train with the ExpertLoadMonitor callback "
            "(lightning_moe.callbacks) to log expert loads, and pass its log directory."
        )
    path = found[-1]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records yet; it gets one every every_n_steps training steps.")
    return path, records


def plot_load(logdir: str | Path, out_png: str | Path, step: int | None = None) -> Path:
    """Draw the expert-load heatmap logged by ``ExpertLoadMonitor`` again.

    Args:
        logdir: A run's log directory (or any directory above it: the newest run found is used),
            or a ``counts.jsonl`` file.
        out_png: Where to write the PNG.
        step: The logged step to draw; ``None`` for the last one.

    Returns:
        The path of the PNG written.
    """
    path, records = read_load_records(logdir)
    if step is None:
        record = records[-1]
    else:
        matching = [r for r in records if r["step"] == step]
        if not matching:
            steps = ", ".join(str(r["step"]) for r in records)
            raise ValueError(f"{path} has no record of step {step}; logged steps: {steps}.")
        record = matching[-1]
    return save_png(render_load_heatmap(record["tokens_per_expert"], record_title(record)), out_png)


def _color_scale(shares: list[list[float]]) -> tuple[float, float]:
    """(balanced share, top of the scale): the scale is centred on 1/E and reaches at least 2/E."""
    widths = [len(row) for row in shares if row]
    balanced = sum(1.0 / w for w in widths) / max(len(widths), 1)
    top = max([2 * balanced] + [value for row in shares for value in row])
    return balanced, top


def _render_matplotlib(shares: list[list[float]], title: str) -> Tensor:
    import numpy
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    num_layers, num_experts = len(shares), max(len(row) for row in shares)
    grid = [[row[e] if e < len(row) else math.nan for e in range(num_experts)] for row in shares]
    balanced, top = _color_scale(shares)
    figure = Figure(
        figsize=(min(14.0, max(5.0, 2.2 + 0.42 * num_experts)), min(10.0, max(2.6, 1.5 + 0.42 * num_layers))), dpi=110
    )
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=top)
    heatmap = axes.imshow(grid, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_title(title)
    axes.set_xticks(range(0, num_experts, max(1, num_experts // 16)))
    axes.set_yticks(range(0, num_layers, max(1, num_layers // 16)))
    if num_experts <= 24 and num_layers <= 24:
        for layer, row in enumerate(shares):
            for expert, value in enumerate(row):
                strong = abs(norm(value) - 0.5) > 0.3
                color = "white" if strong else "black"
                axes.text(expert, layer, _percent(value), ha="center", va="center", fontsize=7, color=color)
    colorbar = figure.colorbar(heatmap, ax=axes)
    colorbar.set_label("share of the layer's\ntoken assignments")
    colorbar.set_ticks([0.0, balanced, top])
    colorbar.set_ticklabels(["0%", f"{100 * balanced:.3g}% = 1/E", f"{100 * top:.3g}%"])
    figure.tight_layout()
    canvas.draw()
    return torch.from_numpy(numpy.asarray(canvas.buffer_rgba())[..., :3].copy())


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%" if value >= 0.1 or value == 0 else f"{100 * value:.1f}%"


def _diverging(value: float, balanced: float, top: float) -> tuple[int, int, int]:
    """RdBu_r-like colour: blue at 0, white at ``balanced``, red at ``top``."""
    if math.isnan(value):
        return _GREY
    if value <= balanced:
        t, low, high = value / max(balanced, 1e-12), _BLUE, _WHITE
    else:
        t, low, high = min(1.0, (value - balanced) / max(top - balanced, 1e-12)), _WHITE, _RED
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high, strict=True))  # type: ignore[return-value]


class _Canvas:
    """An RGB pixel buffer with rectangles and 5x7 pixel text."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (3 * width * height))

    def fill(self, x: int, y: int, w: int, h: int, rgb: tuple[int, int, int]) -> None:
        x0, x1 = max(x, 0), min(x + w, self.width)
        if x1 <= x0:
            return
        run = bytes(rgb) * (x1 - x0)
        for row in range(max(y, 0), min(y + h, self.height)):
            start = 3 * (row * self.width + x0)
            self.pixels[start : start + len(run)] = run

    def text(self, x: int, y: int, text: str, scale: int = 2, rgb: tuple[int, int, int] = (0, 0, 0)) -> None:
        for i, char in enumerate(text.upper()):
            rows = _FONT.get(char, _FONT["?"]).split("|")
            for r, row in enumerate(rows):
                for c, bit in enumerate(row):
                    if bit == "#":
                        self.fill(x + (6 * i + c) * scale, y + r * scale, scale, scale, rgb)

    def image(self) -> Tensor:
        return torch.frombuffer(self.pixels, dtype=torch.uint8).view(self.height, self.width, 3).clone()


def _text_width(text: str, scale: int = 2) -> int:
    return (6 * len(text) - 1) * scale


def _render_raster(shares: list[list[float]], title: str) -> Tensor:
    """The same heatmap without matplotlib: cells, labels, and a colour bar, in pixels."""
    num_layers, num_experts = len(shares), max(len(row) for row in shares)
    balanced, top = _color_scale(shares)
    cell_w = min(56, max(14, 640 // num_experts))
    cell_h = min(40, max(16, 360 // num_layers))
    left = _text_width(f"LAYER {num_layers - 1}") + 16
    grid_x, grid_y = left, 44
    grid_w, grid_h = cell_w * num_experts, cell_h * num_layers
    bar_x = grid_x + grid_w + 24
    width = max(bar_x + 28 + _text_width("12.5% = 1/E") + 12, _text_width(title) + 24)
    height = grid_y + max(grid_h, 150) + 60
    canvas = _Canvas(width, height)
    canvas.text(max(8, (width - _text_width(title)) // 2), 12, title)
    for layer, row in enumerate(shares):
        y = grid_y + layer * cell_h
        label = f"layer {layer}"
        canvas.text(left - 10 - _text_width(label), y + (cell_h - 14) // 2, label)
        for expert in range(num_experts):
            value = row[expert] if expert < len(row) else math.nan
            x = grid_x + expert * cell_w
            rgb = _diverging(value, balanced, top)
            canvas.fill(x, y, cell_w - 1, cell_h - 1, rgb)
            text = _percent(value) if not math.isnan(value) else ""
            if _text_width(text, 1) + 4 <= cell_w and cell_h >= 11:
                ink = (255, 255, 255) if sum(rgb) < 380 else (0, 0, 0)
                canvas.text(x + (cell_w - _text_width(text, 1)) // 2, y + (cell_h - 7) // 2, text, 1, ink)
    _draw_expert_axis(canvas, grid_x, grid_y + grid_h, cell_w, num_experts)
    _draw_colour_bar(canvas, bar_x, grid_y, max(grid_h, 150), balanced, top)
    return canvas.image()


def _draw_expert_axis(canvas: _Canvas, x: int, y: int, cell_w: int, num_experts: int) -> None:
    every = max(1, math.ceil((_text_width(str(num_experts - 1)) + 8) / cell_w))
    for expert in range(0, num_experts, every):
        label = str(expert)
        canvas.text(x + expert * cell_w + (cell_w - _text_width(label)) // 2, y + 6, label)
    canvas.text(x + (cell_w * num_experts - _text_width("expert")) // 2, y + 28, "expert")


def _draw_colour_bar(canvas: _Canvas, x: int, y: int, height: int, balanced: float, top: float) -> None:
    for row in range(height):
        canvas.fill(x, y + row, 18, 1, _diverging(top * (1 - row / (height - 1)), balanced, top))
    for value, label in ((top, f"{100 * top:.3g}%"), (balanced, f"{100 * balanced:.3g}% = 1/E"), (0.0, "0%")):
        tick_y = y + round((1 - value / top) * (height - 1))
        canvas.fill(x, tick_y, 18, 1, (0, 0, 0))  # a line across the bar, not a tick that reads as a minus
        canvas.text(x + 26, min(max(tick_y - 7, y - 7), y + height - 7), label)
    canvas.text(x - 4, y + height + 10, "share")


# A 5x7 pixel font: rows top to bottom, '#' set. Lowercase text is drawn in capitals.
_FONT = {
    " ": ".....|.....|.....|.....|.....|.....|.....",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "####.|....#|....#|.###.|....#|....#|####.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "###..|#..#.|#...#|#...#|#...#|#..#.|###..",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "-": ".....|.....|.....|.###.|.....|.....|.....",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "'": "..#..|..#..|.#...|.....|.....|.....|.....",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
}

"""Heatmap drawing, the built-in PNG writer, and plot_load from logged counts."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

from lightning_moe.plotting import encode_png, load_shares, plot_load, render_load_heatmap, save_png

COUNTS = [[10, 10, 10, 10], [40, 0, 0, 0], [5, 15, 5, 15]]


def decode_png(data: bytes) -> torch.Tensor:
    """Decode the 8-bit RGB, unfiltered PNGs that encode_png writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        tag, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        position += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color_type) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (3 * width + 1) + 1 : (y + 1) * (3 * width + 1)] for y in range(height)]
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).view(height, width, 3)


@pytest.fixture
def without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError


def test_png_round_trip() -> None:
    image = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8)
    assert torch.equal(decode_png(encode_png(image)), image)


def test_load_shares_normalises_each_layer() -> None:
    assert load_shares([[1, 3], [0, 0]]) == [[0.25, 0.75], [0.0, 0.0]]


def test_raster_fallback_draws_cells_title_and_colour_bar(without_matplotlib) -> None:
    image = render_load_heatmap(COUNTS, "Expert load, training steps 1-50")
    height, width, _ = image.shape
    assert height > 150 and width > 300
    reds = ((image[..., 0] > 150) & (image[..., 1] < 80) & (image[..., 2] < 90)).sum()
    blues = ((image[..., 2] > 150) & (image[..., 0] < 80)).sum()
    dark = (image.int().sum(-1) < 100).sum()  # text
    assert reds > 100 and blues > 100 and dark > 500


def test_layers_of_different_widths(without_matplotlib) -> None:
    image = render_load_heatmap([[1, 2, 3, 4], [1, 1]], "mixed")
    assert image.dtype == torch.uint8 and image.shape[-1] == 3


def test_matplotlib_rendering() -> None:
    pytest.importorskip("matplotlib")
    image = render_load_heatmap(COUNTS, "Expert load, training step 7")
    assert image.dtype == torch.uint8 and image.shape[-1] == 3 and image.shape[0] > 200


def write_counts(logdir: Path, steps: list[int]) -> Path:
    directory = logdir / "lightning_logs" / "version_0" / "expert_load"
    directory.mkdir(parents=True)
    records = [
        {"step": step, "first_step": step - 9, "layers": ["a", "b", "c"], "tokens_per_expert": COUNTS} for step in steps
    ]
    path = directory / "counts.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_plot_load_draws_a_logged_step(tmp_path: Path, without_matplotlib) -> None:
    write_counts(tmp_path, [10, 20])
    out = plot_load(tmp_path, tmp_path / "load.png", step=10)
    assert decode_png(out.read_bytes()).shape[-1] == 3
    out_last = plot_load(tmp_path / "lightning_logs" / "version_0", tmp_path / "last.png")
    assert out_last.exists()
    with pytest.raises(ValueError, match="logged steps: 10, 20"):
        plot_load(tmp_path, tmp_path / "x.png", step=15)


def test_plot_load_without_logs_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ExpertLoadMonitor"):
        plot_load(tmp_path, tmp_path / "x.png")


def test_save_png_creates_the_directory(tmp_path: Path) -> None:
    path = save_png(torch.zeros(2, 2, 3, dtype=torch.uint8), tmp_path / "a" / "b.png")
    assert decode_png(path.read_bytes()).shape == (2, 2, 3)


def test_plot_load_command(tmp_path: Path, without_matplotlib, capsys) -> None:
    from lightning_moe import cli

    write_counts(tmp_path, [10])
    cli.main(["plot-load", str(tmp_path), "--out", str(tmp_path / "cli.png")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "cli.png").exists()
    with pytest.raises(SystemExit):
        cli.main(["plot-load", str(tmp_path), "--step", "3"])

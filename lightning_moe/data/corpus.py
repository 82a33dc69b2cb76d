"""A byte-level text corpus that ships with Python, and windows of it for language modelling.

Shape legend: B batch, S window length (``block_size``).

The default corpus is the text of Python's interactive help topics (``pydoc_data.topics``),
about 465 KB of English prose and code that every CPython installation carries: training starts
without a download, and the same bytes are there on every machine. Bytes are the tokens, so
the vocabulary is 256 and no tokenizer is needed.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from typing_extensions import override


def pydoc_corpus() -> bytes:
    """The UTF-8 text of Python's help topics, joined in sorted topic order (about 465 KB)."""
    from pydoc_data.topics import topics

    return "".join(topics[name] for name in sorted(topics)).encode("utf-8")


class ByteWindows(Dataset[tuple[Tensor, Tensor]]):
    """Windows of ``block_size`` bytes and the same windows shifted one byte ahead.

    Window i starts at byte ``i * stride``; stride 1 gives every window, stride ``block_size``
    gives non-overlapping ones.

    Args:
        data: (L,) uint8 bytes, L > ``block_size``.
        block_size: Window length S.
        stride: Bytes between the starts of consecutive windows.
    """

    def __init__(self, data: Tensor, block_size: int, stride: int = 1) -> None:
        self.data = data
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        # A window needs block_size + 1 bytes: its inputs and, one byte later, its targets.
        return max(0, (self.data.numel() - self.block_size - 1) // self.stride + 1)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """(S,) int64 input bytes and (S,) int64 target bytes of window ``index``."""
        start = index * self.stride
        chunk = self.data[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class ByteCorpusDataModule(LightningDataModule):
    """Next-byte prediction batches from a text: random windows to train, fixed ones to validate.

    The first ``1 - val_fraction`` of the bytes are for training, the rest for validation, so no
    validation byte is ever trained on. A training epoch is ``train_samples_per_epoch`` windows
    drawn at random offsets (with replacement) through the global RNG, which ``seed_everything``
    makes reproducible. Validation walks the non-overlapping windows of the held-out bytes in
    order, the same ones every time.

    Args:
        block_size: Window length S; at most the model's ``block_size``.
        batch_size: Windows per batch B.
        val_fraction: Fraction of the bytes, at the end of the text, held out for validation.
        train_samples_per_epoch: Random training windows per epoch.
        num_workers: DataLoader worker processes.
        text: The text to model; ``None`` for Python's help topics (:func:`pydoc_corpus`).
    """

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        train_samples_per_epoch: int = 32_000,
        num_workers: int = 0,
        text: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("train_samples_per_epoch", train_samples_per_epoch),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; 0.1 is typical.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.train_samples_per_epoch = train_samples_per_epoch
        self.num_workers = num_workers
        self.text = text
        self.train_data: Tensor | None = None
        self.val_data: Tensor | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        """Split the corpus bytes into the training head and the validation tail."""
        if self.train_data is not None:
            return
        corpus = pydoc_corpus() if self.text is None else self.text.encode("utf-8")
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
        split = int(len(data) * (1.0 - self.val_fraction))
        train_data, val_data = data[:split], data[split:]
        for name, part in (("training", train_data), ("validation", val_data)):
            if part.numel() <= self.block_size:
                raise ValueError(
                    f"The {name} part of the text has {part.numel()} bytes, fewer than block_size + 1 = "
                    f"{self.block_size + 1}; give a longer text, a smaller block_size or another val_fraction."
                )
        self.train_data, self.val_data = train_data, val_data

    def train_dataset(self) -> ByteWindows:
        """Every window of the training bytes (stride 1); the sampler picks among them."""
        self.setup()
        assert self.train_data is not None
        return ByteWindows(self.train_data, self.block_size, stride=1)

    def val_dataset(self) -> ByteWindows:
        """The non-overlapping windows of the validation bytes."""
        self.setup()
        assert self.val_data is not None
        return ByteWindows(self.val_data, self.block_size, stride=self.block_size)

    @override
    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        sampler = RandomSampler(dataset, replacement=True, num_samples=self.train_samples_per_epoch)
        return self._loader(dataset, sampler=sampler, drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), sampler=None, drop_last=False)

    def _loader(self, dataset: ByteWindows, sampler: RandomSampler | None, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

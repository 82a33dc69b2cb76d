"""Data modules for the built-in models; none downloads anything."""

from lightning_moe.data.corpus import ByteCorpusDataModule, ByteWindows, pydoc_corpus

__all__ = ["ByteCorpusDataModule", "ByteWindows", "pydoc_corpus"]

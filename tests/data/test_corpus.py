import socket

import pytest
import torch

from lightning_moe.data import ByteCorpusDataModule, ByteWindows, pydoc_corpus


def test_pydoc_corpus_loads_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the corpus must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    corpus = pydoc_corpus()
    assert isinstance(corpus, bytes) and len(corpus) > 300_000
    assert corpus == pydoc_corpus()


def test_windows_are_targets_shifted_by_one_byte():
    data = torch.arange(20, dtype=torch.uint8)
    windows = ByteWindows(data, block_size=4, stride=3)
    assert len(windows) == 6  # starts 0, 3, ..., 15; the last needs bytes 15..19
    inputs, targets = windows[5]
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [15, 16, 17, 18]
    assert targets.tolist() == [16, 17, 18, 19]


def test_split_holds_the_last_bytes_out_of_training():
    datamodule = ByteCorpusDataModule(block_size=64, val_fraction=0.1)
    datamodule.setup("fit")
    corpus = pydoc_corpus()
    train, val = datamodule.train_data, datamodule.val_data
    assert bytes(torch.cat([train, val]).tolist()) == corpus
    assert val.numel() == len(corpus) - int(len(corpus) * 0.9)
    # The last training window ends inside the training bytes.
    train_windows = datamodule.train_dataset()
    assert (len(train_windows) - 1) + 64 + 1 == train.numel()


def test_validation_windows_are_fixed_and_do_not_overlap():
    first, second = ByteCorpusDataModule(block_size=64), ByteCorpusDataModule(block_size=64)
    torch.manual_seed(0)
    batches = list(first.val_dataloader())
    torch.manual_seed(1)
    for batch, other in zip(batches, second.val_dataloader(), strict=True):
        assert torch.equal(batch[0], other[0]) and torch.equal(batch[1], other[1])
    inputs = torch.cat([inputs for inputs, _ in batches])
    assert torch.equal(inputs.flatten(), first.val_data[: inputs.numel()].long())


def test_training_epoch_is_a_fixed_number_of_random_windows():
    datamodule = ByteCorpusDataModule(block_size=32, batch_size=8, train_samples_per_epoch=40)
    torch.manual_seed(0)
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 5
    inputs, targets = batches[0]
    assert inputs.shape == targets.shape == (8, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    torch.manual_seed(0)
    assert torch.equal(next(iter(datamodule.train_dataloader()))[0], inputs)


def test_custom_text():
    datamodule = ByteCorpusDataModule(block_size=4, batch_size=2, text="héllo wörld " * 10)
    datamodule.setup()
    assert datamodule.train_data.numel() + datamodule.val_data.numel() == len(("héllo wörld " * 10).encode())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "too short"}, "longer text"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
    ],
    ids=["short-text", "no-validation", "empty-batch"],
)
def test_invalid_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ByteCorpusDataModule(**kwargs).setup()

"""`train` leaves out the ID validation images that tuning holds out of the training split, and records which."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import oodforge.training.loop as loop
from oodforge.data.benchmarks import get_benchmark
from oodforge.models.classifier import CheckpointError, read_checkpoint
from oodforge.models.loading import held_out_record
from oodforge.training.config import LAST_CHECKPOINT, MODEL_CHECKPOINT, TrainConfig
from test_bring_your_own import make_folder

CLASSES = {"ash": 12, "elm": 10, "oak": 8}  # 30 training images, in this order in the folder dataset
HELD = [10, 11, 20, 21, 28, 29]  # 20% of 30 = 6 < 1000: the last 2 images of each class


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


def tiny_benchmark(root: Path, val_id: bool = False) -> Path:
    """A YAML benchmark of 16x16 image folders: ``CLASSES`` training images, a separate val.id set if asked."""
    make_folder(root / "id" / "train", CLASSES, seed=0)
    make_folder(root / "id" / "test", {"ash": 3, "elm": 3, "oak": 3}, seed=1)
    make_folder(root / "ood", {"x": 6}, seed=5)
    config = {"name": "tiny", "id": {"train": "folder:id/train", "test": "folder:id/test"}, "ood": {"a": "folder:ood"},
              "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "backbone": "small_cnn"}
    if val_id:
        make_folder(root / "id" / "val", {"ash": 2, "elm": 2, "oak": 2}, seed=2)
        config["val"] = {"id": "folder:id/val"}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def spy(monkeypatch) -> dict:
    """Records the real images ``train`` trains on and the size the batch sampler is given."""
    seen: dict = {}
    original_data, original_sampler = loop.training_data, loop.MixedBatchSampler

    def training_data(config, benchmark):
        data = original_data(config, benchmark)
        seen["real"] = data.real
        return data

    def sampler(n_real, *args, **kwargs):
        seen["n_real"] = n_real
        return original_sampler(n_real, *args, **kwargs)

    monkeypatch.setattr(loop, "training_data", training_data)
    monkeypatch.setattr(loop, "MixedBatchSampler", sampler)
    return seen


def config(path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"benchmark": str(path), "epochs": 1, "batch_size": 8, "lr": 0.01,
                          "accelerator": "cpu", "precision": "32-true", **kw})


def test_training_leaves_out_the_validation_images_and_records_them(tmp_path, spy) -> None:
    path = tiny_benchmark(tmp_path)
    out = tmp_path / "run"
    loop.train(config(path), out, quiet=True)
    expected = {"images": 6, "of_train": 30, "rule": "min(1000, 20% of the training split)",
                "indices_sha256": hashlib.sha256(np.array(HELD, dtype="<i8").tobytes()).hexdigest(),
                "source": f"folder:{tmp_path / 'id' / 'train'}"}
    assert held_out_record(out / MODEL_CHECKPOINT) == expected
    assert held_out_record(out / LAST_CHECKPOINT) == expected
    assert json.loads((out / "train.json").read_text())["held_out"] == expected
    assert spy["n_real"] == len(spy["real"]) == 30 - 6
    bench = get_benchmark(str(path))
    train = bench.id_set("train")
    val_id = bench.split_train()[1]
    assert np.array_equal(val_id.images, train.images[HELD])  # the record's indices are split_train's
    trained = {d.tobytes() for d in spy["real"].item_digests()}
    assert trained == {d.tobytes() for i, d in enumerate(train.item_digests()) if i not in HELD}


def test_train_subset_takes_its_class_balanced_head_of_the_remaining_images(tmp_path, spy) -> None:
    path = tiny_benchmark(tmp_path)
    loop.train(config(path, train_subset=21), tmp_path / "run", quiet=True)
    # 24 remain: ash 0-9, elm 12-19, oak 22-27; 21 taken from the classes in turn: 8 ash, 7 elm, 6 oak
    train = get_benchmark(str(path)).id_set("train")
    assert spy["n_real"] == 21
    assert np.bincount(spy["real"].labels, minlength=3).tolist() == [8, 7, 6]
    assert np.array_equal(spy["real"].images, train.images[[*range(0, 8), *range(12, 19), *range(22, 28)]])


def test_resume_refuses_a_checkpoint_of_other_training_images(tmp_path) -> None:
    path = tiny_benchmark(tmp_path)
    out = tmp_path / "run"
    loop.train(config(path, epochs=2), out, quiet=True, stop_after_epochs=1)
    last = out / LAST_CHECKPOINT
    state = read_checkpoint(last)
    del state["held_out"]  # as written before the hold-out was recorded
    torch.save(state, last)
    with pytest.raises(CheckpointError, match="was written with other training images; use a new --out or "
                                              "--no-resume"):
        loop.train(config(path, epochs=2), out, quiet=True)
    loop.train(config(path, epochs=2), out, quiet=True, resume=False, stop_after_epochs=1)
    make_folder(tmp_path / "id" / "train", {"ash": 13, "elm": 10, "oak": 8}, seed=0)  # one more ash image
    with pytest.raises(CheckpointError, match=f"{last} was written with other training images"):
        loop.train(config(path, epochs=2), out, quiet=True)
    make_folder(tmp_path / "id" / "train", CLASSES, seed=0)
    (tmp_path / "id" / "train" / "ash" / "012.png").unlink()  # back to the images it was written with
    assert [h["epoch"] for h in loop.train(config(path, epochs=2), out, quiet=True).history] == [1, 2]


def test_a_separate_val_id_set_leaves_the_training_split_whole(tmp_path, spy) -> None:
    path = tiny_benchmark(tmp_path, val_id=True)
    out = tmp_path / "run"
    loop.train(config(path), out, quiet=True)
    expected = {"separate": f"folder:{tmp_path / 'id' / 'val'}"}
    assert held_out_record(out / MODEL_CHECKPOINT) == expected
    assert json.loads((out / "train.json").read_text())["held_out"] == expected
    assert spy["n_real"] == 30


def test_held_out_record_is_none_for_other_files(tmp_path) -> None:
    assert held_out_record(None) is None and held_out_record(tmp_path / "missing.ckpt") is None
    (tmp_path / "weights.bin").write_bytes(b"not a torch file")
    torch.save({"weight": torch.zeros(2), "held_out": torch.zeros(3)}, tmp_path / "plain.pth")
    torch.save({"format": "oodforge-classifier", "extra": {"train_config": {}}}, tmp_path / "old.ckpt")
    assert all(held_out_record(tmp_path / name) is None for name in ("weights.bin", "plain.pth", "old.ckpt"))

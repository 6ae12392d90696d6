"""Training loop: checkpoints every epoch, resume after a stop or a kill, recipes with outliers / SIO."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import needs_fashion, needs_mnist_family
from oodforge.models.classifier import load_classifier, read_checkpoint
from oodforge.training.config import LAST_CHECKPOINT, MODEL_CHECKPOINT, TrainConfig
from oodforge.training.loop import train


def _config(**kw):
    return TrainConfig(**{"benchmark": "fashion_mnist", "epochs": 2, "batch_size": 64, "lr": 0.05,
                          "train_subset": 512, **kw})


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@needs_fashion
def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path):
    full = train(_config(), tmp_path / "full", quiet=True)
    partial = train(_config(), tmp_path / "cut", quiet=True, stop_after_epochs=1)
    assert read_checkpoint(tmp_path / "cut" / LAST_CHECKPOINT)["epoch"] == 1
    assert not (tmp_path / "cut" / MODEL_CHECKPOINT).exists()
    assert len(partial.history) == 1
    resumed = train(_config(), tmp_path / "cut", quiet=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == partial.history[0]  # the completed epoch is kept, not redone
    assert _same_weights(full, resumed)
    assert _same_weights(resumed, load_classifier(tmp_path / "cut" / MODEL_CHECKPOINT))


@needs_fashion
def test_resume_refuses_a_different_recipe(tmp_path):
    train(_config(), tmp_path, quiet=True, stop_after_epochs=1)
    try:
        train(_config(lr=0.01), tmp_path, quiet=True)
    except Exception as exc:  # CheckpointError
        assert "different recipe" in str(exc)
    else:
        raise AssertionError("resuming with another recipe must fail")


@needs_fashion
def test_kill_mid_run_then_resume_keeps_completed_epochs(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "oodforge", "train", "--benchmark", "fashion_mnist", "--epochs", "3",
               "--train-subset", "2048", "--batch-size", "64", "--lr", "0.05", "--detectors", "msp",
               "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / LAST_CHECKPOINT
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.exists(), process.stderr.read().decode()[-2000:] if process.poll() is not None else "no checkpoint"
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = read_checkpoint(last)
    assert 1 <= first["epoch"] < 3
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    history = json.loads((out / "train.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[: first["epoch"]] == first["history"]  # completed epochs survive the kill unchanged
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["epochs"] == 3


@needs_mnist_family
def test_outlier_exposure_and_synthetic_mix_run(tmp_path):
    """OE with MNIST-like outliers from a disjoint source and SIO with a folder of 'synthetic' images."""
    from PIL import Image

    folder = tmp_path / "syn"
    for label in range(10):
        (folder / f"{label}").mkdir(parents=True)
        Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(folder / f"{label}" / "a.png")
    model = train(_config(epochs=1, outliers="uniform", synthetic_id=f"folder:{folder}", real_ratio=0.75),
                  tmp_path / "run", quiet=True)
    assert len(model.history) == 1 and model.history[0]["loss"] > 0


def test_outliers_overlapping_a_test_ood_set_are_refused():
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.training.loop import check_outlier_source

    try:
        check_outlier_source(get_benchmark("fashion_mnist"), "mnist")
    except ValueError as exc:
        assert "mnist" in str(exc)
    else:
        raise AssertionError("mnist is a test OOD set of fashion_mnist")


@needs_fashion  # make_model reads the benchmark's class count from the test split
def test_fine_tuning_into_another_head_keeps_backbone_and_class_weights(tmp_path):
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.models.classifier import ModelConfig, build_classifier, save_classifier
    from oodforge.training.loop import make_model

    torch.manual_seed(0)
    base = build_classifier(ModelConfig(backbone="small_cnn", head="linear", mean=(0.2860,), std=(0.3530,)))
    save_classifier(base, tmp_path / "base.ckpt")
    for head in ("linear", "cosface", "adacos"):
        model = make_model(TrainConfig(head=head, init=str(tmp_path / "base.ckpt")), get_benchmark("fashion_mnist"))
        assert model.config.head == head
        for key, value in base.state_dict().items():
            if key.startswith("backbone."):
                assert torch.equal(model.state_dict()[key], value), key
        assert torch.equal(model.state_dict()["head.weight"], base.state_dict()["head.weight"])
        assert ("head.bias" in model.state_dict()) == (head == "linear")


def test_bench_path_fields_expand_variables_out_and_seed(tmp_path, monkeypatch):
    from oodforge.bench.jobs import resolve_paths

    monkeypatch.setenv("WEIGHTS_DIR", "/w")
    options = {"init": "$WEIGHTS_DIR/{seed}.th", "outliers": "synthetic:{out}/interp", "synthetic_id": None,
               "lr": 0.1, "loss": "{seed}"}
    resolved = resolve_paths(options, tmp_path, 2)
    assert resolved == {"init": "/w/2.th", "outliers": f"synthetic:{tmp_path}/interp", "synthetic_id": None,
                        "lr": 0.1, "loss": "{seed}"}
    assert options["init"] == "$WEIGHTS_DIR/{seed}.th"  # the input is not modified


def test_sample_grids_of_synthetic_sets_are_copied_with_a_prefix(tmp_path):
    from oodforge.training.loop import copy_sample_grids

    for name in ("id", "interp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "grid.png").write_bytes(name.encode())
    config = TrainConfig(synthetic_id=f"synthetic:{tmp_path / 'id'}", outliers=f"synthetic:{tmp_path / 'interp'}")
    copy_sample_grids(config, tmp_path / "out", prefix="ce_sio-")
    assert (tmp_path / "out" / "figures" / "ce_sio-synthetic-id-grid.png").read_bytes() == b"id"
    assert (tmp_path / "out" / "figures" / "ce_sio-outliers-grid.png").read_bytes() == b"interp"
    copy_sample_grids(TrainConfig(outliers="natural_patches"), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

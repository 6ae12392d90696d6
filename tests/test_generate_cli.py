"""Tiny end-to-end: generate train -> sample ID and interpolated sets -> train with SIO + OE -> score."""

import json

import numpy as np
import torch
from typer.testing import CliRunner

from conftest import needs_mnist_family
from oodforge.cli import app
from oodforge.data.datasets import load_dataset
from oodforge.generate.diffusion import load_generator
from oodforge.generate.sample_chunks import SampleChunks, job_key
from oodforge.util.precision import resolve_precision

runner = CliRunner()


def train_tiny_generator(out, subset: int, batch_size: int):
    """``generate train`` for one epoch on ``subset`` Fashion-MNIST images; returns the checkpoint path."""
    result = runner.invoke(app, ["generate", "train", "--dataset", "fashion_mnist", "--subset", str(subset),
                                 "--epochs", "1", "--batch-size", str(batch_size), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out / "diffusion.ckpt"


@needs_mnist_family
def test_generate_then_train_on_generated_data(tmp_path):
    ckpt = train_tiny_generator(tmp_path / "gen", subset=128, batch_size=64)
    sets = {}
    for kind, extra in (("id", ["--per-class", "3"]), ("interpolated", ["--n", "24", "--alpha-range", "0.4", "0.6"])):
        sets[kind] = tmp_path / kind
        result = runner.invoke(app, ["generate", "sample", "--generator", str(ckpt), "--kind", kind, "--steps", "4",
                                     "--out", str(sets[kind]), "--quiet", *extra])
        assert result.exit_code == 0, result.output
        assert (sets[kind] / "grid.png").is_file()
    synthetic_id = load_dataset(f"synthetic:{sets['id']}")
    assert synthetic_id.images.shape == (30, 28, 28, 1)
    assert np.array_equal(synthetic_id.labels, np.repeat(np.arange(10), 3))
    manifest = json.loads((sets["interpolated"] / "manifest.json").read_text())
    assert manifest["kind"] == "interpolated" and manifest["alpha_range"] == [0.4, 0.6]
    alphas = np.load(sets["interpolated"] / "alphas.npy")
    assert alphas.min() >= 0.4 and alphas.max() <= 0.6

    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--benchmark", "fashion_mnist", "--epochs", "1", "--train-subset", "256",
                                 "--synthetic-id", f"synthetic:{sets['id']}", "--real-ratio", "0.75",
                                 "--outliers", f"synthetic:{sets['interpolated']}", "--head", "cosface",
                                 "--detectors", "msp,cosine", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert {r["detector"] for r in results["results"]} == {"msp", "cosine"}
    assert results["train"]["synthetic_id"].startswith("synthetic:")
    assert (out / "figures" / "synthetic-id-grid.png").is_file()
    assert "synthetic-id-grid.png" in (out / "report.html").read_text()


def test_sample_rejects_a_bad_kind_and_a_missing_generator(tmp_path):
    result = runner.invoke(app, ["generate", "sample", "--generator", str(tmp_path / "none.ckpt"), "--kind", "id",
                                 "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "none.ckpt" in result.output
    result = runner.invoke(app, ["generate", "sample", "--generator", str(tmp_path / "none.ckpt"), "--kind", "odd",
                                 "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "--kind" in result.output


def test_generate_train_on_cifar10_takes_the_cpu_preset_and_refuses_an_unknown_one(tmp_path):
    from conftest import real_root

    real_root("cifar10-jpeg.tar.gz")
    result = runner.invoke(app, ["generate", "train", "--dataset", "cifar10", "--preset", "tpu", "--out",
                                 str(tmp_path / "bad"), "--quiet"])
    assert result.exit_code == 2 and "--preset" in result.output and "tpu" in result.output
    assert not (tmp_path / "bad" / "diffusion.ckpt").exists()
    gen = tmp_path / "gen"
    result = runner.invoke(app, ["generate", "train", "--dataset", "cifar10", "--subset", "20", "--epochs", "1",
                                 "--batch-size", "10", "--device", "cpu", "--out", str(gen), "--quiet"])
    assert result.exit_code == 0, result.output
    config = torch.load(gen / "diffusion.ckpt", weights_only=False, map_location="cpu")["config"]
    assert config["channels"] == 3 and config["image_size"] == 32  # auto on a CPU: the cpu preset
    assert tuple(config["block_out_channels"]) == (64, 128, 128) and config["epochs"] == 1


@needs_mnist_family
def test_sample_resumes_from_batches_beside_out_and_removes_them_when_done(tmp_path):
    ckpt = train_tiny_generator(tmp_path / "gen", subset=64, batch_size=32)
    args = ["generate", "sample", "--generator", str(ckpt), "--kind", "id", "--per-class", "1",
            "--steps", "2", "--batch-size", "4", "--quiet"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert result.exit_code == 0, result.output
    whole = np.load(tmp_path / "whole" / "images.npy")
    assert not (tmp_path / ".whole.batches").exists()  # removed once the set is written

    batches = tmp_path / ".part.batches"  # as an interrupted run of the same job would have left them
    model = load_generator(ckpt, device="cpu")
    bf16 = resolve_precision("auto", model.device) == "bf16-mixed"  # what the CLI samples with
    with torch.no_grad():
        vectors = model.model.embed(torch.arange(10))
    store = SampleChunks(batches, job_key(model.model_hash, vectors, 0, 2.0, 2, 4, bf16)).open()
    marked = whole[:4].copy()
    marked[:, 0, 0, 0] = 7  # ... marked, to see that they are reused rather than recomputed
    store.save(0, marked)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "part")])
    assert result.exit_code == 0, result.output
    part = np.load(tmp_path / "part" / "images.npy")
    np.testing.assert_array_equal(part[:4], marked)
    np.testing.assert_array_equal(part[4:], whole[4:])
    assert not batches.exists()

    foreign = tmp_path / ".other.batches"
    SampleChunks(foreign, {"model_hash": "elsewhere"}).open()
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and ".other.batches" in result.output and "another sampling job" in result.output
    assert not (tmp_path / "other").exists()
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "other"), "--no-resume"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "other" / "images.npy"), whole)

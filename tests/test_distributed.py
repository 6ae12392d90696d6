"""Issue 14, item 2: extraction over 2 CPU processes (gloo) equals one process, with no duplicated or dropped
row; DDP training on 2 CPU processes from the command line writes its checkpoint once and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_fabric import Fabric
from torch import nn

from conftest import has_real
from oodforge.data.imageset import ImageSet
from oodforge.evaluation.distributed import distributed_outputs, shard_range
from oodforge.evaluation.extraction import compute_outputs
from oodforge.models.adapters import wrap_model

ROWS = 101  # odd: the shards differ in size, so padding must be dropped


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    return wrap_model(net, head="6")


def images() -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet("rows", rng.integers(0, 256, (ROWS, 8, 8, 1), dtype=np.uint8), np.arange(ROWS),
                    [str(i) for i in range(ROWS)])


def _extract(fabric: Fabric) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    torch.set_num_threads(1)
    outputs = distributed_outputs(tiny_model(), images(), fabric, batch_size=16)
    # end the gloo group before the process exits: otherwise its threads can still be joinable at interpreter
    # exit and the child aborts ("terminate called without an active exception"; 1 run in 3 here)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return outputs.logits.numpy(), outputs.features.numpy(), outputs.labels.numpy()


def test_shards_cover_every_row_once():
    for rows in (0, 1, 7, 101):
        for world in (1, 2, 3, 8):
            covered = [i for rank in range(world) for i in shard_range(rows, rank, world)]
            assert covered == list(range(rows))


def _extract_in_two_processes(path: str) -> None:
    """Run ``_extract`` on 2 spawned gloo processes and save rank 0's gathered arrays to ``path``."""
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    logits, features, labels = fabric.launch(_extract)
    np.savez(path, logits=logits, features=features, labels=labels)


def test_two_process_extraction_equals_one_process(tmp_path):
    # in a fresh interpreter: spawned children abort (std::terminate) once typer.testing is imported here
    path = tmp_path / "gathered.npz"
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from test_distributed import _extract_in_two_processes; _extract_in_two_processes({str(path)!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(path) as gathered:
        logits, features, labels = gathered["logits"], gathered["features"], gathered["labels"]
    single = compute_outputs(tiny_model(), images(), batch_size=16)
    assert np.array_equal(labels, np.arange(ROWS))  # rank order, nothing duplicated or dropped
    np.testing.assert_allclose(logits, single.logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features, single.features.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not has_real("FashionMNIST"), reason="needs Fashion-MNIST in OODFORGE_DATA")
def test_ddp_training_on_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "oodforge", "train", "--benchmark", "fashion_mnist", "--accelerator", "cpu",
               "--devices", "2", "--strategy", "ddp", "--train-subset", "512", "--batch-size", "64",
               "--epochs", "1", "--detectors", "msp,knn", "--precision", "32-true", "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OODFORGE_CACHE": str(tmp_path / "cache-ddp")}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["train"]["history"]) == 1 and results["id_accuracy"] > 0.3
    # the outputs were extracted over both processes; one process from an empty cache scores the same
    single = subprocess.run([sys.executable, "-m", "oodforge", "score", "--benchmark", "fashion_mnist", "--model",
                             str(out / "model.ckpt"), "--detectors", "msp,knn", "--precision", "32-true",
                             "--out", str(tmp_path / "single"), "--quiet"], capture_output=True, text=True,
                            env={**env, "OODFORGE_CACHE": str(tmp_path / "cache-single")}, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    alone = json.loads((tmp_path / "single" / "results.json").read_text())
    assert alone["id_accuracy"] == results["id_accuracy"]
    pairs = {(r["detector"], r["ood_dataset"]): r["auroc"] for r in alone["results"]}
    assert len(pairs) == len(results["results"]) == 6
    for row in results["results"]:  # knn fits on the 512 training images in the DDP run, on all of them here
        if row["detector"] == "msp":
            assert abs(row["auroc"] - pairs[("msp", row["ood_dataset"])]) < 1e-6, row
    entries = list((tmp_path / "cache-ddp" / "outputs").glob("*/*"))
    assert len(entries) == 5  # test set, three OOD sets, the 512 training images: each written once, by rank 0
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".ckpt") == ["last.ckpt", "model.ckpt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file, no staging folder
    history = json.loads((out / "train.json").read_text())["history"]
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)  # resumes: all done
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "train.json").read_text())["history"] == history  # loaded, not trained again
    changed = [*command[:command.index("--epochs") + 1], "2", *command[command.index("--epochs") + 2:]]
    refused = subprocess.run(changed, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "different recipe" in refused.stderr  # another recipe: refused, not mixed

"""Hostile files: YAML tags, pickle payloads in checkpoints, archive members that climb out of the cache,
concurrent writers to one run folder. None may run code, write outside its folder or leave a mixed run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from oodforge.cli import app
from oodforge.data.datasets import CorruptImageError, image_folder
from oodforge.models.classifier import ModelConfig, build_classifier, save_classifier
from oodforge.runs.folder import scores_digest

runner = CliRunner()
MARKER_ENV = "OODFORGE_TEST_PAYLOAD_MARKER"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


class Payload:
    """Unpickling this calls ``os.system`` to create a marker file: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def png_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_python_tags_in_a_benchmark_file_never_run(tmp_path) -> None:
    """Security: a `!!python/object/apply` tag in a benchmark YAML is refused in one line; nothing runs."""
    marker = tmp_path / "ran"
    path = tmp_path / "bench.yaml"
    path.write_text(f"name: x\nid: !!python/object/apply:os.system ['touch {marker}']\nood: {{a: gaussian}}\n")
    result = runner.invoke(app, ["score", "--benchmark", str(path), "--model", "resnet20", "--weights", "w.th",
                                 "--out", str(tmp_path / "run"), "--quiet"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("route", ["checkpoint", "backbone_weights", "torchvision_weights"])
def test_a_pickle_payload_in_any_checkpoint_path_never_runs(tmp_path, route) -> None:
    """Security: a `__reduce__` payload in a checkpoint, in external weights or in a torchvision state dict is
    refused in one line naming the file, and the payload never runs."""
    marker = tmp_path / "ran"
    weights = tmp_path / "evil.pt"
    if route == "checkpoint":
        model = build_classifier(ModelConfig(backbone="small_cnn", num_classes=10, in_channels=1))
        save_classifier(model, weights, extra={"note": "x"})
        state = torch.load(weights, weights_only=True)
        state["extra"] = {"payload": Payload(marker)}
        torch.save(state, weights)
        args = ["--model", str(weights)]
    else:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, weights)
        args = (["--model", "resnet20", "--weights", str(weights)] if route == "backbone_weights"
                else ["--model", "torchvision:resnet18", "--weights", str(weights)])
    result = runner.invoke(app, ["score", "--benchmark", "fashion_mnist", *args, "--out", str(tmp_path / "run"),
                                 "--quiet"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert str(weights) in lines[0] and "weights_only" not in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("streaming", ["never", "always"])
def test_archive_members_that_leave_the_folder_write_nothing_outside(tmp_path, streaming) -> None:
    """Security: tar members `../x.png`, an absolute path and a link to `/etc` are refused in one line naming the
    archive when it is unpacked (streamed), never read in memory; zip members climbing out are never written.
    Nothing appears outside the cache."""
    archive = tmp_path / "data" / "evil.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("set/a/ok.png", "../escaped.png", "/tmp/absolute-escape.png"):
            data = png_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("set/a/etc")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    before = set(tmp_path.rglob("*"))
    if streaming == "always":  # unpacked into the cache: the members that climb out are refused
        with pytest.raises(CorruptImageError, match=str(archive)):
            image_folder(archive / "set", streaming=streaming, shape=(8, 8, 3))
    else:  # read member by member in memory: only the images under set/ are read, nothing is written
        assert len(image_folder(archive / "set", streaming=streaming, shape=(8, 8, 3))) == 1
    created = {p for p in set(tmp_path.rglob("*")) - before if not p.is_relative_to(tmp_path / "cache")}
    assert created == set() and not Path("/tmp/absolute-escape.png").exists()
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "data" / "escaped.png").exists()

    zipped = tmp_path / "data" / "evil.zip"
    with zipfile.ZipFile(zipped, "w") as handle:
        handle.writestr("set/a/ok.png", png_bytes())
        handle.writestr("../zip-escaped.png", png_bytes(1))
    images = image_folder(zipped / "set", streaming=streaming, shape=(8, 8, 3))
    assert len(images) == 1
    assert not (tmp_path / "zip-escaped.png").exists() and not (tmp_path / "data" / "zip-escaped.png").exists()


def test_concurrent_writers_to_one_run_folder_leave_one_whole_run(tmp_path) -> None:
    """Security: two processes saving runs into one folder 15 times each all succeed and end with one whole run:
    results.json's scores digest matches scores.npz, and no staging or temporary file is left."""
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from pathlib import Path
        from oodforge.runs.payload import save_run

        seed = int(sys.argv[1])
        for i in range(15):
            rng = np.random.default_rng(seed * 100 + i)
            scores = {{"msp/id": rng.normal(1, 1, 200), "msp/ood": rng.normal(0, 1, 200)}}
            row = {{"method": "model", "detector": "msp", "ood_dataset": "ood", "group": "far", "auroc": 0.5,
                    "aupr_in": 0.5, "aupr_out": 0.5, "fpr95": 0.9}}
            save_run(Path({str(tmp_path / "run")!r}), {{"benchmark": "b", "id_dataset": "id", "id_accuracy": 0.9,
                     "ood_sets": {{"ood": "far"}}, "results": [row], "writer": seed}}, scores, report=False)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", script, str(seed)], env=env) for seed in (1, 2)]
    assert [child.wait(timeout=240) for child in children] == [0, 0]
    run = tmp_path / "run"
    payload = json.loads((run / "results.json").read_text())
    with np.load(run / "scores.npz") as saved:
        scores = {key: saved[key] for key in saved.files}
    assert payload["scores_sha256"] == scores_digest(scores) and payload["writer"] in (1, 2)
    assert sorted(p.name for p in run.iterdir()) == ["results.json", "results.md", "scores.npz"]


def test_yaml_config_tags_are_refused_in_bench_configs_too(tmp_path) -> None:
    """Security: bench configs go through the same safe loader as benchmark files."""
    marker = tmp_path / "ran"
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({"benchmark": "fashion_mnist", "runs": [{"name": "ce"}]})
                      + f"seeds: !!python/object/apply:os.system ['touch {marker}']\n")
    result = runner.invoke(app, ["bench", str(config), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and result.output.startswith("error:") and not marker.exists()

"""Cached outputs and stored evaluations are reused only while everything that determines them is the same:
every pixel (or file), the labels, the preprocessing, the model's weights and code, the precision and oodforge."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from oodforge.cli import app
from oodforge.data.benchmark_file import load_benchmark_file
from oodforge.data.datasets import image_folder
from oodforge.data.imageset import ImageSet
from oodforge.data.manifest import file_digests
from oodforge.data.overlap import shared_count
from oodforge.evaluation.cache import OutputCache, model_fingerprint
from oodforge.models.adapters import wrap_model
from oodforge.runs.store import evaluation_key
from oodforge.util.code_identity import code_identity, oodforge_identity

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


def write_images(folder: Path, count: int, seed: int, suffix: str = ".png", size: int = 8) -> list[Path]:
    """``count`` random RGB images ``folder/NNN<suffix>``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def replace_keeping_size_and_mtime(path: Path, seed: int) -> None:
    """Overwrite a BMP (fixed size for a fixed shape) with other pixels and put its old mtime back."""
    stat = path.stat()
    with Image.open(path) as old:
        shape = (old.height, old.width, 3)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# ---------------------------------------------------------------- sets


def test_fingerprint_covers_every_image_labels_and_classes() -> None:
    """Row 1: one changed pixel anywhere in a 600-image set, a label or a class name changes the key."""
    rng = np.random.default_rng(0)
    base = ImageSet("s", rng.integers(0, 256, (600, 4, 4, 3), dtype=np.uint8), np.arange(600) % 3, ["a", "b", "c"])
    seen = {base.fingerprint()}
    for position in (1, 299, 301, 599):  # the old key sampled every second image of a 600-image set
        images = base.images.copy()
        images[position, 2, 1, 0] ^= 1
        seen.add(ImageSet("s", images, base.labels, base.classes).fingerprint())
    labels = base.labels.copy()
    labels[301] = 0
    seen.add(ImageSet("s", base.images, labels, base.classes).fingerprint())
    seen.add(ImageSet("s", base.images, base.labels, ["a", "b", "d"]).fingerprint())
    assert len(seen) == 7
    assert base.fingerprint() == ImageSet("s", base.images.copy(), base.labels.copy(), base.classes).fingerprint()


def test_item_digests_are_equal_exactly_for_equal_images() -> None:
    """Rows 1 and 15: per-image pixel hashes, equal exactly for equal images."""
    images = np.zeros((4, 3, 3, 1), np.uint8)
    images[1, 0, 0, 0] = 1
    images[3] = images[1]
    digests = ImageSet("s", images, np.zeros(4, np.int64)).item_digests()
    assert digests.shape == (4, 16) and digests.dtype == np.uint8
    rows = [row.tobytes() for row in digests]
    assert rows[0] == rows[2] and rows[1] == rows[3] and rows[0] != rows[1]


def test_in_memory_folder_reloads_a_file_replaced_with_same_size_and_mtime(tmp_path) -> None:
    """Row 1: a folder image replaced by one of the same size with its old mtime is decoded again."""
    paths = write_images(tmp_path / "ood", 20, seed=0, suffix=".bmp")
    first = image_folder(tmp_path / "ood", streaming="never")
    replace_keeping_size_and_mtime(paths[11], seed=5)
    second = image_folder(tmp_path / "ood", streaming="never")
    assert not np.array_equal(first.images[11], second.images[11])
    np.testing.assert_array_equal(first.images[10], second.images[10])
    assert first.fingerprint() != second.fingerprint()


def test_streamed_fingerprint_follows_file_contents_through_the_manifest(tmp_path, monkeypatch) -> None:
    """Row 1: a streamed set is keyed by file contents; the manifest re-reads only the replaced file."""
    paths = write_images(tmp_path / "ood", 30, seed=0, suffix=".bmp")
    streamed = image_folder(tmp_path / "ood", streaming="always", shape=(8, 8, 3))
    first = streamed.fingerprint()
    reads = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real_read(self))
    assert streamed.fingerprint() == first and reads == []  # nothing changed: no file read again
    replace_keeping_size_and_mtime(paths[17], seed=9)
    assert streamed.fingerprint() != first
    assert reads == ["017.bmp"]  # only the replaced file is read again


def test_zip_members_are_hashed_again_only_when_the_archive_changes(tmp_path) -> None:
    """Row 1: members of a zip archive are keyed by their content."""
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("a.png", b"one")
        handle.writestr("b.png", b"two")
    first = file_digests(archive, ["a.png", "b.png"])
    assert first[0].tobytes() != first[1].tobytes()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("a.png", b"one")
        handle.writestr("b.png", b"TWO")
    second = file_digests(archive, ["a.png", "b.png"])
    assert first[0].tobytes() == second[0].tobytes() and first[1].tobytes() != second[1].tobytes()


# ---------------------------------------------------------------- models


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_model_fingerprint_covers_weights_buffers_structure_and_normalization() -> None:
    """Row 2: weights, layer settings (a stride) and the input normalization are all in the model key."""
    torch.manual_seed(0)
    net = Net()
    base = model_fingerprint(net)
    assert model_fingerprint(net) == base
    changed = Net()
    changed.load_state_dict(net.state_dict())
    assert model_fingerprint(changed) == base
    with torch.no_grad():
        changed.fc.bias[1] += 1e-6
    assert model_fingerprint(changed) != base
    strided = Net()
    strided.load_state_dict(net.state_dict())
    strided.conv.stride = (2, 2)  # same weights, another computation
    assert model_fingerprint(strided) != base
    wrapped = model_fingerprint(wrap_model(net, mean=[0.5] * 3, std=[0.25] * 3))
    assert wrapped != model_fingerprint(wrap_model(net, mean=[0.5] * 3, std=[0.2] * 3))


def test_code_identity_names_library_versions_and_hashes_user_source(tmp_path, monkeypatch) -> None:
    """Row 2: library classes are keyed by version, user classes by their source file."""
    assert code_identity({nn.Conv2d}) == {"torch": f"torch=={torch.__version__.split('+')[0]}"}
    source = tmp_path / "idnets.py"
    source.write_text("import torch\nclass A(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import idnets

    try:
        first = code_identity({idnets.A})
        source.write_text("import torch\nclass A(torch.nn.Linear):\n    pass  # edited\n")
        assert code_identity({idnets.A}) != first
    finally:
        sys.modules.pop("idnets", None)
    assert oodforge_identity().startswith("0.")


# ---------------------------------------------------------------- end to end


@pytest.fixture
def bench_yaml(tmp_path) -> Path:
    """A YAML benchmark whose OOD folder holds 600 images (and a streamed twin of it)."""
    for split, seed in (("train", 1), ("test", 2)):
        for label in range(3):
            write_images(tmp_path / "id" / split / f"c{label}", 8, seed=seed * 10 + label)
    write_images(tmp_path / "ood", 600, seed=3)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "id": {"train": "folder:id/train", "test": "folder:id/test"},
        "ood": {"ood": {"data": "folder:ood", "group": "near"}}, "image_size": 8,
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    return path


def user_module(tmp_path: Path, body: str) -> str:
    """Write ``cachenets.py`` (a fixed-seed net whose forward is ``body``) and return its ``module:`` spec."""
    (tmp_path / "cachenets.py").write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 6, 3)
                self.fc = nn.Linear(6, 3)

            def forward(self, x):
                {body}

        def make():
            torch.manual_seed(0)
            return Net()
    """))
    sys.modules.pop("cachenets", None)  # each CLI call of a user is a new process
    return "module:cachenets:make"


def score(bench: Path, spec: str, out: Path, *extra: str) -> dict[str, np.ndarray]:
    result = runner.invoke(app, ["score", "--benchmark", str(bench), "--model", spec, "--detectors",
                                 "msp,maxlogit", "--out", str(out), "--quiet", "--precision", "32-true", *extra])
    assert result.exit_code == 0, result.output
    with np.load(out / "scores.npz") as scores:
        return {key: scores[key] for key in scores.files}


FORWARD = "return self.fc(self.conv(x).mean((2, 3)))"


@pytest.mark.parametrize("streaming", ["never", "always"])
def test_one_image_changed_in_a_600_image_set_gives_new_numbers(bench_yaml, tmp_path, monkeypatch,
                                                                 streaming) -> None:
    """Row 1: one image changed in the middle of a 600-image OOD folder (in memory or streamed): new numbers."""
    config = yaml.safe_load(bench_yaml.read_text()) | {"streaming": streaming}
    bench_yaml.write_text(yaml.safe_dump(config))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = user_module(tmp_path, FORWARD)
    before = score(bench_yaml, spec, tmp_path / "a")
    time.sleep(0.01)
    Image.open(next((tmp_path / "id" / "test" / "c0").iterdir())).save(tmp_path / "ood" / "301.png")
    after = score(bench_yaml, spec, tmp_path / "b")
    changed = np.flatnonzero(before["msp/ood"] != after["msp/ood"])
    assert changed.tolist() == [301]
    np.testing.assert_array_equal(before["msp/tiny"], after["msp/tiny"])
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "fresh-cache"))
    np.testing.assert_array_equal(after["msp/ood"], score(bench_yaml, spec, tmp_path / "c")["msp/ood"])


def test_editing_a_module_models_forward_gives_new_numbers(bench_yaml, tmp_path, monkeypatch) -> None:
    """Row 2: one line of a module: model's forward edited, or another factory with the same weights: new numbers."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = score(bench_yaml, user_module(tmp_path, FORWARD), tmp_path / "a")
    edited = score(bench_yaml, user_module(tmp_path, "return 3.0 * " + FORWARD[7:]), tmp_path / "b")
    assert not np.allclose(before["msp/ood"], edited["msp/ood"])
    np.testing.assert_allclose(edited["maxlogit/ood"], 3.0 * before["maxlogit/ood"], rtol=1e-4, atol=1e-4)
    other = tmp_path / "other.py"  # another factory, another class, the same weights
    other.write_text("import cachenets\n\nclass Flipped(cachenets.Net):\n    def forward(self, x):\n"
                     "        return -super().forward(x)\n\ndef make():\n    import torch\n    torch.manual_seed(0)\n"
                     "    return Flipped()\n")
    sys.modules.pop("other", None)
    flipped = score(bench_yaml, "module:other:make", tmp_path / "c")
    assert not np.allclose(flipped["maxlogit/ood"], edited["maxlogit/ood"])


def test_evaluation_key_covers_the_fit_set_and_the_model_code(bench_yaml, tmp_path) -> None:
    """Row 1: the stored-evaluation key of bench covers the training images detectors fit on."""
    benchmark = load_benchmark_file(bench_yaml)
    torch.manual_seed(0)
    model = wrap_model(Net(), mean=[0.5] * 3, std=[0.25] * 3)
    key = lambda: evaluation_key(model, benchmark, "msp", tune=False, outliers=None,  # noqa: E731
                                 train_subset=None, precision="32-true")
    first = key()
    assert key() == first
    time.sleep(0.01)
    Image.open(tmp_path / "id" / "test" / "c1" / "000.png").save(tmp_path / "id" / "train" / "c0" / "004.png")
    assert key() != first  # the training images detectors fit on changed


def test_an_ood_set_that_repeats_the_id_test_set_is_warned_about(bench_yaml, tmp_path, monkeypatch) -> None:
    """Row 15: an OOD set identical to the ID test set is scored with one warning line naming both."""
    config = yaml.safe_load(bench_yaml.read_text())
    config["ood"]["copy"] = {"data": "folder:id/test", "group": "far"}
    bench_yaml.write_text(yaml.safe_dump(config))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["score", "--benchmark", str(bench_yaml), "--model", user_module(tmp_path, FORWARD),
                                 "--detectors", "msp,knn:k=3", "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: OOD set 'copy' shares 24 of its 24 images with the ID test set 'tiny'; its scores "
                      "measure nothing about OOD detection there"]
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert {r["auroc"] for r in rows if r["ood_dataset"] == "copy"} == {0.5}


def test_shared_count_compares_like_with_like(tmp_path) -> None:
    """Row 15: shared images are counted by pixels in memory and by file content when streamed."""
    write_images(tmp_path / "a", 6, seed=0)
    write_images(tmp_path / "b", 4, seed=0)  # the first 4 images of a
    in_memory = image_folder(tmp_path / "a", streaming="never"), image_folder(tmp_path / "b", streaming="never")
    streamed = image_folder(tmp_path / "a", streaming="always"), image_folder(tmp_path / "b", streaming="always")
    assert shared_count(in_memory[1], in_memory[0]) == 4 and shared_count(in_memory[0], in_memory[1]) == 4
    assert shared_count(streamed[1], streamed[0]) == 4
    assert shared_count(streamed[1], in_memory[0]) is None


def test_output_cache_key_time_is_recorded(bench_yaml, tmp_path, monkeypatch) -> None:
    """Row 1: the time spent hashing for cache keys is recorded in results.json's timings."""
    monkeypatch.syspath_prepend(str(tmp_path))
    score(bench_yaml, user_module(tmp_path, FORWARD), tmp_path / "a")
    timings = json.loads((tmp_path / "a" / "results.json").read_text())["timings"]
    assert 0 < timings["cache_keys_s"] < 5
    assert OutputCache().key_seconds == 0.0

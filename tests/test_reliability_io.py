"""Issue 13, items 5 and 8: files and folders that cannot be written, huge images, synthetic sets without a
manifest, temp files left by a kill, file permissions, and a demo with an OOD set missing."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import oodforge
from conftest import needs_fashion, needs_mnist_family
from oodforge.cli import app
from oodforge.data import benchmarks
from oodforge.data.benchmarks import Benchmark, get_benchmark
from oodforge.data.datasets import CorruptImageError, DatasetNotFoundError, load_dataset
from oodforge.data.decoding import decode_pil
from oodforge.evaluation.cache import OutputCache
from oodforge.models.classifier import ModelConfig, build_classifier, save_classifier
from oodforge.util.atomic import (
    WriteError,
    atomic_json,
    atomic_npy,
    atomic_torch_save,
    host_tag,
    partial_path,
    remove_stale_temp_files,
)
from oodforge.util.validation import check_output_folder

runner = CliRunner()


def _one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return lines[0]


def make_folder(root: Path, classes: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(40 + 60 * index + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def bomb_png(width: int = 15000, height: int = 15000) -> bytes:
    """A 68-byte PNG whose header claims ``width`` x ``height`` pixels (PIL refuses it when opening)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("OODFORGE_CACHE", str(folder))
    return folder


@pytest.fixture
def leaves(tmp_path) -> tuple[Path, Path]:
    """(a YAML benchmark over small image folders, a checkpoint of a 3-class RGB classifier for it)."""
    make_folder(tmp_path / "leaves" / "train", {"ash": 4, "elm": 4, "oak": 4})
    make_folder(tmp_path / "leaves" / "test", {"ash": 2, "elm": 2, "oak": 2}, seed=1)
    make_folder(tmp_path / "weeds", {"x": 3}, size=24, seed=2)
    config = {"name": "leaves", "id": {"train": f"folder:{tmp_path / 'leaves' / 'train'}",
                                       "test": f"folder:{tmp_path / 'leaves' / 'test'}"},
              "ood": {"weeds": {"data": f"folder:{tmp_path / 'weeds'}", "group": "near"}},
              "image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = tmp_path / "leaves.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(num_classes=3, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    save_classifier(model, tmp_path / "leaves.ckpt")
    return path, tmp_path / "leaves.ckpt"


# ---------------------------------------------------------------- item 5a: --out checked at the door

COMMANDS = {
    "demo": ["demo", "--quiet"],
    "train": ["train", "--quiet"],
    "score": ["score", "--benchmark", "fashion_mnist", "--model", "no-such-model", "--quiet"],
    "bench": ["bench", "no-such-config.yaml", "--quiet"],
    "generate train": ["generate", "train", "--quiet"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_naming_a_file_is_one_error_line(tmp_path, command) -> None:
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    line = _one_error(runner.invoke(app, [*COMMANDS[command], "--out", str(out)]))
    assert f"--out {out} is a file, not a folder" in line
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_on_a_read_only_filesystem_is_one_error_line(tmp_path, monkeypatch, command) -> None:
    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "deep" / "run"
    line = _one_error(runner.invoke(app, [*COMMANDS[command], "--out", str(out)]))
    assert f"--out {out}" in line and "Read-only file system" in line
    assert not (tmp_path / "deep").exists()  # the folders made for the check are removed again


def test_out_where_no_folder_can_be_made_is_one_error_line(tmp_path) -> None:
    out = Path("/sys/oodforge-test/run")
    try:
        out.parent.mkdir()
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys
        out.parent.rmdir()
        pytest.skip("/sys is writable here")
    line = _one_error(runner.invoke(app, ["train", "--out", str(out), "--quiet"]))
    assert f"--out {out}: cannot write there" in line


def test_generate_sample_checks_the_parent_of_out(tmp_path, monkeypatch) -> None:
    file = tmp_path / "set"
    file.write_text("x")
    args = ["generate", "sample", "--generator", str(tmp_path / "none.ckpt"), "--quiet"]
    assert "is a file, not a folder" in _one_error(runner.invoke(app, [*args, "--out", str(file)]))
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir=None, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system", dir)))
    line = _one_error(runner.invoke(app, [*args, "--out", str(tmp_path / "new" / "set")]))
    assert str(tmp_path / "new") in line and "Read-only file system" in line


def test_check_output_folder_makes_and_keeps_nothing_for_an_existing_folder(tmp_path) -> None:
    assert check_output_folder(tmp_path, "--out") == tmp_path
    assert list(tmp_path.iterdir()) == []
    check_output_folder(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"--x .*f/sub: cannot write there \(Not a directory\)"):
        check_output_folder(tmp_path / "f" / "sub", "--x")


# ---------------------------------------------------------------- item 5b: a full disk


def test_full_disk_is_one_line_naming_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(WriteError) as caught:
        atomic_npy(np.zeros(3), tmp_path / "images.npy")
    assert str(caught.value) == f"cannot write {tmp_path / 'images.npy'}: No space left on device"
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)

    def torch_full(obj, path, *args, **kwargs):  # what torch.save says when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0\nmore")

    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(WriteError, match=r"cannot write .*last\.ckpt: .*unexpected pos 64 vs 0 \(is the disk full"):
        atomic_torch_save({"a": 1}, tmp_path / "last.ckpt")
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@needs_fashion
def test_full_disk_under_out_during_training_is_one_error_line(tmp_path, cache, monkeypatch) -> None:
    def torch_full(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", torch_full)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--train-subset", "64", "--batch-size", "64", "--epochs", "1",
                                 "--detectors", "msp", "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: cannot write {out / 'last.ckpt'}: "), result.output
    assert "unexpected pos 64" in lines[-1]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_dataset_cache_that_cannot_be_written_warns_and_goes_on(tmp_path, cache, monkeypatch) -> None:
    folder = make_folder(tmp_path / "imgs", {"a": 3, "b": 2})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.warns(UserWarning, match=r"dataset cache .*datasets.* not written \(cannot write .*images\.npy: "
                                         r"No space left on device\); going on without it"):
        images = load_dataset(f"folder:{folder}")
    assert images.images.shape == (5, 16, 16, 3) and images.classes == ["a", "b"]
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no temp file left


def test_output_cache_full_disk_or_write_error_warns_and_goes_on(tmp_path, cache, monkeypatch) -> None:
    images = load_dataset(f"folder:{make_folder(tmp_path / 'imgs', {'a': 3})}")
    model = oodforge.wrap_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 2)))
    for error in (lambda: OSError(errno.ENOSPC, "No space left on device"),
                  lambda: WriteError("x.npy", "No space left on device")):
        def full(*args, error=error, **kwargs):
            raise error()

        monkeypatch.setattr(np.lib.format, "open_memmap", full)
        with pytest.warns(UserWarning, match="output cache .* not written .*No space left on device.*going on"):
            outputs = OutputCache(tmp_path / "outputs").outputs(model, images, model_key="m")
        assert len(outputs) == 3
        assert list((tmp_path / "outputs" / "m").iterdir()) == []  # no partial folder left
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_cache_failure_is_one_warning_line_in_the_cli_and_the_run_goes_on(leaves, tmp_path, cache,
                                                                          monkeypatch) -> None:
    benchmark, checkpoint = leaves
    real_save = np.save

    def full(file, *args, **kwargs):  # the dataset cache cannot be written; everything else can
        if str(cache) in str(getattr(file, "name", file)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "run"
    result = runner.invoke(app, ["score", "--benchmark", str(benchmark), "--model", str(checkpoint),
                                 "--detectors", "msp", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    warning_lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warning_lines and all("dataset cache" in line and "No space left on device" in line
                                 for line in warning_lines), result.output
    assert (out / "results.json").is_file()


# ---------------------------------------------------------------- item 5c: a decompression bomb


def test_huge_png_is_a_corrupt_image_naming_the_file() -> None:
    with pytest.raises(CorruptImageError, match=r"cannot decode image /x/big\.png: it is larger than PIL's size "
                                                r"limit \(Image size \(225000000 pixels\)"):
        decode_pil(bomb_png(), "/x/big.png")


def test_huge_png_in_a_folder_set_is_named_in_memory_and_streamed(tmp_path, cache) -> None:
    folder = make_folder(tmp_path / "imgs", {"a": 2})
    (folder / "a" / "big.png").write_bytes(bomb_png())
    for streaming in ("never", "always"):
        with pytest.raises(CorruptImageError, match=r"big\.png: it is larger than PIL's size limit"):
            images = load_dataset(f"folder:{folder}", streaming=streaming)
            for i in range(len(images)):
                images.load(i)


def test_huge_png_in_a_yaml_benchmark_is_one_error_line_naming_it(leaves, tmp_path, cache) -> None:
    benchmark, checkpoint = leaves
    (tmp_path / "weeds" / "x" / "huge.png").write_bytes(bomb_png())
    out = tmp_path / "run"
    line = _one_error(runner.invoke(app, ["score", "--benchmark", str(benchmark), "--model", str(checkpoint),
                                          "--detectors", "msp", "--out", str(out), "--quiet"]))
    assert str(tmp_path / "weeds") in line and "huge.png" in line and "larger than PIL's size limit" in line
    assert not (out / "results.json").exists()


# ---------------------------------------------------------------- item 5d: a synthetic set without manifest


@needs_fashion
@pytest.mark.parametrize("option", ["--synthetic-id", "--outliers"])
def test_synthetic_set_without_manifest_is_one_error_line(tmp_path, cache, option) -> None:
    folder = tmp_path / "half-written"
    folder.mkdir()
    np.save(folder / "images.npy", np.zeros((4, 28, 28, 1), np.uint8))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", option, f"synthetic:{folder}", "--train-subset", "64", "--epochs", "1",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1] == f"error: {folder} has no manifest.json (not a synthetic set, or its write was cut off)"
    assert not any(line.startswith("Traceback") for line in lines)
    assert not (out / "last.ckpt").exists()


# ---------------------------------------------------------------- item 8e: temp files left by a kill


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_dead_or_old_writers_are_removed_and_live_ones_kept(tmp_path) -> None:
    here, dead, live = host_tag(), _dead_pid(), os.getpid()
    day_old = time.time() - 25 * 3600

    def make(name: str, folder: bool = False, old: bool = False) -> Path:
        path = tmp_path / name
        if folder:
            path.mkdir()
            (path / "logits.npy").write_bytes(b"x")
        else:
            path.write_bytes(b"x")
        if old:
            os.utime(path, (day_old, day_old))
        return path

    stale = [make(f".last.ckpt.tmp-{here}-{dead}-abc_123x"),
             make(".results.json.tmp-other-host-77-zz9_zz9z", old=True),
             make(f".mnist-0123abcd.{here}-{dead}.partial", folder=True),
             make(f".mnist-4567abcd.{dead}.partial", folder=True, old=True),
             make(".images.npy.k2j3h4g5.tmp", old=True)]
    kept = [make(f".last.ckpt.tmp-{here}-{live}-def_4567"),
            make(f".last.ckpt.tmp-{here}-{live}-olderone", old=True),  # a live writer: never touched
            make(".results.json.tmp-other-host-77-fresh123"),
            make(f".mnist-89abcdef.{dead}.partial", folder=True),  # no host named, not old
            make("last.ckpt", old=True), make("results.json")]
    (tmp_path / "sub").mkdir()
    below = tmp_path / "sub" / f".x.tmp-{here}-{dead}-abcdefgh"
    below.write_bytes(b"x")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept) and below.exists()
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_atomic_write_temp_names_carry_host_and_pid(tmp_path, monkeypatch) -> None:
    import oodforge.util.atomic as io_module

    seen = []
    real = io_module.os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(io_module.os, "replace", spy)
    atomic_json({"a": 2}, tmp_path / "r.json")
    assert seen and seen[0].startswith(f".r.json.tmp-{host_tag()}-{os.getpid()}-")
    assert partial_path(tmp_path / "e").name == f".e.{host_tag()}-{os.getpid()}.partial"
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 2}


def test_caches_remove_stale_partials_before_writing(tmp_path, cache) -> None:
    here, dead = host_tag(), _dead_pid()
    images = load_dataset(f"folder:{make_folder(tmp_path / 'imgs', {'a': 3})}")
    model = oodforge.wrap_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 2)))
    model_folder = tmp_path / "outputs" / "m"
    model_folder.mkdir(parents=True)
    stale = model_folder / f".imgs-0000.{here}-{dead}.partial"
    stale.mkdir()
    live = model_folder / f".imgs-1111.{here}-{os.getpid()}.partial"
    live.mkdir()
    OutputCache(tmp_path / "outputs").outputs(model, images, model_key="m")
    assert not stale.exists() and live.exists()

    (dataset_folder,) = (cache / "datasets").iterdir()
    left = dataset_folder / f".images.npy.tmp-{here}-{dead}-abcdefgh"
    left.write_bytes(b"x")
    (dataset_folder / "images.npy").unlink()  # a miss: the entry is written again
    load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert not left.exists() and (dataset_folder / "images.npy").is_file()


@needs_fashion
def test_training_removes_stale_temp_files_of_its_run_folder(tmp_path, cache) -> None:
    from oodforge.training.config import TrainConfig
    from oodforge.training.loop import train

    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".last.ckpt.tmp-{host_tag()}-{_dead_pid()}-abcdefgh"
    stale.write_bytes(b"half a checkpoint")
    train(TrainConfig(epochs=1, train_subset=32, batch_size=32), out, quiet=True, stop_after_epochs=0)
    assert not stale.exists()


# ---------------------------------------------------------------- item 8f: files follow the umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode) -> None:
    previous = os.umask(umask)
    try:
        atomic_json({"results": []}, tmp_path / "results.json")
        atomic_torch_save({"a": 1}, tmp_path / "model.ckpt")
    finally:
        os.umask(previous)
    for name in ("results.json", "model.ckpt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# ---------------------------------------------------------------- item 8g: demo with an OOD set missing


@pytest.fixture
def without_notmnist(tmp_path, monkeypatch) -> Path:
    """A data folder with everything of $OODFORGE_DATA but notMNIST (symlinks)."""
    from conftest import real_root

    source = real_root("FashionMNIST", "MNIST", "notMNIST")
    root = tmp_path / "data"
    root.mkdir()
    for entry in source.iterdir():
        if entry.name != "notMNIST":
            (root / entry.name).symlink_to(entry)
    monkeypatch.setenv("OODFORGE_DATA", str(root))
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    return root


@needs_mnist_family
def test_benchmark_without_missing_ood_drops_exactly_the_missing_set(without_notmnist) -> None:
    full = get_benchmark("fashion_mnist")
    bench, messages = full.without_missing_ood()
    assert bench.ood == {"mnist": "far", "gaussian": "far"} and full.ood["notmnist"] == "far"
    (message,) = messages
    assert message.startswith("OOD set 'notmnist' skipped: dataset 'notmnist' not found in ")
    assert str(without_notmnist) in message and "notMNIST/raw/t10k-images-idx3-ubyte" in message
    assert bench.val == full.val and bench.id_dataset == "fashion_mnist"
    # a validation OOD set drawn from the missing dataset goes too
    val = {**full.val, "ood": {**full.val["ood"], "letters": {"data": "notmnist", "split": "test", "group": "far"}}}
    bench, messages = replace(full, val=val).without_missing_ood()
    assert "letters" not in bench.val["ood"] and set(bench.val["ood"]) == set(full.val["ood"])
    assert any("validation OOD set 'letters'" in m for m in messages)


def test_benchmark_without_missing_ood_raises_when_every_set_is_missing(tmp_path) -> None:
    bench = Benchmark("letters", "fashion_mnist", {"notmnist": "far"}, (28, 28, 1), (0.5,), (0.5,))
    with pytest.raises(DatasetNotFoundError, match=f"dataset 'notmnist' not found in {tmp_path / 'empty'}"):
        bench.without_missing_ood(root=tmp_path / "empty")
    complete = Benchmark("noise", "fashion_mnist", {"gaussian": "far"}, (28, 28, 1), (0.5,), (0.5,))
    assert complete.without_missing_ood(root=tmp_path) == (complete, [])


@needs_mnist_family
def test_demo_skips_a_missing_ood_set_with_one_warning_line(without_notmnist, tmp_path, monkeypatch) -> None:
    import oodforge.training.loop as train_module

    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", lambda config, out, **kw: real_train(
        replace(config, train_subset=256), out, **kw))  # a short demo
    out = tmp_path / "demo"
    tic = time.perf_counter()
    result = runner.invoke(app, ["demo", "--epochs", "1", "--detectors", "msp", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    warnings_ = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1 and "'notmnist'" in warnings_[0] and str(without_notmnist) in warnings_[0]
    saved = json.loads((out / "results.json").read_text())
    assert {r["ood_dataset"] for r in saved["results"]} == {"mnist", "gaussian"}
    assert time.perf_counter() - tic < 120


@needs_mnist_family
def test_demo_with_every_ood_set_missing_is_one_error_line_before_training(without_notmnist, tmp_path,
                                                                          monkeypatch) -> None:
    real = get_benchmark("fashion_mnist")
    monkeypatch.setattr(benchmarks, "get_benchmark", lambda name: replace(real, ood={"notmnist": "far"}))
    out = tmp_path / "demo"
    with warnings.catch_warnings():
        line = _one_error(runner.invoke(app, ["demo", "--epochs", "1", "--out", str(out), "--quiet"]))
    assert "dataset 'notmnist' not found in" in line and str(without_notmnist) in line
    assert not out.exists()

"""Reliability probe, data rows: symlinked folders, duplicate YAML keys, mean/std at the door, archives with a
cache that cannot be written, one-line messages naming the file, and one file listing for in-memory and
streamed sets."""

from __future__ import annotations

import errno
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from oodforge.bench.jobs import load_bench_config
from oodforge.cli import app
from oodforge.data.benchmark_file import IMAGENET_MEAN, IMAGENET_STD, load_benchmark_file
from oodforge.data.datasets import CorruptImageError, load_dataset
from oodforge.data.streaming import FileImageSet
from oodforge.util.atomic import read_yaml_mapping

MODES = ["never", "always"]  # decoded into memory, streamed from disk
runner = CliRunner()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("OODFORGE_CACHE", str(folder))
    return folder


def write_images(folder: Path, count: int, value: int = 100, start: int = 0) -> Path:
    """``count`` 8x8 RGB PNGs ``<i>.png`` of brightness ``value + i`` (so every image differs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(folder / f"{i}.png")
    return folder


def load_all(spec: str, streaming: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pixels, labels, classes) of a folder spec, every image decoded (streamed sets one by one)."""
    images = load_dataset(spec, streaming=streaming)
    if streaming == "always":
        assert isinstance(images, FileImageSet)
        return np.stack([images.load(i) for i in range(len(images))]), images.labels, images.classes
    return images.images, images.labels, images.classes


def one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def benchmark_yaml(path: Path, **extra: object) -> Path:
    """A small YAML benchmark over noise sets (no image decoded), plus ``extra`` keys."""
    config = {"name": "probe", "id": {"train": "gaussian", "test": "uniform"}, "ood": {"noise": "gaussian"},
              "image_size": 8, **extra}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def score(benchmark: Path, tmp_path: Path):
    return runner.invoke(app, ["score", "--benchmark", str(benchmark), "--model", str(tmp_path / "none.ckpt"),
                               "--out", str(tmp_path / "run"), "--quiet"])


# ---------------------------------------------------------------- row 3: symlinked folders


@pytest.mark.parametrize("streaming", MODES)
def test_symlinked_subfolder_of_an_ood_folder_is_followed(tmp_path, streaming) -> None:
    """Row 3: 5 images plus a symlinked subfolder of 7 are 12 images, the link's name their class."""
    ood = write_images(tmp_path / "ood", 5)
    (ood / "sub").symlink_to(write_images(tmp_path / "elsewhere", 7, value=50), target_is_directory=True)
    pixels, labels, classes = load_all(f"folder:{ood}", streaming)
    assert len(pixels) == 12 and classes == ["sub"]
    assert labels.tolist() == [-1] * 5 + [0] * 7
    assert pixels[5:, 0, 0, 0].tolist() == list(range(50, 57))


@pytest.mark.parametrize("streaming", MODES)
def test_train_folder_of_symlinked_class_folders_is_labelled_by_the_link_names(tmp_path, streaming) -> None:
    """Row 3: an ID train folder whose class folders are symlinks has those classes, not "no image files"."""
    train = tmp_path / "train"
    train.mkdir()
    (train / "oak").symlink_to(write_images(tmp_path / "store" / "q", 2), target_is_directory=True)
    (train / "ash").symlink_to(write_images(tmp_path / "store" / "z", 3, value=10), target_is_directory=True)
    pixels, labels, classes = load_all(f"folder:{train}", streaming)
    assert classes == ["ash", "oak"] and labels.tolist() == [0, 0, 0, 1, 1]
    assert pixels[:, 0, 0, 0].tolist() == [10, 11, 12, 100, 101]


@pytest.mark.parametrize("streaming", MODES)
def test_symlink_loops_are_visited_once_and_end(tmp_path, streaming) -> None:
    """Row 3: links back to the top folder or to a folder read already are skipped: each real folder read once."""
    top = tmp_path / "top"
    write_images(top / "c", 3)
    (top / "c" / "back").symlink_to(top, target_is_directory=True)
    (top / "c" / "self").symlink_to(top / "c", target_is_directory=True)
    (top / "again").symlink_to(top / "c", target_is_directory=True)  # sorts first, but the real folder wins
    pixels, labels, classes = load_all(f"folder:{top}", streaming)
    assert len(pixels) == 3 and classes == ["c"] and labels.tolist() == [0, 0, 0]


def test_adding_an_image_behind_a_symlinked_folder_invalidates_the_cache(tmp_path) -> None:
    """Row 3: the in-memory cache key follows symlinks too, so a new image in a linked folder is seen."""
    top = tmp_path / "top"
    top.mkdir()
    (top / "c").symlink_to(write_images(tmp_path / "real", 2), target_is_directory=True)
    assert len(load_dataset(f"folder:{top}", streaming="never")) == 2
    write_images(tmp_path / "real", 1, start=2)
    assert len(load_dataset(f"folder:{top}", streaming="never")) == 3


# ---------------------------------------------------------------- row 11: one rule for memory and streaming


def junk_folder(root: Path) -> Path:
    """3 + 2 real images among every kind of entry that is not an image file."""
    write_images(root / "c", 3)
    write_images(root / "d", 2, value=20)
    (root / "c" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble
    (root / "c" / "x.jpg").mkdir()  # a folder named like an image
    (root / "d" / "gone.png").symlink_to(root / "nowhere.png")  # dangling
    (root / "d" / "loop.png").symlink_to(root / "d" / "loop.png")  # loops on itself
    return root


@pytest.mark.parametrize("streaming", MODES)
def test_apple_double_files_folders_named_like_images_and_bad_links_are_skipped(tmp_path, streaming) -> None:
    """Row 11: ._x files, a folder x.jpg, dangling and looping links are skipped in both modes alike."""
    pixels, labels, classes = load_all(f"folder:{junk_folder(tmp_path / 'junk')}", streaming)
    assert classes == ["c", "d"] and labels.tolist() == [0, 0, 0, 1, 1]
    assert pixels[:, 0, 0, 0].tolist() == [100, 101, 102, 20, 21]


@pytest.mark.parametrize("packing", ["zip", "tar.gz"])
def test_apple_double_members_of_archives_are_skipped_in_both_modes(tmp_path, packing) -> None:
    """Row 11: a macOS zip's __MACOSX/._x.png and a tar's ._x.png are no images, in memory or streamed."""
    source = write_images(tmp_path / "src" / "c", 3).parent
    archive = tmp_path / f"set.{packing}"
    if packing == "zip":
        with zipfile.ZipFile(archive, "w") as handle:
            for i in range(3):
                handle.write(source / "c" / f"{i}.png", f"top/c/{i}.png")
                handle.writestr(f"__MACOSX/top/c/._{i}.png", b"\x00\x05\x16\x07 resource fork")
                handle.writestr(f"top/c/._{i}.png", b"\x00\x05\x16\x07 resource fork")
    else:
        (source / "c" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
        with tarfile.open(archive, "w:gz") as handle:
            handle.add(source, arcname="top")
    memory = load_all(f"folder:{archive}/top", "never")
    streamed = load_all(f"folder:{archive}/top", "always")
    for pixels, labels, classes in (memory, streamed):
        assert classes == ["c"] and labels.tolist() == [0, 0, 0]
        assert pixels[:, 0, 0, 0].tolist() == [100, 101, 102]


@pytest.mark.parametrize("streaming", MODES)
def test_a_corrupt_real_image_is_an_error_naming_it_in_both_modes(tmp_path, streaming) -> None:
    """Row 11: skipping stops at non-files; a real file with an image name that does not decode is an error."""
    root = junk_folder(tmp_path / "junk")
    (root / "d" / "9.png").write_bytes(b"not a png")
    with pytest.raises(CorruptImageError, match=rf"cannot decode image {root / 'd' / '9.png'}: "):
        load_all(f"folder:{root}", streaming)


# ---------------------------------------------------------------- row 9: archives with a cache that cannot be written


def tar_gz(tmp_path: Path, name: str = "set.tar.gz") -> Path:
    """``name`` holding top/a/ (3 images) and top/b/ (2 images)."""
    source = tmp_path / "src"
    write_images(source / "a", 3)
    write_images(source / "b", 2, value=20)
    with tarfile.open(tmp_path / name, "w:gz") as handle:
        handle.add(source, arcname="top")
    return tmp_path / name


def archive_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "archive cache" in str(w.message)]


@pytest.mark.parametrize("problem, cause", [("not a folder", "Not a directory"),
                                            ("read-only", "Read-only file system")])
def test_archive_with_a_cache_that_cannot_be_made_warns_once_and_streams_from_a_temporary_folder(
        tmp_path, monkeypatch, problem, cause) -> None:
    """Row 9: a cache that cannot be made (under a file, read-only): one warning naming it and why; images load."""
    archive = tar_gz(tmp_path)
    cache = tmp_path / "file" / "cache"
    monkeypatch.setenv("OODFORGE_CACHE", str(cache))
    if problem == "not a folder":
        (tmp_path / "file").write_text("not a folder")
    else:
        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if str(self).startswith(str(cache)):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = load_dataset(f"folder:{archive}/top", streaming="always")
        second = load_dataset(f"folder:{archive}/top/b", streaming="always")
    (message,) = archive_warnings(caught)
    assert message == (f"archive cache {cache / 'unpacked'} not written ({cause}); unpacked {archive} into the "
                       f"temporary folder {first.source} instead (removed at exit)")
    assert len(first) == 5 and first.classes == ["a", "b"] and first.labels.tolist() == [0, 0, 0, 1, 1]
    assert len(second) == 2 and second.source == first.source  # unpacked once per process
    assert first.source.parent == Path(tempfile.gettempdir()) and first.source.is_dir()
    assert [first.load(i)[0, 0, 0] for i in range(5)] == [100, 101, 102, 20, 21]


def test_archive_with_a_full_cache_disk_warns_without_blaming_the_archive(tmp_path, cache, monkeypatch) -> None:
    """Row 9: a full disk under the cache is a warning about the cache, not "cannot read archive"."""
    archive = tar_gz(tmp_path)
    real_makefile = tarfile.TarFile.makefile

    def full(self, tarinfo, targetpath):
        if str(cache) in str(targetpath):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_makefile(self, tarinfo, targetpath)

    monkeypatch.setattr(tarfile.TarFile, "makefile", full)
    with pytest.warns(UserWarning, match=rf"archive cache {cache / 'unpacked'} not written \(No space left on "
                                         r"device\); unpacked .*set\.tar\.gz into the temporary folder"):
        images = load_dataset(f"folder:{archive}/top", streaming="always")
    assert len(images) == 5 and [images.load(i)[0, 0, 0] for i in range(5)] == [100, 101, 102, 20, 21]
    assert not (cache / "unpacked").exists() or not any((cache / "unpacked").iterdir())  # no partial folder left


@pytest.mark.parametrize("cache_state", ["writable", "not a folder"])
def test_a_truncated_archive_is_still_an_error_naming_it(tmp_path, cache_state, monkeypatch) -> None:
    """Row 9: a damaged .tar.gz is one line naming the archive, whether or not the cache can be written."""
    archive = tar_gz(tmp_path)
    data = archive.read_bytes()
    archive.write_bytes(data[:len(data) // 2])
    if cache_state == "not a folder":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "file" / "cache"))
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        with pytest.raises(CorruptImageError) as caught:
            load_dataset(f"folder:{archive}/top", streaming="always")
    assert str(caught.value).startswith(f"cannot read archive {archive}: ") and "\n" not in str(caught.value)
    assert archive_warnings(caught_warnings) == []  # no warning about a cache the archive never got into


def test_archive_cache_failure_is_one_warning_line_in_the_cli(tmp_path, monkeypatch) -> None:
    """Row 9: a YAML benchmark streamed from a .tar.gz with an unusable cache runs, with one warning line."""
    archive = tar_gz(tmp_path)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "file" / "cache"))
    import torch

    from oodforge.models.classifier import ModelConfig, build_classifier, save_classifier

    torch.manual_seed(0)
    save_classifier(build_classifier(ModelConfig(num_classes=2, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)),
                    tmp_path / "two.ckpt")
    benchmark = benchmark_yaml(tmp_path / "b.yaml", id={"train": f"folder:{archive}/top",
                                                        "test": f"folder:{archive}/top"},
                               mean=[0.5] * 3, std=[0.25] * 3, streaming="always")
    result = runner.invoke(app, ["score", "--benchmark", str(benchmark), "--model", str(tmp_path / "two.ckpt"),
                                 "--detectors", "msp", "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "archive cache" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: archive cache ") and "Not a directory" in lines[0]
    assert (tmp_path / "run" / "results.json").is_file()


# ---------------------------------------------------------------- row 10: one line naming the file


@pytest.mark.parametrize("streaming", MODES)
def test_a_folder_spec_naming_a_plain_file_is_one_line_naming_it(tmp_path, streaming) -> None:
    """Row 10: a file that is neither folder nor archive says so in one line, streamed or not."""
    (tmp_path / "notes.txt").write_text("not images")
    with pytest.raises(ValueError) as caught:
        load_dataset(f"folder:{tmp_path / 'notes.txt'}", streaming=streaming)
    assert str(caught.value) == (f"{tmp_path / 'notes.txt'}: a folder: spec must name a folder or an archive "
                                 "(.zip, .tar, .tar.gz), not another kind of file")


def test_an_ood_path_that_is_a_plain_file_is_one_error_line_at_the_door(tmp_path) -> None:
    """Row 10: in a streamed YAML benchmark, the OOD file is refused before anything runs, naming YAML and key."""
    (tmp_path / "notes.txt").write_text("not images")
    path = benchmark_yaml(tmp_path / "b.yaml", ood={"notes": "folder:notes.txt"}, streaming="always")
    line = one_error(score(path, tmp_path))
    assert line == (f"error: {path}: ood.notes: {tmp_path / 'notes.txt'}: a folder: spec must name a folder or an "
                    "archive (.zip, .tar, .tar.gz), not another kind of file")


def test_non_utf8_benchmark_yaml_is_one_error_line_naming_it(tmp_path) -> None:
    """Row 10: a Latin-1 benchmark file names the file, the byte and its line."""
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: probe\ndescription: caf\xe9\n".encode("latin-1"))
    line = one_error(score(path, tmp_path))
    assert line == f"error: {path}: a benchmark file must be UTF-8 text; byte 0xe9 on line 2 is not"


def test_non_utf8_bench_config_is_one_error_line_naming_it(tmp_path) -> None:
    """Row 10: a bench config that is not UTF-8 names the file, before anything runs."""
    path = tmp_path / "bench.yaml"
    path.write_bytes("runs: [{name: ce}]\ndescription: \xff\xfe\n".encode("latin-1"))
    line = one_error(runner.invoke(app, ["bench", str(path), "--out", str(tmp_path / "out"), "--quiet"]))
    assert line == f"error: {path}: a bench config must be UTF-8 text; byte 0xff on line 2 is not"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- row 7: duplicate YAML keys


def test_duplicate_ood_entry_in_a_benchmark_is_one_error_line(tmp_path) -> None:
    """Row 7: a second `ood:` block is refused, naming the file, the key and both lines."""
    path = tmp_path / "dup.yaml"
    path.write_text("name: probe\nid: {train: gaussian, test: uniform}\nood: {a: gaussian}\nimage_size: 8\n"
                    "ood: {b: uniform}\n")
    line = one_error(score(path, tmp_path))
    assert line == f"error: {path}: key 'ood' is given twice, on line 3 and again on line 5; keep one"


def test_duplicate_nested_key_is_named_with_its_path(tmp_path) -> None:
    """Row 7: a duplicate OOD set name inside `ood:` (and inside a list) is named by its dotted path."""
    path = tmp_path / "dup.yaml"
    path.write_text("name: probe\nood:\n  a: gaussian\n  b: uniform\n  a: uniform\n")
    with pytest.raises(ValueError, match=r"dup\.yaml: key 'ood\.a' is given twice, on line 3 and again on line 5"):
        load_benchmark_file(path)
    path.write_text("runs:\n  - {name: ce, epochs: 1}\n  - name: ls\n    epochs: 2\n    epochs: 3\n")
    with pytest.raises(ValueError, match=r"key 'runs\[1\]\.epochs' is given twice, on line 4 and again on line 5"):
        load_bench_config(path)


def test_duplicate_top_level_key_in_a_bench_config_is_one_error_line(tmp_path) -> None:
    """Row 7: the same check guards bench configs (one loader for every YAML oodforge reads)."""
    path = tmp_path / "bench.yaml"
    path.write_text("seeds: [0]\nruns: [{name: ce}]\nseeds: [1, 2]\n")
    line = one_error(runner.invoke(app, ["bench", str(path), "--out", str(tmp_path / "out"), "--quiet"]))
    assert line == f"error: {path}: key 'seeds' is given twice, on line 1 and again on line 3; keep one"


def test_merge_keys_aliases_and_the_old_protections_still_hold(tmp_path) -> None:
    """Row 7: a merge that overrides a key is no duplicate; python tags are still refused."""
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {epochs: 1, lr: 0.1}\nruns: [{<<: *b, name: a, epochs: 2}, {<<: *b, name: b}]\n")
    assert read_yaml_mapping(path, "bench config")["runs"] == [{"epochs": 2, "lr": 0.1, "name": "a"},
                                                              {"epochs": 1, "lr": 0.1, "name": "b"}]
    path.write_text("runs: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ValueError, match=r"ok\.yaml: not valid YAML: could not determine a constructor"):
        read_yaml_mapping(path, "bench config")


# ---------------------------------------------------------------- row 8: mean and std


def test_benchmark_without_mean_and_std_gets_the_documented_imagenet_defaults(tmp_path) -> None:
    """Row 8: no `mean`/`std` keys: ImageNet's values, three channels."""
    bench = load_benchmark_file(benchmark_yaml(tmp_path / "b.yaml"))
    assert bench.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406) and bench.std == IMAGENET_STD
    assert bench.image_shape == (8, 8, 3)


@pytest.mark.parametrize("key, values, shown", [
    ("std", [0.2, 0.0, 0.2], "std must be finite numbers > 0, got 0.0"),
    ("std", [-0.5], "std must be finite numbers > 0, got -0.5"),
    ("std", [float("nan")], "std must be finite numbers > 0, got nan"),
    ("std", [float("inf")], "std must be finite numbers > 0, got inf"),
    ("mean", [float("nan")], "mean must be finite numbers, got nan"),
    ("mean", [0.5, float("-inf"), 0.5], "mean must be finite numbers, got -inf"),
    ("std", [True], "std must be a list of numbers, got [True]"),
])
def test_non_finite_or_non_positive_mean_and_std_are_refused_at_the_door(tmp_path, key, values, shown) -> None:
    """Row 8: a zero, negative, NaN or infinite std (NaN/inf mean) is one line naming the file and key."""
    other = {"mean": [0.5] * len(values), "std": [0.25] * len(values)}
    path = benchmark_yaml(tmp_path / "b.yaml", **{**other, key: values})
    line = one_error(score(path, tmp_path))
    assert line.startswith(f"error: {path}: {shown}")

"""Bring your own classifier and images: extract_outputs, evaluate_ood, YAML benchmarks, streaming, CLI errors."""

from __future__ import annotations

import json
import re
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
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import oodforge
from oodforge.cli import app
from oodforge.data.benchmarks import get_benchmark
from oodforge.data.datasets import load_dataset
from oodforge.data.streaming import FileImageSet
from oodforge.detectors.logits import MSP
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import compute_outputs, extract_outputs

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


class TinyNet(nn.Module):
    """A plain classifier with a torchvision-style ``fc``: what a user brings."""

    def __init__(self, classes: int = 3, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def make_folder(root: Path, classes: dict[str, int], size: int = 16, mode: str = "RGB", seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` images whose brightness depends on the class."""
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = 40 + 60 * index
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            pixels = np.clip(base + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i:03d}.png")
    return root


# ---------------------------------------------------------------- extract_outputs


def test_extract_outputs_from_tensor_dataset_and_loader_agree_and_restore_mode() -> None:
    net = TinyNet().train()
    x = torch.rand(10, 3, 8, 8)
    y = torch.arange(10) % 3
    from_tensor = extract_outputs(net, x, batch_size=4, quiet=True)
    from_dataset = extract_outputs(net, TensorDataset(x, y), batch_size=3, quiet=True)
    from_loader = extract_outputs(net, DataLoader(TensorDataset(x, y), batch_size=7), quiet=True)
    assert net.training, "the model's training mode is restored"
    net.eval()
    with torch.no_grad():
        expected_logits = net(x)
        expected_features = net.body(x)
    for outputs in (from_tensor, from_dataset, from_loader):
        torch.testing.assert_close(outputs.logits, expected_logits)
        torch.testing.assert_close(outputs.features, expected_features)
    assert from_tensor.labels is None
    assert torch.equal(from_dataset.labels, y) and torch.equal(from_loader.labels, y)


def test_extract_outputs_rejects_other_data() -> None:
    with pytest.raises(TypeError, match="DataLoader"):
        extract_outputs(TinyNet(), [1, 2, 3])


def test_detector_score_takes_a_wrapped_network_and_names_wrap_model_for_a_plain_one() -> None:
    net = TinyNet().eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1).max(dim=1).values
    torch.testing.assert_close(MSP().score(oodforge.wrap_model(net), x), expected)
    with pytest.raises(TypeError, match=r"oodforge\.wrap_model\(net\)"):
        MSP().score(net, x)


def test_detector_fit_takes_a_dataloader_and_the_model() -> None:
    """pytorch-ood's convention: ``fit(loader, model)`` equals fitting on the extracted outputs."""
    from oodforge.detectors.mahalanobis import Mahalanobis

    model = oodforge.wrap_model(TinyNet().eval())
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    from_loader = Mahalanobis().fit(loader, model)
    from_outputs = Mahalanobis().fit(extract_outputs(model, loader, quiet=True), model)
    test = extract_outputs(model, x[:7], quiet=True)
    torch.testing.assert_close(from_loader.score_outputs(test), from_outputs.score_outputs(test))
    with pytest.raises(ValueError, match="needs the model"):
        Mahalanobis().fit(loader)


def test_chunked_output_cache_equals_in_memory(tmp_path) -> None:
    images = load_dataset(f"folder:{make_folder(tmp_path / 'imgs', {'a': 7, 'b': 6})}")
    model = oodforge.wrap_model(TinyNet())
    direct = compute_outputs(model, images, batch_size=4)
    cache = OutputCache(tmp_path / "outputs")
    first = cache.outputs(model, images, batch_size=4)
    again = cache.outputs(model, images, batch_size=5)  # served from the memory-mapped files
    for outputs in (first, again):
        torch.testing.assert_close(outputs.logits, direct.logits)
        torch.testing.assert_close(outputs.features, direct.features)
        assert torch.equal(outputs.labels, direct.labels)
    entries = list((tmp_path / "outputs").glob("*/*"))
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} >= {"features.npy", "logits.npy"}


def test_output_cache_that_cannot_be_written_warns_and_goes_on(tmp_path) -> None:
    images = load_dataset(f"folder:{make_folder(tmp_path / 'imgs', {'a': 3})}")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="going on without it"):
        outputs = OutputCache(blocker).outputs(oodforge.wrap_model(TinyNet()), images)
    assert len(outputs) == 3


# ---------------------------------------------------------------- evaluate_ood


def test_evaluate_ood_rows_match_sklearn_and_write_a_run(tmp_path) -> None:
    torch.manual_seed(1)
    train = TensorDataset(torch.rand(60, 3, 8, 8), torch.arange(60) % 3)
    test = TensorDataset(torch.rand(30, 3, 8, 8), torch.arange(30) % 3)
    noise = torch.rand(20, 3, 8, 8) * 3
    ood = {"noise": noise, "dark": (torch.zeros(15, 3, 8, 8), "near")}
    results = oodforge.evaluate_ood(TinyNet(), train, test, ood,
                                    detectors="msp,energy,knn:k=5,vim:dim=8", out=tmp_path / "run", quiet=True)
    assert {(r["detector"], r["ood_dataset"]) for r in results.rows} == {
        (d, s) for d in ("msp", "energy", "knn", "vim") for s in ("noise", "dark")}
    assert {r["ood_dataset"]: r["group"] for r in results.rows} == {"noise": "far", "dark": "near"}
    for row in results.rows:
        id_scores = results.scores[f"{row['detector']}/id"]
        ood_scores = results.scores[f"{row['detector']}/{row['ood_dataset']}"]
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[id_scores, ood_scores]))
    assert 0.0 <= results.id_accuracy <= 1.0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["results"] == results.rows and (tmp_path / "run" / "report.html").is_file()
    assert "knn" in repr(results) and "<table>" in results._repr_html_()


def test_evaluate_ood_vim_uses_the_wrapped_head(tmp_path) -> None:
    """ViM needs the final layer: it comes from the wrapped network, with no stand-in object."""
    net = TinyNet()
    data = TensorDataset(torch.rand(40, 3, 8, 8), torch.arange(40) % 3)
    results = oodforge.evaluate_ood(net, data, data, {"noise": torch.rand(10, 3, 8, 8)}, detectors="vim:dim=4",
                                    quiet=True)
    assert results.detectors["vim"].model_.head is net.fc


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch) -> None:
    """The README's bring-your-own snippet, executed as written on folders made here."""
    text = README.read_text()
    block = re.search(r"<!-- byo-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lacks the bring-your-own snippet"
    for split, count in (("train", 12), ("test", 6)):
        make_folder(tmp_path / "data" / split, {"cat": count, "dog": count, "fox": count}, size=40)
    make_folder(tmp_path / "data" / "textures", {"any": 10}, size=48, seed=3)
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README-snippet", "exec"), {})  # noqa: S102
    results = json.loads((tmp_path / "runs" / "my-model" / "results.json").read_text())
    assert {r["ood_dataset"] for r in results["results"]} == {"textures"}


# ---------------------------------------------------------------- YAML benchmarks and streaming


@pytest.fixture
def leaves(tmp_path) -> Path:
    """A YAML benchmark over folders (ID train/test with 3 classes, an OOD folder, a zip archive)."""
    make_folder(tmp_path / "leaves" / "train", {"ash": 8, "elm": 8, "oak": 8})
    make_folder(tmp_path / "leaves" / "test", {"ash": 4, "elm": 4, "oak": 4}, seed=1)
    weeds = make_folder(tmp_path / "weeds", {"x": 6}, size=24, seed=2)
    with zipfile.ZipFile(tmp_path / "weeds.zip", "w") as archive:
        for file in sorted(weeds.rglob("*.png")):
            archive.write(file, f"top/{file.relative_to(weeds)}")
    config = {"name": "leaves", "id": {"train": "folder:leaves/train", "test": "folder:leaves/test"},
              "ood": {"weeds": {"data": "folder:weeds", "group": "near"}, "zipped": "folder:weeds.zip/top",
                      "noise": {"data": "gaussian", "group": "far"}},
              "image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = tmp_path / "leaves.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_yaml_benchmark_loads_folders_zip_and_registered_sets(leaves) -> None:
    bench = get_benchmark(str(leaves))
    assert bench.ood == {"weeds": "near", "zipped": "far", "noise": "far"}
    assert bench.image_shape == (16, 16, 3) and bench.num_classes() == 3
    test = bench.id_set("test")
    assert test.classes == ["ash", "elm", "oak"] and sorted(set(test.labels.tolist())) == [0, 1, 2]
    weeds, zipped = bench.ood_set("weeds"), bench.ood_set("zipped")
    assert weeds.image_shape == (16, 16, 3) and np.array_equal(weeds.images, zipped.images)
    assert bench.ood_set("noise").image_shape == (16, 16, 3)


def test_yaml_classes_list_sets_the_label_order(leaves) -> None:
    config = yaml.safe_load(leaves.read_text())
    config["classes"] = ["oak", "elm", "ash"]
    leaves.write_text(yaml.safe_dump(config))
    test = get_benchmark(str(leaves)).id_set("test")
    assert test.classes == ["oak", "elm", "ash"]
    assert test.labels[:4].tolist() == [2, 2, 2, 2]  # the first files are the "ash" folder


@pytest.mark.parametrize("packing", ["folder", "zip", "tar.gz"])
def test_streaming_equals_in_memory(tmp_path, packing) -> None:
    root = make_folder(tmp_path / "imgs", {"a": 5, "b": 4}, size=12)
    spec = root
    if packing == "zip":
        spec = tmp_path / "imgs.zip"
        with zipfile.ZipFile(spec, "w") as archive:
            for file in sorted(root.rglob("*.png")):
                archive.write(file, f"inner/{file.relative_to(root)}")
        spec = spec / "inner"
    elif packing == "tar.gz":
        spec = tmp_path / "imgs.tar.gz"
        with tarfile.open(spec, "w:gz") as archive:
            archive.add(root, arcname="inner")
        spec = spec / "inner"
    memory = load_dataset(f"folder:{spec}", streaming="never")
    streamed = load_dataset(f"folder:{spec}", streaming="always")
    assert isinstance(streamed, FileImageSet) and len(streamed) == len(memory) == 9
    assert np.array_equal(np.stack([streamed.load(i) for i in range(9)]), memory.images)
    assert np.array_equal(streamed.labels, memory.labels) and streamed.classes == memory.classes
    model = oodforge.wrap_model(TinyNet())
    torch.testing.assert_close(compute_outputs(model, streamed).logits, compute_outputs(model, memory).logits)


def test_streaming_resize_matches_torchvision_resize_and_centre_crop(tmp_path) -> None:
    from torchvision.transforms import v2

    (tmp_path / "wide" / "c").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide" / "c" / "0.png")
    streamed = load_dataset(f"folder:{tmp_path / 'wide'}", streaming="always").reshaped((12, 12, 3), "shorter_crop")
    reference = v2.Compose([v2.Resize(12, antialias=True), v2.CenterCrop(12)])(
        torch.from_numpy(pixels).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert streamed.load(0).shape == (12, 12, 3)
    assert np.abs(streamed.load(0).astype(int) - reference.astype(int)).max() <= 2


def test_auto_streaming_depends_on_size(tmp_path, monkeypatch) -> None:
    from oodforge.data import datasets

    root = make_folder(tmp_path / "imgs", {"a": 4})
    assert not isinstance(load_dataset(f"folder:{root}"), FileImageSet)
    monkeypatch.setattr(datasets, "STREAM_BYTES", 10)
    assert isinstance(load_dataset(f"folder:{root}"), FileImageSet)


# ---------------------------------------------------------------- CLI with YAML benchmarks and model specs

runner = CliRunner()


def factory_module(tmp_path: Path, monkeypatch, classes: int = 3) -> str:
    """A user module with a factory, importable as ``usernets``."""
    (tmp_path / "usernets.py").write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, {classes}))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usernets", None)
    return "module:usernets:make"


def test_score_yaml_benchmark_with_a_user_module(leaves, tmp_path, monkeypatch) -> None:
    spec = factory_module(tmp_path, monkeypatch)
    out = tmp_path / "run"
    result = runner.invoke(app, ["score", "--benchmark", str(leaves), "--model", spec, "--model-head", "4",
                                 "--detectors", "msp,knn:k=3,vim:dim=2", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "leaves" and saved["id_accuracy"] is not None
    assert {r["ood_dataset"] for r in saved["results"]} == {"weeds", "zipped", "noise"}
    assert saved["model"]["head"] == "4"


def test_score_torchvision_spec_with_weights(leaves, tmp_path) -> None:
    import torchvision

    net = torchvision.models.get_model("mobilenet_v3_small", num_classes=3)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "run"
    result = runner.invoke(app, ["score", "--benchmark", str(leaves), "--model", "torchvision:mobilenet_v3_small",
                                 "--weights", str(tmp_path / "w.pt"), "--detectors", "energy", "--out", str(out),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["model"]["head"] == "classifier.3"


def test_train_and_bench_take_a_yaml_benchmark(leaves, tmp_path) -> None:
    config = yaml.safe_load(leaves.read_text())
    config.update(backbone="small_cnn", image_size=28)
    leaves.write_text(yaml.safe_dump(config))
    out = tmp_path / "train"
    result = runner.invoke(app, ["train", "--benchmark", str(leaves), "--epochs", "1", "--batch-size", "8",
                                 "--lr", "0.01", "--detectors", "msp", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["model"]["num_classes"] == 3
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump({"benchmark": leaves.name, "detectors": "msp", "seeds": [0],
                                     "defaults": {"epochs": 1, "batch_size": 8, "lr": 0.01},
                                     "runs": [{"name": "ce"}]}))
    result = runner.invoke(app, ["bench", str(bench), "--out", str(tmp_path / "bench"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["benchmark"] == "leaves"


def _error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def _score(leaves: Path, tmp_path: Path, *extra: str):
    return runner.invoke(app, ["score", "--benchmark", str(leaves), "--detectors", "msp", "--out",
                               str(tmp_path / "run"), "--quiet", *extra])


def test_bad_yaml_missing_folder(leaves, tmp_path, monkeypatch) -> None:
    config = yaml.safe_load(leaves.read_text())
    config["ood"]["gone"] = "folder:nowhere/at/all"
    leaves.write_text(yaml.safe_dump(config))
    line = _error(_score(leaves, tmp_path, "--model", factory_module(tmp_path, monkeypatch)))
    assert "nowhere" in line


def test_bad_yaml_unknown_key(leaves, tmp_path, monkeypatch) -> None:
    config = yaml.safe_load(leaves.read_text())
    config["image_szie"] = 32
    leaves.write_text(yaml.safe_dump(config))
    line = _error(_score(leaves, tmp_path, "--model", factory_module(tmp_path, monkeypatch)))
    assert "image_szie" in line and str(leaves) in line


def test_bad_ood_folder_without_decodable_images(leaves, tmp_path, monkeypatch) -> None:
    (tmp_path / "junk" / "c").mkdir(parents=True)
    (tmp_path / "junk" / "c" / "0.jpg").write_bytes(b"not a jpeg at all")
    config = yaml.safe_load(leaves.read_text())
    config["ood"]["junk"] = "folder:junk"
    leaves.write_text(yaml.safe_dump(config))
    line = _error(_score(leaves, tmp_path, "--model", factory_module(tmp_path, monkeypatch)))
    assert "0.jpg" in line


def test_bad_head_name(leaves, tmp_path, monkeypatch) -> None:
    line = _error(_score(leaves, tmp_path, "--model", factory_module(tmp_path, monkeypatch), "--model-head", "9"))
    assert "'9'" in line


def test_bad_weights_for_the_architecture(leaves, tmp_path) -> None:
    import torchvision

    torch.save(torchvision.models.get_model("resnet18", num_classes=3).state_dict(), tmp_path / "r18.pt")
    line = _error(_score(leaves, tmp_path, "--model", "torchvision:mobilenet_v3_small", "--weights",
                         str(tmp_path / "r18.pt")))
    assert "r18.pt" in line and "mobilenet_v3_small" in line


def test_bad_class_count(leaves, tmp_path, monkeypatch) -> None:
    spec = factory_module(tmp_path, monkeypatch, classes=5)
    line = _error(_score(leaves, tmp_path, "--model", spec))
    assert "5 classes" in line and "3" in line


def test_in_memory_and_streamed_folders_give_the_same_pixels_at_a_target_shape(tmp_path) -> None:
    """Mixed sizes and modes, fitted to one shape: decoded-into-memory and streamed sets agree exactly."""
    rng = np.random.default_rng(4)
    (tmp_path / "mixed" / "c").mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 60), (64, 32), (20, 20)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "mixed" / "c" / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), "L").save(tmp_path / "mixed" / "c" / "3.png")
    for resize in ("stretch", "shorter_crop"):
        kwargs = {"image_shape": (16, 16, 3), "resize": resize}
        memory = load_dataset(f"folder:{tmp_path / 'mixed'}", streaming="never", **kwargs)
        streamed = load_dataset(f"folder:{tmp_path / 'mixed'}", streaming="always", **kwargs)
        assert memory.images.shape == (4, 16, 16, 3)
        assert np.array_equal(np.stack([streamed.load(i) for i in range(4)]), memory.images)

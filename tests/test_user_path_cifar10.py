"""Same numbers through the user's path: a ResNet-20 defined here (not oodforge's), the public CIFAR-10
weights, wrapped with ``wrap_model`` and scored on a YAML benchmark of ``folder:`` specs, against
``oodforge score --benchmark cifar10 --model resnet20``.

Preprocessing difference: the Tiny ImageNet folder holds 10,100 images (the 100 extra files of two
appended classes), the built-in set only val_0..val_9999; everything else is the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from conftest import real_root

DETECTORS = "msp,maxlogit,energy,mahalanobis,knn,vim,react,flow,representation"
OOD_PAIRS = {"tiny_imagenet": "tiny", "mnist": "mnist", "dtd": "dtd", "gaussian": "gaussian"}  # built-in -> YAML


class Block(nn.Module):
    """A CIFAR ResNet basic block with option-A (zero-padded, subsampled) shortcuts."""

    def __init__(self, inputs: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - inputs) // 2 if stride != 1 or inputs != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20, parameter names as in the public checkpoint; final layer ``linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, inputs = (16, 32, 64), 16
        for stage, planes in enumerate(widths, 1):
            blocks = [Block(inputs if i == 0 else planes, planes, 2 if stage > 1 and i == 0 else 1) for i in range(3)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            inputs = planes
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def load_resnet20(weights: Path) -> ResNet20:
    """The public checkpoint (keys prefixed ``module.``, no ``num_batches_tracked``) loaded into ``ResNet20``."""
    state = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    net = ResNet20()
    missing, unexpected = net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return net.eval()


def benchmark_yaml(root: Path, folder: Path) -> Path:
    """The user's benchmark file: CIFAR-10, Tiny ImageNet and DTD as folder specs inside the archives."""
    config = {
        "name": "cifar10_folders",
        "id": {"train": f"folder:{root}/cifar10-jpeg.tar.gz/cifar10_jpg/train",
               "test": f"folder:{root}/cifar10-jpeg.tar.gz/cifar10_jpg/test"},
        "ood": {"tiny": {"data": f"folder:{root}/tiny-imagenet-200-val.tar.gz/tiny-imagenet-200/val/images",
                         "group": "near"},
                "mnist": "mnist", "dtd": f"folder:{root}/dtd-subset-128.tar.gz/dtd-subset-128/images",
                "gaussian": "gaussian"},
        "image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    }
    path = folder / "cifar10_folders.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def compare(detectors: str, folder: Path) -> list[dict]:
    """Per (detector, OOD set): AUROC through the user's path and through ``oodforge score``."""
    import oodforge
    from oodforge.cli import app
    from oodforge.evaluation.runner import evaluate
    from oodforge.evaluation.specs import parse_detector_spec

    root = real_root("cifar10-jpeg.tar.gz", "tiny-imagenet-200-val.tar.gz", "dtd-subset-128.tar.gz", "MNIST",
                     "weights")
    weights = sorted((root / "weights").glob("resnet20-*.th"))[0]
    bench = oodforge.get_benchmark(str(benchmark_yaml(root, folder)))
    model = oodforge.wrap_model(load_resnet20(weights), head="linear", mean=bench.mean, std=bench.std)
    user = evaluate(model, bench, parse_detector_spec(detectors), quiet=True)
    result = CliRunner().invoke(app, ["score", "--benchmark", "cifar10", "--model", "resnet20", "--weights",
                                      str(weights), "--detectors", detectors, "--out", str(folder / "builtin"),
                                      "--precision", "32-true", "--quiet"])  # the user's path runs float32
    assert result.exit_code == 0, result.output
    builtin = json.loads((folder / "builtin" / "results.json").read_text())
    user_auroc = {(r["detector"], r["ood_dataset"]): r["auroc"] for r in user.results}
    rows = [{"detector": r["detector"], "ood_dataset": r["ood_dataset"], "builtin": r["auroc"],
             "user": user_auroc[r["detector"], OOD_PAIRS[r["ood_dataset"]]]} for r in builtin["results"]]
    return rows + [{"detector": "id_accuracy", "ood_dataset": "-", "builtin": builtin["id_accuracy"],
                    "user": user.id_accuracy}]


@pytest.mark.slow
def test_user_path_equals_builtin_scoring(tmp_path) -> None:
    rows = compare(DETECTORS, tmp_path)
    assert len(rows) == 4 * len(DETECTORS.split(",")) + 1
    for row in rows:
        assert abs(row["user"] - row["builtin"]) <= 0.005, row

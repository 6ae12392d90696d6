"""Every registered detector runs end to end on small real data: the public ResNet-20 on CIFAR-10 (against Tiny
ImageNet and MNIST) and a ResNet-20 trained here on Fashion-MNIST (against MNIST and notMNIST). Each gives finite
scores on every set and an AUROC row per OOD set; detectors whose model lacks what they need (a dropout layer, a
cosine head) are skipped by ``supports`` and say so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import oodforge
from conftest import real_root
from oodforge.data.benchmarks import get_benchmark
from oodforge.detectors import DETECTORS, create_detector
from oodforge.models.classifier import Classifier, ModelConfig
from oodforge.models.loading import load_model

# small settings where a default would take long on a few hundred images; every other detector runs as it is
OPTIONS = {"flow": {"epochs": 2, "blocks": 2, "batch_size": 64}, "nac": {"train_images": 200}}
TRAIN, TEST, OOD = 300, 100, 100


def every_spec(model: nn.Module, members: str | None) -> dict[str, dict]:
    """Every registered detector (with small options) that supports ``model``."""
    spec = {}
    for name in DETECTORS.names():
        options = dict(OPTIONS.get(name, {}))
        if name == "ensemble":
            options["members"] = members
        if create_detector(name, **options).supports(model):
            spec[name] = options
    return spec


def balanced(images, n: int, seed: int = 0):
    rows = np.random.default_rng(seed).choice(len(images), n, replace=False)
    return images.subset(np.sort(rows))


def run_every_detector(model: nn.Module, benchmark, ood: list[str], members: str, tmp_path) -> dict:
    train = balanced(benchmark.id_set("train"), TRAIN).torch_dataset()
    test = balanced(benchmark.id_set("test"), TEST).torch_dataset()
    sets = {name: balanced(benchmark.ood_set(name), OOD).torch_dataset() for name in ood}
    spec = every_spec(model, members)
    results = oodforge.evaluate_ood(model, train, test, sets, detectors=spec, out=tmp_path / "run", quiet=True,
                                    batch_size=100)
    rows = {(r["detector"], r["ood_dataset"]): r for r in results.rows}
    assert {d for d, _ in rows} == set(spec), "every supported detector gives rows"
    assert all(np.isfinite(r["auroc"]) and np.isfinite(r["fpr95"]) for r in rows.values())
    skipped = set(DETECTORS.names()) - set(spec)
    return {"rows": rows, "skipped": skipped, "accuracy": results.id_accuracy}


@pytest.mark.slow
def test_every_detector_on_cifar10(tmp_path) -> None:
    root = real_root("cifar10-jpeg.tar.gz", "weights/resnet20-12fca82f.th", "tiny-imagenet-200-val.tar.gz")
    benchmark = get_benchmark("cifar10")
    weights = root / "weights" / "resnet20-12fca82f.th"
    model, _ = load_model("resnet20", weights, benchmark)
    member = tmp_path / "member.pt"
    torch.save(model.state_dict(), member)  # the ensemble's second member: the same network (a plumbing check)
    outcome = run_every_detector(model, benchmark, ["tiny_imagenet", "mnist"], str(member), tmp_path)
    assert outcome["skipped"] <= {"cosine", "mc_dropout"}, "only the cosine head's score and MC dropout need more"
    assert outcome["rows"][("energy", "mnist")]["auroc"] > 0.8


@pytest.mark.slow
def test_every_detector_on_fashion_mnist(tmp_path) -> None:
    real_root("FashionMNIST", "MNIST", "notMNIST")
    benchmark = get_benchmark("fashion_mnist")
    torch.manual_seed(0)
    model = Classifier(ModelConfig(backbone="resnet20", num_classes=10, in_channels=1, mean=(0.286,), std=(0.353,)))
    train = benchmark.id_set("train").torch_dataset()
    loader = torch.utils.data.DataLoader(Subset(train, range(2000)), batch_size=100, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(3):  # three epochs on 2,000 images: a working classifier, not a good one
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    members = tmp_path / "member.pt"
    torch.save(model.state_dict(), members)
    outcome = run_every_detector(model, benchmark, ["mnist", "notmnist"], str(members), tmp_path)
    assert outcome["skipped"] <= {"cosine", "mc_dropout"}
    assert outcome["accuracy"] > 0.6, "a working classifier"

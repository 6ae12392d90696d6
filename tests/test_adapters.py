"""Model adapters: head detection per family, exact logits, features = input of the head, build_model specs."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from oodforge.models.adapters import WrappedClassifier, build_model, wrap_model
from oodforge.models.classifier import CheckpointError, ModelConfig, build_classifier

TORCHVISION = [  # name, expected head path, input side
    ("resnet18", "fc", 64),
    ("resnext50_32x4d", "fc", 64),
    ("wide_resnet50_2", "fc", 64),
    ("regnet_y_400mf", "fc", 64),
    ("vgg11", "classifier.6", 64),
    ("alexnet", "classifier.6", 64),
    ("efficientnet_b0", "classifier.1", 64),
    ("mobilenet_v2", "classifier.1", 64),
    ("mobilenet_v3_small", "classifier.3", 64),
    ("convnext_tiny", "classifier.2", 64),
    ("densenet121", "classifier", 64),
    ("vit_b_16", "heads.head", 224),
    ("swin_t", "head", 64),
]
TIMM = [("resnet18", "fc", 64), ("deit_tiny_patch16_224", "head", 224), ("convnext_atto", "head.fc", 64),
        ("efficientnet_b0", "classifier", 64)]  # fmt: skip


def images(side: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=generator)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_adapter_matches(net: nn.Module, expected_head: str, x: torch.Tensor) -> WrappedClassifier:
    model = wrap_model(net).eval()
    assert model.head_name == expected_head
    assert model.head is net.get_submodule(expected_head)
    with torch.no_grad():
        reference = net(x)
        features, logits = model.features_and_logits(x)
        assert max_diff(model.logits(x), reference) <= 1e-5
        assert max_diff(logits, reference) <= 1e-5
        assert features.shape == (x.shape[0], model.feature_dim)
        assert max_diff(model.features(x), features) == 0
        assert max_diff(model.head(features), reference) <= 1e-4
    assert model.num_classes == reference.shape[1]
    return model


@pytest.mark.parametrize(("name", "head", "side"), TORCHVISION, ids=[c[0] for c in TORCHVISION])
def test_torchvision_families(name: str, head: str, side: int) -> None:
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, num_classes=7).eval()
    model = assert_adapter_matches(net, head, images(side, n=1 if side == 224 else 2))
    assert model.num_classes == 7
    assert model.describe()["family"] == "torchvision"


@pytest.mark.parametrize(("name", "head", "side"), TIMM, ids=[c[0] for c in TIMM])
def test_timm_families(name: str, head: str, side: int) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=7).eval()
    x = images(side, n=1 if side == 224 else 2)
    model = assert_adapter_matches(net, head, x)
    with torch.no_grad():
        pre_logits = torch.flatten(net.forward_head(net.forward_features(x), pre_logits=True), 1)
        assert max_diff(model.features(x), pre_logits) <= 1e-5
    assert model.describe()["family"] == "timm"


class CustomNet(nn.Module):
    """A net whose final layer has a non-standard name, ``body.out``."""

    def __init__(self, calls: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.body = nn.ModuleDict({"hidden": nn.Linear(16, 8), "out": nn.Linear(8, 5)})
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body["hidden"](self.stem(x)))
        out = self.body["out"](h)
        for _ in range(self.calls - 1):
            out = out + self.body["out"](h)
        return out


def test_custom_head_name() -> None:
    torch.manual_seed(0)
    net = CustomNet().eval()
    model = wrap_model(net, head="body.out")
    x = images(16)
    with torch.no_grad():
        hidden = torch.relu(net.body["hidden"](net.stem(x)))
        assert max_diff(model.features(x), hidden) == 0
        assert max_diff(model.logits(x), net(x)) == 0
    assert (model.num_classes, model.feature_dim) == (5, 8)
    assert model.describe() == {"net": "CustomNet", "head": "body.out", "num_classes": 5, "feature_dim": 8,
                                "family": "generic"}  # fmt: skip


def test_custom_head_errors() -> None:
    net = CustomNet()
    with pytest.raises(ValueError, match="pass head=") as auto:
        wrap_model(net)
    assert "CustomNet" in str(auto.value) and "'body.out'" in str(auto.value)
    with pytest.raises(ValueError) as missing:
        wrap_model(net, head="body.nope")
    message = str(missing.value)
    assert "'body.nope'" in message and "CustomNet" in message and "'body.hidden', 'body.out'" in message
    with pytest.raises(ValueError, match=r"head 'stem.0' of CustomNet is a Conv2d, not an nn.Linear"):
        wrap_model(net, head="stem.0")


def test_explicit_head_overrides_detection() -> None:
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(4, 3))
    net.add_module("final", nn.Linear(3, 2))
    assert wrap_model(net).head_name == "fc"
    model = wrap_model(net, head="final")
    x = torch.randn(5, 4)
    assert max_diff(model.features(x), net.fc(x)) == 0


def test_hook_does_not_leak_and_results_repeat() -> None:
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=7).eval()
    model = wrap_model(net)
    hooks = (len(net.fc._forward_pre_hooks), len(net.fc._forward_hooks))
    x = images(32)
    with torch.no_grad():
        first = model.features_and_logits(x)
        second = model.features_and_logits(x)
        model.features(x)
    assert max_diff(first[0], second[0]) == 0 and max_diff(first[1], second[1]) == 0
    assert (len(net.fc._forward_pre_hooks), len(net.fc._forward_hooks)) == hooks
    with pytest.raises(RuntimeError):  # channel mismatch inside the net: the hook is still removed
        model.features_and_logits(torch.rand(2, 1, 32, 32))
    assert (len(net.fc._forward_pre_hooks), len(net.fc._forward_hooks)) == hooks


def test_head_called_twice_is_an_error() -> None:
    model = wrap_model(CustomNet(calls=2), head="body.out")
    with pytest.raises(RuntimeError, match="ran 2 times"):
        model.features(images(16))


def test_head_is_the_real_module_and_state_dict_has_no_duplicates() -> None:
    net = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=7)
    model = wrap_model(net, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert model.head is net.classifier[3]
    assert model.head.weight is net.classifier[3].weight and model.head.bias is net.classifier[3].bias
    assert model.net is net
    assert list(model.state_dict()) == ["net." + key for key in net.state_dict()]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in net.parameters())
    model.train()
    assert net.training
    model.eval()
    assert not net.training and model(images(32)).shape == (2, 7)


def test_normalisation() -> None:
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=7).eval()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model = wrap_model(net, mean=mean, std=std)
    x = images(32)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert max_diff(model.logits(x), net(normalised)) <= 1e-5
        assert max_diff(model.head(model.features(x)), net(normalised)) <= 1e-4
        assert max_diff(wrap_model(net).logits(x), net(x)) == 0
    info = json.loads(json.dumps(model.describe()))
    assert info["mean"] == mean and info["std"] == std and info["net"] == "ResNet" and info["head"] == "fc"
    with pytest.raises(ValueError, match="both mean and std"):
        wrap_model(net, mean=mean)


def test_moves_with_to() -> None:
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=7).eval()
    model = wrap_model(net, mean=[0.5] * 3, std=[0.5] * 3).to(torch.float64)
    x = images(32).double()
    with torch.no_grad():
        assert model.logits(x).dtype == torch.float64
        assert max_diff(model.logits(x), net((x - 0.5) / 0.5)) <= 1e-10
    if torch.cuda.is_available():
        model = model.to("cuda", torch.float32)
        with torch.no_grad():
            features, logits = model.features_and_logits(x.float().cuda())
        assert features.is_cuda and logits.is_cuda and features.shape == (2, 512)


def test_oodforge_classifier_passes_through() -> None:
    classifier = build_classifier(ModelConfig())
    assert wrap_model(classifier) is classifier
    wrapped = wrap_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), head="1")
    assert wrap_model(wrapped) is wrapped


def resnet18_state(seed: int, num_classes: int = 7) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=num_classes).eval()
    return net, net.state_dict()


@pytest.mark.parametrize("layout", ["plain", "module_prefix", "state_dict_key", "model_key"])
def test_build_model_torchvision_weights(tmp_path: Path, layout: str) -> None:
    reference, state = resnet18_state(seed=3)
    if layout == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    saved = {"state_dict": state, "epoch": 5} if layout == "state_dict_key" else state
    saved = {"model": state} if layout == "model_key" else saved
    path = tmp_path / "w.pt"
    torch.save(saved, path)
    torch.manual_seed(0)
    net = build_model("torchvision:resnet18", weights=path, num_classes=7)
    assert not net.training
    x = images(32)
    with torch.no_grad():
        assert max_diff(net(x), reference(x)) <= 1e-5


def test_build_model_without_weights() -> None:
    net = build_model("torchvision:mobilenet_v3_small", num_classes=4)
    assert isinstance(net, torchvision.models.MobileNetV3) and not net.training
    assert net.classifier[3].out_features == 4
    assert build_model("torchvision:mobilenet_v3_small").classifier[3].out_features == 1000


def test_build_model_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(resnet18_state(seed=0)[1], path)
    with pytest.raises(CheckpointError) as other_arch:
        build_model("torchvision:resnet34", weights=path, num_classes=7)
    message = str(other_arch.value)
    assert message.startswith(f"--weights {path} does not fit --model torchvision:resnet34: ")
    assert "80 keys of the model missing from the weights ('layer1.2.conv1.weight'," in message
    assert "\n" not in message
    with pytest.raises(CheckpointError) as other_classes:
        build_model("torchvision:resnet18", weights=path, num_classes=10)
    message = str(other_classes.value)
    assert message == (f"--weights {path} does not fit --model torchvision:resnet18: layer fc.weight: the model "
                       "expects shape (10, 512), the weights have (7, 512) (the model predicts 10 classes, the "
                       "weights 7); 1 more layer with a different shape ('fc.bias')")
    with pytest.raises(CheckpointError, match="not found"):
        build_model("torchvision:resnet18", weights=tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        build_model("torchvision:resnet18", weights=tmp_path / "junk.pt")


FACTORIES = """
from torch import nn

def with_classes(num_classes=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))

def fixed():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))

def not_a_net():
    return 42
"""


def test_build_model_module_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "oodforge_test_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "oodforge_test_factories", raising=False)
    assert build_model("module:oodforge_test_factories:with_classes")[1].out_features == 3
    net = build_model("module:oodforge_test_factories:with_classes", num_classes=6)
    assert net[1].out_features == 6 and not net.training
    assert build_model("module:oodforge_test_factories:fixed", num_classes=6)[1].out_features == 2
    path = tmp_path / "w.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    loaded = build_model("module:oodforge_test_factories:with_classes", weights=path, num_classes=6)
    assert torch.equal(loaded[1].weight, net[1].weight)
    assert wrap_model(loaded, head="1").feature_dim == 12
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        build_model("module:no_such_module_xyz:make")
    with pytest.raises(ValueError, match="'missing_factory'"):
        build_model("module:oodforge_test_factories:missing_factory")
    with pytest.raises(ValueError, match="not an nn.Module"):
        build_model("module:oodforge_test_factories:not_a_net")
    with pytest.raises(ValueError, match="module:pkg.mod:factory"):
        build_model("module:oodforge_test_factories")


def test_build_model_timm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    reference = build_model("timm:resnet18", num_classes=5)
    path = tmp_path / "timm.pt"
    torch.save({"model": reference.state_dict()}, path)
    torch.manual_seed(1)
    net = build_model("timm:resnet18", weights=path, num_classes=5)
    x = images(32)
    with torch.no_grad():
        assert max_diff(net(x), reference(x)) <= 1e-5
    assert wrap_model(net).describe()["family"] == "timm"
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_model("timm:no_such_net")
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ValueError, match=r"timm is not installed: pip install 'oodforge\[timm\]'"):
        build_model("timm:resnet18")


@pytest.mark.parametrize("spec", ["keras:resnet", "resnet18", "torchvision:", "hub:x/y"])
def test_build_model_unknown_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="torchvision:NAME, timm:NAME or module:pkg.mod:factory"):
        build_model(spec)


def test_build_model_unknown_torchvision_name() -> None:
    with pytest.raises(ValueError, match="unknown torchvision model 'no_such_net'"):
        build_model("torchvision:no_such_net")


def test_adapters_respect_layering() -> None:
    source = Path(__file__).parents[1] / "src" / "oodforge" / "models" / "adapters.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    forbidden = {f"oodforge.{name}" for name in ("train", "evaluate", "bench", "runs", "cli")}
    assert imported & forbidden == set()
    assert any(name.startswith("oodforge.models") for name in imported)

"""Feature extractors: each maps images to penultimate features and reports ``feature_dim``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from oodforge.util.errors import ConfigError
from oodforge.util.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


@BACKBONES.register("small_cnn")
class SmallCNN(nn.Module):
    """A ~415k-parameter CNN for 28x28 inputs: two 5x5 conv blocks, then a 256-d feature layer."""

    def __init__(self, in_channels: int = 1, feature_dim: int = 256) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7), nn.Flatten(),
            nn.Linear(32 * 49, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class _ShortcutA(nn.Module):
    """Option-A shortcut of the CIFAR ResNets: stride-2 subsampling plus zero-padded channels."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, option: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = _ShortcutA(planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images (He et al. 2016); parameter names match the public CIFAR checkpoints."""

    def __init__(self, blocks: list[int], widths: list[int], in_channels: int = 3, option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(_BasicBlock(in_planes, planes, stride, option))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.feature_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@BACKBONES.register("resnet20")
def resnet20(in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (0.27M parameters), option-A shortcuts, as in the pretrained CIFAR-10 checkpoint."""
    return CifarResNet([3, 3, 3], [16, 32, 64], in_channels, option="A")


@BACKBONES.register("resnet18")
def resnet18(in_channels: int = 3) -> CifarResNet:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), projection shortcuts; for GPU runs."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], in_channels, option="B")


class TorchvisionBackbone(nn.Module):
    """Any torchvision classification model with its final classifier replaced by the identity."""

    def __init__(self, name: str, weights: str | None = None, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels != 3:
            raise ConfigError(f"torchvision model {name!r} expects 3 input channels, got {in_channels}")
        model = torchvision.models.get_model(name, weights=weights)
        self.classifier = _pop_classifier(model)
        self.feature_dim = self.classifier.in_features
        self.net = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.net(x), 1)


def _pop_classifier(model: nn.Module) -> nn.Linear:
    """Replace the last ``nn.Linear`` of a torchvision model by ``nn.Identity`` and return it."""
    for attr in ("fc", "classifier", "head", "heads"):
        module = getattr(model, attr, None)
        if module is None:
            continue
        if isinstance(module, nn.Linear):
            setattr(model, attr, nn.Identity())
            return module
        if isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear):
            last = module[-1]
            module[-1] = nn.Identity()
            return last
    raise ConfigError(f"cannot find the final linear classifier of {type(model).__name__}")


def create_backbone(name: str, in_channels: int = 3) -> nn.Module:
    """Build a registered backbone, or ``torchvision:<model name>`` for any torchvision classifier."""
    if name.startswith("torchvision:"):
        return TorchvisionBackbone(name.split(":", 1)[1], in_channels=in_channels)
    return BACKBONES.create(name, in_channels=in_channels)

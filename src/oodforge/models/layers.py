"""Default intermediate layers of a network: the ends of its stages, which multi-layer detectors read.

- timm models: the modules of ``feature_info`` (what ``forward_intermediates`` returns);
- ResNet-like nets (torchvision ResNet/ResNeXt/Wide ResNet, oodforge's CIFAR ResNets): ``layer1``, ``layer2``, ...;
- nets with a ``features`` trunk (VGG, DenseNet, MobileNet, EfficientNet, ConvNeXt, RegNet's ``trunk_output``,
  oodforge's small CNN's ``body``):
  the last module of the trunk at each spatial size, found by one probe pass on a small zero image;
- torchvision ViT: every fourth encoder block and the last;
- anything else: none (pass ``layers=`` to the model or to the detector).
"""

from __future__ import annotations

import re

import torch
from torch import nn

_STAGE = re.compile(r"layer\d+$")
PROBE_SIZE = 64  # the probe image's side, small enough to be cheap, large enough for five stride-2 stages


def default_layers(net: nn.Module, in_channels: int = 3) -> list[str]:
    """The stage-end modules of ``net``, by name relative to ``net`` (``[]`` when none are known)."""
    info = getattr(net, "feature_info", None)
    if info is not None and callable(getattr(info, "module_name", None)):
        return [info.module_name(i) for i in range(len(info))]
    if isinstance(info, list) and info and all(isinstance(item, dict) and "module" in item for item in info):
        return [item["module"] for item in info]
    stages = [name for name, _ in net.named_children() if _STAGE.match(name)]
    if stages:
        return stages
    for trunk_name in ("features", "trunk_output", "body"):
        trunk = getattr(net, trunk_name, None)
        if isinstance(trunk, nn.Sequential):
            return [f"{trunk_name}.{name}" for name in _resolution_ends(net, trunk, in_channels)]
    encoder = getattr(getattr(net, "encoder", None), "layers", None)
    if isinstance(encoder, nn.Sequential):
        names = [name for name, _ in encoder.named_children()]
        picked = names[3::4] if len(names) > 4 else names
        if names and picked[-1] != names[-1]:
            picked.append(names[-1])
        return [f"encoder.layers.{name}" for name in picked]
    return []


def _resolution_ends(net: nn.Module, trunk: nn.Sequential, in_channels: int) -> list[str]:
    """The children of ``trunk`` that end each spatial size, from one probe pass of ``net`` in eval mode."""
    sizes: dict[str, tuple[int, ...]] = {}
    handles = [child.register_forward_hook(lambda _m, _a, out, name=name: sizes.__setitem__(name, tuple(out.shape[2:])))
               for name, child in trunk.named_children()]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            parameter = next(net.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            net(torch.zeros(1, in_channels, PROBE_SIZE, PROBE_SIZE, device=device))
    except Exception:  # noqa: BLE001 (a net that cannot take the probe has no default; layers= names them)
        return []
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    names = [name for name, _ in trunk.named_children() if name in sizes and len(sizes[name]) == 2]
    return [name for i, name in enumerate(names) if i + 1 == len(names) or sizes[names[i + 1]] != sizes[name]]

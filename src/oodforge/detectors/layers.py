"""Intermediate layers for detectors that read them (Gram, multi-layer Mahalanobis, RankFeat, ...).

A detector asks for keys ``<layer>@<reduction>``: ``<layer>`` names a module of the network (``layer3``, or
``backbone.layer3`` in oodforge's own classifiers; a wrapped net's names are its own), and ``<reduction>`` says how
each output map is reduced per image, so that only small vectors are kept and cached:

- ``mean``: the spatial mean, (N, C) for maps (N, C, H, W); the token mean for (N, T, C); (N, D) as it is;
- ``gram<P>``: Gram features of orders 1..P (Sastry & Oore 2020): for the map F (C, HW) of one image and each p,
  the signed p-th root of the row sums of F^p F^p^T (as the authors' code and pytorch-ood compute it), shape
  (N, P * C);
- ``rankfeat``: the spatial mean after the map's largest singular component is removed (Song et al. 2022),
  (N, C), from ``RANKFEAT_ITERATIONS`` power iterations as the paper does.

``layer_outputs`` runs the network once with forward hooks on the named modules and returns
(features, logits, {key: values}); the output cache stores each key beside the logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from oodforge.util.errors import ConfigError

RANKFEAT_ITERATIONS = 20
_GRAM = re.compile(r"gram([1-9][0-9]?)$")


def layer_key(layer: str, reduction: str) -> str:
    """The key of ``layer``'s outputs under ``reduction``: ``<layer>@<reduction>``."""
    return f"{layer}@{reduction}"


def split_key(key: str) -> tuple[str, str]:
    """``<layer>@<reduction>`` -> (layer, reduction), with the reduction checked."""
    layer, sep, reduction = key.rpartition("@")
    if not sep or not layer:
        raise ConfigError(f"layer key {key!r} must be <layer>@<reduction>")
    reducer(reduction)
    return layer, reduction


def spatial_mean(maps: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C) mean over positions; (N, T, C) -> (N, C) mean over tokens; (N, D) unchanged."""
    maps = maps.float()
    if maps.ndim == 4:
        return maps.mean(dim=(2, 3))
    if maps.ndim == 3:
        return maps.mean(dim=1)
    return maps.flatten(1)


def _as_channel_rows(maps: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, HW); token maps (N, T, C) -> (N, C, T); (N, D) -> (N, D, 1)."""
    maps = maps.float()
    if maps.ndim == 4:
        return maps.flatten(2)
    if maps.ndim == 3:
        return maps.transpose(1, 2)
    return maps.flatten(1).unsqueeze(2)


def gram_features(maps: Tensor, orders: int) -> Tensor:
    """Signed p-th roots of the row sums of the Gram matrices of orders p = 1..``orders``, (N, orders * C)."""
    rows = _as_channel_rows(maps).double()
    parts = []
    for p in range(1, orders + 1):
        powered = rows.pow(p)
        sums = (powered @ powered.transpose(1, 2)).sum(dim=2)
        parts.append(sums.sign() * sums.abs().pow(1.0 / p))
    return torch.cat(parts, dim=1).float()


def rank1_removed_mean(maps: Tensor, iterations: int = RANKFEAT_ITERATIONS) -> Tensor:
    """The spatial mean of each map (C, HW) minus its largest singular component s u v^T, (N, C), by power
    iteration from a fixed start (the paper's approximation of the SVD)."""
    rows = _as_channel_rows(maps)
    v = torch.ones(rows.shape[0], rows.shape[2], 1, dtype=rows.dtype, device=rows.device)
    v = v / v.norm(dim=1, keepdim=True)
    for _ in range(iterations):
        u = rows @ v
        u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
        v = rows.transpose(1, 2) @ u
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sigma_u = rows @ v  # (N, C, 1) = s u
    removed = rows - sigma_u @ v.transpose(1, 2)
    return removed.mean(dim=2)


def reducer(reduction: str) -> Callable[[Tensor], Tensor]:
    """The function that reduces one batch of a layer's outputs under ``reduction``."""
    if reduction == "mean":
        return spatial_mean
    if reduction == "rankfeat":
        return rank1_removed_mean
    match = _GRAM.match(reduction)
    if match:
        orders = int(match.group(1))
        return lambda maps: gram_features(maps, orders)
    raise ConfigError(f"unknown layer reduction {reduction!r}; known: mean, rankfeat, gram<P> (P in 1..99)")


def layer_values(outputs: object, key: str) -> Tensor:
    """The (N, D) values of layer key ``key`` in ``outputs`` (a ``ModelOutputs``), or one error naming the key."""
    values = getattr(outputs, "layers", {}).get(key)
    if values is None:
        raise ConfigError(f"the outputs hold no layer {key!r} (extract it with layers=[{key!r}])")
    return values.flatten(1)


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The module ``name`` of ``model`` (through ``model.layer_module`` when the model maps its own names)."""
    resolve = getattr(model, "layer_module", None)
    try:
        return resolve(name) if callable(resolve) else model.get_submodule(name)
    except AttributeError:
        known = ", ".join(model_layers(model)) or "none found"
        raise ConfigError(f"the model has no layer {name!r}; its default layers: {known}") from None


def model_layers(model: nn.Module) -> list[str]:
    """The model's default layers (``model.default_layers()``), or [] when it names none."""
    default = getattr(model, "default_layers", None)
    return list(default()) if callable(default) else []


def chosen_layers(model: nn.Module | None, layers: str | None) -> list[str]:
    """The layers a detector reads: its ``layers`` option (names joined by ``+``), else the model's defaults."""
    if layers:
        return [name.strip() for name in layers.split("+") if name.strip()]
    names = model_layers(model) if model is not None else []
    if not names:
        raise ConfigError("the model names no default layers; give the detector layers=<name>+<name> "
                          "(module names, as in model.named_modules())")
    return names


def forward_with_layers(model: nn.Module, layers: Sequence[str], forward: Callable[[], object]
                        ) -> tuple[object, dict[str, Tensor]]:
    """(what ``forward()`` returns, {layer: its raw output}) with forward hooks on ``layers`` of ``model``; each
    layer must run exactly once (one error naming it otherwise). The outputs stay in the autograd graph, if any."""
    maps: dict[str, Tensor] = {}
    calls: dict[str, int] = {}

    def hook_for(layer: str) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            maps[layer] = output[0] if isinstance(output, tuple | list) else output
            calls[layer] = calls.get(layer, 0) + 1
        return hook

    handles = [find_layer(model, layer).register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        result = forward()
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        if calls.get(layer, 0) != 1:
            raise ConfigError(f"layer {layer!r} ran {calls.get(layer, 0)} times in one forward pass, expected once; "
                              "name a module that runs once per image")
    return result, maps


def layer_outputs(model: nn.Module, x: Tensor, keys: Sequence[str],
                  features_and_logits: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]
                  ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(features, logits, {key: reduced outputs}) of one forward pass, the layers read by forward hooks and
    reduced in float32/64 (outside any bf16 autocast)."""
    by_layer: dict[str, list[tuple[str, Callable]]] = {}
    for key in keys:
        layer, reduction = split_key(key)
        by_layer.setdefault(layer, []).append((key, reducer(reduction)))
    (features, logits), maps = forward_with_layers(model, list(by_layer), lambda: features_and_logits(model, x))
    values: dict[str, Tensor] = {}
    for layer, reductions in by_layer.items():
        with torch.autocast(maps[layer].device.type, enabled=False):
            for key, reduce in reductions:
                values[key] = reduce(maps[layer].float())
    return features, logits, values

"""One forward pass per (model, dataset): logits, penultimate features and labels, cached on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from oodforge.data.datasets import cache_root
from oodforge.data.imageset import ImageSet
from oodforge.detectors.base import ModelOutputs
from oodforge.io import atomic_torch_save
from oodforge.progress import progress_bar


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's configuration and every tensor in its state dict."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(json.dumps(getattr(config, "__dict__", {}), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def images_fingerprint(images: ImageSet) -> str:
    """A short hash of an ``ImageSet``'s name, shape and pixels (sampled rows, for speed)."""
    digest = hashlib.sha256(f"{images.name}{images.images.shape}".encode())
    step = max(1, len(images) // 256)
    digest.update(np.ascontiguousarray(images.images[::step]).tobytes())
    digest.update(images.labels.tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def compute_outputs(model: nn.Module, images: ImageSet, device: torch.device | str = "cpu",
                    batch_size: int = 500, quiet: bool = True) -> ModelOutputs:
    """Run ``model`` (eval mode) over ``images`` without augmentation; outputs are on the CPU."""
    model.eval()
    loader = DataLoader(images.torch_dataset(), batch_size=batch_size, shuffle=False)
    parts = []
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"forward {images.name}", total=len(loader))
        for x, y in loader:
            features = model.features(x.to(device, non_blocking=True))
            logits = model.head(features)
            parts.append(ModelOutputs(logits.float().cpu(), features.float().cpu(), y))
            bar.advance(task)
    return ModelOutputs.cat(parts)


class OutputCache:
    """Outputs stored under ``<cache>/outputs/<model hash>/<dataset hash>.pt`` and reused by every detector."""

    def __init__(self, folder: Path | None = None, enabled: bool = True) -> None:
        self.folder = folder or cache_root() / "outputs"
        self.enabled = enabled

    def outputs(self, model: nn.Module, images: ImageSet, device: torch.device | str = "cpu",
                batch_size: int = 500, quiet: bool = True, model_key: str | None = None) -> ModelOutputs:
        """Cached outputs of ``model`` on ``images``, computed on a miss."""
        if not self.enabled:
            return compute_outputs(model, images, device, batch_size, quiet)
        path = self.folder / (model_key or model_fingerprint(model)) / f"{images.name}-{images_fingerprint(images)}.pt"
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                return ModelOutputs(state["logits"], state["features"], state["labels"])
            except Exception:  # a damaged entry is recomputed
                path.unlink(missing_ok=True)
        out = compute_outputs(model, images, device, batch_size, quiet)
        atomic_torch_save({"logits": out.logits, "features": out.features, "labels": out.labels}, path)
        return out

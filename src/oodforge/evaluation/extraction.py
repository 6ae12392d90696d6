"""Output extraction (any model, any data).

``extract_outputs`` runs a classifier over a DataLoader, Dataset or tensor and returns its logits,
penultimate features and labels; ``compute_outputs`` does the same for an image set, writing the outputs
batch by batch into ``.npy`` files when given a folder (``OutputWriter``), so a set larger than memory costs
disk, not RAM (``oodforge.evaluation.cache`` keeps them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from oodforge.data.imageset import ImageSet
from oodforge.data.streaming import FileImageSet
from oodforge.detectors.base import features_and_logits
from oodforge.models.adapters import classifier_view
from oodforge.outputs import ModelOutputs
from oodforge.util.errors import ConfigError
from oodforge.util.precision import autocast
from oodforge.util.progress import progress_bar

Data = DataLoader | Dataset | Tensor


as_classifier = classifier_view


def as_loader(data: Data, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``data`` (used as is when it already is one), in order."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Tensor):
        data = TensorDataset(data)
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a DataLoader, a torch Dataset or a tensor, got {type(data).__name__}")
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def split_batch(batch: object) -> tuple[Tensor, Tensor | None]:
    """A batch ``x``, ``(x,)`` or ``(x, y, ...)`` -> (x, y or None)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 else None
        return batch[0], None if labels is None else torch.as_tensor(labels)
    raise TypeError(f"a batch must be x or (x, y) with x a tensor, got {type(batch).__name__}")


def default_device() -> str:
    """Where scoring runs unless told otherwise: ``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def forward_batches(model: nn.Module, loader: DataLoader, device: torch.device | str, quiet: bool = True,
                    label: str = "forward", precision: str = "32-true"
                    ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """(features, logits, labels) per batch, float32 on the CPU, in inference mode with the model in eval
    mode, the forward pass under ``precision``'s autocast; the model's previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), progress_bar(quiet) as bar:
            task = bar.add_task(label, total=len(loader) if hasattr(loader, "__len__") else None)
            for batch in loader:
                x, y = split_batch(batch)
                with autocast(precision, device):
                    features, logits = features_and_logits(model, x.to(device, non_blocking=True))
                yield features.flatten(1).float().cpu(), logits.float().cpu(), y
                bar.advance(task)
    finally:
        model.train(was_training)


def extract_outputs(model: nn.Module, data: Data, device: torch.device | str | None = None,
                    batch_size: int = 256, num_workers: int = 0, quiet: bool = False,
                    precision: str = "32-true") -> ModelOutputs:
    """Logits, penultimate features and labels (None if the batches have none) of ``model`` on ``data``.

    ``model`` is any classifier (wrapped with ``wrap_model`` when it is a plain network); ``data`` a
    DataLoader, a Dataset or a tensor of inputs, with batches ``x`` or ``(x, y)``. ``precision``:
    ``32-true``, ``bf16-mixed`` (autocast; outputs stay float32) or ``auto`` (``oodforge.util.precision``).
    """
    model = as_classifier(model)
    device = model_device(model) if device is None else torch.device(device)
    loader = as_loader(data, batch_size, num_workers)
    features, logits, labels = [], [], []
    for f, lg, y in forward_batches(model, loader, device, quiet, "forward", precision):
        features.append(f)
        logits.append(lg)
        labels.append(y)
    if not logits:
        raise ConfigError("data yielded no batches")
    has_labels = all(y is not None for y in labels)
    return ModelOutputs(torch.cat(logits), torch.cat(features),
                        torch.cat([y.long() for y in labels]) if has_labels else None)


Images = ImageSet | FileImageSet


def loader_workers(images: Images) -> int:
    """DataLoader workers for a set: none for decoded arrays; ``$OODFORGE_WORKERS`` or the CPU count
    (at most 8) for streamed files."""
    if isinstance(images, ImageSet):
        return 0
    return int(os.environ.get("OODFORGE_WORKERS", min(8, os.cpu_count() or 1)))


def image_loader(images: Images, batch_size: int, transform=None) -> DataLoader:
    """An in-order DataLoader over an image set (streamed sets decode in worker processes)."""
    workers = loader_workers(images)
    return DataLoader(images.torch_dataset(transform), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)


def compute_outputs(model: nn.Module, images: Images, device: torch.device | str = "cpu", batch_size: int = 500,
                    quiet: bool = True, folder: Path | None = None, precision: str = "32-true") -> ModelOutputs:
    """Run ``model`` (eval mode, ``precision``) over ``images`` without augmentation; with ``folder``, write
    the outputs there batch by batch as ``.npy`` files and return them memory-mapped."""
    model = as_classifier(model)
    batches = forward_batches(model, image_loader(images, batch_size), device, quiet, f"forward {images.name}",
                              precision)
    try:
        if folder is None:
            return ModelOutputs.cat([ModelOutputs(logits, features, y) for features, logits, y in batches])
        writer = OutputWriter(folder, len(images))
        for features, logits, y in batches:
            writer.add(features, logits, y)
        return writer.finish()
    finally:  # a failed write (full disk) must not leave the generator, and inference mode, open
        batches.close()


class OutputWriter:
    """Writes outputs batch by batch into ``logits.npy``, ``features.npy`` and ``labels.npy`` of a folder."""

    def __init__(self, folder: Path, rows: int) -> None:
        self.folder, self.rows, self.filled = folder, rows, 0
        self.arrays: dict[str, np.ndarray] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        """Append one batch."""
        if not self.arrays:
            for name, width in (("features", features.shape[1]), ("logits", logits.shape[1])):
                self.arrays[name] = np.lib.format.open_memmap(self.folder / f"{name}.npy", "w+", np.float32,
                                                              (self.rows, width))
            self.arrays["labels"] = np.lib.format.open_memmap(self.folder / "labels.npy", "w+", np.int64,
                                                              (self.rows,))
        end = self.filled + len(logits)
        self.arrays["features"][self.filled:end] = features.numpy()
        self.arrays["logits"][self.filled:end] = logits.numpy()
        self.arrays["labels"][self.filled:end] = -1 if labels is None else labels.numpy()
        self.filled = end

    def finish(self) -> ModelOutputs:
        """Flush, check the row count and return the outputs memory-mapped."""
        if self.filled != self.rows:
            raise RuntimeError(f"expected {self.rows} rows of outputs, got {self.filled}")
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        (self.folder / "complete").write_text("1\n")
        return read_outputs(self.folder)


def read_outputs(folder: Path) -> ModelOutputs:
    """Outputs written by ``OutputWriter``, memory-mapped (copy-on-write, so nothing writes back)."""
    arrays = {n: torch.from_numpy(np.load(folder / f"{n}.npy", mmap_mode="c")) for n in ("logits", "features",
                                                                                         "labels")}
    return ModelOutputs(arrays["logits"], arrays["features"], arrays["labels"])



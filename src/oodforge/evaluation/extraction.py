"""Output extraction (any model, any data).

``extract_outputs`` runs a classifier over a DataLoader, Dataset or tensor and returns its logits,
penultimate features and labels; ``compute_outputs`` does the same for an image set, writing the outputs
batch by batch into ``.npy`` files when given a folder (``OutputWriter``), so a set larger than memory costs
disk, not RAM (``oodforge.evaluation.cache`` keeps them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from oodforge.data.imageset import ImageSet
from oodforge.data.streaming import FileImageSet
from oodforge.detectors.base import forward_outputs
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
                    label: str = "forward", precision: str = "32-true", layers: Sequence[str] = ()
                    ) -> Iterator[tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]]:
    """(features, logits, labels, {layer key: values}) per batch, float32 on the CPU, in inference mode with the
    model in eval mode, the forward pass under ``precision``'s autocast; the model's previous mode is restored
    afterwards. ``layers``: keys ``<layer>@<reduction>`` read by hooks (``oodforge.detectors.layers``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), progress_bar(quiet) as bar:
            task = bar.add_task(label, total=len(loader) if hasattr(loader, "__len__") else None)
            for batch in loader:
                x, y = split_batch(batch)
                with autocast(precision, device):
                    features, logits, values = forward_outputs(model, x.to(device, non_blocking=True), layers)
                yield (features.flatten(1).float().cpu(), logits.float().cpu(), y,
                       {key: value.float().cpu() for key, value in values.items()})
                bar.advance(task)
    finally:
        model.train(was_training)


def extract_outputs(model: nn.Module, data: Data, device: torch.device | str | None = None,
                    batch_size: int = 256, num_workers: int = 0, quiet: bool = False,
                    precision: str = "32-true", layers: Sequence[str] = ()) -> ModelOutputs:
    """Logits, penultimate features and labels (None if the batches have none) of ``model`` on ``data``.

    ``model`` is any classifier (wrapped with ``wrap_model`` when it is a plain network); ``data`` a
    DataLoader, a Dataset or a tensor of inputs, with batches ``x`` or ``(x, y)``. ``precision``:
    ``32-true``, ``bf16-mixed`` (autocast; outputs stay float32) or ``auto`` (``oodforge.util.precision``).
    ``layers``: intermediate layer keys ``<layer>@<reduction>`` to add (``ModelOutputs.layers``).
    """
    model = as_classifier(model)
    device = model_device(model) if device is None else torch.device(device)
    loader = as_loader(data, batch_size, num_workers)
    parts = [ModelOutputs(logits, features, y, values)
             for features, logits, y, values in forward_batches(model, loader, device, quiet, "forward", precision,
                                                                 layers)]
    if not parts:
        raise ConfigError("data yielded no batches")
    has_labels = all(p.labels is not None for p in parts)
    outputs = ModelOutputs.cat([ModelOutputs(p.logits, p.features, None, p.layers) for p in parts])
    outputs.labels = torch.cat([p.labels.long() for p in parts]) if has_labels else None
    return outputs


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
                    quiet: bool = True, folder: Path | None = None, precision: str = "32-true",
                    layers: Sequence[str] = ()) -> ModelOutputs:
    """Run ``model`` (eval mode, ``precision``) over ``images`` without augmentation; with ``folder``, write
    the outputs there batch by batch as ``.npy`` files and return them memory-mapped. ``layers``: intermediate
    layer keys to add (``ModelOutputs.layers``)."""
    model = as_classifier(model)
    batches = forward_batches(model, image_loader(images, batch_size), device, quiet, f"forward {images.name}",
                              precision, layers)
    try:
        if folder is None:
            return ModelOutputs.cat([ModelOutputs(logits, features, y, values)
                                     for features, logits, y, values in batches])
        writer = OutputWriter(folder, len(images))
        for features, logits, y, values in batches:
            writer.add(features, logits, y, values)
        return writer.finish()
    finally:  # a failed write (full disk) must not leave the generator, and inference mode, open
        batches.close()


class OutputWriter:
    """Writes outputs batch by batch into ``logits.npy``, ``features.npy``, ``labels.npy`` and one
    ``layer-<key>.npy`` per intermediate layer key (``layers.json`` maps the keys to the files)."""

    def __init__(self, folder: Path, rows: int) -> None:
        self.folder, self.rows, self.filled = folder, rows, 0
        self.arrays: dict[str, np.ndarray] = {}
        self.layer_files: dict[str, str] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def _open(self, name: str, dtype: type, shape: tuple[int, ...]) -> None:
        self.arrays[name] = np.lib.format.open_memmap(self.folder / f"{name}.npy", "w+", dtype, shape)

    def add(self, features: Tensor, logits: Tensor, labels: Tensor | None,
            layers: dict[str, Tensor] | None = None) -> None:
        """Append one batch."""
        layers = layers or {}
        if not self.arrays:
            self._open("features", np.float32, (self.rows, features.shape[1]))
            self._open("logits", np.float32, (self.rows, logits.shape[1]))
            self._open("labels", np.int64, (self.rows,))
            for index, (key, values) in enumerate(sorted(layers.items())):
                self.layer_files[key] = f"layer-{index}"
                self._open(self.layer_files[key], np.float32, (self.rows, *values.shape[1:]))
        if set(layers) != set(self.layer_files):
            raise RuntimeError(f"batch has layers {sorted(layers)}, expected {sorted(self.layer_files)}")
        end = self.filled + len(logits)
        self.arrays["features"][self.filled:end] = features.numpy()
        self.arrays["logits"][self.filled:end] = logits.numpy()
        self.arrays["labels"][self.filled:end] = -1 if labels is None else labels.numpy()
        for key, values in layers.items():
            self.arrays[self.layer_files[key]][self.filled:end] = values.float().numpy()
        self.filled = end

    def finish(self) -> ModelOutputs:
        """Flush, check the row count and return the outputs memory-mapped."""
        if self.filled != self.rows:
            raise RuntimeError(f"expected {self.rows} rows of outputs, got {self.filled}")
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        (self.folder / "layers.json").write_text(json.dumps(self.layer_files, sort_keys=True) + "\n")
        (self.folder / "complete").write_text("1\n")
        return read_outputs(self.folder)


def read_outputs(folder: Path) -> ModelOutputs:
    """Outputs written by ``OutputWriter``, memory-mapped (copy-on-write, so nothing writes back)."""
    def load(name: str) -> Tensor:
        return torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c"))

    index = folder / "layers.json"
    files = json.loads(index.read_text()) if index.is_file() else {}
    return ModelOutputs(load("logits"), load("features"), load("labels"),
                        {key: load(name) for key, name in files.items()})

"""The on-disk output cache: one forward pass per (model, set) under ``$OODFORGE_CACHE/outputs``, written batch
by batch into ``.npy`` files and read back memory-mapped, reused by every detector and every later run. Its key
covers everything that determines the outputs: every pixel or file of the set, its labels, the model's weights,
structure and code, the precision and oodforge itself (``model_fingerprint``, ``ImageSet.fingerprint``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from oodforge.data.datasets import cache_root
from oodforge.evaluation.extraction import Images, OutputWriter, compute_outputs, read_outputs
from oodforge.outputs import ModelOutputs
from oodforge.util.atomic import partial_path, remove_stale_temp_files
from oodforge.util.code_identity import code_identity, oodforge_identity
from oodforge.util.precision import resolve_precision


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of everything about a model that determines its outputs.

    Its configuration (or ``describe()``: the input normalization of wrapped nets), its structure
    (``repr``: every layer with its settings), every parameter and buffer (non-persistent ones too),
    each with its name, dtype and shape, and the code of every class it is built from
    (``oodforge.util.code_identity``: library versions, or the source of user code).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(json.dumps(getattr(config, "__dict__", {}), sort_keys=True, default=str).encode())
    describe = getattr(model, "describe", None)
    if callable(describe) and config is None:
        digest.update(json.dumps(describe(), sort_keys=True, default=str).encode())
    digest.update(_ADDRESS.sub("0x", repr(model)).encode())
    digest.update(json.dumps(code_identity({type(m) for m in model.modules()}), sort_keys=True).encode())
    for name, tensor in itertools.chain(model.named_parameters(remove_duplicate=False),
                                        model.named_buffers(remove_duplicate=False)):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")  # object addresses some reprs show differ from run to run


class OutputCache:
    """Outputs stored under ``<cache>/outputs/<model hash>/<dataset>-<hash>/`` and reused by every detector.

    A failed write (full disk, read-only cache) warns and goes on without the cache. Partial entries
    that a killed process left in a model's folder are removed before a new entry is written.
    """

    def __init__(self, folder: Path | None = None, enabled: bool = True) -> None:
        self.folder = folder or cache_root() / "outputs"
        self.enabled = enabled
        self.key_seconds = 0.0  # time spent hashing models and sets for cache keys

    def outputs(self, model: nn.Module, images: Images, device: torch.device | str = "cpu",
                batch_size: int = 500, quiet: bool = True, model_key: str | None = None,
                precision: str = "32-true", layers: Sequence[str] = ()) -> ModelOutputs:
        """Cached outputs of ``model`` on ``images`` under ``precision``, computed on a miss (float32 and
        bf16 outputs are kept apart: ``<dataset>-<hash>`` and ``<dataset>-<hash>@bf16-mixed``), with the
        intermediate ``layers`` (keys ``<layer>@<reduction>``) when asked (``layer_outputs``)."""
        outputs = self._outputs(model, images, device, batch_size, quiet, model_key, precision)
        if not layers:
            return outputs
        return outputs.with_layers(self.layer_outputs(model, images, layers, device, batch_size, quiet, model_key,
                                                      precision))

    def layer_outputs(self, model: nn.Module, images: Images, keys: Sequence[str], device: torch.device | str = "cpu",
                      batch_size: int = 500, quiet: bool = True, model_key: str | None = None,
                      precision: str = "32-true") -> dict[str, Tensor]:
        """Cached reduced outputs of intermediate layers, one entry per key beside the set's entry
        (``<dataset>-<hash>.layers/<key>``), so each detector's layers are computed once and shared; the keys
        missing from the cache are computed together in one forward pass."""
        precision = resolve_precision(precision, device)
        keys = list(dict.fromkeys(keys))
        if not self.enabled:
            return compute_outputs(model, images, device, batch_size, quiet, precision=precision, layers=keys).layers
        entry = self.entry(model, images, precision, model_key)
        folders = {key: entry.with_name(entry.name + ".layers") / _layer_slug(key) for key in keys}
        values = {key: _read_layer(folder) for key, folder in folders.items() if (folder / "complete").is_file()}
        values = {key: value for key, value in values.items() if value is not None}
        missing = [key for key in keys if key not in values]
        if missing:
            scratch = partial_path(entry.with_name(entry.name + ".layer-pass"))
            try:
                computed = compute_outputs(model, images, device, batch_size, quiet, folder=scratch,
                                           precision=precision, layers=missing)
                files = json.loads((scratch / "layers.json").read_text())
                for key in missing:
                    if self._commit(folders[key], functools.partial(_move_layer, scratch / f"{files[key]}.npy")):
                        values[key] = _read_layer(folders[key])
                    else:
                        values[key] = computed.layers[key].clone()
            except OSError as exc:
                warnings.warn(f"output cache {self.folder} not written ({exc}); going on without it", stacklevel=2)
                values |= compute_outputs(model, images, device, batch_size, quiet, precision=precision,
                                          layers=missing).layers
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return {key: values[key] for key in keys}

    def _outputs(self, model: nn.Module, images: Images, device: torch.device | str, batch_size: int, quiet: bool,
                 model_key: str | None, precision: str) -> ModelOutputs:
        precision = resolve_precision(precision, device)
        if not self.enabled:
            return compute_outputs(model, images, device, batch_size, quiet, precision=precision)
        entry = self.entry(model, images, precision, model_key)
        if (entry / "complete").is_file():
            try:
                return read_outputs(entry)
            except (OSError, ValueError):  # a damaged entry is recomputed
                shutil.rmtree(entry, ignore_errors=True)
        fill = functools.partial(compute_outputs, model, images, device, batch_size, quiet, precision=precision)
        if self._commit(entry, lambda partial: fill(folder=partial)):
            return read_outputs(entry)
        return fill()

    def _commit(self, entry: Path, fill: Callable[[Path], object]) -> bool:
        """Fill a partial folder beside ``entry`` and rename it to ``entry``; a failed write warns and gives
        False (the run goes on without the cache). Partial folders a killed run left are removed first."""
        partial = partial_path(entry)
        remove_stale_temp_files(entry.parent)
        try:
            fill(partial)
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(partial, entry)
            return True
        except OSError as exc:
            warnings.warn(f"output cache {self.folder} not written ({exc}); going on without it", stacklevel=3)
            return False
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def entry(self, model: nn.Module, images: Images, precision: str = "32-true", model_key: str | None = None
              ) -> Path:
        """The cache folder of ``model``'s outputs on ``images`` under a resolved ``precision``."""
        tic = time.perf_counter()
        suffix = "" if precision == "32-true" else f"@{precision}.head32"  # bf16 outputs since heads run in float32
        data_key = hashlib.sha256(f"{images.fingerprint()}|{oodforge_identity()}".encode()).hexdigest()[:16]
        entry = self.folder / (model_key or model_fingerprint(model)) / f"{_slug(images.name)}-{data_key}{suffix}"
        self.key_seconds += time.perf_counter() - tic
        return entry

    def has(self, model: nn.Module, images: Images, precision: str = "32-true") -> bool:
        """Whether complete outputs of ``model`` on ``images`` are cached (always False when disabled)."""
        return self.enabled and (self.entry(model, images, precision) / "complete").is_file()

    def store(self, model: nn.Module, images: Images, outputs: ModelOutputs, precision: str = "32-true") -> None:
        """Cache ``outputs`` computed elsewhere (e.g. gathered from several processes); a failed write warns."""
        if not self.enabled:
            return

        def fill(partial: Path) -> None:
            writer = OutputWriter(partial, len(outputs.logits))
            writer.add(outputs.features.float(), outputs.logits.float(), outputs.labels)
            writer.finish()

        self._commit(self.entry(model, images, precision), fill)


def _layer_slug(key: str) -> str:
    """A folder name for a layer key: readable, and unique through a hash of the whole key."""
    return f"{_slug(key)[-40:]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _move_layer(source: Path, folder: Path) -> None:
    """Fill a layer entry's folder with the array a forward pass wrote at ``source``."""
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(source, folder / "values.npy")
    (folder / "complete").write_text("1\n")


def _read_layer(folder: Path) -> Tensor | None:
    """A layer entry's values, memory-mapped copy-on-write; None (and the entry removed) when it is damaged."""
    try:
        return torch.from_numpy(np.load(folder / "values.npy", mmap_mode="c"))
    except (OSError, ValueError):
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]

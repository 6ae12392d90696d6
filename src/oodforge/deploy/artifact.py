"""A guard as one file, ``guard.safetensors``: every tensor (network weights, detector state, calibration scores)
in safetensors, everything else (architecture spec, detector name and parameters, alpha, preprocessing, class
names, versions) as JSON in its header, and a SHA-256 content hash over both. No pickle anywhere."""

from __future__ import annotations

import hashlib
import json
import platform
import struct
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import Tensor, nn

from oodforge.models.adapters import WrappedClassifier, build_model, wrap_model
from oodforge.models.classifier import Classifier, ModelConfig, build_classifier
from oodforge.util.atomic import atomic_write
from oodforge.util.errors import ConfigError, DataError, MissingPathError

ARTIFACT = "guard.safetensors"
FORMAT = "oodforge-guard"
FORMAT_VERSION = 1
HEADER_KEY = "oodforge_guard"
MAX_HEADER = 100 * 2**20


class ArtifactError(DataError):
    """A guard artifact that is damaged, tampered with, or of a format this oodforge does not read."""


def artifact_path(path: str | Path) -> Path:
    """The artifact file of a guard folder (or the file itself)."""
    path = Path(path)
    return path / ARTIFACT if path.is_dir() or not path.suffix else path


def model_spec_of(model: nn.Module, spec: str | dict | None = None) -> dict:
    """How to rebuild ``model``: an oodforge classifier's config, or a ``torchvision:``/``timm:``/``module:`` spec
    (``spec``, needed for wrapped networks) with the head name and normalization."""
    if isinstance(spec, dict):
        return spec
    if isinstance(model, Classifier):
        return {"kind": "oodforge", "config": asdict(model.config)}
    if isinstance(model, WrappedClassifier):
        if spec is None:
            raise ConfigError("a guard around a wrapped network needs model_spec= (e.g. 'torchvision:resnet18' or "
                              "'module:pkg.mod:factory') to be saved")
        norm = model._norm
        return {"kind": "spec", "spec": spec, "num_classes": model.num_classes, "head": model.head_name,
                "mean": list(norm[0]) if norm else None, "std": list(norm[1]) if norm else None}
    raise ConfigError(f"cannot save a guard around a {type(model).__name__}: wrap it with oodforge.wrap_model")


def rebuild_model(spec: dict) -> nn.Module:
    """An untrained network of the architecture ``spec`` describes (weights are loaded afterwards)."""
    if spec.get("kind") == "oodforge":
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}
        return build_classifier(ModelConfig(**config))
    if spec.get("kind") == "spec":
        net = build_model(spec["spec"], None, num_classes=spec["num_classes"])
        return wrap_model(net, head=spec["head"], mean=spec["mean"], std=spec["std"])
    raise ArtifactError(f"unknown model kind {spec.get('kind')!r}")


def versions(spec: dict | None = None) -> dict:
    """The versions that made an artifact: Python, oodforge, torch, torchvision, numpy (and timm for timm nets)."""
    names = ["oodforge", "torch", "torchvision", "numpy", "safetensors"]
    if spec and str(spec.get("spec", "")).startswith("timm:"):
        names.append("timm")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def save_guard(guard, folder: str | Path) -> Path:
    """Write ``guard`` to ``folder/guard.safetensors`` atomically; returns the file."""
    calibration = guard._require_calibration()
    spec = model_spec_of(guard.model, guard.model_spec)
    tensors: dict[str, Tensor] = {f"model/{k}": v for k, v in guard.model.state_dict().items()}
    centres = getattr(guard.model, "class_centres", None)
    if centres is not None:
        tensors["model_extra/class_centres"] = centres
    tensors["calibration/scores"] = calibration.scores
    for c, scores in calibration.by_class.items():
        tensors[f"calibration/class/{c}"] = scores
    state = _encode(guard.detector.get_state(), tensors, guard.detector_name)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": spec,
              "detector": {"name": guard.detector_name, "params": guard.detector.get_params(), "state": state},
              "alpha": guard.alpha, "class_conditional": guard.class_conditional, "classes": guard.classes,
              "preprocessing": guard.preprocessing.to_dict(), "precision": guard.precision,
              "calibration": {"source": calibration.source, "size": len(calibration.scores)},
              "info": guard.info, "versions": versions(spec)}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header["sha256"] = content_hash(header, tensors)
    from safetensors.torch import save

    data = save(tensors, metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    path = artifact_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_guard_file(path: str | Path) -> tuple[dict, dict[str, Tensor], Path]:
    """(header, tensors, file) of the guard saved in folder ``path`` (or the artifact file itself), checked against
    its format, format version and content hash."""
    file = artifact_path(path)
    if not file.is_file():
        raise MissingPathError(f"{path} is not a guard folder: it has no {ARTIFACT}" if Path(path).is_dir()
                               else f"guard not found: {path}")
    header, tensors = _read(file.read_bytes(), file)
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not an oodforge guard (format {header.get('format')!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{file} has guard format version {header.get('format_version')!r}; this oodforge "
                            f"reads version {FORMAT_VERSION}: rebuild the guard or upgrade oodforge")
    stored = header.pop("sha256", None)
    if stored != content_hash(header, tensors):
        raise ArtifactError(f"{file} fails its content hash: the file was changed after it was written")
    return header, tensors, file


def detector_state(header: dict, tensors: dict[str, Tensor]) -> dict:
    """The detector's learned state stored in an artifact."""
    return _decode(header["detector"]["state"], tensors)


def content_hash(header: dict, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the header's canonical JSON and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read(data: bytes, file: Path) -> tuple[dict, dict[str, Tensor]]:
    """(header JSON, tensors) of an artifact's bytes; any damage is one ``ArtifactError``."""
    if len(data) < 8:
        raise ArtifactError(f"{file} is truncated ({len(data)} bytes)")
    size = struct.unpack("<Q", data[:8])[0]
    if size > min(MAX_HEADER, len(data) - 8):
        raise ArtifactError(f"{file} is truncated or not a safetensors file (header of {size} bytes)")
    try:
        meta = json.loads(data[8:8 + size]).get("__metadata__", {})
        header = json.loads(meta[HEADER_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{file} has no readable guard header ({type(exc).__name__})") from exc
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ArtifactError(f"{file} is damaged or truncated: {str(exc).splitlines()[0]}") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"{file} has no readable guard header")
    return header, tensors


def _encode(value: object, tensors: dict[str, Tensor], label: str) -> object:
    """A JSON tree of ``value`` with each tensor moved into ``tensors`` (as ``{"__tensor__": key}``)."""
    if isinstance(value, Tensor):
        key = f"detector/{len([k for k in tensors if k.startswith('detector/')])}"
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"cannot save detector {label}: its state has a dict with non-string keys")
        return {"__dict__": {k: _encode(v, tensors, label) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"__list__" if isinstance(value, list) else "__tuple__": [_encode(v, tensors, label) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(f"cannot save detector {label}: its state holds a {type(value).__name__}, which a guard "
                      "artifact cannot store (e.g. a faiss index: use_faiss=False)")


def _decode(value: object, tensors: dict[str, Tensor]) -> object:
    """The inverse of ``_encode``."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
        if "__list__" in value:
            return [_decode(v, tensors) for v in value["__list__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
    return value

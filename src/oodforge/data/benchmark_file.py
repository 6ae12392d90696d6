"""Benchmarks described in a YAML file: ID train/test data, named OOD sets, image size, normalization.

```yaml
name: leaves
id: {train: "folder:/data/leaves/train", test: "folder:/data/leaves/test"}
ood:
  textures: {data: "folder:/data/dtd", group: far}
  weeds: {data: "folder:/data/weeds", group: near}
image_size: 224            # resize the shorter side, then centre-crop
mean: [0.485, 0.456, 0.406]
std: [0.229, 0.224, 0.225]
```

Data values are dataset specs (``folder:PATH``, ``synthetic:PATH`` or a registered name); ``$VARS``
are expanded and relative folder paths are taken from the YAML file's folder. Every error names
the file and the key, and is raised before any data is decoded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from oodforge.data.benchmark import Benchmark
from oodforge.data.datasets import DATASETS, STREAMING_MODES, locate
from oodforge.util.atomic import read_yaml_mapping
from oodforge.util.errors import ConfigError, MissingPathError

KEYS = {"name", "id", "ood", "val", "image_size", "mean", "std", "classes", "channels", "augment", "backbone",
        "streaming", "description", "calibration"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GROUPS = ("near", "far")


def load_benchmark_file(path: Path) -> Benchmark:
    """Read and validate a benchmark YAML file."""
    config = read_yaml_mapping(path, "benchmark file")
    unknown = sorted(set(config) - KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(KEYS))}")
    name = _text(config.get("name", path.stem), path, "name")
    sources = _id_sources(config.get("id"), path)
    ood = _ood_sets(config.get("ood"), path, "ood")
    if not ood:
        raise ConfigError(f"{path}: 'ood' names no OOD set")
    sources.update({n: spec for n, (spec, _) in ood.items()})
    if name in ood:
        raise ConfigError(f"{path}: OOD set {name!r} has the benchmark's own name; rename one of them")
    mean = _floats(config.get("mean", list(IMAGENET_MEAN)), path, "mean")
    std = _floats(config.get("std", list(IMAGENET_STD)), path, "std", positive=True)
    channels = config.get("channels", len(mean))
    if len(mean) != len(std) or channels not in (1, 3) or len(mean) not in (1, channels):
        raise ConfigError(f"{path}: mean and std need one value per channel (1 or 3), got {mean} and {std}")
    size = _image_size(config.get("image_size"), path)
    for key, spec in sources.items():
        check_spec(spec, path, "id." + key[3:] if key.startswith("id:") else f"ood.{key}")
    calibration = _resolve(config["calibration"], path, "calibration") if "calibration" in config else None
    if calibration is not None:
        check_spec(calibration, path, "calibration")
    return Benchmark(
        name=name, id_dataset=name, ood={n: group for n, (_, group) in ood.items()},
        image_shape=(*size, channels), mean=tuple(mean) * (channels // len(mean)),
        std=tuple(std) * (channels // len(std)), augment=_choice(config.get("augment", "none"), path, "augment",
                                                                 ("none", "crop_flip")),
        default_backbone=_text(config.get("backbone", "resnet18"), path, "backbone"), sources=sources,
        classes=_classes(config.get("classes"), path), resize="shorter_crop",
        streaming=_streaming(config.get("streaming", "auto"), path), val=_val(config.get("val"), path),
        calibration=calibration, path=str(path))


def check_spec(spec: str, path: Path, key: str) -> None:
    """Fail now, naming the key, when a dataset spec points at nothing."""
    if spec.startswith("folder:"):
        try:
            locate(Path(spec.split(":", 1)[1]), "", spec)
        except ValueError as exc:  # a file that is no archive, or a damaged one
            raise ConfigError(f"{path}: {key}: {exc}") from None
    elif spec.startswith("synthetic:"):
        folder = Path(spec.split(":", 1)[1])
        if not folder.is_dir():
            raise MissingPathError(f"{path}: {key}: synthetic set folder not found: {folder}")
    elif spec not in DATASETS:
        raise ConfigError(f"{path}: {key}: unknown dataset {spec!r}; use folder:PATH, synthetic:PATH or one of "
                         f"{', '.join(DATASETS.names())}")


def _resolve(spec: object, path: Path, key: str) -> str:
    """Expand ``$VARS`` and make relative folder/synthetic paths relative to the YAML file."""
    text = _text(spec, path, key)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("folder", "synthetic"):
        target = Path(os.path.expandvars(rest)).expanduser()
        if not target.is_absolute():
            target = path.parent / target
        return f"{prefix}:{target}"
    return text


def _id_sources(block: object, path: Path) -> dict[str, str]:
    if not isinstance(block, dict) or set(block) - {"train", "test"} or "test" not in block or "train" not in block:
        raise ConfigError(f"{path}: 'id' must be a mapping with 'train' and 'test' dataset specs")
    return {f"id:{split}": _resolve(block[split], path, f"id.{split}") for split in ("train", "test")}


def _ood_sets(block: object, path: Path, key: str) -> dict[str, tuple[str, str]]:
    """name -> (spec, group); an entry is a spec string (group far) or ``{data, group}``."""
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: '{key}' must map OOD set names to a dataset spec or {{data, group}}")
    sets = {}
    for name, entry in block.items():
        where = f"{key}.{name}"
        if isinstance(entry, dict):
            extra = sorted(set(entry) - {"data", "group"})
            if extra or "data" not in entry:
                raise ConfigError(f"{path}: {where} needs 'data' (and optionally 'group'); unknown {extra}")
            spec, group = entry["data"], entry.get("group", "far")
        else:
            spec, group = entry, "far"
        sets[_text(name, path, key)] = (_resolve(spec, path, where), _choice(group, path, f"{where}.group", GROUPS))
    return sets


def _val(block: object, path: Path) -> dict:
    if block is None:
        return {}
    if not isinstance(block, dict) or set(block) - {"id", "ood"}:
        raise ConfigError(f"{path}: 'val' must be a mapping with 'id' (a dataset spec) and 'ood' (named sets)")
    val: dict = {}
    if "id" in block:
        val["id"] = _resolve(block["id"], path, "val.id")
        check_spec(val["id"], path, "val.id")
    if "ood" in block:
        val["ood"] = {n: {"data": s, "group": g} for n, (s, g) in _ood_sets(block["ood"], path, "val.ood").items()}
        for name, entry in val["ood"].items():
            check_spec(entry["data"], path, f"val.ood.{name}")
    return val


def _text(value: object, path: Path, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: {key} must be a non-empty string, got {value!r}")
    return value


def _floats(value: object, path: Path, key: str, positive: bool = False) -> list[float]:
    """A non-empty list of finite numbers (each > 0 with ``positive``); else one line naming the file and key."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{path}: {key} must be a list of numbers, got {value!r}")
    bad = [v for v in value if not abs(v) <= sys.float_info.max or (positive and v <= 0)]  # NaN, inf, 1e999
    if bad:
        kind = "finite numbers > 0" if positive else "finite numbers"
        raise ConfigError(f"{path}: {key} must be {kind}, got {bad[0]!r} in {value!r}")
    return [float(v) for v in value]


def _image_size(value: object, path: Path) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return value[0], value[1]
    raise ConfigError(f"{path}: image_size must be a positive integer (or [height, width]), got {value!r}")


def _choice(value: object, path: Path, key: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{path}: {key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _streaming(value: object, path: Path) -> str:
    if isinstance(value, bool):
        return "always" if value else "never"
    return _choice(value, path, "streaming", STREAMING_MODES)


def _classes(value: object, path: Path) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: classes must be a list of class-folder names, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{path}: classes has duplicates")
    return tuple(value)

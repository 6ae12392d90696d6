"""The benchmark runner: outputs once per dataset, every detector on every OOD set, metrics, files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from oodforge.detectors import DETECTORS, Detector, create_detector
from oodforge.detectors.base import registered_name
from oodforge.util.errors import ConfigError, MissingPathError
from oodforge.util.validation import parse_options


def parse_detector_spec(spec: str) -> dict[str, dict]:
    """``"msp,energy:temperature=2,knn:k=10;use_faiss=true"`` or ``"all"`` -> {label: options} (YAML values).

    Every detector is built once here, so an unknown name or option, a wrong type or a value out of
    range fails before any work. A name given twice with different options gives named variants,
    ``knn:k=10,knn:k=50`` -> labels ``knn[k=10]`` and ``knn[k=50]``, whose options carry
    ``detector: knn``; ``all`` adds every registered detector with its defaults.
    """
    items: list[tuple[str, dict, bool]] = []  # (name, options, came from "all")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition(":")
        if name == "all":
            items.extend((n, {}, True) for n in DETECTORS.names())
            continue
        options = parse_options(filter(None, rest.split(";")), f"detector {item!r}: option")
        create_detector(name, **options)
        items.append((name, options, False))
    explicit = Counter(name for name, _, from_all in items if not from_all)
    detectors: dict[str, dict] = {}
    for name, options, from_all in items:
        if from_all and explicit[name]:
            continue  # an explicit entry replaces the default that "all" adds
        if explicit[name] > 1 and options:
            detectors[f"{name}[{_options_text(options)}]"] = {"detector": name, **options}
        else:
            detectors[name] = options
    if not detectors:
        raise ConfigError("no detector named")
    return detectors


def _options_text(options: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in options.items())


def build_detector(label: str, options: dict) -> Detector:
    """The detector behind one entry of a parsed spec (``options["detector"]`` names it for variants)."""
    options = dict(options)
    return create_detector(options.pop("detector", label), **options)


def detector_record(detector: Detector) -> dict:
    """What results.json says of a detector: its registered name, parameters, what it reads and, where a default
    was clamped to the data (``size_within``), the values used (``params_used``)."""
    params = {k: v if isinstance(v, bool | int | float | str | type(None)) else repr(v)
              for k, v in detector.get_params().items()}
    used = getattr(detector, "params_used_", None)
    return {"detector": registered_name(detector) or type(detector).__name__, "params": params,
            **({"params_used": dict(used)} if used else {}), "requires": list(detector.requires)}


def detector_options(detectors: str | list[str] | dict[str, dict]) -> dict[str, dict]:
    """A ``--detectors`` string, a list of such items, or {label: options} -> {label: options}, checked."""
    if isinstance(detectors, str):
        return parse_detector_spec(detectors)
    if isinstance(detectors, dict):
        for label, options in detectors.items():
            build_detector(label, options or {})
        return {n: dict(o or {}) for n, o in detectors.items()}
    return parse_detector_spec(",".join(detectors))


def load_fitted_detectors(folder: Path, detectors: dict[str, dict]) -> dict[str, Detector]:
    """Detectors saved by an earlier run (``<folder>/<label>.pt``, e.g. the flow), reloaded."""
    if not folder.is_dir():
        raise MissingPathError(f"--detector-dir {folder} is not a folder")
    fitted = {}
    for label, options in detectors.items():
        path = folder / f"{label}.pt"
        if path.is_file():
            fitted[label] = DETECTORS.get(options.get("detector", label)).load(path)
    return fitted

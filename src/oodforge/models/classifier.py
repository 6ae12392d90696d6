"""A classifier = input normalization + backbone (features) + head (logits), with checkpoint I/O."""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from oodforge.models.backbones import create_backbone
from oodforge.models.heads import create_head
from oodforge.models.layers import default_layers
from oodforge.util.atomic import atomic_torch_save
from oodforge.util.errors import DivergedError, ModelError


@dataclass
class ModelConfig:
    """Everything needed to rebuild a classifier before loading its weights."""

    backbone: str = "small_cnn"
    head: str = "linear"
    num_classes: int = 10
    in_channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    head_options: dict = field(default_factory=dict)


class Classifier(nn.Module):
    """Image classifier exposing ``features(x)`` (penultimate) and ``logits(x)``; inputs in [0, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)
        self.backbone = create_backbone(config.backbone, in_channels=config.in_channels)
        self.head = create_head(
            config.head, self.backbone.feature_dim, config.num_classes, **config.head_options
        )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features h(x), shape (N, D)."""
        return self.backbone((x - self.mean) / self.std)

    def logits(self, x: Tensor) -> Tensor:
        """Test-time logits f(x), shape (N, C)."""
        return self.run_head(self.features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(features, test-time logits) from one forward pass."""
        features = self.features(x)
        return features, self.run_head(features)

    def default_layers(self) -> list[str]:
        """The backbone's stage ends, which multi-layer detectors read (``oodforge.models.layers``)."""
        body = getattr(self.backbone, "net", self.backbone)
        prefix = "backbone.net." if body is not self.backbone else "backbone."
        return [prefix + name for name in default_layers(body, self.config.in_channels)]

    def run_head(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """The head in float32 even under autocast: bf16 logits of a cosine head (s * cos, about 30) would
        come in steps of 0.125 and turn most scores built on them into ties."""
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.float(), labels)

    @property
    def num_classes(self) -> int:
        """Number of classes the head predicts."""
        return self.config.num_classes

    def describe(self) -> dict:
        """The model block of results.json: its config."""
        return asdict(self.config)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits; with ``labels`` during training, margin heads apply their margins."""
        return self.run_head(self.features(x), labels)


def build_classifier(config: ModelConfig) -> Classifier:
    """A freshly initialised classifier for ``config``."""
    return Classifier(config)


class CheckpointError(ModelError, RuntimeError):
    """A checkpoint or weights file that cannot be read or does not fit the model."""


def save_classifier(model: Classifier, path: str | Path, extra: dict | None = None) -> None:
    """Write ``model`` (config + weights + ``extra``) to ``path`` atomically; non-finite weights are refused."""
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise DivergedError(f"not saving {path}: {len(bad)} weight tensors are NaN or infinite, e.g. "
                                 f"{bad[0]}; training diverged, lower --lr")
    state = {
        "format": "oodforge-classifier",
        "model_config": asdict(model.config),
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    if getattr(model, "class_centres", None) is not None:
        state["class_centres"] = model.class_centres.detach().cpu()
    atomic_torch_save(state, Path(path))


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dictionary, naming the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's multi-line note on a plain pickle file; the error below says it
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(_unreadable(path, exc)) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dictionary")
    return state


def _unreadable(path: Path, exc: Exception) -> str:
    """One line on why ``torch.load(path, weights_only=True)`` failed, without torch's advice to load unsafely."""
    text = str(exc)
    pickled = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if pickled:
        return (f"checkpoint {path} holds pickled Python objects ({pickled.group(1)}) that oodforge will not load; "
                "only tensors and plain containers (dicts, lists, numbers, strings) are loaded: save a state_dict")
    lines = [line.strip() for line in text.split("WeightsUnpickler error:")[-1].splitlines()]
    cause = next((line for line in lines if line and "weights_only" not in line), "")
    if "Weights only load failed" in text:
        return f"cannot read checkpoint {path}: not a file torch.save wrote, or damaged ({cause or 'unpickling'})"
    return f"cannot read checkpoint {path}: {exc.__class__.__name__}: {cause}"


def load_classifier(path: str | Path, config: ModelConfig | None = None, source: str | None = None) -> Classifier:
    """Rebuild a classifier from an oodforge checkpoint, or load external weights into ``config``.

    External weights may be a plain state dict or a ``{"state_dict": ...}`` dict, with or without a
    ``module.`` prefix; the final linear layer may be named ``linear``, ``fc`` or ``head``. Errors name
    the file as ``source`` (e.g. ``"--weights W.th"``), else by its path.
    """
    state = read_checkpoint(path)
    source = source or str(path)
    if state.get("format") == "oodforge-classifier":
        model = build_classifier(ModelConfig(**_tuples(state["model_config"])))
        _load_state(model, state["state_dict"], path, source)
        if "class_centres" in state:
            model.class_centres = state["class_centres"]
        return model
    if state.get("format") == "oodforge-training":
        return load_classifier_from_training(state, path)
    if config is None:
        raise CheckpointError(f"{path} is not an oodforge checkpoint; name the --model it belongs to")
    model = build_classifier(config)
    renamed, file_keys = _external_state_dict(state)
    _load_state(model, renamed, path, source, file_keys)
    return model


def load_classifier_from_training(state: dict, path: str | Path) -> Classifier:
    """The classifier inside a training checkpoint (see ``oodforge.training.loop``)."""
    model = build_classifier(ModelConfig(**_tuples(state["model_config"])))
    _load_state(model, state["model"], path, str(path))
    return model


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _external_state_dict(state: dict) -> tuple[dict, dict[str, str]]:
    """(the state dict under the classifier's names, classifier name -> the file's name without ``module.``)."""
    state = state.get("state_dict", state)
    renamed, file_keys = {}, {}
    for original, value in state.items():
        key = file_key = str(original).removeprefix("module.")
        for old in ("linear.", "fc.", "classifier."):
            if key.startswith(old):
                key = "head." + key[len(old):]
                break
        else:
            key = "backbone." + key
        renamed[key], file_keys[key] = value, file_key
    return renamed, file_keys


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold NaN or infinity."""
    return [name for name, value in state.items()
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _load_state(model: Classifier, state_dict: dict, path: str | Path, source: str,
                file_keys: dict[str, str] | None = None) -> None:
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"weights in {path} are not finite (NaN or infinity) in {len(bad)} tensors, "
                              f"e.g. {bad[0]}; the training that wrote them diverged")
    problem = state_dict_mismatch(model.state_dict(), state_dict, file_keys)
    if problem:
        raise CheckpointError(f"{source} does not fit the {model.config.backbone} model: {problem}")
    model.load_state_dict(state_dict, strict=False)


def state_dict_mismatch(expected: dict, given: dict, file_keys: dict[str, str] | None = None) -> str | None:
    """One line on how state dict ``given`` fails to fit a model's ``expected`` one, or None when it fits.

    It names the first layer whose shape differs, then counts the other problems with a few keys each;
    ``file_keys`` maps keys to the names the file uses, for the message.
    """
    named = (file_keys or {}).get
    reshaped = [k for k, v in given.items() if k in expected and (not isinstance(v, Tensor) or
                                                                   v.shape != expected[k].shape)]
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [named(k, k) for k in given if k not in expected]
    parts = []
    if reshaped:
        key = reshaped[0]
        parts.append(f"layer {named(key, key)}: the model expects shape {tuple(expected[key].shape)}, the weights "
                     f"have {_shape(given[key])}{_shape_hint(expected, key, given[key])}")
        if len(reshaped) > 1:
            others = [named(k, k) for k in reshaped[1:]]
            parts.append(f"{_count(others, 'more layer')} with a different shape ({_few(others)})")
    if missing:
        parts.append(f"{_count(missing, 'key')} of the model missing from the weights ({_few(missing)})")
    if unexpected:
        parts.append(f"{_count(unexpected, 'key')} in the weights not in the model ({_few(unexpected)})")
    return "; ".join(parts) or None


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else f"a {type(value).__name__}"


def _shape_hint(expected: dict, key: str, value: object) -> str:
    """What a shape mismatch means when it is the first convolution's input channels or the last layer's classes."""
    want = expected[key].shape
    if not isinstance(value, Tensor) or value.dim() != len(want):
        return ""
    differ = [d for d in range(len(want)) if want[d] != value.shape[d]]
    first_conv = next((k for k, v in expected.items() if v.dim() == 4), None)
    last_matrix = next((k for k, v in reversed(expected.items()) if v.dim() == 2), None)
    if key == first_conv and differ == [1]:
        plural = "s" if want[1] != 1 else ""
        return f" (the model expects {want[1]} input channel{plural}, the weights have {value.shape[1]})"
    if key == last_matrix and differ == [0]:
        return f" (the model predicts {want[0]} classes, the weights {value.shape[0]})"
    return ""


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def file_hash(path: str | Path, length: int = 12) -> str:
    """Short SHA-256 of a file's bytes, used to key caches by checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]

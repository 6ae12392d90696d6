"""``Guard``: a classifier plus a fitted OOD detector plus conformal calibration. Each input gets the predicted
class, an OOD score, a conformal p-value and the decision ``in`` or ``out``; on ID data exchangeable with the
calibration images, the share decided ``out`` is at most ``alpha`` (``oodforge.deploy.conformal``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from oodforge.deploy.artifact import ArtifactError, detector_state, read_guard_file, rebuild_model, save_guard
from oodforge.deploy.conformal import benjamini_hochberg, check_alpha, minimum_calibration, p_values, sorted_scores
from oodforge.deploy.conformal import threshold as conformal_threshold
from oodforge.deploy.inputs import Item, Preprocessing, items_of, stream_items
from oodforge.detectors.base import (
    Detector,
    create_detector,
    features_and_logits,
    forward_outputs,
    registered_name,
    require_interface,
)
from oodforge.outputs import ModelOutputs
from oodforge.util.errors import ConfigError, OodforgeError
from oodforge.util.precision import autocast, check_precision

DECISIONS = ("in", "out")
GUARD_PRECISIONS = ("32-true", "bf16-mixed")


@dataclass(frozen=True)
class Prediction:
    """One input's answer. ``decision`` is ``in`` or ``out`` (None with ``error``: the input could not be read)."""

    name: str
    label: str | None = None
    probability: float | None = None
    score: float | None = None
    p_value: float | None = None
    decision: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        """The record as a plain dict (the CSV, JSONL and HTTP rows)."""
        return asdict(self)


class Predictions(list):
    """A list of ``Prediction`` with counts and a pandas view."""

    @property
    def flagged(self) -> int:
        """How many inputs were decided ``out``."""
        return sum(p.decision == "out" for p in self)

    @property
    def failed(self) -> int:
        """How many inputs could not be read."""
        return sum(p.error is not None for p in self)

    def to_frame(self):
        """The predictions as a pandas DataFrame (pandas must be installed)."""
        try:
            import pandas
        except ImportError as exc:
            raise ConfigError("Predictions.to_frame needs pandas: pip install pandas") from exc
        return pandas.DataFrame([p.as_dict() for p in self], columns=list(Prediction.__dataclass_fields__))


@dataclass
class Calibration:
    """Sorted calibration scores, overall and (for class-conditional guards) per predicted class."""

    scores: Tensor
    by_class: dict[int, Tensor] = field(default_factory=dict)
    source: str = ""


class Guard:
    """A guarded classifier: ``predict`` answers class, probability, OOD score, p-value and decision.

    ``model`` is any classifier with oodforge's interface (``wrap_model``); ``detector`` a fitted detector
    (or one that needs no fit); ``alpha`` the level: at most ``alpha`` of exchangeable ID inputs are flagged.
    ``class_conditional`` calibrates per predicted class (a bound per class). ``calibrate`` must run before
    ``predict``. ``model_spec`` says how to rebuild the network when it is saved (``oodforge.deploy.artifact``).
    """

    def __init__(self, model: nn.Module, detector: Detector, *, classes: Sequence[str],
                 preprocessing: Preprocessing, alpha: float = 0.05, class_conditional: bool = False,
                 precision: str = "32-true", device: str | torch.device = "cpu", model_spec: dict | None = None,
                 info: dict | None = None) -> None:
        self.model = require_interface(model).to(device).eval()
        if not isinstance(detector, Detector):
            raise ConfigError(f"detector must be an oodforge Detector, got {type(detector).__name__}")
        detector.check_fitted()
        self.detector = detector
        if getattr(detector, "model_", None) is None:
            detector.model_ = self.model
        self.alpha = check_alpha(alpha)
        self.classes = [str(c) for c in classes]
        if getattr(self.model, "num_classes", len(self.classes)) != len(self.classes):
            raise ConfigError(f"the model predicts {self.model.num_classes} classes but {len(self.classes)} class "
                              "names were given")
        self.preprocessing = preprocessing
        self.class_conditional = bool(class_conditional)
        self.precision = check_precision(precision, GUARD_PRECISIONS)
        self.device = torch.device(device)
        self.model_spec = model_spec
        self.info = dict(info or {})
        self.calibration: Calibration | None = None

    # ------------------------------------------------------------------ scoring
    @property
    def detector_name(self) -> str:
        """The detector's registry name."""
        return registered_name(self.detector) or type(self.detector).__name__

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(float32 logits, OOD scores) of a preprocessed batch (N, C, H, W) in [0, 1]."""
        x = x.to(self.device)
        with autocast(self.precision, self.device):
            if self.detector.needs_inputs:
                with torch.no_grad():
                    _, logits = features_and_logits(self.model, x)
                scores = self.detector.score(self.model, x)
                return logits.float().cpu(), scores.float().cpu()
            with torch.inference_mode():
                features, logits, layers = forward_outputs(self.model, x, self.detector.layer_keys(self.model))
        outputs = ModelOutputs(logits.float(), features.flatten(1).float(),
                               layers={k: v.float() for k, v in layers.items()})
        with torch.inference_mode():
            scores = self.detector.score_outputs(outputs)
        return outputs.logits.cpu(), scores.float().cpu()

    def score_batches(self, batches: Iterable) -> tuple[Tensor, Tensor]:
        """(logits, scores) over batches of ``x`` or ``(x, y)`` (a DataLoader, say)."""
        logits, scores = [], []
        for batch in batches:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            part_logits, part_scores = self.outputs(x)
            logits.append(part_logits)
            scores.append(part_scores)
        if not scores:
            raise ConfigError("the data yielded no batches")
        return torch.cat(logits), torch.cat(scores)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, data: object, batch_size: int = 256, source: str = "") -> Guard:
        """Score the calibration images (an image set, a DataLoader, a tensor of inputs, or ``(logits, scores)``
        already computed by this guard) and keep their scores; they must be ID images that neither the
        classifier nor the detector learned from."""
        if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            logits, scores = data
        else:
            logits, scores = self.score_batches(_batches(data, batch_size))
        self.calibration = calibration_of(scores, logits.argmax(1) if self.class_conditional else None,
                                          source or getattr(data, "name", ""))
        self._check_size()
        return self

    def _check_size(self) -> None:
        needed = minimum_calibration(self.alpha)
        sizes = {"all": len(self.calibration.scores)}
        sizes |= {self.classes[c]: len(s) for c, s in self.calibration.by_class.items()}
        small = {k: v for k, v in sizes.items() if v < needed}
        if small:
            name, size = next(iter(small.items()))
            warnings.warn(f"alpha={self.alpha} needs at least {needed} calibration images to flag anything; "
                          f"{'class ' + repr(name) if name != 'all' else 'the calibration set'} has {size}",
                          stacklevel=3)

    def _require_calibration(self) -> Calibration:
        if self.calibration is None:
            raise ConfigError("this guard has no calibration yet: call guard.calibrate(images) first")
        return self.calibration

    @property
    def threshold(self) -> float:
        """The score below which an input is flagged (overall calibration; per class see ``class_thresholds``)."""
        return conformal_threshold(self._require_calibration().scores, self.alpha)

    def class_thresholds(self) -> dict[str, float]:
        """Per predicted class, the score below which an input is flagged (class-conditional guards)."""
        calibration = self._require_calibration()
        return {self.classes[c]: conformal_threshold(s, self.alpha) for c, s in calibration.by_class.items()}

    def p_values(self, scores: Tensor, predicted: Tensor | None = None) -> Tensor:
        """Conformal p-values of ``scores``; class-conditional guards use the predicted class's calibration."""
        calibration = self._require_calibration()
        if not self.class_conditional:
            return p_values(calibration.scores, scores)
        if predicted is None:
            raise ConfigError("a class-conditional guard needs the predicted classes for its p-values")
        out = torch.empty(len(scores), dtype=torch.float64)
        for c in predicted.unique().tolist():
            rows = predicted == c
            reference = calibration.by_class.get(int(c))
            out[rows] = 1.0 if reference is None else p_values(reference, scores[rows])
        return out

    def decide(self, p: Tensor, fdr: bool = False) -> Tensor:
        """True where an input is flagged OOD: ``p <= alpha``, or Benjamini-Hochberg over the batch (``fdr``)."""
        return benjamini_hochberg(p, self.alpha) if fdr else p <= self.alpha

    # ------------------------------------------------------------------ prediction
    def predict(self, inputs: object, batch_size: int = 256, fdr: bool = False) -> Prediction | Predictions:
        """Predict on file paths (files, folders, archives), PIL images, uint8 arrays/tensors or preprocessed
        float tensors. One input gives a ``Prediction``, several a ``Predictions`` list. ``fdr``: flag by
        Benjamini-Hochberg over the whole call (false discovery rate ``alpha``) instead of per input."""
        single = isinstance(inputs, str | Path | Tensor | np.ndarray) and not _is_batch(inputs, self.preprocessing)
        from PIL import Image

        single = single or isinstance(inputs, Image.Image)
        predictions = self.predict_items(items_of(inputs, self.preprocessing), batch_size, fdr)
        if single and len(predictions) == 1:
            return predictions[0]
        return predictions

    def predict_items(self, items: Iterable[Item], batch_size: int = 256, fdr: bool = False) -> Predictions:
        """Predictions for ``Item`` s, in order; unreadable items keep their error and are not scored."""
        items = list(items)
        rows = self._rows(items, batch_size)
        if fdr:
            readable = [i for i, row in enumerate(rows) if row["error"] is None]
            if readable:
                flags = benjamini_hochberg(torch.tensor([rows[i]["p_value"] for i in readable], dtype=torch.float64),
                                           self.alpha)
                for i, flag in zip(readable, flags.tolist(), strict=True):
                    rows[i]["decision"] = DECISIONS[int(flag)]
        return Predictions(Prediction(**row) for row in rows)

    def predict_stream(self, paths: Iterable[str | Path], batch_size: int = 256) -> Iterator[Prediction]:
        """Predictions for every image under ``paths`` (files, folders, archives), decoded and scored one batch
        at a time; unreadable images come back as rows with ``error``."""
        pending: list[Item] = []
        for item in stream_items(paths, self.preprocessing):
            pending.append(item)
            if len(pending) >= batch_size:
                yield from (Prediction(**row) for row in self._rows(pending, batch_size))
                pending = []
        if pending:
            yield from (Prediction(**row) for row in self._rows(pending, batch_size))

    def _rows(self, items: list[Item], batch_size: int) -> list[dict]:
        rows = [{"name": item.name, "label": None, "probability": None, "score": None, "p_value": None,
                 "decision": None, "error": item.error} for item in items]
        good = [i for i, item in enumerate(items) if item.error is None]
        for start in range(0, len(good), batch_size):
            chunk = good[start:start + batch_size]
            answers = self.answer(torch.stack([_as_tensor(items[i].pixels) for i in chunk]))
            for i, answer in zip(chunk, answers, strict=True):
                rows[i].update(answer)
        return rows

    def answer(self, x: Tensor) -> list[dict]:
        """label, probability, score, p_value and decision of each image of a preprocessed batch."""
        logits, scores = self.outputs(x)
        probabilities = torch.softmax(logits.double(), dim=1)
        best, predicted = probabilities.max(1)
        p = self.p_values(scores, predicted)
        out = self.decide(p)
        return [{"label": self.classes[c], "probability": b, "score": s, "p_value": q, "decision": DECISIONS[o]}
                for c, b, s, q, o in zip(predicted.tolist(), best.tolist(), scores.tolist(), p.tolist(),
                                         out.int().tolist(), strict=True)]

    def classify(self, x: Tensor) -> list[dict]:
        """The network alone, without the detector: label and probability of each image of a preprocessed batch."""
        with torch.inference_mode(), autocast(self.precision, self.device):
            logits = features_and_logits(self.model, x.to(self.device))[1]
        best, predicted = torch.softmax(logits.double().cpu(), dim=1).max(1)
        return [{"label": self.classes[c], "probability": b} for c, b in zip(predicted.tolist(), best.tolist(),
                                                                              strict=True)]

    # ------------------------------------------------------------------ description and files
    def describe(self) -> dict:
        """What the guard is: detector, parameters, alpha, threshold, calibration size, classes, preprocessing."""
        calibration = self._require_calibration()
        return {"detector": self.detector_name, "detector_params": self.detector.get_params(), "alpha": self.alpha,
                "threshold": self.threshold, "calibration_size": len(calibration.scores),
                "calibration_source": calibration.source, "class_conditional": self.class_conditional,
                "classes": self.classes, "preprocessing": self.preprocessing.to_dict(), "precision": self.precision,
                **({"model": self.model_spec} if self.model_spec else {}), **self.info}

    def save(self, path: str | Path) -> Path:
        """Write the guard as one artifact (``guard.safetensors`` in folder ``path``); see ``load_guard``."""
        return save_guard(self, path)

    def __repr__(self) -> str:
        size = len(self.calibration.scores) if self.calibration is not None else 0
        return (f"Guard(detector={self.detector!r}, alpha={self.alpha}, calibration={size} images, "
                f"classes={len(self.classes)})")


def load_guard(path: str | Path, device: str | torch.device = "cpu") -> Guard:
    """The guard saved in folder ``path`` (or the artifact file itself), checked against its content hash; a
    damaged, tampered or unknown artifact is one ``ArtifactError``."""
    header, tensors, file = read_guard_file(path)
    try:
        return _assemble(header, tensors, device)
    except OodforgeError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{file}: cannot rebuild the guard: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                            ) from exc


def _assemble(header: dict, tensors: dict[str, Tensor], device: str | torch.device) -> Guard:
    """A guard from an artifact's header and tensors."""
    model = rebuild_model(header["model"])
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    if "model_extra/class_centres" in tensors:
        model.class_centres = tensors["model_extra/class_centres"]
    model = model.to(device).eval()
    spec = header["detector"]
    detector = create_detector(spec["name"], **spec["params"])
    detector.set_state(detector_state(header, tensors))
    detector.model_ = model
    detector.fitted_ = True
    guard = Guard(model, detector, classes=header["classes"], alpha=header["alpha"],
                  preprocessing=Preprocessing.from_dict(header["preprocessing"]),
                  class_conditional=header["class_conditional"], precision=header["precision"], device=device,
                  model_spec=header["model"], info=header.get("info", {}))
    by_class = {int(k.rsplit("/", 1)[1]): v for k, v in tensors.items() if k.startswith("calibration/class/")}
    guard.calibration = Calibration(tensors["calibration/scores"], by_class, header["calibration"]["source"])
    guard.versions = header.get("versions", {})
    return guard


def calibration_of(scores: Tensor, predicted: Tensor | None = None, source: str = "") -> Calibration:
    """Sorted calibration scores, split by predicted class when ``predicted`` is given."""
    overall = sorted_scores(scores)
    by_class = {}
    if predicted is not None:
        by_class = {int(c): sorted_scores(scores[predicted == c]) for c in predicted.unique().tolist()}
    return Calibration(overall, by_class, source)


def _as_tensor(pixels: np.ndarray | Tensor) -> Tensor:
    """A fitted uint8 (H, W, C) array or a preprocessed float (C, H, W) tensor -> float (C, H, W) in [0, 1]."""
    if isinstance(pixels, Tensor):
        return pixels
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)


def _is_batch(value: object, prep: Preprocessing) -> bool:
    """Whether a tensor or array input holds several images."""
    if isinstance(value, str | Path):
        return Path(value).is_dir() or Path(value).name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz"))
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.dim() == 4
    shape = tuple(value.shape)
    return len(shape) == 4 or (len(shape) == 3 and shape[-1] not in (1, 3, 4) and shape[0] not in (1, 3, 4))


def _batches(data: object, batch_size: int) -> Iterable:
    """Batches of preprocessed inputs from an image set, a DataLoader, a Dataset or a tensor."""
    if isinstance(data, Tensor):
        return data.split(batch_size)
    if hasattr(data, "torch_dataset"):  # an oodforge image set
        from oodforge.evaluation.extraction import image_loader

        return image_loader(data, batch_size)
    if isinstance(data, torch.utils.data.Dataset):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, Iterable):
        return data
    raise ConfigError(f"cannot calibrate on a {type(data).__name__}: give an image set, a DataLoader or a tensor")

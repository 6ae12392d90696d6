"""The detector API: configure in ``__init__``, learn in ``fit``, score with higher = more ID."""

from __future__ import annotations

import inspect
import pickle
import typing
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.layers import layer_outputs
from oodforge.outputs import ModelOutputs, has_interface
from oodforge.util.errors import ConfigError, OodforgeError
from oodforge.util.registry import Registry
from oodforge.util.validation import check_value


class NotFittedError(OodforgeError, RuntimeError):
    """Raised when ``score`` is called on a detector that needs ``fit`` first."""


REQUIREMENTS = ("logits", "features", "train", "head", "gradients", "layers")


class _ValidatedWhenBuilt(type):
    """Detectors check their parameters once, when they are built (``Detector.validate``)."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **kwargs).validate()


class Detector(metaclass=_ValidatedWhenBuilt):
    """Base class of OOD detectors, in scikit-learn's manner. ``score_outputs`` returns (N,), higher = more ID.

    ``__init__`` only stores its (typed, simple) parameters under their own names; ``get_params``,
    ``repr`` and validation come from its signature. ``_check`` adds range checks; both run once, when the
    detector is built (``KNN(k=0)`` raises at once, before any training or forward pass). ``fit`` learns
    state into attributes ending in ``_``, which ``save``/``load`` write and read. Class attributes:
    ``needs_fit`` (learns from ID outputs), ``needs_inputs`` (needs the raw inputs and the model:
    ODIN, GradNorm), ``requires`` (what it reads: logits, features, train, head, gradients) and
    ``search_space`` (values of each tunable parameter).
    """

    needs_fit: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    fits_on_inputs: ClassVar[bool] = False  # fit reads the training inputs themselves (``_fit_inputs``)
    needs_labels: ClassVar[bool] = False  # fit needs the training labels (one error, before any fitting, if absent)
    requires: ClassVar[tuple[str, ...]] = ("logits",)
    search_space: ClassVar[dict[str, list]] = {}

    @classmethod
    def param_names(cls) -> list[str]:
        """The parameters of ``__init__``, in order."""
        if cls.__init__ is object.__init__:
            return []
        return [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict:
        """The parameters this detector was built with."""
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self, **params) -> Detector:
        """Change parameters (validated); learned state is dropped, so ``fit`` must run again."""
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ConfigError(self._unknown_message(unknown[0]))
        for name, value in params.items():
            setattr(self, name, value)
        self.validate()
        self.fitted_ = False
        return self

    def validate(self) -> Detector:
        """Check every parameter's type (from the ``__init__`` annotations) and range (``_check``)."""
        hints = typing.get_type_hints(type(self).__init__) if type(self).__init__ is not object.__init__ else {}
        for name in self.param_names():
            setattr(self, name, check_value(self._label(), name, getattr(self, name), hints.get(name)))
        self._check()
        return self

    def _check(self) -> None:
        """Override to check parameter ranges; raise ValueError naming the detector and the parameter."""

    def supports(self, model: nn.Module | None) -> bool:
        """Whether this detector can run on ``model`` (detectors that read the head need a linear one)."""
        from oodforge.detectors.head import has_linear_head

        return "head" not in self.requires or has_linear_head(model)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def _label(self) -> str:
        return registered_name(self) or type(self).__name__

    def _unknown_message(self, key: str) -> str:
        options = ", ".join(self.param_names()) or "none"
        return f"{self._label()} has no option {key!r}; its options: {options}"

    def fit(self, train: ModelOutputs | Iterable, model: nn.Module | None = None) -> Detector:
        """Learn from ID training outputs (and the model, for detectors that reuse its head). ``train`` may also
        be a DataLoader (or any iterable of ``x`` or ``(x, y)`` batches), as in pytorch-ood: ``model`` then gives
        the outputs."""
        if not isinstance(train, ModelOutputs):
            if model is None:
                raise ConfigError(f"{self._label()}: fit on a DataLoader needs the model too: fit(loader, model)")
            if self.fits_on_inputs:
                self.model_ = model
                self._fit_inputs(train, model)
                self.fitted_ = True
                return self
            train = outputs_of(model, train, self.layer_keys(model))
        elif self.fits_on_inputs:
            raise ConfigError(f"{self._label()} fits on the training inputs: fit(loader, model), not on outputs")
        if self.needs_labels and train.labels is None:
            raise ConfigError(f"{self._label()} needs labelled training outputs (train.labels is None)")
        self.model_ = model
        self._fit(train)
        self.fitted_ = True
        return self

    def _fit(self, train: ModelOutputs) -> None:
        """Override to learn state into attributes ending in ``_``."""

    def _fit_inputs(self, batches: Iterable, model: nn.Module) -> None:
        """Override, with ``fits_on_inputs = True``, to learn from batches ``x`` or ``(x, y)`` of training inputs."""
        raise NotImplementedError

    def _ready(self, train: ModelOutputs | None, model: nn.Module | None,
               train_inputs: Callable[[], Iterable] | None = None) -> Detector:
        """Ready to score: ``fit`` when the detector learns (on ``train_inputs()`` batches when it fits on
        inputs), else just remember the model (for its head)."""
        if self.fits_on_inputs:
            if train_inputs is None:
                raise ConfigError(f"{self._label()} fits on the training inputs, which this pipeline does not give")
            return self.fit(train_inputs(), model)
        if self.needs_fit:
            return self.fit(train, model)
        self.model_ = model
        return self

    def check_fitted(self) -> None:
        """Raise ``NotFittedError`` if this detector needs ``fit`` and has not had it."""
        if self.needs_fit and not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} must be fit on ID training data before scoring")

    def score_outputs(self, outputs: ModelOutputs) -> Tensor:
        """Scores from precomputed outputs, shape (N,)."""
        self.check_fitted()
        return self._score(outputs).reshape(-1)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        raise NotImplementedError

    def layer_keys(self, model: nn.Module | None) -> list[str]:
        """The intermediate layers this detector reads, as ``<layer>@<reduction>`` keys
        (``oodforge.detectors.layers``); none unless ``requires`` has ``layers``."""
        return []

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """Scores of a batch of inputs ``x`` under ``model`` (any classifier), shape (N,)."""
        with torch.no_grad():
            features, logits, layers = forward_outputs(model, x, self.layer_keys(model))
        return self.score_outputs(ModelOutputs(logits, features.flatten(1), layers=layers))

    def get_state(self) -> dict:
        """The learned state: every attribute ending in ``_`` but the model (tensors moved to the CPU)."""
        return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in vars(self).items()
                if k.endswith("_") and k not in ("model_", "fitted_")}

    def set_state(self, state: dict) -> None:
        """Restore what ``get_state`` returned."""
        for key, value in state.items():
            setattr(self, key, value)

    def save(self, path: str | Path) -> Path:
        """Write name, parameters and learned state to ``path`` atomically (loadable with ``weights_only``)."""
        from oodforge.util.atomic import atomic_torch_save

        self.check_fitted()
        payload = {"format": "oodforge-detector", "detector": self._label(), "params": self.get_params(),
                   "state": self.get_state()}
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Detector:
        """A fitted detector from a file written by ``save``; ``model`` for detectors that read its head."""
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            detector = create_detector(payload["detector"], **payload["params"])
            detector.set_state(payload["state"])
        except (OSError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as exc:
            raise ConfigError(f"{path} is not a saved oodforge detector: {exc}") from None
        if cls is not Detector and not isinstance(detector, cls):
            raise ConfigError(f"{path} holds a {type(detector).__name__}, not a {cls.__name__}")
        detector.model_ = model
        detector.fitted_ = True
        return detector


def size_within(detector: Detector, name: str, limit: int, what: str, warn: bool = True) -> int:
    """The value of size parameter ``name`` (``k``, ``m``, ...) to use when only ``limit`` ``what`` exist.

    A value that fits is used as it is. The parameter's default, when too large, is clamped to ``limit``: the
    value used goes into ``params_used_`` (results.json records it) with a warning (unless ``warn`` is False).
    Any other value that is too large is refused with one ``ValueError`` naming ``<detector>:<name>=<value>``
    and ``limit``.
    """
    value = getattr(detector, name)
    used = getattr(detector, "params_used_", {})
    if value <= limit:
        detector.params_used_ = {k: v for k, v in used.items() if k != name}
        return value
    label = detector._label()
    if value != inspect.signature(type(detector).__init__).parameters[name].default:
        raise ConfigError(f"{label}:{name}={value} is more than the {limit} {what}; choose {name} <= {limit}")
    if warn:
        warnings.warn(f"{label}: {name}={value} (the default) is more than the {limit} {what}; using "
                      f"{name}={limit}", stacklevel=2)
    detector.params_used_ = {**used, name: limit}
    return limit


DETECTORS: Registry[Detector] = Registry("detector")


def registered_name(detector: Detector) -> str | None:
    """The registry name of a detector's class."""
    return next((n for n in DETECTORS.names() if DETECTORS.get(n) is type(detector)), None)


def create_detector(name: str, **kwargs) -> Detector:
    """Build the detector registered as ``name``, with its parameters checked (unknown, type, range)."""
    cls = DETECTORS.get(name)
    known = cls.param_names() if isinstance(cls, type) and issubclass(cls, Detector) else None
    if known is not None:
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ConfigError(f"{name} has no option {unknown[0]!r}; its options: {', '.join(known) or 'none'}")
    return cls(**kwargs)  # a Detector checks its parameters as it is built


def require_interface(model: nn.Module) -> nn.Module:
    """``model`` itself when it has oodforge's classifier interface (``features_and_logits``, or ``features`` and
    ``head``), else a ``TypeError`` saying how to give it one (``oodforge.wrap_model``)."""
    if has_interface(model):
        return model
    raise TypeError(f"{type(model).__name__} has no features_and_logits (or features and head); give detectors "
                    "oodforge.wrap_model(net), which finds its final linear layer")


def features_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(penultimate features, logits) of any classifier on a batch, from one forward pass."""
    model = require_interface(model)
    if callable(getattr(model, "features_and_logits", None)):
        return model.features_and_logits(x)
    features = model.features(x)
    return features, model.head(features)


def forward_outputs(model: nn.Module, x: Tensor, layer_keys: list[str] | tuple[str, ...] = ()
                    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(features, logits, {key: reduced layer outputs}) of one forward pass; no hooks when no keys are asked."""
    if not layer_keys:
        features, logits = features_and_logits(model, x)
        return features, logits, {}
    return layer_outputs(require_interface(model), x, layer_keys, features_and_logits)


def outputs_of(model: nn.Module, batches: Iterable, layer_keys: list[str] | tuple[str, ...] = ()) -> ModelOutputs:
    """The outputs of ``model`` (eval mode, no gradients, on its own device) over batches of ``x`` or ``(x, y)``."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for batch in batches:
                x, y = (batch[0], batch[1]) if isinstance(batch, list | tuple) and len(batch) > 1 else (batch, None)
                x = x[0] if isinstance(x, list | tuple) else x
                features, logits, layers = forward_outputs(model, x.to(device), layer_keys)
                parts.append(ModelOutputs(logits.float().cpu(), features.flatten(1).float().cpu(),
                                          None if y is None else torch.as_tensor(y).long().cpu(),
                                          {k: v.float().cpu() for k, v in layers.items()}))
    finally:
        model.train(was_training)
    if not parts:
        raise ConfigError("fit: the DataLoader yielded no batches")
    return ModelOutputs.cat(parts)

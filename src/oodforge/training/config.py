"""``TrainConfig``: a training recipe (backbone + head + loss + data mix + outliers + schedule), checked at the door."""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field, fields

from oodforge.losses import LOSSES
from oodforge.models.heads import HEADS
from oodforge.util.errors import ConfigError
from oodforge.util.precision import FABRIC_PRECISIONS
from oodforge.util.validation import check_value

LAST_CHECKPOINT = "last.ckpt"


MODEL_CHECKPOINT = "model.ckpt"


@dataclass
class TrainConfig:
    """A training recipe. Defaults: SGD (momentum 0.9, Nesterov) with a cosine schedule, seeded."""

    benchmark: str = "fashion_mnist"
    backbone: str | None = None  # None: the benchmark's default
    head: str = "linear"
    head_options: dict = field(default_factory=dict)
    loss: str = "ce"
    loss_options: dict = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    init: str | None = None  # fine-tune from this checkpoint or weights file
    outliers: str | None = None  # dataset spec of training outliers
    oe_weight: float = 0.5
    outlier_batch_size: int | None = None  # None: same as batch_size
    synthetic_id: str | None = None  # synthetic ID set (SIO)
    real_ratio: float = 0.8
    train_subset: int | None = None  # use N training images, class-balanced (ImageSet.balanced_head)
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed where the hardware runs bf16 natively (oodforge.util.precision)

    def validate(self) -> TrainConfig:
        """Check every field's type and range at the door; one ValueError naming the field and value."""
        hints = typing.get_type_hints(TrainConfig)
        for item in fields(self):
            setattr(self, item.name, check_value("training config", item.name, getattr(self, item.name),
                                                 hints[item.name]))
        checks = [("epochs", self.epochs >= (0 if self.init else 1), ">= 1 (0 only with init: score it as is)"),
                  ("batch_size", self.batch_size >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                  ("momentum", 0 <= self.momentum < 1, "in [0, 1)"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("oe_weight", self.oe_weight >= 0, ">= 0"), ("real_ratio", 0 < self.real_ratio <= 1, "in (0, 1]"),
                  ("train_subset", self.train_subset is None or self.train_subset >= 1, ">= 1"),
                  ("outlier_batch_size", self.outlier_batch_size is None or self.outlier_batch_size >= 1, ">= 1"),
                  ("num_nodes", self.num_nodes >= 1, ">= 1")]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"training config: {name} must be {rule}, got {getattr(self, name)!r}")
        _check_options("head", HEADS, self.head, self.head_options, ("feature_dim", "num_classes"))
        _check_options("loss", LOSSES, self.loss, self.loss_options, ("feature_dim", "num_classes"))
        if self.precision not in ("auto", *FABRIC_PRECISIONS):
            raise ConfigError(f"training config: precision must be one of auto, {', '.join(FABRIC_PRECISIONS)}; "
                             f"got {self.precision!r}")
        if isinstance(self.devices, str) and self.devices != "auto" and not self.devices.replace(",", "").isdigit():
            raise ConfigError(f"training config: devices must be a count, 'auto' or a list like '0,1', got "
                             f"{self.devices!r}")
        return self


def _check_options(kind: str, registry, name: str, options: dict, supplied: tuple[str, ...]) -> None:
    """Refuse an unknown head or loss, or an option its factory does not take (``--head-option foo=1``)."""
    parameters = inspect.signature(registry.get(name)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    known = [p for p in parameters if p not in supplied and p != "self"]
    for key in options:
        if key not in known:
            raise ConfigError(f"training config: {kind} {name!r} has no option {key!r}; its options: "
                             f"{', '.join(known) or 'none'}")


def recipe_detectors(config: TrainConfig) -> list[str]:
    """The scores a recipe is built for, added to whatever detectors a run asks for: ``cosine`` for a
    cosine head, ``semantic_energy`` and ``representation`` for the ``sde`` loss."""
    own = ["cosine"] if config.head != "linear" else []
    return own + (["semantic_energy", "representation"] if config.loss == "sde" else [])


def with_recipe_detectors(spec: str, config: TrainConfig) -> str:
    """``spec`` plus the recipe's own detectors that it does not name already."""
    named = {item.split(":", 1)[0].strip() for item in spec.split(",")}
    extra = [d for d in recipe_detectors(config) if d not in named and "all" not in named]
    return ",".join([spec, *extra]) if extra else spec

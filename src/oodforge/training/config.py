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

    benchmark: str = field(default="fashion_mnist", metadata={"help": "Benchmark whose ID training set is used."})
    backbone: str | None = field(default=None, metadata={"help": "Backbone (default: the benchmark's)."})
    head: str = field(default="linear", metadata={"help": "Classification head."})
    head_options: dict = field(default_factory=dict, metadata={"help": "Head option key=value (repeatable)."})
    loss: str = field(default="ce", metadata={"help": "Training loss."})
    loss_options: dict = field(default_factory=dict, metadata={"help": "Loss option key=value (repeatable)."})
    epochs: int = field(default=5, metadata={"help": "Training epochs."})
    batch_size: int = field(default=128, metadata={"help": "Images per batch."})
    lr: float = field(default=0.1, metadata={"help": "Learning rate (SGD, cosine schedule)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (Nesterov)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    init: str | None = field(default=None, metadata={"help": "Fine-tune from this checkpoint or weights file."})
    outliers: str | None = field(default=None, metadata={"help": "Dataset of training outliers (outlier exposure)."})
    oe_weight: float = field(default=0.5, metadata={"help": "Weight of the outlier-exposure term."})
    outlier_batch_size: int | None = field(default=None, metadata={"help": "Outliers per batch (default: batch "
                                                                           "size)."})
    synthetic_id: str | None = field(default=None, metadata={"help": "Synthetic ID set mixed into batches (SIO)."})
    real_ratio: float = field(default=0.8, metadata={"help": "Share of real images per batch with --synthetic-id."})
    train_subset: int | None = field(default=None, metadata={"help": "Use N training images (class-balanced)."})
    accelerator: str = field(default="auto", metadata={"help": "Fabric accelerator: auto, cpu, gpu, ..."})
    devices: int | str = field(default=1, metadata={"help": "Fabric devices: a count, or e.g. 0,1 or auto."})
    num_nodes: int = field(default=1, metadata={"help": "Fabric nodes."})
    strategy: str = field(default="auto", metadata={"help": "Fabric strategy: auto, ddp, ..."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16-mixed autocast where the CPU or GPU runs "
                                                             "bf16 natively, else 32-true), 32-true, bf16-mixed, or "
                                                             "any Fabric precision (16-mixed, ...)."})

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

"""Training losses; importing this package registers all of them in ``LOSSES``."""

from oodforge.losses import energy, label_smoothing  # noqa: F401  (imported to register)
from oodforge.losses.base import LOSSES, LossInputs, create_loss

__all__ = ["LOSSES", "LossInputs", "create_loss"]

"""Post-hoc OOD detectors; importing this package registers all of them in ``DETECTORS``."""

from oodforge.detectors import (  # noqa: F401  (imported to register)
    cosine,
    fdbd,
    flow,
    knn,
    logits,
    mahalanobis,
    nci,
    nnguide,
    react,
    relation,
    residual,
    rmds,
    semantic_energy,
    she,
    vim,
)
from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, NotFittedError, create_detector

__all__ = ["DETECTORS", "Detector", "ModelOutputs", "NotFittedError", "create_detector"]

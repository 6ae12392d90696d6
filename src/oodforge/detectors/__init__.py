"""Post-hoc OOD detectors; importing this package registers all of them in ``DETECTORS``."""

from oodforge.detectors import (  # noqa: F401  (imported to register)
    ash,
    cadref,
    cosine,
    dice,
    entropy,
    fdbd,
    flow,
    gen,
    gradnorm,
    gram,
    grood,
    klm,
    knn,
    logits,
    mahalanobis,
    multi_mahalanobis,
    nci,
    nnguide,
    rankfeat,
    react,
    relation,
    residual,
    rmds,
    scale,
    semantic_energy,
    she,
    ssd,
    temperature,
    vim,
    vra,
    weiper,
)
from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, NotFittedError, create_detector

__all__ = ["DETECTORS", "Detector", "ModelOutputs", "NotFittedError", "create_detector"]

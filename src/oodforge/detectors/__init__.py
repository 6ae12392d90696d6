"""Post-hoc OOD detectors; importing this package registers all of them in ``DETECTORS``."""

from oodforge.detectors import (  # noqa: F401  (imported to register)
    ash,
    cosine,
    dice,
    entropy,
    fdbd,
    flow,
    gen,
    gmm,
    gradnorm,
    klm,
    knn,
    logits,
    lts,
    mahalanobis,
    nci,
    neco,
    nnguide,
    openmax,
    pnml,
    react,
    relation,
    residual,
    rmds,
    scale,
    semantic_energy,
    she,
    temperature,
    vim,
    weighted_ebo,
)
from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, NotFittedError, create_detector

__all__ = ["DETECTORS", "Detector", "ModelOutputs", "NotFittedError", "create_detector"]

"""Post-hoc OOD detectors; importing this package registers all of them in ``DETECTORS``."""

from oodforge.detectors import (  # noqa: F401  (imported to register)
    ash,
    cosine,
    dice,
    ensemble,
    entropy,
    fdbd,
    flow,
    gen,
    gradnorm,
    gram,
    klm,
    knn,
    logits,
    mahalanobis,
    mds_ensemble,
    multi_mahalanobis,
    nac,
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
    temperature,
    vim,
)
from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, NotFittedError, create_detector

__all__ = ["DETECTORS", "Detector", "ModelOutputs", "NotFittedError", "create_detector"]

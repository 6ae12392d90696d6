"""GROOD (ElAraby et al.) against an independent reference: per-row autograd gradients of the paper's
nearest-prototype cross-entropy with respect to the OOD prototype, and SciPy nearest neighbours; and its
behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from oodforge.detectors import create_detector
from oodforge.detectors.base import ModelOutputs

CLASSES, DIM = 5, 12


@pytest.fixture(scope="module")
def case() -> tuple[ModelOutputs, ModelOutputs, ModelOutputs]:
    """Five classes of relu(centre + noise) in 12-d, the nearest-centre linear head (it gets some training rows
    wrong), and OOD points far from every centre."""
    generator = torch.Generator().manual_seed(0)
    centres = 2.5 * torch.rand(CLASSES, DIM, generator=generator)
    weight, bias = centres, -0.5 * centres.square().sum(dim=1)

    def outputs(features: torch.Tensor, labels: torch.Tensor | None) -> ModelOutputs:
        return ModelOutputs(features @ weight.T + bias, features, labels)

    def in_distribution(n: int) -> ModelOutputs:
        labels = torch.randint(CLASSES, (n,), generator=generator)
        return outputs((centres[labels] + torch.randn(n, DIM, generator=generator)).relu(), labels)

    ood = outputs(6.0 + 2.0 * torch.rand(60, DIM, generator=generator), None)
    return in_distribution(300), in_distribution(40), ood


def reference_grood(train: ModelOutputs, test: ModelOutputs, k: int = 1, ood_prototype: str = "mixup",
                    lam: float = 0.5) -> np.ndarray:
    """The paper's score, step by step: prototypes, the OOD prototype, each row's gradient of
    CE(softmax(-||h - p_j||), argmax logits) with respect to p_o by autograd, and the k-th nearest neighbour
    among the gradients of the correctly classified training rows."""
    x, logits, y = train.features.double().numpy(), train.logits.double().numpy(), train.labels.numpy()
    prototypes = np.stack([x[y == c].mean(axis=0) for c in range(CLASSES)])
    if ood_prototype == "mixup":
        runner_up = np.argsort(-logits, axis=1)[:, 1]
        ood = (lam * x + (1.0 - lam) * prototypes[runner_up]).mean(axis=0)
    else:
        ood = prototypes.mean(axis=0)

    def gradients(outputs: ModelOutputs) -> np.ndarray:
        h = outputs.features.double()
        own_ood = torch.tensor(ood).expand(len(h), -1).clone().requires_grad_(True)  # one copy of p_o per row
        class_distances = torch.cdist(h, torch.tensor(prototypes))
        ood_distance = (h - own_ood).norm(dim=1, keepdim=True)
        loss = F.cross_entropy(-torch.cat([class_distances, ood_distance], dim=1), outputs.logits.argmax(dim=1),
                               reduction="sum")
        (grad,) = torch.autograd.grad(loss, own_ood)
        return grad.numpy()

    correct = logits.argmax(axis=1) == y
    bank = gradients(ModelOutputs(train.logits[correct], train.features[correct], train.labels[correct]))
    distances = np.sort(cdist(gradients(test), bank), axis=1)
    return -distances[:, k - 1]


@pytest.mark.parametrize("options", [{}, {"k": 3}, {"ood_prototype": "mean"}, {"lam": 0.8, "k": 5}])
def test_grood_matches_autograd_reference(case, options):
    train, test, ood = case
    assert 0 < (train.logits.argmax(dim=1) != train.labels).sum() < 60, "some training rows are misclassified"
    detector = create_detector("grood", **options).fit(train)
    for outputs in (test, ood):
        scores = detector.score_outputs(outputs)
        assert scores.dtype == torch.float32
        np.testing.assert_allclose(scores.numpy(), reference_grood(train, outputs, **options), rtol=1e-5,
                                   atol=1e-9)


def test_grood_ranks_rows_at_class_prototypes_above_rows_at_the_ood_prototype(case):
    """Near its class prototype a row's loss hardly depends on p_o (small gradient, like the training rows');
    near p_o the OOD probability is large and the gradient's direction arbitrary, far from every training
    gradient. Each indexed training row is its own nearest neighbour (score 0)."""
    train, _, _ = case
    detector = create_detector("grood").fit(train)
    generator = torch.Generator().manual_seed(1)
    near_classes = detector.prototypes_.float().repeat(8, 1)
    near_ood = detector.ood_prototype_.float().expand(len(near_classes), -1)
    scores = [detector.score_outputs(ModelOutputs(torch.zeros(len(rows), CLASSES),
                                                  rows + 0.05 * torch.randn(rows.shape, generator=generator)))
              for rows in (near_classes, near_ood)]
    assert scores[0].min() > scores[1].max()
    correct = train.logits.argmax(dim=1) == train.labels
    rows = ModelOutputs(train.logits[correct], train.features[correct])
    np.testing.assert_allclose(detector.score_outputs(rows).numpy(), 0.0, atol=1e-6)


def test_grood_refuses_bad_options_and_unlabelled_training_data(case):
    train, _, _ = case
    with pytest.raises(ValueError, match="grood: ood_prototype must be one of mixup, mean, got 'val'"):
        create_detector("grood", ood_prototype="val")
    with pytest.raises(ValueError, match=r"grood: lam must be in \[0, 1\], got 1.5"):
        create_detector("grood", lam=1.5)
    with pytest.raises(ValueError, match="grood: k must be >= 1"):
        create_detector("grood", k=0)
    with pytest.raises(ValueError, match="grood needs labelled training outputs"):
        create_detector("grood").fit(ModelOutputs(train.logits, train.features))
    with pytest.raises(ValueError, match=r"grood:k=999 is more than the \d+ correctly classified training rows"):
        create_detector("grood", k=999).fit(train)

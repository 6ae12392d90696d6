"""What calibrating on the classifier's own training images does to a guard's false-alarm rate: the public
ResNet-20 on CIFAR-10 with MSP, calibrated on 1,000 random training images vs 1,000 random held-out test images,
20 draws each, at alpha 0.01, 0.05 and 0.1 (float32; outputs from the output cache).

Run: OODFORGE_DATA=... python benchmarks/guard_training_calibration.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.deploy.conformal import p_values, sorted_scores
from oodforge.detectors import create_detector
from oodforge.evaluation.cache import OutputCache
from oodforge.models.loading import load_model

ALPHAS = (0.01, 0.05, 0.1)
DRAWS = 20
CALIBRATION = 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guard_training_calibration.json"))
    args = parser.parse_args()
    bench = get_benchmark("cifar10")
    model, _ = load_model("resnet20", Path(os.environ["OODFORGE_DATA"]) / "weights" / "resnet20-12fca82f.th", bench)
    cache = OutputCache()
    train = cache.outputs(model, bench.id_set("train"), "cpu", 500, True, precision="32-true")
    test = cache.outputs(model, bench.id_set("test"), "cpu", 500, True, precision="32-true")
    msp = create_detector("msp")
    train_scores, test_scores = msp.score_outputs(train), msp.score_outputs(test)
    rng = np.random.default_rng(0)
    rates = {"training images": {a: [] for a in ALPHAS}, "held-out test images": {a: [] for a in ALPHAS}}
    for _ in range(DRAWS):
        calibration = sorted_scores(train_scores[rng.choice(len(train_scores), CALIBRATION, replace=False)])
        p = p_values(calibration, test_scores)
        order = rng.permutation(len(test_scores))
        p_held = p_values(sorted_scores(test_scores[order[:CALIBRATION]]), test_scores[order[CALIBRATION:]])
        for alpha in ALPHAS:
            rates["training images"][alpha].append(float((p <= alpha).double().mean()))
            rates["held-out test images"][alpha].append(float((p_held <= alpha).double().mean()))
    record = {"model": "resnet20 (public weights)", "detector": "msp", "precision": "float32", "draws": DRAWS,
              "calibration_images": CALIBRATION, "train_accuracy": float((train.logits.argmax(1) == train.labels)
                                                                         .double().mean()),
              "test_accuracy": float((test.logits.argmax(1) == test.labels).double().mean()),
              "false_alarm_rate": [{"calibrated_on": source, "alpha": alpha, "mean": float(np.mean(v)),
                                    "sd": float(np.std(v, ddof=1))}
                                   for source, by_alpha in rates.items() for alpha, v in by_alpha.items()]}
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

"""Relation's bank size : AUROC and scoring time of the full training bank vs random subsets.

Run: OODFORGE_DATA=... OMP_NUM_THREADS=1 python benchmarks/relation_bank.py [--out FILE.json]
Pretrained ResNet-20 on `cifar10` (outputs from the cache, computed on a miss), one thread: the bank is the
whole training set (`bank_size=None`, the paper's and OpenOOD's setting) or a seeded subset of 20,000 or
10,000 samples (two seeds each); AUROC per OOD set and the seconds to score the ID test set and every OOD set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.detectors.relation import Relation
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.metrics import ood_metrics
from oodforge.models.classifier import ModelConfig, load_classifier
from oodforge.training.loop import pretrained_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/relation_bank.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = Path(os.environ["OODFORGE_DATA"]) / "weights" / "resnet20-12fca82f.th"
    bench = get_benchmark("cifar10")
    model = load_classifier(weights, pretrained_config(ModelConfig(num_classes=10), weights)).eval()
    cache = OutputCache()
    train = cache.outputs(model, bench.id_set("train"))
    test = cache.outputs(model, bench.id_set("test"))
    oods = {name: cache.outputs(model, bench.ood_set(name)) for name in bench.ood}
    rows = []
    for bank, seed in [(None, 0), (20000, 0), (20000, 1), (10000, 0), (10000, 1)]:
        detector = Relation(bank_size=bank, seed=seed).fit(train, model)
        tic = time.perf_counter()
        id_scores = detector.score_outputs(test).numpy()
        aurocs = {name: 100 * ood_metrics(id_scores, detector.score_outputs(o).numpy())["auroc"]
                  for name, o in oods.items()}
        rows.append({"bank_size": bank or len(train.features), "seed": seed, "score_s": time.perf_counter() - tic,
                     "auroc": aurocs, "near": float(np.mean([aurocs[n] for n, g in bench.ood.items() if g == "near"])),
                     "far": float(np.mean([aurocs[n] for n, g in bench.ood.items() if g == "far"]))})
        print(json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": 1, "queries": len(test.features) + sum(len(o.features)
                                                                                  for o in oods.values()),
                                    "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

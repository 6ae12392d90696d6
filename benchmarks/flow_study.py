"""Study: the feature-density flow vs MSP/Energy/Mahalanobis/KNN; normalization on/off;
flow epochs (1 vs 5 vs 20); several seeds of the flow fit.

Run (pretrained ResNet-20 on CIFAR-10):
  OODFORGE_DATA=... python benchmarks/flow_study.py --benchmark cifar10 \
      --weights $OODFORGE_DATA/weights/resnet20-12fca82f.th
Run (small CNN of the demo on Fashion-MNIST):
  OODFORGE_DATA=... python benchmarks/flow_study.py --benchmark fashion_mnist --checkpoint runs/demo/model.ckpt
Writes benchmarks/results/flow_<benchmark>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from oodforge.data.benchmarks import get_benchmark  # noqa: E402
from oodforge.detectors import create_detector  # noqa: E402
from oodforge.evaluation.cache import OutputCache  # noqa: E402
from oodforge.evaluation.metrics import ood_metrics  # noqa: E402
from oodforge.models.classifier import ModelConfig, load_classifier  # noqa: E402
from oodforge.training.loop import pretrained_config  # noqa: E402


def load_model(args):
    if args.checkpoint:
        return load_classifier(args.checkpoint)
    return load_classifier(args.weights, pretrained_config(ModelConfig(num_classes=10), args.weights))


def metrics_for(detector, model, outputs, bench) -> dict:
    id_scores = detector.score_outputs(outputs[bench.id_dataset]).numpy()
    rows = {n: ood_metrics(id_scores, detector.score_outputs(outputs[n]).numpy()) for n in bench.ood}
    summary = {}
    for group in ("near", "far"):
        names = [n for n, g in bench.ood.items() if g == group]
        if names:
            summary[f"{group}_auroc"] = float(np.mean([rows[n]["auroc"] for n in names]))
            summary[f"{group}_fpr95"] = float(np.mean([rows[n]["fpr95"] for n in names]))
    return {"per_set": rows, **summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--benchmark", default="cifar10")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    bench = get_benchmark(args.benchmark)
    model = load_model(args).eval()
    cache = OutputCache()
    sets = {bench.id_dataset: bench.id_set("test")} | {n: bench.ood_set(n) for n in bench.ood}
    outputs = {n: cache.outputs(model, s) for n, s in sets.items()}
    train = cache.outputs(model, bench.id_set("train"))
    record = {"benchmark": bench.name, "model": str(args.checkpoint or args.weights), "baselines": {}, "flow": []}
    for name in ("msp", "energy", "mahalanobis", "knn"):
        detector = create_detector(name)
        if detector.needs_fit:
            detector.fit(train, model)
        record["baselines"][name] = metrics_for(detector, model, outputs, bench)
        print(name, {k: v for k, v in record["baselines"][name].items() if k != "per_set"}, flush=True)
    for normalize in (True, False):
        for epochs in args.epochs:
            for seed in args.seeds:
                tic = time.perf_counter()
                flow = create_detector("flow", epochs=epochs, seed=seed, normalize=normalize, quiet=True)
                flow.fit(train, model)
                fit_s = time.perf_counter() - tic
                row = {"normalize": normalize, "epochs": epochs, "seed": seed, "fit_s": fit_s,
                       **metrics_for(flow, model, outputs, bench)}
                record["flow"].append(row)
                print({k: v for k, v in row.items() if k != "per_set"}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"flow_{bench.name}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(record, bench))
    plot(record, stem.with_suffix(".png"))


def markdown(record: dict, bench) -> str:
    groups = [g for g in ("near", "far") if any(v == g for v in bench.ood.values())]
    head = ["detector"] + [f"{g} AUROC" for g in groups] + [f"{g} FPR95" for g in groups] + ["fit s"]
    lines = [f"# Flow study on {record['benchmark']} ({record['model']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in record["baselines"].items():
        cells = [f"{100 * row[f'{g}_auroc']:.2f}" for g in groups] + [f"{100 * row[f'{g}_fpr95']:.2f}" for g in groups]
        lines.append("| " + " | ".join([name, *cells, "-"]) + " |")
    keys = sorted({(r["normalize"], r["epochs"]) for r in record["flow"]}, key=lambda k: (not k[0], k[1]))
    for normalize, epochs in keys:
        rows = [r for r in record["flow"] if r["normalize"] == normalize and r["epochs"] == epochs]
        cells = [_pm([r[f"{g}_auroc"] for r in rows]) for g in groups]
        cells += [_pm([r[f"{g}_fpr95"] for r in rows]) for g in groups]
        label = f"flow ({'L2-normalized' if normalize else 'raw'} features, {epochs} ep, {len(rows)} seeds)"
        lines.append("| " + " | ".join([label, *cells, f"{np.mean([r['fit_s'] for r in rows]):.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def _pm(values: list[float]) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def plot(record: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.5), dpi=100)
    for normalize in (True, False):
        rows = [r for r in record["flow"] if r["normalize"] == normalize]
        epochs = sorted({r["epochs"] for r in rows})
        means = [np.mean([r["far_auroc"] for r in rows if r["epochs"] == e]) for e in epochs]
        stds = [np.std([r["far_auroc"] for r in rows if r["epochs"] == e]) for e in epochs]
        axis.errorbar(epochs, means, yerr=stds, marker="o", capsize=3,
                      label=f"flow, {'normalized' if normalize else 'raw'} features")
    for name in ("msp", "knn"):
        axis.axhline(record["baselines"][name]["far_auroc"], linestyle="--", linewidth=1, label=name,
                     color="grey" if name == "msp" else "black")
    axis.set_xscale("log")
    axis.set_xlabel("flow training epochs")
    axis.set_ylabel("mean far-OOD AUROC")
    axis.set_title(f"{record['benchmark']}: flow epochs")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()

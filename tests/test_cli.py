"""End-to-end CLI runs on small real data, and the one-line errors on bad input."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from conftest import needs_mnist_family
from oodforge.cli import app

runner = CliRunner()


def check_contract(out):
    """results.json and scores.npz follow design.md §2, and every AUROC matches scikit-learn's."""
    results = json.loads((out / "results.json").read_text())
    for key in ("benchmark", "id_dataset", "id_accuracy", "model", "train", "results"):
        assert key in results
    scores = np.load(out / "scores.npz")
    several = "methods" in results
    for row in results["results"]:
        assert set(row) >= {"method", "detector", "ood_dataset", "group", "auroc", "aupr_in", "aupr_out", "fpr95"}
        assert row["group"] in ("near", "far")
        assert all(0.0 <= row[k] <= 1.0 for k in ("auroc", "aupr_in", "aupr_out", "fpr95"))
        prefix = f"{row['method']}/" if several else ""
        id_scores = scores[f"{prefix}{row['detector']}/{results['id_dataset']}"]
        ood_scores = scores[f"{prefix}{row['detector']}/{row['ood_dataset']}"]
        assert id_scores.ndim == 1 and ood_scores.ndim == 1
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[id_scores, ood_scores]), abs=1e-9)
    assert (out / "report.html").is_file()
    return results


@needs_mnist_family
def test_train_then_score_end_to_end(tmp_path):
    out = tmp_path / "train"
    result = runner.invoke(app, ["train", "--benchmark", "fashion_mnist", "--epochs", "1", "--train-subset", "1024",
                                 "--lr", "0.05", "--detectors", "msp,maxlogit,energy,knn:k=5,mahalanobis,flow",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = check_contract(out)
    assert {r["detector"] for r in results["results"]} == {"msp", "maxlogit", "energy", "knn", "mahalanobis", "flow"}
    assert (out / "detectors" / "flow.pt").is_file()
    assert {r["ood_dataset"] for r in results["results"]} == {"mnist", "notmnist", "gaussian"}
    assert results["id_accuracy"] > 0.5  # 1 epoch on 1024 images is far above chance (0.1)
    assert "uniformity" in results["model"]["diagnostics"]

    scored = tmp_path / "score"
    result = runner.invoke(app, ["score", "--benchmark", "fashion_mnist", "--model", str(out / "model.ckpt"),
                                 "--detectors", "msp,odin,flow", "--detector-dir", str(out / "detectors"),
                                 "--out", str(scored), "--quiet"])
    assert result.exit_code == 0, result.output
    again = check_contract(scored)
    flow = lambda r: [x["auroc"] for x in r["results"] if x["detector"] == "flow"]  # noqa: E731
    assert flow(again) == flow(results)  # the saved flow was reloaded, not refitted on the full train set
    assert again["id_accuracy"] == pytest.approx(results["id_accuracy"])
    msp = lambda r: [x["auroc"] for x in r["results"] if x["detector"] == "msp"]  # noqa: E731
    assert msp(again) == pytest.approx(msp(results))


@needs_mnist_family
def test_bench_runs_several_recipes_into_one_report(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("benchmark: fashion_mnist\ndetectors: msp,energy\nseeds: [0, 1]\n"
                      "defaults: {epochs: 1, train_subset: 512, lr: 0.05}\n"
                      "runs:\n  - {name: ce, loss: ce}\n  - {name: ls, loss: ls}\n"
                      "  - {name: frozen, epochs: 0, seeds: [1], init: '{out}/ce/seed{seed}/model.ckpt'}\n")
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = check_contract(out)
    assert set(results["methods"]) == {"ce-seed0", "ce-seed1", "ls-seed0", "ls-seed1", "frozen-seed1"}
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["run"], r["detector"]) for r in summary} == {(a, b) for a in ("ce", "ls", "frozen")
                                                            for b in ("msp", "energy")}
    # the 0-epoch run re-scores ce-seed1's model, found through {out} and {seed}
    assert results["methods"]["frozen-seed1"]["train"]["init"] == str(out / "ce" / "seed1" / "model.ckpt")
    auroc = lambda m: [r["auroc"] for r in results["results"] if r["method"] == m]  # noqa: E731
    assert auroc("frozen-seed1") == pytest.approx(auroc("ce-seed1"), abs=1e-12)
    ce_acc = [results["methods"][f"ce-seed{s}"]["id_accuracy"] for s in (0, 1)]
    row = next(r for r in summary if r["run"] == "ce" and r["detector"] == "msp")
    assert row["id_accuracy_mean"] == pytest.approx(np.mean(ce_acc))
    assert row["id_accuracy_std"] == pytest.approx(np.std(ce_acc))


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    text = " ".join(result.output.split())
    assert lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in text, (needle, result.output)


def test_missing_dataset_names_folder_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_DATA", str(tmp_path))
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("torchvision.datasets.utils.download_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    result = runner.invoke(app, ["score", "--benchmark", "fashion_mnist", "--model", "small_cnn",
                                 "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"), "--quiet"])
    _one_line_error(result, "'fashion_mnist'", "download failed", "OODFORGE_DATA")
    result = runner.invoke(app, ["train", "--benchmark", "mnist", "--epochs", "1", "--out", str(tmp_path / "o"),
                                 "--quiet"])
    _one_line_error(result, "'mnist'", str(tmp_path), "OODFORGE_DATA")


def test_corrupt_checkpoint_and_unknown_names(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["score", "--benchmark", "fashion_mnist", "--model", str(bad), "--quiet"])
    _one_line_error(result, "bad.ckpt")
    result = runner.invoke(app, ["score", "--benchmark", "nope", "--model", str(bad), "--quiet"])
    _one_line_error(result, "unknown benchmark 'nope'", "fashion_mnist")
    result = runner.invoke(app, ["train", "--detectors", "msp,bogus", "--epochs", "0", "--quiet",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2


def test_bench_summary_of_a_single_method_payload():
    from oodforge.bench.jobs import summarize

    results = [{"method": "sde-seed0", "detector": "msp", "ood_dataset": d, "group": g, "auroc": a, "fpr95": f}
               for d, g, a, f in (("tin", "near", 0.7, 0.9), ("mnist", "far", 0.8, 0.5), ("dtd", "far", 0.9, 0.3))]
    payload = {"id_accuracy": 0.9, "train": {"run": "sde"}, "results": results}
    (row,) = summarize(payload)
    assert (row["run"], row["detector"], row["seeds"]) == ("sde", "msp", 1)
    assert row["id_accuracy_mean"] == 0.9 and row["near_auroc_mean"] == pytest.approx(0.7)
    assert row["far_auroc_mean"] == pytest.approx(0.85) and row["fpr95_mean"] == pytest.approx(np.mean([0.9, 0.5, 0.3]))
    assert row["near_fpr95_mean"] == pytest.approx(0.9) and row["far_fpr95_mean"] == pytest.approx(0.4)
    from oodforge.bench.jobs import summary_markdown

    header, _, line = summary_markdown([row], payload).splitlines()
    assert "near FPR95" in header and "| 90.00 ± 0.00 |" in line


def test_train_options_are_the_train_config_fields() -> None:
    """Every TrainConfig field is one `train` option with the field's default and help (dict fields as the
    repeatable `--head-option`/`--loss-option`), plus --out, --detectors, --resume and --quiet."""
    from dataclasses import MISSING, fields

    import typer

    from oodforge.training.config import TrainConfig

    command = typer.main.get_command(app).commands["train"]
    options = {p.name: p for p in command.params}
    for spec in fields(TrainConfig):
        default = spec.default_factory() if spec.default is MISSING else spec.default
        name = spec.name.removesuffix("s") if isinstance(default, dict) else spec.name
        assert name in options, name
        assert options[name].help == spec.metadata["help"]
        if not isinstance(default, dict):
            assert options[name].default == (str(default) if name == "devices" else default)
    assert set(options) - {f.name.removesuffix("s") if f.name.endswith("_options") else f.name
                           for f in fields(TrainConfig)} == {"out", "detectors", "resume", "quiet"}

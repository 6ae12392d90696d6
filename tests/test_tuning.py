"""Tuning on validation data only: search spaces, chosen values in results.json, blindness to test data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import oodforge
from oodforge.cli import app
from oodforge.data.benchmarks import get_benchmark
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.specs import parse_detector_spec
from oodforge.evaluation.tuning import MAX_TRIALS, grid, tune
from test_bring_your_own import TinyNet, make_folder

DETECTORS = "knn,react,energy,msp"  # msp has no search space


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


def write_benchmark(tmp_path: Path, name: str, test_ood: dict[str, str]) -> Path:
    """A YAML benchmark over folders with a validation section; ``test_ood`` maps names to folders."""
    config = {"name": name, "id": {"train": "folder:leaves/train", "test": "folder:leaves/test"},
              "ood": {n: f"folder:{f}" for n, f in test_ood.items()},
              "val": {"id": "folder:leaves/val", "ood": {"shapes": {"data": "folder:val_ood", "group": "near"},
                                                         "noise": {"data": "uniform", "group": "far"}}},
              "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def folders(tmp_path) -> Path:
    for split, count, seed in (("train", 20, 0), ("test", 8, 1), ("val", 8, 2)):
        make_folder(tmp_path / "leaves" / split, {"ash": count, "elm": count, "oak": count}, seed=seed)
    make_folder(tmp_path / "val_ood", {"x": 12}, size=20, seed=5)
    make_folder(tmp_path / "test_a", {"x": 10}, size=24, seed=6)
    make_folder(tmp_path / "test_b", {"x": 10}, size=12, seed=7)
    return tmp_path


def test_grid_leaves_out_fixed_parameters_and_is_capped() -> None:
    space = {"k": [1, 5], "memory_mb": [10.0, 20.0]}
    assert grid(space, {}) == [{"k": 1, "memory_mb": 10.0}, {"k": 1, "memory_mb": 20.0},
                               {"k": 5, "memory_mb": 10.0}, {"k": 5, "memory_mb": 20.0}]
    assert grid(space, {"k": 3}) == [{"memory_mb": 10.0}, {"memory_mb": 20.0}]
    assert grid(space, {"k": 3, "memory_mb": 1.0}) == [] and grid({}, {}) == []
    assert len(grid({"a": list(range(20)), "b": list(range(20))}, {})) == MAX_TRIALS


def test_tuning_never_opens_test_sets_and_ignores_which_they_are(folders) -> None:
    model = oodforge.wrap_model(TinyNet())
    spec = parse_detector_spec(DETECTORS)
    first = get_benchmark(str(write_benchmark(folders, "first", {"a": "test_a"})))
    second = get_benchmark(str(write_benchmark(folders, "second", {"b": "test_b", "a": "test_a"})))
    for test_folder in ("test_a", "test_b", "leaves/test"):  # gone while tuning runs: opening one would fail
        shutil.move(folders / test_folder, folders / f"{test_folder.replace('/', '_')}-away")
    chosen = [tune(model, bench, spec, cache=OutputCache(folders / f"cache-{bench.name}")) for bench in (first, second)]
    tunable = {n for n in spec if oodforge.DETECTORS.get(n).search_space}
    assert {"react", "energy"} <= tunable and set(chosen[0].detectors) == tunable  # msp has no space
    for label in chosen[0].detectors:
        assert chosen[0].detectors[label]["chosen"] == chosen[1].detectors[label]["chosen"]
        trials = [json.dumps(c.detectors[label]["trials"]) for c in chosen]  # NaN (a refused trial) == NaN here
        assert trials[0] == trials[1]
    record = chosen[0].detectors["react"]
    best = max(record["trials"], key=lambda t: t["val_auroc"])
    assert record["chosen"] == best["params"] and record["val_auroc"] == best["val_auroc"]
    trial_values = {t["params"]["percentile"] for t in record["trials"]}
    assert set(record["space"]) == {"percentile"} and trial_values == set(record["space"]["percentile"])


def test_tuned_run_records_space_choice_and_validation_sets(folders) -> None:
    path = write_benchmark(folders, "leaves", {"a": "test_a"})
    out = folders / "run"
    model = "module:test_bring_your_own:TinyNet"
    result = CliRunner().invoke(app, ["score", "--benchmark", str(path), "--model", model, "--detectors", "react,msp",
                                      "--tune", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert [r["detector"] for r in saved["results"]] == ["react", "msp", "react[tuned]"]
    tuning = saved["tuning"]
    assert set(tuning["validation"]["ood"]) == {"shapes", "noise"} and "leaves/val" in tuning["validation"]["id"]
    chosen = tuning["detectors"]["react"]["chosen"]["percentile"]
    assert saved["detectors"]["react[tuned]"]["params"]["percentile"] == chosen
    assert chosen in tuning["detectors"]["react"]["space"]["percentile"]
    assert np.isfinite([r["auroc"] for r in saved["results"]]).all()


def test_validation_set_that_shares_images_with_a_test_set_is_refused(folders) -> None:
    path = write_benchmark(folders, "leaky", {"a": "val_ood"})
    with pytest.raises(ValueError, match="shares images with test set"):
        get_benchmark(str(path)).check_validation()


def test_built_in_benchmarks_declare_disjoint_validation_data() -> None:
    from oodforge.data.benchmarks import BENCHMARKS

    for name in BENCHMARKS.names():
        bench = get_benchmark(name)
        assert bench.val.get("ood"), name
        bench.check_validation()


def test_trials_that_do_not_fit_the_model_are_recorded_not_fatal(folders, monkeypatch) -> None:
    from oodforge.detectors.vim import ViM

    monkeypatch.setattr(ViM, "search_space", {"dim": [4, 64]})  # the net's features have 32 dimensions
    bench = get_benchmark(str(write_benchmark(folders, "dims", {"a": "test_a"})))
    record = tune(oodforge.wrap_model(TinyNet()), bench, parse_detector_spec("vim")).detectors["vim"]
    assert record["chosen"] == {"dim": 4}
    assert "dim" in record["trials"][1]["error"] and np.isnan(record["trials"][1]["val_auroc"])


def test_every_detector_records_validation_auroc_per_set_equal_to_sklearn(folders) -> None:
    from sklearn.metrics import roc_auc_score

    from oodforge.evaluation.extraction import compute_outputs

    bench = get_benchmark(str(write_benchmark(folders, "vals", {"a": "test_a"})))
    model = oodforge.wrap_model(TinyNet())
    tuning = tune(model, bench, parse_detector_spec("msp,react"), cache=OutputCache(folders / "cache-vals"))
    assert set(tuning.validation_auroc) == {"msp", "react", "react[tuned]"}  # msp: defaults only (no space)

    def msp(images):
        return compute_outputs(model, images).logits.softmax(1).max(1).values.numpy()

    id_scores = msp(bench.split_train()[1])
    for name, images in bench.val_ood_sets().items():
        ood = msp(images)
        expected = roc_auc_score(np.r_[np.ones(len(id_scores)), np.zeros(len(ood))], np.r_[id_scores, ood])
        assert tuning.validation_auroc["msp"]["by_set"][name] == pytest.approx(expected, abs=1e-9)
    record = tuning.validation_auroc["msp"]
    assert record["mean"] == pytest.approx(np.mean(list(record["by_set"].values())))
    assert tuning.validation_auroc["react[tuned]"]["mean"] == tuning.detectors["react"]["val_auroc"]
    assert "val_auroc_by_set" not in tuning.detectors["react"]  # moved to validation_auroc


def test_validation_sets_from_the_training_outlier_source_are_left_out(folders) -> None:
    bench = get_benchmark(str(write_benchmark(folders, "oe", {"a": "test_a"})))
    model = oodforge.wrap_model(TinyNet())
    tuning = tune(model, bench, parse_detector_spec("msp,energy"), outliers="uniform",
                  cache=OutputCache(folders / "cache-oe"))
    assert set(tuning.validation["ood"]) == {"shapes"}
    assert tuning.validation["excluded"] == {"noise": "same source as the training outliers (uniform)"}
    assert set(tuning.validation_auroc["msp"]["by_set"]) == {"shapes"}
    plain = tune(model, bench, parse_detector_spec("msp"), cache=OutputCache(folders / "cache-oe"))
    assert set(plain.validation_auroc["msp"]["by_set"]) == {"shapes", "noise"} and "excluded" not in plain.validation
    assert plain.validation_auroc["msp"]["by_set"]["shapes"] == tuning.validation_auroc["msp"]["by_set"]["shapes"]
    only_noise = yaml.safe_load(write_benchmark(folders, "noisy", {"a": "test_a"}).read_text())
    del only_noise["val"]["ood"]["shapes"]
    (folders / "noisy.yaml").write_text(yaml.safe_dump(only_noise))
    with pytest.raises(ValueError, match="every validation OOD set .* training outliers 'uniform'"):
        tune(model, get_benchmark(str(folders / "noisy.yaml")), parse_detector_spec("msp"), outliers="uniform")


def test_training_outliers_are_read_from_oodforge_checkpoints_only(tmp_path) -> None:
    import torch

    from oodforge.models.loading import training_outliers

    assert training_outliers(None) is None and training_outliers(tmp_path / "missing.ckpt") is None
    (tmp_path / "weights.bin").write_bytes(b"not a torch file")
    assert training_outliers(tmp_path / "weights.bin") is None
    torch.save({"format": "oodforge-classifier", "extra": {"train_config": {"outliers": "uniform"}}},
               tmp_path / "model.ckpt")
    torch.save({"format": "oodforge-training", "train_config": {"outliers": "natural_patches"}}, tmp_path / "last.ckpt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pth")
    assert training_outliers(tmp_path / "model.ckpt") == "uniform"
    assert training_outliers(tmp_path / "last.ckpt") == "natural_patches"
    assert training_outliers(tmp_path / "plain.pth") is None


def test_cifar10_validates_on_photos_disjoint_from_the_outlier_pool() -> None:
    from oodforge.data.datasets import NATURAL_PHOTOS, NATURAL_PHOTOS_A, NATURAL_PHOTOS_B, load_dataset, overlaps
    from oodforge.evaluation.tuning import validation_sets_apart

    assert set(NATURAL_PHOTOS_A).isdisjoint(NATURAL_PHOTOS_B)
    assert set(NATURAL_PHOTOS_A) | set(NATURAL_PHOTOS_B) == set(NATURAL_PHOTOS)
    assert overlaps("natural_patches", "natural_patches_b") and overlaps("natural_patches_a", "natural_patches")
    assert not overlaps("natural_patches_a", "natural_patches_b")
    for name in ("cifar10", "cifar10_oe"):
        bench = get_benchmark(name)
        assert bench.val["ood"]["patches_val"]["data"] == "natural_patches_b"
        assert validation_sets_apart(bench, "natural_patches_a") == {}
        assert set(validation_sets_apart(bench, "natural_patches")) == {"patches_val"}
    a, b = (load_dataset(f"natural_patches_{half}", "train") for half in "ab")
    assert a.images.shape == b.images.shape == (10_000, 64, 64, 3)
    # no crop of one half is a crop of the other: compare exact pixel rows of the first 500 of each
    rows_a = {img.tobytes() for img in a.images[:500, 0]}
    assert not rows_a & {img.tobytes() for img in b.images[:500, 0]}


def test_bench_picks_the_pipeline_on_validation_sets_common_to_all_runs(folders) -> None:
    from oodforge.bench.jobs import best_on_validation

    path = write_benchmark(folders, "pick", {"a": "test_a"})
    config = yaml.safe_load(path.read_text())
    config.update(backbone="small_cnn", image_size=28)
    path.write_text(yaml.safe_dump(config))
    bench = folders / "bench.yaml"
    bench.write_text(yaml.safe_dump({"benchmark": str(path), "detectors": "msp,energy", "tune": True, "seeds": [0, 1],
                                     "defaults": {"epochs": 1, "batch_size": 8, "lr": 0.01},
                                     "runs": [{"name": "ce"}, {"name": "oe", "outliers": "uniform"}]}))
    out = folders / "bench"
    result = CliRunner().invoke(app, ["bench", str(bench), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    tunings = {m: info["tuning"] for m, info in saved["methods"].items()}
    assert set(tunings["ce-seed0"]["validation"]["ood"]) == {"shapes", "noise"}
    assert set(tunings["oe-seed1"]["validation"]["ood"]) == {"shapes"}  # noise = the training outliers' source
    summary = json.loads((out / "summary.json").read_text())
    for row in summary:  # validation AUROC over the common set only, mean over the two seeds
        per_seed = [tunings[f"{row['run']}-seed{k}"]["validation_auroc"][row["detector"]]["by_set"]["shapes"]
                    for k in (0, 1)]
        assert row["val_auroc_mean"] == pytest.approx(np.mean(per_seed))
    assert {r["detector"] for r in summary} >= {"msp", "energy", "energy[tuned]"}
    best = best_on_validation(summary)
    assert best["val_auroc_mean"] == max(r["val_auroc_mean"] for r in summary)
    text = (out / "summary.md").read_text()
    assert "val AUROC" in text and f"run **{best['run']}**, detector **{best['detector']}**" in text
    assert "mean AUROC over shapes)" in text


def _payload(run: str, seeds: dict[int, dict[str, float]], sets: list[str]) -> dict:
    """A minimal bench results.json: one detector 'msp', validation AUROC per set, one near and one far row."""
    methods, results = {}, []
    for seed, by_set in seeds.items():
        method = f"{run}-seed{seed}"
        methods[method] = {"train": {"run": run}, "id_accuracy": 0.8 + seed / 100,
                           "tuning": {"validation": {"ood": sets}, "validation_auroc": {"msp": {"by_set": by_set}}}}
        results += [{"method": method, "detector": "msp", "group": "near", "auroc": 0.7 + seed / 10, "fpr95": 0.5},
                    {"method": method, "detector": "msp", "group": "far", "auroc": 0.9, "fpr95": 0.2}]
    return {"benchmark": "cifar10", "methods": methods, "results": results}


def test_merged_payloads_are_ranked_on_the_validation_sets_common_to_all() -> None:
    from oodforge.bench.jobs import best_on_validation, merge_payloads, payload_validation_sets, summarize

    a = _payload("ce", {0: {"x": 0.6, "y": 0.9}, 1: {"x": 0.8, "y": 0.9}}, ["x", "y"])
    b = _payload("oe", {0: {"x": 0.75}}, ["x"])  # its training outliers' source left y out
    merged = merge_payloads([a, b, a])  # a method found twice with the same results is kept once
    assert len(merged["methods"]) == 3 and len(merged["results"]) == 6
    assert payload_validation_sets(merged) == ["x"]
    rows = {r["run"]: r for r in summarize(merged)}
    assert rows["ce"]["val_auroc_mean"] == pytest.approx(0.7) and rows["ce"]["val_auroc_std"] == pytest.approx(0.1)
    assert rows["ce"]["near_auroc_mean"] == pytest.approx(0.75) and rows["ce"]["seeds"] == 2
    assert best_on_validation(list(rows.values()))["run"] == "oe"  # 0.75 > 0.7 on x
    alone = {r["run"]: r for r in summarize(a, validation_sets=["y"])}
    assert alone["ce"]["val_auroc_mean"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="validation set\\(s\\) y not scored for every run"):
        summarize(merged, validation_sets=["y"])
    changed = _payload("ce", {0: {"x": 0.6, "y": 0.9}}, ["x", "y"])
    changed["results"][0]["auroc"] = 0.1
    with pytest.raises(ValueError, match="'ce-seed0' appears in two payloads with different results"):
        merge_payloads([a, changed])
    with pytest.raises(ValueError, match="different benchmarks"):
        merge_payloads([a, {**b, "benchmark": "fashion_mnist"}])


def test_a_one_method_results_json_merges_like_a_bench_output() -> None:
    from oodforge.bench.jobs import merge_payloads, methods_of, summarize

    a = _payload("ce", {0: {"x": 0.6}, 1: {"x": 0.8}}, ["x"])
    two = _payload("ce", {2: {"x": 0.7}}, ["x"])
    ((method, block),) = two.pop("methods").items()
    single = {**two, **block}  # a bench of one run and one seed keeps its method's block at the top level
    assert methods_of(single) == {"ce-seed2": block} and methods_of(a) is a["methods"]
    assert summarize(single)[0]["val_auroc_mean"] == pytest.approx(0.7)
    merged = merge_payloads([a, single])
    assert list(merged["methods"]) == ["ce-seed0", "ce-seed1", "ce-seed2"] and len(merged["results"]) == 6
    (row,) = summarize(merged)
    assert row["seeds"] == 3 and row["id_accuracy_mean"] == pytest.approx(np.mean([0.80, 0.81, 0.82]))
    assert row["val_auroc_mean"] == pytest.approx(0.7) and row["near_auroc_mean"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="not exactly one method in its results: ce-seed0, ce-seed1"):
        methods_of({**single, "results": a["results"]})


def _full_payload(run: str, seeds: dict[int, dict[str, float]], sets: list[str]) -> dict:
    """``_payload`` with the per-row fields results.md prints (OOD set, AUPR-In, AUPR-Out)."""
    payload = _payload(run, seeds, sets)
    for r in payload["results"]:
        r.update(ood_dataset=f"{r['group']}_set", aupr_in=0.5, aupr_out=0.5)
    return payload


def test_merge_results_script_writes_the_summary_of_all_seeds(tmp_path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_results.py"
    seed0 = tmp_path / "seed0.json"
    seed0.write_text(json.dumps(_full_payload("arcface", {0: {"x": 0.6}}, ["x"])))
    seeds12 = tmp_path / "seeds12.json"
    seeds12.write_text(json.dumps(_full_payload("arcface", {1: {"x": 0.8}, 2: {"x": 0.7}}, ["x"])))
    out = tmp_path / "heads"
    done = subprocess.run([sys.executable, str(script), str(seed0), str(seeds12), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads((tmp_path / "heads_summary.json").read_text())
    assert row["seeds"] == 3 and row["val_auroc_mean"] == pytest.approx(0.7)
    assert row["near_auroc_mean"] == pytest.approx(np.mean([0.7, 0.8, 0.9]))  # 0.7 + seed / 10
    assert row["id_accuracy_std"] == pytest.approx(np.std([0.80, 0.81, 0.82]))
    merged = json.loads((tmp_path / "heads_results.json").read_text())
    assert list(merged["methods"]) == ["arcface-seed0", "arcface-seed1", "arcface-seed2"]
    assert [m["file"] for m in merged["merged_from"]] == [str(seed0), str(seeds12)]
    accuracies = "arcface-seed0 80.00%, arcface-seed1 81.00%, arcface-seed2 82.00%"
    assert accuracies in (tmp_path / "heads_results.md").read_text()
    assert "| arcface | msp | 3 |" in (tmp_path / "heads_summary.md").read_text()

    broken = tmp_path / "broken.json"
    broken.write_text("{")
    before = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run([sys.executable, str(script), str(seed0), str(broken), "--out", str(tmp_path / "again")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {broken}:") and done.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def _scored(run: str, seed: int, detectors: dict[str, tuple[float, float]], accuracy: float = 0.86) -> dict:
    """A bench results.json of one run and seed: per detector (validation AUROC on 'x', near test AUROC)."""
    method = f"{run}-seed{seed}"
    tuning = {"validation": {"ood": ["x"]},
              "validation_auroc": {d: {"by_set": {"x": val}} for d, (val, _) in detectors.items()}}
    results = [row for d, (_, near) in detectors.items()
               for row in ({"method": method, "detector": d, "group": "near", "auroc": near, "fpr95": 1 - near},
                           {"method": method, "detector": d, "group": "far", "auroc": 0.9, "fpr95": 0.2})]
    return {"benchmark": "cifar10", "methods": {method: {"train": {"run": run}, "id_accuracy": accuracy,
                                                         "tuning": tuning}}, "results": results}


def test_best_pipeline_script_picks_on_validation_overall_and_per_run(tmp_path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "best_pipeline.py"
    files = []
    for name, payload in {"ce0": _scored("ce", 0, {"msp": (0.70, 0.80), "energy": (0.90, 0.60)}),
                          "ce1": _scored("ce", 1, {"msp": (0.72, 0.82), "energy": (0.80, 0.62)}),
                          "head": _scored("arcface", 0, {"msp": (0.95, 0.50), "cosine": (0.60, 0.95)}, 0.84),
                          "oe": _scored("oe", 0, {"msp": (0.86, 0.70), "energy": (0.50, 0.99)})}.items():
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(payload))
    out = tmp_path / "best"
    done = subprocess.run([sys.executable, str(script), *map(str, files), "--min-accuracy", "0.85", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    # oe msp (0.86) beats ce energy (mean 0.85); arcface msp (0.95) is below the accuracy floor
    assert (result["pick"]["run"], result["pick"]["detector"]) == ("oe", "msp")
    assert result["pick"]["near_auroc_mean"] == pytest.approx(0.70) and not result["pick_meets_target"]
    per_run = [(r["run"], r["detector"], round(r["val_auroc_mean"], 4)) for r in result["pick_per_run"]]
    assert per_run == [("oe", "msp", 0.86), ("ce", "energy", 0.85)]  # ce's msp (0.71) and oe's energy lose
    best_test = result["best_test_near_auroc_for_reference"]
    assert (best_test["run"], best_test["detector"]) == ("oe", "energy")  # shown, never picked
    assert [(r["run"], r["detector"]) for r in result["rows_meeting_target_on_test"]] == [("oe", "energy")]
    text = out.with_suffix(".md").read_text()
    assert "Pick: **oe + msp**" in text and "Each run's own pick" in text and "| ce | energy | 2 |" in text

    done = subprocess.run([sys.executable, str(script), str(files[0]), "--target", "0.9,0.3", "--out",
                           str(tmp_path / "again")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: --target '0.9,0.3'")
    assert not (tmp_path / "again.json").exists()


def test_oe_gain_table_matches_each_oe_run_with_its_baseline_and_pick() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "oe_gain_table.py"
    spec = importlib.util.spec_from_file_location("oe_gain_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def row(run: str, detector: str, seeds: int, near: float, std: float = 0.01) -> dict:
        stats = {f"{k}_{s}": (v if s == "mean" else std) for k, v in
                 [("id_accuracy", 0.85), ("near_auroc", near), ("near_fpr95", 0.5), ("far_auroc", 0.9)]
                 for s in ("mean", "std")}
        return {"run": run, "detector": detector, "seeds": seeds, **stats}

    with_oe = [row("softmax_oe", "energy", 3, 0.8630), row("softmax_oe", "msp", 3, 0.8361),
               row("cosface_oe", "cosine", 2, 0.8162), row("cosface_oe", "msp", 2, 0.8223),
               row("arcface_oe", "cosine", 1, 0.70), row("arcface_oe", "msp", 1, 0.76)]
    without = [row("ce", "energy", 3, 0.8351), row("cosface", "cosine", 3, 0.7774), row("cosface", "energy", 3, 0.1)]
    picks = [row("softmax_oe", "ash[tuned]", 3, 0.8048), row("cosface_oe", "semantic_energy[tuned]", 2, 0.8313)]
    lines = module.rows(with_oe, without, picks)
    assert len(lines) == 4  # header, separator, softmax, cosface; arcface has no baseline here
    assert lines[2].startswith("| softmax | 3 | 85.00 ± 1.00 → 85.00 ± 1.00 | energy | 83.51 ± 1.00 → **86.30 ± 1.00**")
    assert "| 83.61 ± 1.00 | ash[tuned]: 80.48 / 50.00 / 90.00 |" in lines[2]
    assert "| max cosine | 77.74 ± 1.00 → **81.62 ± 1.00** |" in lines[3]
    assert lines[3].endswith("| 82.23 ± 1.00 | semantic energy[tuned]: 83.13 / 50.00 / 90.00 |")

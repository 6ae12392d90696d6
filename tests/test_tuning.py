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
from oodforge.evaluate import parse_detector_spec
from oodforge.features import OutputCache
from oodforge.tuning import MAX_TRIALS, grid, tune
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
        assert chosen[0].detectors[label]["trials"] == chosen[1].detectors[label]["trials"]
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

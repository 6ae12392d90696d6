"""Reliability probe rows 5, 6, 13, 14 and 16: detector options, size parameters, tuning hold-out, diverged training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from oodforge.cli import app
from oodforge.detectors import ModelOutputs
from oodforge.detectors.gen import GEN
from oodforge.detectors.knn import KNN
from oodforge.detectors.nnguide import NNGuide
from oodforge.evaluation.specs import detector_record, parse_detector_spec
from oodforge.runs.payload import print_results
from test_bring_your_own import make_folder

runner = CliRunner()
MODEL = "module:test_bring_your_own:TinyNet"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


def one_error(result) -> str:
    """The one ``error:`` line of a CLI call that exited with code 2."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def outputs(rows: int, classes: int = 3, width: int = 8, seed: int = 0) -> ModelOutputs:
    """Random model outputs: ``rows`` x ``classes`` logits and ``rows`` x ``width`` features."""
    generator = torch.Generator().manual_seed(seed)
    return ModelOutputs(torch.randn(rows, classes, generator=generator), torch.randn(rows, width, generator=generator),
                        torch.arange(rows) % classes)


def small_benchmark(root: Path, per_class: int, val_id: bool = False) -> Path:
    """A YAML benchmark over image folders: ``per_class`` training images in each of 3 classes, no ``val.id``
    unless asked."""
    make_folder(root / "id" / "train", {"ash": per_class, "elm": per_class, "oak": per_class}, seed=0)
    make_folder(root / "id" / "test", {"ash": 5, "elm": 5, "oak": 5}, seed=1)
    make_folder(root / "ood", {"x": 12}, size=20, seed=5)
    make_folder(root / "val_ood", {"x": 12}, size=20, seed=6)
    val: dict = {"ood": {"shapes": {"data": "folder:val_ood", "group": "near"}}}
    if val_id:
        make_folder(root / "id" / "val", {"ash": 4, "elm": 4, "oak": 4}, seed=2)
        val["id"] = "folder:id/val"
    config = {"name": "small", "id": {"train": "folder:id/train", "test": "folder:id/test"}, "ood": {"a": "folder:ood"},
              "val": val, "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    path = root / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- row 5: option values are plain YAML or one error


@pytest.mark.parametrize("spec, option", [("knn:k=[", "k=["),
                                          ("knn:k=!!python/name:os.system", "k=!!python/name:os.system"),
                                          ("msp,knn:k=5;memory_mb={a: 1", "memory_mb={a: 1")])
def test_bad_yaml_in_a_detector_option_is_one_error_line_naming_spec_and_option(tmp_path, spec, option) -> None:
    """Row 5: a detector option that is not plain YAML (or a Python tag) is one error line, exit 2, before training."""
    out = tmp_path / "run"
    line = one_error(runner.invoke(app, ["train", "--detectors", spec, "--out", str(out), "--quiet"]))
    item = spec.split(",")[-1]
    assert line.startswith(f"error: detector {item!r}: option {option!r}: the value of ") and "not a plain YAML" in line
    assert not out.exists()
    with pytest.raises(ValueError, match="not a plain YAML value"):
        parse_detector_spec(spec)


def test_python_tag_in_a_detector_option_never_runs(monkeypatch) -> None:
    """Row 5: ``!!python/object/apply:os.system`` is refused by the safe loader; the function is never called."""
    called = []
    monkeypatch.setattr("os.system", lambda *args: called.append(args))
    with pytest.raises(ValueError, match=r"could not determine a constructor for the tag .*python/object/apply"):
        parse_detector_spec("knn:k=!!python/object/apply:os.system ['true']")
    assert called == []


def test_bad_yaml_in_head_and_loss_options_is_the_same_one_line(tmp_path) -> None:
    """Row 5: --head-option and --loss-option values go through the same parser as detector options."""
    out = tmp_path / "run"
    line = one_error(runner.invoke(app, ["train", "--head-option", "s=[", "--out", str(out), "--quiet"]))
    assert line.startswith("error: head option 's=[': the value of 's' is not a plain YAML value")
    line = one_error(runner.invoke(app, ["train", "--loss", "ls", "--loss-option", "eps=!!python/name:os.system",
                                         "--out", str(out), "--quiet"]))
    assert line.startswith("error: loss option 'eps=!!python/name:os.system': the value of 'eps'")
    assert not out.exists()


def test_good_detector_options_still_parse_as_yaml_values() -> None:
    """Row 5: plain values keep their YAML types (int, float, bool, list) and variants keep their labels."""
    spec = parse_detector_spec("knn:k=10;use_faiss=true,knn:k=50,react:percentile=90.5")
    assert spec == {"knn[k=10;use_faiss=True]": {"detector": "knn", "k": 10, "use_faiss": True},
                    "knn[k=50]": {"detector": "knn", "k": 50}, "react": {"percentile": 90.5}}


def test_option_value_alias_bomb_is_refused() -> None:
    """Row 5: a short option value whose YAML aliases expand to 100,000 values is refused in one line."""
    from oodforge.util.validation import parse_options

    bomb = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
           "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]"
    with pytest.raises(ValueError, match=r"^head option 's=\[&a .*: the value of 's' expands to more than 10,000 "
                                         r"values; refused$"):
        parse_options([f"s={bomb}"], "head option")


# ---------------------------------------------------------------- row 6: no silent clamp of k / m


def test_knn_k_larger_than_the_bank_is_refused_naming_value_and_bank_size() -> None:
    """Row 6: an explicit knn k above the number of training features fails at fit, naming knn:k=... and the size."""
    with pytest.raises(ValueError, match=r"^knn:k=100000 is more than the 200 training features it searches; "
                                         r"choose k <= 200$"):
        KNN(k=100000).fit(outputs(200))
    assert KNN(k=200).fit(outputs(200)).k_ == 200  # the bank size itself is fine


def test_knn_k_too_large_from_the_cli_is_one_error_line(tmp_path) -> None:
    """Row 6: ``score --detectors knn:k=100000`` on a 30-image training set: one error line, exit 2, no results."""
    path = small_benchmark(tmp_path, per_class=10)
    out = tmp_path / "run"
    line = one_error(runner.invoke(app, ["score", "--benchmark", str(path), "--model", MODEL, "--detectors",
                                         "msp,knn:k=100000", "--out", str(out), "--quiet"]))
    assert line == "error: knn:k=100000 is more than the 30 training features it searches; choose k <= 30"
    assert not (out / "results.json").exists()


def test_default_k_on_a_small_bank_is_clamped_with_a_warning_and_recorded() -> None:
    """Row 6: the default k (50) on 30 training features is used as k=30, said in a warning and in the record."""
    with pytest.warns(UserWarning, match=r"^knn: k=50 \(the default\) is more than the 30 training features it "
                                         r"searches; using k=30$"):
        detector = KNN().fit(outputs(30))
    record = detector_record(detector)
    assert detector.k_ == 30 and record["params"]["k"] == 50 and record["params_used"] == {"k": 30}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refit = detector.fit(outputs(60))  # a bank that holds the default: nothing clamped any more
    assert refit.k_ == 50 and "params_used" not in detector_record(refit)


def test_nnguide_k_larger_than_its_bank_is_refused_and_the_default_clamped() -> None:
    """Row 6: nnguide's k against its guidance bank (bank_fraction of the training rows): same rules as knn."""
    with pytest.raises(ValueError, match=r"^nnguide:k=100 is more than the 3 rows of its guidance bank "
                                         r"\(bank_fraction=0.01 of 300 training rows\); choose k <= 3$"):
        NNGuide(k=100).fit(outputs(300))
    with pytest.warns(UserWarning, match=r"nnguide: k=10 \(the default\) is more than the 3 rows"):
        detector = NNGuide().fit(outputs(300))
    assert detector.k_ == 3 and detector_record(detector)["params_used"] == {"k": 3}


def test_gen_m_larger_than_the_classes_is_refused_and_the_default_recorded() -> None:
    """Row 6: gen's m against the number of classes: an explicit m=50 on 10 classes is refused; the default
    m=100 means all 10 classes (documented), recorded as the value used, without a warning."""
    logits = outputs(20, classes=10)
    with pytest.raises(ValueError, match=r"^gen:m=50 is more than the 10 classes; choose m <= 10$"):
        GEN(m=50).score_outputs(logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = GEN()
        scores = default.score_outputs(logits)
    torch.testing.assert_close(scores, GEN(m=10).score_outputs(logits))
    assert detector_record(default)["params_used"] == {"m": 10}


def test_cli_table_labels_knn_variants_as_results_json_does(tmp_path) -> None:
    """Row 6: ``--detectors knn:k=5,knn:k=10``: the printed table has the rows knn[k=5] and knn[k=10], as
    results.json does, not two rows labelled "knn"."""
    path = small_benchmark(tmp_path, per_class=10)
    out = tmp_path / "run"
    result = runner.invoke(app, ["score", "--benchmark", str(path), "--model", MODEL, "--detectors",
                                 "knn:k=5,knn:k=10", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert [r["detector"] for r in saved["results"]] == ["knn[k=5]", "knn[k=10]"]
    assert "│ knn[k=5]  │" in result.output and "│ knn[k=10] │" in result.output


def test_tuning_skips_knn_candidates_beyond_the_bank_and_says_why(tmp_path) -> None:
    """Row 6: tuning knn (default k) on 24 training features: k=100 and k=200 get no score, each trial records why;
    the choice is one of the others."""
    path = small_benchmark(tmp_path, per_class=10)
    out = tmp_path / "run"
    result = runner.invoke(app, ["score", "--benchmark", str(path), "--model", MODEL, "--detectors", "knn",
                                 "--tune", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    trials = {t["params"]["k"]: t for t in saved["tuning"]["detectors"]["knn"]["trials"]}
    assert sorted(trials) == [1, 5, 10, 20, 50, 100, 200]
    for k in (100, 200):
        assert trials[k]["error"] == f"knn:k={k} is more than the 24 training features it searches; choose k <= 24"
    assert all("error" not in trials[k] for k in (1, 5, 10, 20, 50))
    assert saved["tuning"]["detectors"]["knn"]["chosen"]["k"] in (1, 5, 10, 20, 50)
    assert saved["detectors"]["knn"]["params_used"] == {"k": 24}  # the default k=50, clamped and recorded
    assert "warning: knn: k=50 (the default) is more than the 24 training features" in result.output


def test_console_table_labels_variants_as_results_json_does() -> None:
    """Row 6: knn[k=10], knn[k=50] and knn[tuned] are printed as such, not all as "knn" (rich markup)."""
    rows = [{"method": "model", "detector": label, "ood_dataset": "a", "group": "far", "auroc": auroc, "aupr_in": 0.5,
             "aupr_out": 0.5, "fpr95": 0.5} for label, auroc in (("knn[k=10]", 0.6), ("knn[k=50]", 0.7),
                                                                 ("knn[tuned]", 0.8))]
    console = Console(record=True, width=120)
    print_results({"benchmark": "b[x]", "id_accuracy": 0.9, "ood_sets": {"a": "far"}, "results": rows}, console)
    text = console.export_text()
    assert "│ knn[k=10]  │ 60.00 │" in text and "│ knn[k=50]  │ 70.00 │" in text and "│ knn[tuned] │ 80.00 │" in text
    assert "b[x]: AUROC %" in text


# ---------------------------------------------------------------- row 13: tuning on a small training set


def test_tune_without_val_id_holds_out_a_fifth_of_a_small_training_set(tmp_path) -> None:
    """Row 13: --tune on a 30-image training split without val.id holds out 6 images (20%), fits on 24, and
    records the hold-out in results.json."""
    path = small_benchmark(tmp_path, per_class=10)
    out = tmp_path / "run"
    result = runner.invoke(app, ["score", "--benchmark", str(path), "--model", MODEL, "--detectors", "msp,react",
                                 "--tune", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    validation = json.loads((out / "results.json").read_text())["tuning"]["validation"]
    assert validation["id"].endswith("train-val (6 images)")
    assert validation["id_holdout"] == {"images": 6, "of_train": 30, "rule": "min(1000, 20% of the training split)"}


def test_tune_with_a_val_id_set_holds_nothing_out(tmp_path) -> None:
    """Row 13: with a separate val.id set the training split is used whole and no hold-out is recorded."""
    path = small_benchmark(tmp_path, per_class=10, val_id=True)
    out = tmp_path / "run"
    result = runner.invoke(app, ["score", "--benchmark", str(path), "--model", MODEL, "--detectors", "react",
                                 "--tune", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    validation = json.loads((out / "results.json").read_text())["tuning"]["validation"]
    assert "id_holdout" not in validation and validation["id"].endswith("(12 images)")


def test_tune_on_a_training_set_too_small_to_hold_out_is_one_error_naming_val_id(tmp_path) -> None:
    """Row 13: 3 training images (20% of them is under one) and no val.id: one error line naming val.id, exit 2."""
    path = small_benchmark(tmp_path, per_class=1)
    out = tmp_path / "run"
    line = one_error(runner.invoke(app, ["score", "--benchmark", str(path), "--model", MODEL, "--detectors", "react",
                                         "--tune", "--out", str(out), "--quiet"]))
    assert line == ("error: benchmark 'small': its ID training split has 3 images, too few to hold out 20% of them "
                    "for validation; give a separate 'val.id' set")
    assert not (out / "results.json").exists()


# ---------------------------------------------------------------- row 14: diverged training saves nothing


def test_training_that_diverges_on_its_last_step_saves_nothing(tmp_path) -> None:
    """Row 14: --lr 1e30 for one step leaves finite weights (about 1e29) whose outputs are all NaN: one error
    line, exit 2, and no model.ckpt, last.ckpt or results.json in --out."""
    path = small_benchmark(tmp_path, per_class=10)
    out = tmp_path / "run"
    line = one_error(runner.invoke(app, ["train", "--benchmark", str(path), "--lr", "1e30", "--batch-size", "30",
                                         "--epochs", "1", "--precision", "32-true", "--detectors", "msp,energy",
                                         "--out", str(out), "--quiet"]))
    assert line.startswith("error: outputs became NaN or infinite after the last step of epoch 1 (weights up to ")
    assert line.endswith("); nothing was saved for it; lower --lr")
    assert not any((out / name).exists() for name in ("model.ckpt", "last.ckpt", "results.json", "train.json"))


# ---------------------------------------------------------------- row 16: DDP processes end their process group

DDP_SCRIPT = """
import atexit, os, sys
import torch.distributed

def record():  # runs in every DDP process (the launcher starts rank 1 with this same script)
    with open(sys.argv[1], "a") as handle:
        handle.write(f"{os.getpid()} {torch.distributed.is_initialized()}\\n")

atexit.register(record)
from oodforge.cli import app
app(sys.argv[2:], prog_name="oodforge")
"""


def test_every_ddp_process_ends_its_process_group_also_when_the_run_is_already_finished(tmp_path) -> None:
    """Row 16: a 2-process CPU DDP run, then the same call again (nothing left to train): both exit 0 and every
    process has ended its gloo process group before exiting (one left alive aborts at exit now and then:
    "terminate called without an active exception", then exit -9)."""
    import os
    import subprocess
    import sys

    path = small_benchmark(tmp_path, per_class=10)
    script = tmp_path / "ddp_cli.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for call in ("first", "again"):
        ends = tmp_path / f"ends-{call}.txt"
        done = subprocess.run([sys.executable, str(script), str(ends), "train", "--benchmark", str(path),
                               "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--batch-size", "16",
                               "--epochs", "1", "--detectors", "msp", "--precision", "32-true", "--out", str(out),
                               "--quiet"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        lines = ends.read_text().split()
        assert len(lines) == 4 and lines[1::2] == ["False", "False"], (call, lines)  # 2 processes, groups ended
    assert json.loads((out / "train.json").read_text())["history"][0]["epoch"] == 1


def test_every_process_waits_for_its_peers_only_when_leaving_normally(monkeypatch) -> None:
    """Row 16: leaving ``every_process`` normally: barrier, then the group is ended; leaving with an error (e.g.
    a refused resume in every rank): the group is ended without a barrier a peer may never reach; one process:
    nothing to end."""
    from types import SimpleNamespace

    from oodforge.evaluation.distributed import every_process

    calls: list[str] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    with every_process(SimpleNamespace(world_size=2)):
        calls.append("work")
    assert calls == ["work", "barrier", "destroy"]
    calls.clear()
    with pytest.raises(ValueError, match="refused"), every_process(SimpleNamespace(world_size=2)):
        raise ValueError("refused")
    assert calls == ["destroy"]
    calls.clear()
    with every_process(SimpleNamespace(world_size=1)):
        calls.append("work")
    assert calls == ["work"]

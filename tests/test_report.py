"""Tests for the self-contained HTML report (oodforge.runs.report)."""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodforge.runs.report import load_run, write_report

ID_DATASET = "cifar10"
DETECTORS = ("msp", "energy")
OOD_SETS = (("cifar100", "near"), ("svhn", "far"))
CHROMIUM = Path("/usr/bin/chromium")


def _metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    labels = np.r_[np.ones(id_scores.size), np.zeros(ood_scores.size)]
    scores = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"auroc": roc_auc_score(labels, scores), "aupr_in": average_precision_score(labels, scores),
            "aupr_out": average_precision_score(1 - labels, -scores),
            "fpr95": float(fpr[np.searchsorted(tpr, 0.95)])}


def make_run(run_dir: Path, methods: tuple[str, ...] = ("baseline",), seed: int = 0) -> dict:
    """A tiny fake run: random scores per (method, detector, dataset), metrics from scikit-learn."""
    rng = np.random.default_rng(seed)
    scores, rows = {}, []
    for m_index, method in enumerate(methods):
        prefix = f"{method}/" if len(methods) > 1 else ""
        for d_index, detector in enumerate(DETECTORS):
            id_scores = rng.normal(1.0, 1.0, 300)
            scores[f"{prefix}{detector}/{ID_DATASET}"] = id_scores
            for o_index, (ood, group) in enumerate(OOD_SETS):
                shift = 0.4 + 0.5 * o_index + 0.3 * d_index + 0.2 * m_index
                ood_scores = rng.normal(1.0 - shift, 1.0, 200)
                scores[f"{prefix}{detector}/{ood}"] = ood_scores
                rows.append({"method": method, "detector": detector, "ood_dataset": ood, "group": group,
                             **_metrics(id_scores, ood_scores)})
    results = {"benchmark": "cifar10-tiny", "id_dataset": ID_DATASET, "id_accuracy": 0.9123,
               "model": {"backbone": "resnet20", "head": {"name": "cosface", "s": 30.0, "m": 0.35}},
               "train": {"epochs": 2, "lr": 0.1, "seeds": [0, 1, 2]}, "results": rows}
    if len(methods) > 1:
        results["methods"] = {m: {"id_accuracy": 0.9 + 0.01 * i, "loss": "ce"} for i, m in enumerate(methods)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    np.savez(run_dir / "scores.npz", **scores)
    return results


def add_sample_grid(run_dir: Path) -> None:
    import matplotlib.image

    (run_dir / "figures").mkdir(exist_ok=True)
    matplotlib.image.imsave(run_dir / "figures" / "samples.png", np.random.default_rng(1).random((32, 64, 3)))


class TableParser(HTMLParser):
    """Collects the body rows of every table with an id: {table_id: [(row_attrs, [(cell_attrs, text)])]}."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list] = {}
        self.table: str | None = None
        self.in_body = False
        self.cell: list | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self.table = attrs["id"]
            self.tables[self.table] = []
        elif tag == "tbody" and self.table:
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.tables[self.table].append((attrs, []))
        elif tag == "td" and self.in_body:
            self.cell = [attrs, ""]

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.tables[self.table][-1][1].append((self.cell[0], self.cell[1].strip()))
            self.cell = None
        elif tag == "tbody":
            self.in_body = False
        elif tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data


def parse_tables(page: str) -> dict[str, list]:
    parser = TableParser()
    parser.feed(page)
    return parser.tables


def cell(row: tuple, key: str) -> tuple[dict, str]:
    return next(c for c in row[1] if c[0].get("data-key") == key)


def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page, re.I)
    assert "<link" not in page and "@import" not in page


def test_report_single_method(tmp_path):
    results = make_run(tmp_path)
    add_sample_grid(tmp_path)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html" and path.is_file()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["figures", "report.html", "results.json", "scores.npz"]
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page)
    # 2 ROC figures (one per OOD set) + 2 histograms (one per detector) + 1 sample grid
    assert page.count("<img ") == 5
    assert page.count('src="data:image/png;base64,') == 5
    assert "samples.png" in page and "91.23 %" in page and "resnet20" in page and "head.name" in page
    rows = parse_tables(page)["results"]
    assert len(rows) == len(results["results"]) == 4
    for expected in results["results"]:
        row = next(r for r in rows if (r[0]["data-detector"], r[0]["data-ood"])
                   == (expected["detector"], expected["ood_dataset"]))
        assert cell(row, "auroc")[1] == f"{100 * expected['auroc']:.2f}"
        assert cell(row, "fpr95")[1] == f"{100 * expected['fpr95']:.2f}"
        assert cell(row, "group")[1] == expected["group"]


def test_best_value_per_ood_set_is_highlighted(tmp_path):
    results = make_run(tmp_path, methods=("baseline", "sio"))
    rows = parse_tables(write_report(tmp_path).read_text(encoding="utf-8"))["results"]
    for ood, _ in OOD_SETS:
        expected = [r for r in results["results"] if r["ood_dataset"] == ood]
        for key, pick in (("auroc", max), ("aupr_in", max), ("aupr_out", max), ("fpr95", min)):
            best = pick(expected, key=lambda r: r[key])
            for row in (r for r in rows if r[0]["data-ood"] == ood):
                attrs, _ = cell(row, key)
                is_best = (row[0]["data-method"], row[0]["data-detector"]) == (
                    best["method"], best["detector"])
                assert ("best" in attrs["class"].split()) == is_best, (ood, key, row[0])


def test_report_two_methods(tmp_path):
    results = make_run(tmp_path, methods=("baseline", "sio"))
    page = write_report(tmp_path, title="SIO <ablation>").read_text(encoding="utf-8")
    assert_self_contained(page)
    assert "<title>SIO &lt;ablation&gt;</title>" in page
    # 2 ROC figures + 4 histograms (2 methods x 2 detectors), no figures/ folder
    assert page.count("<img ") == 6
    tables = parse_tables(page)
    assert len(tables["results"]) == 8
    assert {r[0]["data-method"] for r in tables["methods"]} == {"baseline", "sio"}
    assert "90.00 %" in page and "91.00 %" in page
    summary = {(r[0]["data-method"], r[0]["data-detector"]): r for r in tables["summary"]}
    assert len(summary) == 4
    near = [r["auroc"] for r in results["results"] if (r["method"], r["detector"], r["group"])
            == ("sio", "energy", "near")]
    assert cell(summary["sio", "energy"], "near_auroc")[1] == f"{100 * np.mean(near):.2f}"


def test_missing_scores_are_noted_not_fatal(tmp_path):
    make_run(tmp_path)
    with np.load(tmp_path / "scores.npz") as npz:
        scores = {key: npz[key] for key in npz.files if key != "energy/svhn"}
    scores["msp/svhn"][:5] = np.nan
    np.savez(tmp_path / "scores.npz", **scores)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "baseline/energy/svhn" in page
    assert page.count("<img ") == 4


def test_load_run_names_the_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_run(tmp_path)
    make_run(tmp_path)
    results, scores = load_run(tmp_path)
    assert results["id_dataset"] == ID_DATASET and scores["msp/cifar10"].shape == (300,)
    (tmp_path / "scores.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="scores.npz"):
        load_run(tmp_path)
    (tmp_path / "scores.npz").unlink()
    with pytest.raises(FileNotFoundError, match="scores.npz"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ValueError, match="results.json"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"id_dataset": "x", "results": [{"detector": "msp"}]}))
    with pytest.raises(ValueError, match=r"results\.json: results\[0\] lacks field\(s\) method"):
        load_run(tmp_path)


def _chromium(report: Path, profile: Path, *args: str, url_suffix: str = "") -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args,
               f"file://{report.resolve()}{url_suffix}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium")
def test_report_renders_in_headless_chromium(tmp_path):
    run_dir = tmp_path / "run"
    results = make_run(run_dir, methods=("baseline", "sio"))
    add_sample_grid(run_dir)
    report = write_report(run_dir)
    shot = tmp_path / "shot.png"
    done = _chromium(report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000")
    assert shot.is_file() and shot.stat().st_size > 20_000, done.stderr[-2000:]
    done = _chromium(report, tmp_path / "profile", "--dump-dom", url_suffix="#sort=results.auroc.desc")
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-sort-ready="1"' in done.stdout, "the inline script did not run to the end"
    rows = parse_tables(done.stdout)["results"]
    assert len(rows) == len(results["results"])
    shown = [float(cell(row, "auroc")[1]) for row in rows]
    assert shown == sorted(shown, reverse=True)
    assert 'aria-sort="descending"' in done.stdout

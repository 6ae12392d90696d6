"""Self-contained HTML report of one run: header, sortable results table, ROC curves, score histograms.

The page is a single file with inline CSS, a little inline JavaScript and every figure embedded as a
base64 PNG, so it opens from disk with no network. Input is a run directory holding ``results.json``
and ``scores.npz`` (design.md section 2); higher score = more in-distribution, ID is the positive class.
"""

from __future__ import annotations

import base64
import json
import math
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from oodforge.evaluation.result import percent
from oodforge.runs.folder import finish_pending, scores_digest
from oodforge.util.atomic import atomic_write
from oodforge.util.errors import ConfigError, MissingPathError
from oodforge.util.pages import density_stairs, esc, figure_grid, html_page, png_uri

__all__ = ["load_run", "report_html", "write_report"]

GROUPS = ("near", "far")
METRICS = (("auroc", "AUROC", "max"), ("aupr_in", "AUPR-In", "max"), ("aupr_out", "AUPR-Out", "max"),
           ("fpr95", "FPR95", "min"))
ROW_FIELDS = ("method", "detector", "ood_dataset", "group") + tuple(key for key, _, _ in METRICS)
MAX_BINS = 60
MAX_HISTOGRAMS = 60
LEGEND_INSIDE = 8
MAX_EMBEDDED_BYTES = 5_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LINESTYLES = ("-", "--", ":", "-.")
DASH = "\u2013"
ROC_HINT = ("ID is the positive class. Colour = detector, line style = method; legend: AUROC %. "
            "Dashed line: TPR = 95 %, where FPR95 is read off.")
HIST_HINT = ("Densities over bins shared within each figure; scores beyond the 0.5-99.5 percentile range "
             "(+5 %) fall outside the plot, NaN scores are not drawn.")


# ----------------------------------------------------------------------------------------- loading


def load_run(run_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read ``results.json`` and ``scores.npz`` of a run directory; errors name the file at fault."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingPathError(f"run directory {run_dir} does not exist")
    try:
        finish_pending(run_dir)  # a write that a kill interrupted: finish it (committed) or drop it
    except OSError:
        pass  # a read-only copy of a run: read what is there
    results, scores = _read_results(run_dir / "results.json"), _read_scores(run_dir / "scores.npz")
    expected = results.get("scores_sha256")
    if expected is not None and expected != scores_digest(scores):
        raise ConfigError(f"{run_dir / 'scores.npz'} does not belong to {run_dir / 'results.json'} (its scores_sha256 "
                         "differs): the two files come from different runs; score the run again")
    return results, scores


def _read_results(path: Path) -> dict:
    if not path.is_file():
        raise MissingPathError(f"{path} not found: a run directory needs results.json "
                                "(written by `oodforge bench` or `oodforge demo`)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    _validate_results(results, path)
    return results


def _validate_results(results: Any, path: Path) -> None:
    if not isinstance(results, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(results).__name__}")
    if not isinstance(results.get("id_dataset"), str):
        raise ConfigError(f"{path}: missing string field 'id_dataset'")
    rows = results.get("results")
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: missing list field 'results'")
    for index, row in enumerate(rows):
        missing = [field for field in ROW_FIELDS if not isinstance(row, dict) or field not in row]
        if missing:
            raise ConfigError(f"{path}: results[{index}] lacks field(s) {', '.join(missing)}")
        if row["group"] not in GROUPS:
            raise ConfigError(f"{path}: results[{index}].group is {row['group']!r}, expected 'near' or 'far'")
        for key, _, _ in METRICS:
            if row[key] is not None and not isinstance(row[key], (int, float)):
                raise ConfigError(f"{path}: results[{index}].{key} is {row[key]!r}, expected a number")


def _read_scores(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MissingPathError(f"{path} not found: a run directory needs scores.npz beside results.json")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: np.asarray(npz[key], dtype=np.float64).ravel() for key in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{path} is not a readable scores archive: {err}") from err


# ------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _Run:
    """The parsed run: rows ordered by OOD set (near first), plus lookups into the raw scores."""

    info: dict
    rows: list[dict]
    scores: dict[str, np.ndarray]
    methods: list[str]
    detectors: list[str]
    ood_sets: dict[str, str]

    @property
    def id_dataset(self) -> str:
        return self.info["id_dataset"]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys((row["method"], row["detector"]) for row in self.rows))

    def label(self, method: str, detector: str) -> str:
        return f"{method} / {detector}" if len(self.methods) > 1 else detector

    def lookup(self, method: str, detector: str, dataset: str) -> np.ndarray | None:
        for key in (f"{method}/{detector}/{dataset}", f"{detector}/{dataset}"):
            if key in self.scores and self.scores[key].size:
                return self.scores[key]
        return None


def _parse_run(results: dict, scores: dict[str, np.ndarray]) -> _Run:
    rows = [dict(row, method=str(row["method"]), detector=str(row["detector"]),
                 ood_dataset=str(row["ood_dataset"])) for row in results["results"]]
    ood_sets = {row["ood_dataset"]: row["group"] for row in rows}
    order = list(ood_sets)
    ood_sets = dict(sorted(ood_sets.items(), key=lambda item: (GROUPS.index(item[1]), order.index(item[0]))))
    rank = {name: index for index, name in enumerate(ood_sets)}
    rows.sort(key=lambda row: rank[row["ood_dataset"]])
    methods = list(dict.fromkeys(row["method"] for row in rows))
    detectors = list(dict.fromkeys(row["detector"] for row in rows))
    return _Run(results, rows, scores, methods, detectors, ood_sets)


def _finite(scores: np.ndarray) -> np.ndarray:
    """Scores with NaN and -inf mapped below the lowest finite score, +inf above the highest."""
    finite = scores[np.isfinite(scores)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    out = np.where(np.isnan(scores), low - 1.0, scores)
    return np.clip(out, low - 1.0, high + 1.0)


def _metric(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


# ----------------------------------------------------------------------------------------- figures


def _detector_colors(detectors: Sequence[str]) -> dict[str, Any]:
    cmap = colormaps["tab10" if len(detectors) <= 10 else "tab20"]
    return {name: cmap(index % cmap.N) for index, name in enumerate(detectors)}


def _roc_figure(run: _Run, ood: str) -> tuple[str | None, bool, list[str]]:
    """ROC figure for an OOD set, a curve per (method, detector): URI, whether it is wide, missing keys."""
    fig = Figure(figsize=(4.6, 4.0))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.93)
    ax = fig.add_subplot()
    colors, missing, curves = _detector_colors(run.detectors), [], 0
    for row in (row for row in run.rows if row["ood_dataset"] == ood):
        method, detector = row["method"], row["detector"]
        id_scores, ood_scores = (run.lookup(method, detector, name) for name in (run.id_dataset, ood))
        if id_scores is None or ood_scores is None:
            missing.append(f"{method}/{detector}/{ood}")
            continue
        labels = np.r_[np.ones(id_scores.size), np.zeros(ood_scores.size)]
        fpr, tpr, _ = roc_curve(labels, _finite(np.r_[id_scores, ood_scores]))
        ax.plot(fpr, tpr, lw=1.3, color=colors[detector],
                linestyle=LINESTYLES[run.methods.index(method) % len(LINESTYLES)],
                label=f"{run.label(method, detector)} ({100 * auc(fpr, tpr):.2f})")
        curves += 1
    if not curves:
        return None, False, missing
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, linestyle=":")
    ax.axhline(0.95, color="0.6", lw=0.7, linestyle="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="FPR (OOD kept as ID)", ylabel="TPR (ID kept)",
           title=f"{run.id_dataset} vs {ood} ({run.ood_sets[ood]})")
    ax.title.set_fontsize(10)
    _place_legend(ax, curves, title="AUROC %")
    wide = curves > LEGEND_INSIDE
    return png_uri(fig, tight=wide), wide, missing


def _place_legend(ax: Any, entries: int, title: str | None = None) -> None:
    if entries <= LEGEND_INSIDE:
        ax.legend(loc="lower right", fontsize=7, title=title, title_fontsize=7, framealpha=0.85)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title=title, title_fontsize=7,
                  ncol=math.ceil(entries / 16), frameon=False)


def _histogram_figure(run: _Run, method: str, detector: str) -> str | None:
    """Density histograms of ID scores against every OOD set scored by (method, detector)."""
    id_scores = run.lookup(method, detector, run.id_dataset)
    oods = [(name, run.lookup(method, detector, name)) for name in run.ood_sets
            if any(r["ood_dataset"] == name and (r["method"], r["detector"]) == (method, detector)
                   for r in run.rows)]
    oods = [(name, scores) for name, scores in oods if scores is not None]
    if id_scores is None or not oods:
        return None
    bins = _shared_bins([id_scores] + [scores for _, scores in oods])
    fig = Figure(figsize=(4.4, 2.9))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.16, top=0.9)
    ax = fig.add_subplot()
    density_stairs(ax, id_scores, bins, "0.3", f"ID: {run.id_dataset}", fill=True)
    cmap = colormaps["tab10"]
    for index, (name, scores) in enumerate(oods):
        density_stairs(ax, scores, bins, cmap((index + 1) % cmap.N), f"{name} ({run.ood_sets[name]})")
    ax.set(xlabel="score (higher = more ID)", ylabel="density", title=run.label(method, detector))
    ax.title.set_fontsize(10)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.4)
    ax.legend(loc="upper left", fontsize=7, ncol=2 if len(oods) > 2 else 1, framealpha=0.85)
    return png_uri(fig)


def _shared_bins(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Common bin edges over the 0.5-99.5 percentile range (plus 5 %) of all finite scores."""
    arrays = [array[np.isfinite(array)] for array in arrays]
    values = np.concatenate(arrays)
    count = int(np.clip(2 * np.sqrt(min(array.size for array in arrays)), 10, MAX_BINS))
    low, high = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    pad = (high - low) / 20 if high > low else 0.5
    return np.linspace(low - pad, high + pad, count + 1)


def _extra_figures(run_dir: Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``run_dir/figures/*.png`` as (name, data URI, CSS class); returns the skipped files' notes too."""
    figures, notes = [], []
    for path in sorted((run_dir / "figures").glob("*.png")):
        data = path.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            notes.append(f"figures/{path.name} is not a PNG file; not embedded")
        elif len(data) > MAX_EMBEDDED_BYTES:
            notes.append(f"figures/{path.name} is {len(data) / 1e6:.1f} MB; not embedded")
        else:
            figures.append((path.name, "data:image/png;base64," + base64.b64encode(data).decode("ascii"), ""))
    return figures, notes


# -------------------------------------------------------------------------------------------- html


def _best(values: Iterable[float], better: str) -> float:
    """Best value at shown precision (percent, 2 decimals); NaN when no value is finite."""
    shown = [round(100 * value, 2) for value in values if not math.isnan(value)]
    if not shown:
        return math.nan
    return max(shown) if better == "max" else min(shown)


def _num_cell(key: str, value: float, best: float) -> str:
    is_best = not math.isnan(value) and round(100 * value, 2) == best
    css = "num best" if is_best else "num"
    raw = "" if math.isnan(value) else repr(value)
    title = ' title="best for this OOD set"' if is_best else ""
    return f'<td class="{css}" data-key="{key}" data-value="{raw}"{title}>{percent(value)}</td>'


def _header_cells(columns: Sequence[tuple[str, str, str]]) -> str:
    """``<th>`` cells from (key, label, kind) with kind 'text', 'max' (higher better) or 'min'."""
    cells = []
    for key, label, kind in columns:
        numeric = kind != "text"
        first = "desc" if kind == "max" else "asc"
        hint = {"max": " (higher is better)", "min": " (lower is better)"}.get(kind, "")
        cells.append(f'<th data-key="{key}" data-type="{"num" if numeric else "text"}" data-first="{first}"'
                     f' title="Click to sort{hint}">{esc(label)}</th>')
    return "".join(cells)


def _results_table(run: _Run) -> str:
    best = {(ood, key): _best((_metric(r[key]) for r in run.rows if r["ood_dataset"] == ood), better)
            for ood in run.ood_sets for key, _, better in METRICS}
    columns = [("method", "Method", "text"), ("detector", "Detector", "text"), ("ood", "OOD set", "text"),
               ("group", "Group", "text")] + [(key, label + " %", better) for key, label, better in METRICS]
    body = []
    for row in run.rows:
        ood = row["ood_dataset"]
        cells = [f'<td data-key="{key}">{esc(row[field])}</td>' for key, field in
                 (("method", "method"), ("detector", "detector"), ("ood", "ood_dataset"))]
        cells.append(f'<td data-key="group"><span class="tag {row["group"]}">{row["group"]}</span></td>')
        cells += [_num_cell(key, _metric(row[key]), best[ood, key]) for key, _, _ in METRICS]
        body.append(f'<tr data-method="{esc(row["method"])}" data-detector="{esc(row["detector"])}" '
                    f'data-ood="{esc(ood)}">{"".join(cells)}</tr>')
    return (f'<table class="sortable" id="results"><thead><tr>{_header_cells(columns)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _summary_rows(run: _Run) -> list[tuple[str, str, dict[str, float]]]:
    """Mean AUROC and FPR95 over the near and the far OOD sets for each (method, detector)."""
    summary = []
    for method, detector in run.pairs:
        means = {}
        for group in GROUPS:
            rows = [r for r in run.rows
                    if (r["method"], r["detector"], r["group"]) == (method, detector, group)]
            for key in ("auroc", "fpr95"):
                values = [v for v in (_metric(r[key]) for r in rows) if not math.isnan(v)]
                means[f"{group}_{key}"] = float(np.mean(values)) if values else math.nan
        summary.append((method, detector, means))
    return summary


def _summary_table(run: _Run) -> str:
    summary = _summary_rows(run)
    keys = [(f"{group}_{key}", f"{group.capitalize()} {label} %", better)
            for group in GROUPS for key, label, better in METRICS if key in ("auroc", "fpr95")]
    best = {key: _best((means[key] for _, _, means in summary), better) for key, _, better in keys}
    columns = [("method", "Method", "text"), ("detector", "Detector", "text")] + keys
    body = []
    for method, detector, means in summary:
        cells = f'<td data-key="method">{esc(method)}</td><td data-key="detector">{esc(detector)}</td>'
        cells += "".join(_num_cell(key, means[key], best[key]) for key, _, _ in keys)
        body.append(f'<tr data-method="{esc(method)}" data-detector="{esc(detector)}">{cells}</tr>')
    return (f'<table class="sortable" id="summary"><thead><tr>{_header_cells(columns)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _compact(value: Any, limit: int = 120) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, separators=(",", ":"), default=str)
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _key_values(title: str, mapping: Any) -> str:
    if not isinstance(mapping, dict) or not mapping:
        return ""
    chips = "".join(f'<span class="kv"><b>{esc(key)}</b> {esc(_compact(value))}</span>'
                    for key, value in _flatten(mapping))
    return f'<div class="kvs"><h3>{esc(title)}</h3>{chips}</div>'


def _accuracy(value: Any) -> str:
    return percent(_metric(value)) + " %" if not math.isnan(_metric(value)) else DASH


def _methods_table(methods: Any) -> str:
    """Per-method ID accuracy and other per-method fields, when results.json carries ``methods``."""
    if not isinstance(methods, dict) or not methods:
        return ""
    fields = list(dict.fromkeys(k for info in methods.values() if isinstance(info, dict) for k in info))
    fields = ["id_accuracy"] + [field for field in fields if field != "id_accuracy"]
    head = "".join(f"<th>{esc('ID accuracy' if f == 'id_accuracy' else f)}</th>" for f in fields)
    body = []
    for name, info in methods.items():
        info = info if isinstance(info, dict) else {}
        cells = [f'<td class="num" data-key="id_accuracy">{_accuracy(info.get("id_accuracy"))}</td>']
        cells += [f"<td>{esc(_compact(info[f])) if f in info else DASH}</td>" for f in fields[1:]]
        body.append(f'<tr data-method="{esc(name)}"><td>{esc(name)}</td>{"".join(cells)}</tr>')
    return (f'<table id="methods"><thead><tr><th>Method</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _header(run: _Run, title: str) -> str:
    info = run.info
    facts = [("Benchmark", info.get("benchmark", DASH)), ("ID dataset", run.id_dataset),
             ("ID accuracy", _accuracy(info.get("id_accuracy"))),
             ("OOD sets", ", ".join(f"{name} ({group})" for name, group in run.ood_sets.items()) or DASH),
             ("Methods", ", ".join(run.methods) or DASH), ("Detectors", ", ".join(run.detectors) or DASH)]
    facts_html = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    return (f"<header><h1>{esc(title)}</h1><dl class=\"facts\">{facts_html}</dl>"
            f"{_methods_table(info.get('methods'))}{_key_values('Model', info.get('model'))}"
            f"{_key_values('Training', info.get('train'))}</header>")


def _figures_html(run: _Run, run_dir: Path) -> tuple[str, list[str]]:
    notes, rocs, hists = [], [], []
    for ood in run.ood_sets:
        uri, wide, missing = _roc_figure(run, ood)
        notes += [f"no scores for {key} (or for the ID set) in scores.npz; curve omitted" for key in missing]
        if uri:
            rocs.append((f"ROC: {run.id_dataset} (positive) vs {ood}", uri, "span" if wide else ""))
    pairs = run.pairs
    if len(pairs) > MAX_HISTOGRAMS:
        notes.append(f"score histograms shown for the first {MAX_HISTOGRAMS} of {len(pairs)} "
                     "(method, detector) pairs")
    for method, detector in pairs[:MAX_HISTOGRAMS]:
        uri = _histogram_figure(run, method, detector)
        if uri:
            hists.append((f"Scores: {run.label(method, detector)}", uri, ""))
    extra, extra_notes = _extra_figures(run_dir)
    sections = [("roc", "ROC curves", ROC_HINT, rocs, "grid"),
                ("histograms", "Score histograms", HIST_HINT, hists, "grid"),
                ("figures", "Figures", "", extra, "wide")]
    body = "".join(f'<section id="{sid}"><h2>{name}</h2><p class="hint">{esc(hint)}</p>'
                   f"{figure_grid(figs, css)}</section>" for sid, name, hint, figs, css in sections if figs)
    return body, notes + extra_notes


def _render(run: _Run, run_dir: Path, title: str) -> str:
    figures, notes = _figures_html(run, run_dir)
    notes_html = "".join(f"<li>{esc(note)}</li>" for note in notes)
    body = [_header(run, title),
            '<section id="results-section"><h2>Results</h2><p class="hint">All values in %. Click a column '
            "header to sort. Highlighted: best value per OOD set (max AUROC / AUPR, min FPR95). "
            f"Score convention: higher = more in-distribution; ID ({esc(run.id_dataset)}) is the positive "
            f"class.</p>{_results_table(run)}</section>",
            f'<section id="summary-section"><h2>Summary: mean over near / far OOD sets</h2>'
            f"{_summary_table(run)}</section>",
            figures,
            f'<section id="notes"><h2>Notes</h2><ul>{notes_html}</ul></section>' if notes else "",
            "<footer>Generated by oodforge.runs.report from results.json and scores.npz.</footer>"]
    return html_page(title, "".join(body))


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    """Write the self-contained ``run_dir/report.html`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    page = report_html(*load_run(run_dir), run_dir, title)
    return atomic_write(run_dir / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))


def report_html(results: dict, scores: dict[str, np.ndarray], run_dir: str | Path, title: str | None = None) -> str:
    """The report page of a run's results and scores (extra figures from ``run_dir/figures``)."""
    _validate_results(results, Path(run_dir) / "results.json")
    run = _parse_run(results, {k: np.asarray(v, dtype=np.float64).ravel() for k, v in scores.items()})
    if title is None:
        title = f"oodforge report: {results.get('benchmark') or run.id_dataset}"
    return _render(run, Path(run_dir), title)

"""Generate the results pages at build time from benchmarks/results/*.json (and the figures beside them).

Each study is a template in docs/results-src/<page>.md: prose plus directives, each alone on a line, that this
script replaces with tables built from the recorded files, so no number in a table is typed by hand:

    <!-- table: FILE.json [kind=...] [option=value ...] -->    a table from a JSON record (kinds below);
                                                               A.json+B.json joins summaries (prefix=a_,b_)
    <!-- markdown-table: FILE.md [index=N] [runs=..] [detectors=..] -->   a table that a benchmark script wrote
    <!-- image: FILE.png [alt text] -->                        a figure, copied into the site

Run by mkdocs-gen-files; ``python docs/gen_results.py OUT_DIR`` writes the pages to a folder and fails when a
directive is wrong or when a JSON record is on no page.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATES = ROOT / "docs" / "results-src"
DIRECTIVE = re.compile(r"^<!-- (?P<kind>table|markdown-table|image): (?P<file>\S+)(?P<rest>.*?) -->$")
LOG = logging.getLogger("mkdocs.plugins.oodforge.results")

METRICS = {
    "id_accuracy": "ID acc", "near_auroc": "near AUROC", "near_fpr95": "near FPR95", "far_auroc": "far AUROC",
    "far_fpr95": "far FPR95", "fpr95": "FPR95 (all sets)", "val_auroc": "val AUROC",
}


class DirectiveError(ValueError):
    """A directive names a missing file, run, detector or field."""


# ------------------------------------------------------------------------------------------------ formatting


def fmt(value: object, digits: int = 2, percent: bool = False) -> str:
    """One cell: numbers rounded (scaled to % when asked), lists and mappings inline, None as a dash."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) and not percent:
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, (int, float)):
        number = 100 * value if percent else float(value)
        if not percent and number.is_integer():
            return str(int(number))
        if not percent and 0 < abs(number) < 0.01 and float(f"{number:g}") == number:
            return f"{number:g}"  # a parameter such as 0.0001, not a measurement
        return f"{number:.{2 if percent else digits}f}"
    if isinstance(value, list):
        return ", ".join(fmt(v, digits, percent) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v, digits, percent)}" for k, v in value.items())
    return " ".join(str(value).split()).replace("|", "\\|")


def pm(row: dict, metric: str, with_std: bool = True) -> str:
    """A summary metric as "mean ± std" in percent (the std only over more than one seed)."""
    mean = row.get(f"{metric}_mean")
    if mean is None:
        return "–"
    std = row.get(f"{metric}_std")
    if with_std and std is not None and row.get("seeds", 1) > 1:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{100 * mean:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _names(opts: dict, key: str) -> list[str] | None:
    return opts[key].split(",") if key in opts else None


def _labels(opts: dict) -> dict[str, str]:
    """``labels=a:Label A,b:Label B``."""
    pairs = [item.split(":", 1) for item in opts.get("labels", "").split(",") if ":" in item]
    return {key: label for key, label in pairs}


def _get(record: dict, field: str) -> object:
    """``record[field]``, where ``a.b`` reads ``record["a"]["b"]`` (None when absent)."""
    if field in record:
        return record[field]
    value: object = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _select(path: str, data: object) -> object:
    for part in filter(None, path.split(".")):
        if not isinstance(data, dict) or part not in data:
            raise DirectiveError(f"no key {part!r} in path {path!r}")
        data = data[part]
    return data


# ----------------------------------------------------------------------------------------------------- kinds


def summary_rows(data: list[dict], opts: dict) -> list[dict]:
    """The rows of a bench summary (one per run x detector), filtered and ordered by ``runs`` / ``detectors``, or
    picked one by one with ``pairs=run:detector,...``."""
    if "pairs" in opts:
        by_key = {(r["run"], r["detector"]): r for r in data}
        pairs = [tuple(item.split(":", 1)) for item in opts["pairs"].split(",")]
        missing = [f"{run}:{detector}" for run, detector in pairs if (run, detector) not in by_key]
        if missing:
            raise DirectiveError(f"no rows {', '.join(missing)} in the file")
        return [by_key[pair] for pair in pairs]
    runs, detectors = _names(opts, "runs"), _names(opts, "detectors")
    rows = [r for r in data if (runs is None or r["run"] in runs) and (detectors is None or r["detector"] in detectors)]
    for wanted, key in ((runs, "run"), (detectors, "detector")):
        missing = sorted(set(wanted or []) - {r[key] for r in rows})
        if missing:
            raise DirectiveError(f"no {key} {', '.join(missing)} in the file")
    if runs or detectors:
        rows.sort(key=lambda r: ((runs or [r["run"]]).index(r["run"]),
                                 (detectors or [r["detector"]]).index(r["detector"])))
    return rows


def table_summary(data: object, opts: dict) -> str:
    """Rows run x detector; columns the metrics in ``columns`` (mean ± std over seeds, %)."""
    rows = summary_rows(_as_list(_select(opts.get("path", ""), data)), opts)
    columns = _names(opts, "columns") or [m for m in METRICS if any(r.get(f"{m}_mean") is not None for r in rows)]
    labels = _labels(opts)
    header = ["run", "detector", "seeds"] + [METRICS.get(c, c) for c in columns]
    body = [[labels.get(r["run"], r["run"]), r["detector"], str(r.get("seeds", 1))] + [pm(r, c) for c in columns]
            for r in rows]
    return markdown_table(header, body)


def table_grid(data: object, opts: dict) -> str:
    """Rows detectors, columns runs; each cell joins ``metrics`` (the first with its std)."""
    rows = summary_rows(_as_list(_select(opts.get("path", ""), data)), opts)
    metrics = _names(opts, "metrics") or ["near_auroc", "near_fpr95", "far_auroc"]
    runs = _names(opts, "runs") or list(dict.fromkeys(r["run"] for r in rows))
    detectors = _names(opts, "detectors") or list(dict.fromkeys(r["detector"] for r in rows))
    by_key = {(r["run"], r["detector"]): r for r in rows}
    labels = _labels(opts)
    header = ["detector"]
    for run in runs:
        first = next(r for r in rows if r["run"] == run)
        header.append(f"{labels.get(run, run)} ({pm(first, 'id_accuracy')})")
    body = []
    for detector in detectors:
        cells = [detector]
        for run in runs:
            row = by_key.get((run, detector))
            cells.append("–" if row is None else " / ".join(pm(row, m, i == 0) for i, m in enumerate(metrics)))
        body.append(cells)
    note = " / ".join(METRICS.get(m, m) for m in metrics)
    return (f"*Cells: {note}, % (mean ± std over seeds for the first). Column heads: run (ID accuracy, %).*\n\n"
            + markdown_table(header, body))


def table_tuned(data: object, opts: dict) -> str:
    """A default-vs-tuned record: per detector, default → tuned near/far AUROC and FPR95, and the chosen values."""
    entries = _select(opts.get("path", "detectors"), data)
    has_near = any(fmt((e.get("default") or {}).get("near")) != "–" for e in entries)
    header = (["detector", "reads"] + (["near AUROC"] if has_near else [])
              + ["far AUROC", "FPR95", "chosen on validation"])
    body = []
    for e in entries:
        default, tuned = e.get("default"), e.get("tuned")
        if default is None:
            body.append([e["detector"], fmt(e.get("requires"))] + ["–"] * (len(header) - 3)
                        + [fmt(e.get("note") or e.get("error") or "not applicable")])
            continue
        cells = [e["detector"], fmt(e.get("requires"))]
        for key in (["near"] if has_near else []) + ["far", "fpr95"]:
            before = fmt(default.get(key), percent=True)
            cells.append(f"{before} → {fmt(tuned.get(key), percent=True)}" if tuned else before)
        cells.append(fmt(e.get("chosen")) if e.get("chosen") else "–")
        body.append(cells)
    return markdown_table(header, body)


def table_flow(data: object, opts: dict) -> str:
    """Flow fits grouped by (normalize, epochs): mean ± std over seeds of near/far AUROC and far FPR95."""
    groups: dict[tuple, list[dict]] = {}
    for fit in data["flow"]:
        groups.setdefault((fit["normalize"], fit["epochs"]), []).append(fit)
    keys = [k for k in ("near_auroc", "far_auroc", "far_fpr95") if any(f.get(k) is not None for f in data["flow"])]
    header = ["features", "epochs", "fits"] + [METRICS[k] for k in keys] + ["fit s"]
    body = []
    for (normalize, epochs), fits in groups.items():
        cells = ["L2-normalized" if normalize else "raw", str(epochs), str(len(fits))]
        for key in keys:
            values = [100 * f[key] for f in fits]
            spread = f" ± {statistics.pstdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.2f}{spread}")
        cells.append(f"{statistics.fmean(f['fit_s'] for f in fits):.1f}")
        body.append(cells)
    return markdown_table(header, body)


def table_seeds(data: object, opts: dict) -> str:
    """Per method (run-seed) of a results.json: ID accuracy; near AUROC / near FPR95 / far AUROC of ``detectors``;
    the values tuning chose for the detectors in ``chosen``. ``runs`` keeps only those runs' methods."""
    detectors, chosen, runs = _names(opts, "detectors") or [], _names(opts, "chosen") or [], _names(opts, "runs")
    methods = data.get("methods") or {"model": {"id_accuracy": data.get("id_accuracy")}}
    if runs is not None:
        methods = {m: info for m, info in methods.items() if m.rsplit("-seed", 1)[0] in runs}
        if not methods:
            raise DirectiveError(f"no methods of runs {', '.join(runs)}")
    header = (["run-seed", "ID acc"] + [f"{d}: near AUROC / near FPR95 / far AUROC" for d in detectors]
              + [f"{d}: chosen" for d in chosen])
    body = []
    for method, info in methods.items():
        cells = [method, fmt(info.get("id_accuracy"), percent=True)]
        for detector in detectors:
            rows = [r for r in data["results"] if r.get("method", "model") == method and r["detector"] == detector]
            if not rows:  # this run has no such detector (e.g. cosine for a linear head)
                cells.append("–")
                continue
            near = [r for r in rows if r["group"] == "near"]
            far = [r for r in rows if r["group"] == "far"]
            mean = lambda rs, k: 100 * statistics.fmean(r[k] for r in rs) if rs else None  # noqa: E731
            cells.append(" / ".join(fmt(v) for v in (mean(near, "auroc"), mean(near, "fpr95"), mean(far, "auroc"))))
        for detector in chosen:
            tuned = ((info.get("tuning") or data.get("tuning") or {}).get("detectors") or {}).get(detector)
            if tuned is None:
                raise DirectiveError(f"no tuning of {detector} for {method}")
            cells.append(fmt(tuned.get("chosen")))
        body.append(cells)
    for index, detector in enumerate(detectors, 2):
        if all(cells[index] == "–" for cells in body):
            raise DirectiveError(f"no rows for detector {detector}")
    return markdown_table(header, body)


def table_generic(data: object, opts: dict) -> str:
    """A list of records, a mapping of records (one row per key) or a flat mapping (key, value)."""
    data = _select(opts.get("path", ""), data)
    labels, percent = _labels(opts), set(_names(opts, "percent") or [])
    digits = int(opts.get("digits", 2))
    chosen = _names(opts, "fields")
    flat = isinstance(data, dict) and (all(k in data and not isinstance(data[k], dict) for k in chosen) if chosen
                                       else all(not isinstance(v, dict) for v in data.values()))
    if flat:
        keys = chosen or list(data)
        missing = [k for k in keys if k not in data]
        if missing:
            raise DirectiveError(f"no field {', '.join(missing)}")
        body = [[labels.get(k, k), fmt(data[k], digits, k in percent or "*" in percent)] for k in keys]
        return markdown_table([opts.get("key", "key"), opts.get("value", "value")], body)
    if isinstance(data, dict):
        index = opts.get("index", "name")
        records = [{index: key, **value} for key, value in data.items()]
    elif isinstance(data, list):
        index, records = None, data
    else:
        raise DirectiveError("expected a list or a mapping")
    fields = _names(opts, "fields") or list(dict.fromkeys(
        k for r in records for k, v in r.items() if not isinstance(v, (dict, list)) or k == index))
    exclude = set(_names(opts, "exclude") or [])
    fields = [f for f in fields if f not in exclude]
    for field in fields:
        if not any(_get(r, field) is not None for r in records):
            raise DirectiveError(f"no field {field!r}")
    body = [[fmt(_get(r, f), digits, f in percent) for f in fields] for r in records]
    return markdown_table([labels.get(f, f) for f in fields], body)


def table_compare(data: object, opts: dict) -> str:
    """Mappings side by side: at ``path`` a mapping name -> record; ``field`` picks a sub-mapping of each record.

    Rows are the keys of those mappings, one column per name (e.g. far AUROC per detector, one column per precision).
    """
    named = _select(opts.get("path", ""), data)
    field_name = opts.get("field")
    columns = {name: (record[field_name] if field_name else record) for name, record in named.items()}
    keys = list(dict.fromkeys(k for values in columns.values() for k in values))
    digits, percent = int(opts.get("digits", 2)), opts.get("percent") == "yes"
    body = [[key] + [fmt(values.get(key), digits, percent) for values in columns.values()] for key in keys]
    return markdown_table([opts.get("index", "name"), *columns], body)


KINDS: dict[str, Callable[[object, dict], str]] = {
    "summary": table_summary, "grid": table_grid, "tuned": table_tuned, "flow": table_flow,
    "seeds": table_seeds, "compare": table_compare, "generic": table_generic,
}


def _as_list(data: object) -> list[dict]:
    if isinstance(data, dict) and "run" in data:  # one summary row
        return [data]
    if not isinstance(data, list):
        raise DirectiveError("expected a list of summary rows")
    return data


def _auto_kind(data: object) -> str:
    if isinstance(data, list) and data and isinstance(data[0], dict) and "id_accuracy_mean" in data[0]:
        return "summary"
    return "generic"


# ------------------------------------------------------------------------------------------------ directives


def markdown_file_table(path: Path, opts: dict) -> str:
    """The ``index``-th table of a Markdown file a benchmark script wrote, rows filtered by run / detector."""
    tables, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    index = int(opts.get("index", 0))
    if index >= len(tables):
        raise DirectiveError(f"{path.name} has {len(tables)} tables")
    header, rule, *rows = tables[index]
    columns = [c.strip() for c in header.strip("|").split("|")]
    for key in ("run", "detector"):
        wanted = _names(opts, key + "s")
        if wanted is not None and key in columns:
            position = columns.index(key)
            rows = [r for r in rows if r.strip("|").split("|")[position].strip() in wanted]
    return "\n".join([header, rule, *rows])


def expand(template: Path, write_binary: Callable[[str, bytes], None]) -> tuple[str, set[str]]:
    """The page for one template, and the result files it used."""
    used: set[str] = set()
    out = []
    for number, line in enumerate(template.read_text(encoding="utf-8").splitlines(), 1):
        match = DIRECTIVE.match(line.strip())
        if not match:
            out.append(line)
            continue
        name, rest = match["file"], match["rest"].strip()
        try:
            names = name.split("+")  # several summaries joined: a.json+b.json
            for part in names:
                if not (RESULTS / part).is_file():
                    raise DirectiveError(f"no file benchmarks/results/{part}")
            used.update(names)
            source = RESULTS / names[0]
            if match["kind"] == "image":
                target = "img/" + name.replace("/", "_")
                write_binary(f"results/{target}", source.read_bytes())
                out.append(f"![{rest or source.stem}]({target})")
                continue
            opts = dict(item.split("=", 1) for item in shlex.split(rest))
            if match["kind"] == "markdown-table":
                out.append(markdown_file_table(source, opts))
                continue
            loaded = [json.loads((RESULTS / part).read_text(encoding="utf-8")) for part in names]
            if "prefix" in opts:  # prefix=a_,b_: run names of each joined summary, told apart
                loaded = [[{**row, "run": prefix + row["run"]} for row in part]
                          for prefix, part in zip(opts["prefix"].split(","), loaded, strict=True)]
            data = [row for part in loaded for row in part] if len(loaded) > 1 else loaded[0]
            out.append(KINDS[opts.get("kind") or _auto_kind(data)](data, opts))
        except (DirectiveError, KeyError, ValueError, StopIteration, TypeError) as exc:
            raise DirectiveError(f"{template.relative_to(ROOT)}:{number}: {name}: {exc}") from exc
    files = "\n".join(f"- `benchmarks/results/{name}`" for name in sorted(used))
    footer = (f"\n\n---\n\n*Tables generated by `docs/gen_results.py` from the recorded files:*\n\n{files}\n"
              if used else "\n")
    return "\n".join(out).rstrip() + footer, used


def write_pages(write_text: Callable[[str, str], None], write_binary: Callable[[str, bytes], None]) -> list[str]:
    """Write every results page; return the JSON records that no page shows."""
    used: set[str] = set()
    for template in sorted(TEMPLATES.glob("*.md")):
        page, files = expand(template, write_binary)
        used |= files
        write_text(f"results/{template.name}", page)
    records = {p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*.json")}
    return sorted(records - used)


def _main(out: Path) -> int:
    def write_text(path: str, text: str) -> None:
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(text, encoding="utf-8")

    def write_binary(path: str, data: bytes) -> None:
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)

    unused = write_pages(write_text, write_binary)
    for name in unused:
        print(f"benchmarks/results/{name} is on no results page", file=sys.stderr)
    return 1 if unused else 0


if __name__ == "__main__":  # python docs/gen_results.py OUT_DIR
    sys.exit(_main(Path(sys.argv[1])))
else:
    import mkdocs_gen_files

    def _write_text(path: str, text: str) -> None:
        with mkdocs_gen_files.open(path, "w") as handle:
            handle.write(text)

    def _write_binary(path: str, data: bytes) -> None:
        with mkdocs_gen_files.open(path, "wb") as handle:
            handle.write(data)

    for _name in write_pages(_write_text, _write_binary):
        LOG.warning("benchmarks/results/%s is on no results page (docs/results-src/)", _name)

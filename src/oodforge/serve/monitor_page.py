"""The drift monitor's page: a self-contained ``monitor.html`` drawn from ``DriftMonitor`` records (a JSONL log,
or the ``{"alpha", "records"}`` JSON a server returns at ``/v1/monitor``): the window's OOD rate over the images
seen with the alarm periods shaded, the histogram of all p-values against the uniform density, and a table of
alarms."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from oodforge.deploy.conformal import check_alpha
from oodforge.util.atomic import atomic_write
from oodforge.util.errors import ConfigError, DataError, MissingPathError
from oodforge.util.pages import density_stairs, esc, figure_grid, html_page, png_uri

__all__ = ["alarm_periods", "load_monitor_source", "monitor_page_html", "read_monitor_records",
           "write_monitor_page"]

FETCH_TIMEOUT_S = 10.0
P_BINS = 20
RECORD_KEYS = ("seen", "p_values", "decisions", "alarm")
DASH = "\u2013"
RATE_HINT = ("The share of the monitor's window flagged OOD, after each update. On ID traffic it stays near alpha "
             "(dashed); shaded: the alarm was on.")
P_HINT = ("All p-values received, and (green) those received while no alarm was on. On ID traffic exchangeable "
          "with the calibration images they are uniform (dashed); OOD traffic piles them up near 0.")


# ----------------------------------------------------------------------------------------- reading


def read_monitor_records(source: str | Path, timeout: float = FETCH_TIMEOUT_S) -> tuple[float | None, list[dict]]:
    """(alpha if the source states it, records) from a JSONL monitor log or an http(s) URL answering
    ``{"alpha": ..., "records": [...]}``; a missing file, a bad line or an unreachable URL is one error."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        alpha, records, where = *_fetch(text, timeout), text
    else:
        records, where = _read_log(Path(text)), text
        alpha = None
    _check_records(records, where)
    if alpha is None:
        alpha = next((r["alpha"] for r in records if isinstance(r.get("alpha"), int | float)), None)
    return alpha, records


def load_monitor_source(source: str | Path, alpha: float | None = None) -> tuple[float, list[dict]]:
    """Records and alpha (``alpha`` when given, else the one the source states) of a log file or URL."""
    found, records = read_monitor_records(source)
    if alpha is not None:
        return check_alpha(alpha, "--alpha"), records
    if found is None:
        raise ConfigError(f"{source} does not state the guard's alpha: pass --alpha")
    return check_alpha(found, f"the alpha of {source}"), records


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        raise MissingPathError(f"monitor log {path} not found")
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: not a JSON record ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a text file ({exc.reason})") from None
    return records


def _fetch(url: str, timeout: float) -> tuple[Any, list]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ConfigError(f"cannot fetch {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, bad JSON or encoding
        raise ConfigError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
        raise DataError(f"{url} did not answer a JSON object with a list 'records'")
    return payload.get("alpha"), payload["records"]


def _check_records(records: list, where: str) -> None:
    """Each record has an int ``seen``, equally long ``p_values`` and ``decisions`` and a bool ``alarm``."""
    if not records:
        raise DataError(f"{where} holds no monitor records")
    for index, record in enumerate(records):
        missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise DataError(f"{where}: record {index + 1} lacks {', '.join(missing)}")
        ok = (isinstance(record["seen"], int) and isinstance(record["alarm"], bool)
              and isinstance(record["p_values"], list) and isinstance(record["decisions"], list)
              and len(record["p_values"]) == len(record["decisions"]))
        if not ok:
            raise DataError(f"{where}: record {index + 1} is not a monitor record (seen: int, alarm: bool, "
                            "p_values and decisions: lists of one length)")


# ------------------------------------------------------------------------------------------ content


def alarm_periods(records: Sequence[dict]) -> list[tuple[int, int | None]]:
    """(image count when raised, image count when cleared or None while on) for each alarm in ``records``."""
    periods: list[tuple[int, int | None]] = []
    on = False
    for record in records:
        if record["alarm"] and not on:
            periods.append((record["seen"], None))
        elif on and not record["alarm"]:
            periods[-1] = (periods[-1][0], record["seen"])
        on = record["alarm"]
    return periods


def _rate_figure(records: Sequence[dict], alpha: float, periods: list[tuple[int, int | None]]) -> str:
    fig = Figure(figsize=(9.0, 3.2))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9)
    ax = fig.add_subplot()
    rated = [r for r in records if isinstance(r.get("ood_rate"), int | float)]
    tested = [r for r in rated if r.get("binomial_p") is not None]  # the window held enough inputs to test
    points = [(r["seen"], 100 * r["ood_rate"]) for r in (tested or rated)]
    if points:
        ax.plot(*zip(*points, strict=True), color="C0", lw=1.2, label="OOD rate in the window")
    last = records[-1]["seen"]
    for index, (start, end) in enumerate(periods):
        ax.axvspan(start, last if end is None else end, color="C3", alpha=0.18, lw=0,
                   label="alarm on" if index == 0 else None)
    ax.axhline(100 * alpha, color="0.3", lw=1.0, linestyle="--", label=f"alpha = {100 * alpha:g} %")
    ax.set(xlabel="images seen", ylabel="flagged OOD (%)", title="Rolling OOD rate", ylim=(0, None))
    ax.title.set_fontsize(10)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.85)
    return png_uri(fig)


def _p_value_figure(records: Sequence[dict], alpha: float) -> str:
    fig = Figure(figsize=(4.6, 3.2))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.9)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, P_BINS + 1)
    p = _p_values(records)
    density_stairs(ax, p, bins, "C0", f"all {p.size:,} p-values", fill=True)
    quiet = _p_values([r for r in records if not r["alarm"]])
    if 0 < quiet.size < p.size:
        density_stairs(ax, quiet, bins, "C2", f"{quiet.size:,} while no alarm was on")
    ax.axhline(1.0, color="0.3", lw=1.0, linestyle="--", label="Uniform(0, 1)")
    ax.axvline(alpha, color="C3", lw=0.9, linestyle=":", label=f"alpha = {alpha:g}")
    ax.set(xlabel="p-value", ylabel="density", title="p-values", xlim=(0, 1), ylim=(0, None))
    ax.title.set_fontsize(10)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    return png_uri(fig)


def _p_values(records: Sequence[dict]) -> np.ndarray:
    return np.asarray([v for r in records for v in r["p_values"]], dtype=np.float64)


def _alarm_table(periods: list[tuple[int, int | None]]) -> str:
    if not periods:
        return '<p class="hint">No alarm was raised.</p>'
    rows = "".join(f'<tr><td class="num">{index}</td><td class="num">{start:,}</td>'
                   f'<td class="num">{"still on" if end is None else f"{end:,}"}</td>'
                   f'<td class="num">{DASH if end is None else f"{end - start:,}"}</td></tr>'
                   for index, (start, end) in enumerate(periods, 1))
    return ('<table id="alarms"><thead><tr><th>alarm</th><th>raised at image</th><th>cleared at image</th>'
            f"<th>images while on</th></tr></thead><tbody>{rows}</tbody></table>")


def monitor_page_html(records: Sequence[dict], alpha: float, title: str = "oodforge drift monitor") -> str:
    """The monitor page of ``records`` (``DriftMonitor`` update records, oldest first) for level ``alpha``."""
    _check_records(list(records), "the records")
    alpha = check_alpha(alpha)
    periods = alarm_periods(records)
    received = sum(len(r["p_values"]) for r in records)
    flagged = sum(int(v) for r in records for v in r["decisions"])
    first = records[0]["seen"] - len(records[0]["p_values"])
    facts = [("Images", f"{first + 1:,} to {records[-1]['seen']:,}" if first else f"{records[-1]['seen']:,}"),
             ("alpha", f"{alpha:g}"), ("Flagged OOD", f"{flagged:,} ({flagged / max(received, 1):.2%})"),
             ("Alarms", f"{len(periods)}" + (" (on now)" if records[-1]["alarm"] else ""))]
    if not math.isnan(_last(records, "binomial_p")):
        facts.append(("Last tests", f"binomial p {_last(records, 'binomial_p'):.2g}, "
                                    f"uniformity p {_last(records, 'uniformity_p'):.2g}"))
    facts_html = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    body = (f'<header><h1>{esc(title)}</h1><dl class="facts">{facts_html}</dl></header>'
            f'<section id="rate"><h2>OOD rate</h2><p class="hint">{esc(RATE_HINT)}</p>'
            f'{figure_grid([("Rolling OOD rate over images seen", _rate_figure(records, alpha, periods), "span")])}'
            f'</section><section id="p-values"><h2>p-values</h2><p class="hint">{esc(P_HINT)}</p>'
            f'{figure_grid([("Histogram of p-values", _p_value_figure(records, alpha), "")])}</section>'
            f'<section id="alarms-section"><h2>Alarms</h2>{_alarm_table(periods)}</section>'
            "<footer>Generated by oodforge monitor from the drift monitor's records.</footer>")
    return html_page(title, body)


def _last(records: Sequence[dict], key: str) -> float:
    value = records[-1].get(key)
    return float(value) if isinstance(value, int | float) else math.nan


def write_monitor_page(records: Sequence[dict], out_dir: str | Path, alpha: float) -> Path:
    """Write ``out_dir/monitor.html`` (atomically) from ``DriftMonitor`` records and return its path."""
    page = monitor_page_html(records, alpha)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_dir / "monitor.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))

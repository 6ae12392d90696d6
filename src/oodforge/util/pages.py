"""Pieces of oodforge's self-contained HTML pages (the run report, the monitor page): matplotlib figures embedded
as base64 PNG data URIs, escaping, a figure grid, and the page shell with its CSS and the table-sorting script."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DPI", "PAGE_CSS", "SORT_JS", "density_stairs", "esc", "figure_grid", "html_page", "png_uri"]

DPI = 80


def png_uri(fig: Figure, tight: bool = False, dpi: int = DPI) -> str:
    """Render ``fig`` with the Agg canvas as a base64 PNG data URI, then drop its artists."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None,
                metadata={"Software": None})
    fig.clear()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def density_stairs(ax: Any, values: np.ndarray, bins: np.ndarray, color: Any, label: str,
                   fill: bool = False) -> None:
    """Density histogram (normalised over all values, so the tails cut off by the bins keep their weight)."""
    counts, _ = np.histogram(values[np.isfinite(values)], bins=bins)
    density = counts / (max(values.size, 1) * np.diff(bins))
    if fill:
        ax.stairs(density, bins, fill=True, color=color, alpha=0.3)
    ax.stairs(density, bins, color=color, linewidth=1.2, label=label)


def esc(value: Any) -> str:
    """``value`` as text escaped for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def figure_grid(figures: Sequence[tuple[str, str, str]], css: str = "grid") -> str:
    """``<figure>`` items from (caption, data URI, figure CSS class) in a grid container."""
    items = "".join(f'<figure class="{fig_css}"><img src="{uri}" alt="{esc(caption)}">'
                    f"<figcaption>{esc(caption)}</figcaption></figure>" for caption, uri, fig_css in figures)
    return f'<div class="{css}">{items}</div>'


def html_page(title: str, body: str, extra_css: str = "") -> str:
    """A complete page: ``body`` inside ``<main>``, the shared CSS (plus ``extra_css``) and the sorting script
    (tables with class ``sortable`` sort by a click on a header)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{PAGE_CSS}{extra_css}</style></head>"
            f"<body><main>{body}</main><script>{SORT_JS}</script></body></html>\n")


PAGE_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --head: #eef1f6; --best: #cdeccf;
        --near: #fde7c8; --far: #d6e6fb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: #fafbfc; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 40px; }
h1 { font-size: 22px; margin: 8px 0 12px; }
h2 { font-size: 17px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 13px; margin: 0 8px 0 0; display: inline; color: var(--muted); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0 0 12px; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; font-weight: 500; }
.kvs { margin: 6px 0; } .kv { display: inline-block; margin: 2px 6px 2px 0; padding: 1px 7px;
       border: 1px solid var(--line); border-radius: 10px; background: #fff; font-size: 12px; }
.kv b { color: var(--muted); font-weight: 500; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 9px; text-align: left; white-space: nowrap; }
thead th { background: var(--head); position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th:hover { background: #e1e6ef; }
th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 10px; }
th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 10px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: var(--best); font-weight: 700; }
tbody tr:nth-child(even) td:not(.best) { background: #f6f7f9; }
.tag { padding: 0 6px; border-radius: 8px; font-size: 12px; }
.tag.near { background: var(--near); } .tag.far { background: var(--far); }
.hint { color: var(--muted); font-size: 12.5px; margin: 4px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 12px; }
.grid figure.span { grid-column: 1 / -1; }
.wide { display: grid; gap: 12px; }
figure { margin: 0; padding: 8px; background: #fff; border: 1px solid var(--line); border-radius: 6px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
.wide figure img { min-width: min(256px, 100%); image-rendering: pixelated; }
figcaption { font-size: 12px; color: var(--muted); text-align: center; margin-top: 4px; }
#notes li { color: #8a5300; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
"""

SORT_JS = """
(function () {
  "use strict";
  function cellValue(cell, numeric) {
    var raw = cell.getAttribute("data-value");
    if (!numeric) { return (raw !== null ? raw : cell.textContent).toLowerCase(); }
    var value = parseFloat(raw);
    return isNaN(value) ? null : value;
  }
  function sortTable(table, col, descending) {
    var headers = table.tHead.rows[0].cells, body = table.tBodies[0];
    var numeric = headers[col].getAttribute("data-type") === "num", sign = descending ? -1 : 1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a.cells[col], numeric), y = cellValue(b.cells[col], numeric);
      if (x === y) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      return (x < y ? -1 : 1) * sign;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(headers, function (th) { th.removeAttribute("aria-sort"); });
    headers[col].setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  function nextDescending(th) {
    var current = th.getAttribute("aria-sort");
    if (current) { return current === "ascending"; }
    return th.getAttribute("data-first") === "desc";
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var sort = function () { sortTable(table, col, nextDescending(th)); };
      th.tabIndex = 0;
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sort(); }
      });
    });
  });
  var match = /^#sort=([\\w-]+)\\.(\\w+)\\.(asc|desc)$/.exec(window.location.hash);
  var table = match && document.getElementById(match[1]);
  var th = table && table.querySelector('th[data-key="' + match[2] + '"]');
  if (th) { sortTable(table, th.cellIndex, match[3] === "desc"); }
  document.body.setAttribute("data-sort-ready", "1");
})();
"""

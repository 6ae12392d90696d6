"""``oodforge monitor``: the drift monitor's page from its log file or from a running server."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def monitor(source: str = typer.Argument(..., help="A drift monitor log (JSONL), or the http(s) URL of a server's "
                                                   "monitor records (GET /v1/monitor)."),
            out: Path = typer.Option(..., "--out", help="Folder to write monitor.html to."),
            alpha: float | None = typer.Option(None, help="The guard's level (default: the one the records "
                                                          "state).")) -> None:
    """Draw the drift monitor's page: the rolling OOD rate with the alarms, the p-value histogram, the alarm
    table."""
    from oodforge.serve.monitor_page import alarm_periods, load_monitor_source, write_monitor_page
    from oodforge.util.validation import check_output_folder

    check_output_folder(out, "--out")
    alpha, records = load_monitor_source(source, alpha)
    path = write_monitor_page(records, out, alpha)
    seen = sum(len(r["p_values"]) for r in records)
    flagged = sum(int(v) for r in records for v in r["decisions"])
    alarms = alarm_periods(records)
    console.print(f"{seen} images, {flagged} flagged OOD ({flagged / max(seen, 1):.1%}), {len(alarms)} alarm"
                  f"{'' if len(alarms) == 1 else 's'}{' (on now)' if records[-1]['alarm'] else ''}; wrote {path}",
                  highlight=False)

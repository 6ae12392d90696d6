"""Drift monitoring of a served guard: is the traffic still like the calibration images?

A guard gives each input a conformal p-value and flags it OOD when ``p <= alpha``. On ID inputs exchangeable with
the calibration images, ``P(flagged) <= alpha`` and the p-values are (super-)uniform on (0, 1]. ``DriftMonitor``
keeps the last ``window`` p-values and decisions and, after each ``update``, once the window holds at least
``min_fill`` of them (by default: once it is full), runs two one-sided tests on it:

- **binomial**: with ``k`` of the ``n`` inputs in the window flagged, ``binomial_p = P(X >= k)`` for
  ``X ~ Binomial(n, alpha)``, i.e. ``scipy.stats.binom.sf(k - 1, n, alpha)``: too many flags for rate ``alpha``;
- **uniformity**: ``uniformity_p = scipy.stats.kstest(p, "uniform", alternative="greater").pvalue``, the
  Kolmogorov-Smirnov test against the alternative that the window's p-values are stochastically smaller than
  Uniform(0, 1) (their empirical CDF lies above the diagonal somewhere). It sees a shift that moves scores down
  without yet crossing the threshold.

**With ``calibration_size``** (the number ``n`` of the guard's calibration scores; guards with one calibration
set, not class-conditional ones) both tests compare the window with the calibration images themselves, so that
the randomness of the calibration draw is accounted for (under exchangeability the count test is exact, the
two-sample test asymptotically so):

- **binomial**: a window input is flagged when its score lies below the ``r``-th smallest calibration score,
  ``r = floor(alpha (n + 1))``, so the count of flags is ``BetaBinomial(n_window, r, n + 1 - r)``;
  ``binomial_p = scipy.stats.betabinom.sf(k - 1, n_window, r, n + 1 - r)``;
- **uniformity**: the two-sample test ``scipy.stats.ks_2samp(p, grid, alternative="greater", method="asymp")``
  against the calibration images' own p-values, ``grid = (2, ..., n + 1) / (n + 1)``.

A fixed calibration set makes the conformal p-values of later inputs only approximately uniform (the share
flagged is ``alpha`` on average over calibration draws, not for each draw), so the plain tests also react to an
unlucky calibration draw; ``benchmarks/monitor_streams.py`` measures both variants.

The alarm **raises** when ``binomial_p < significance`` (default 1e-3) or ``uniformity_p < uniformity`` (default
1e-3). A raised alarm **clears** only when both ``binomial_p > clear_level`` and ``uniformity_p > clear_level``
(default 0.05): the gap between the two levels (hysteresis) keeps the alarm from flickering. Before the window
holds ``min_fill`` values no test runs, both p-values are None and the alarm stays as it is.

Each raise is one warning and each clear one info line on the ``oodforge.serve`` logger; with ``webhook``, the
monitor also POSTs the state as JSON (with ``"event": "raised"`` or ``"cleared"``) from a background thread
(2 s timeout; a failure is logged, never raised). With ``log_path``, every non-empty ``update`` appends one JSON
line: ``{"time", "seen", "p_values", "decisions", "ood_rate", "alarm", "binomial_p", "uniformity_p", "alpha"}``
(this update's p-values and 0/1 decisions, the window's OOD rate and test p-values after it). The last
``history_size`` records stay in memory (``history``).

The tests run after every update, on overlapping windows, so ``significance`` and ``uniformity`` bound the
chance of a false alarm per test, not per stream: the more updates, the more chances. How often ID traffic raises
the alarm in practice is measured by ``benchmarks/monitor_streams.py``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from oodforge.deploy.conformal import check_alpha
from oodforge.util.errors import ConfigError, WriteError

__all__ = ["DriftMonitor", "window_tests"]

logger = logging.getLogger("oodforge.serve")

WEBHOOK_TIMEOUT_S = 2.0
HISTORY_SIZE = 20_000


def window_tests(p_values: Sequence[float] | np.ndarray, decisions: Sequence[int] | np.ndarray, alpha: float,
                 calibration_size: int | None = None) -> tuple[float, float]:
    """(binomial_p, uniformity_p) of one window: too many OOD decisions for rate ``alpha``, and p-values
    stochastically smaller than Uniform(0, 1) (one-sided Kolmogorov-Smirnov); with ``calibration_size``, both
    against the calibration set itself (module docstring)."""
    p = np.asarray(p_values, dtype=np.float64)
    flagged = int(np.count_nonzero(np.asarray(decisions)))
    if calibration_size is None:
        binomial_p = float(stats.binom.sf(flagged - 1, len(p), alpha))
        uniformity_p = float(stats.kstest(p, "uniform", alternative="greater").pvalue)
        return binomial_p, uniformity_p
    n = calibration_size
    rank = math.floor(alpha * (n + 1) + 1e-9)
    binomial_p = float(stats.betabinom.sf(flagged - 1, len(p), rank, n + 1 - rank)) if rank >= 1 else 1.0
    grid = np.arange(2, n + 2, dtype=np.float64) / (n + 1)
    uniformity_p = float(stats.ks_2samp(p, grid, alternative="greater", method="asymp").pvalue)
    return binomial_p, uniformity_p


class DriftMonitor:
    """Sliding-window drift alarm over a guard's p-values and decisions (thread-safe; see the module docstring)."""

    def __init__(self, alpha: float, window: int = 500, significance: float = 1e-3, uniformity: float = 1e-3,
                 clear_level: float = 0.05, log_path: str | Path | None = None, webhook: str | None = None,
                 min_fill: int | None = None, history_size: int = HISTORY_SIZE,
                 calibration_size: int | None = None) -> None:
        self.alpha = check_alpha(alpha)
        self.calibration_size = None if calibration_size is None else _positive_int(calibration_size,
                                                                                    "calibration_size")
        self.window = _positive_int(window, "window")
        self.significance = check_alpha(significance, "significance")
        self.uniformity = check_alpha(uniformity, "uniformity")
        self.clear_level = check_alpha(clear_level, "clear_level")
        if self.clear_level < max(self.significance, self.uniformity):
            raise ConfigError(f"clear_level ({clear_level}) must be at least significance ({significance}) and "
                              f"uniformity ({uniformity}), or an alarm could clear as it raises")
        self.min_fill = self.window if min_fill is None else _positive_int(min_fill, "min_fill")
        if self.min_fill > self.window:
            raise ConfigError(f"min_fill ({min_fill}) must be at most window ({window})")
        self.log_path = _writable(Path(log_path)) if log_path is not None else None
        self.webhook = _check_url(webhook) if webhook is not None else None
        self._p: deque[float] = deque(maxlen=self.window)
        self._out: deque[int] = deque(maxlen=self.window)
        self._history: deque[dict] = deque(maxlen=_positive_int(history_size, "history_size"))
        self._lock = threading.Lock()
        self._posts: list[threading.Thread] = []
        self._log_failing = False
        self.seen = 0
        self.alarm = False
        self.alarms = 0
        self.last_change: float | None = None
        self.binomial_p: float | None = None
        self.uniformity_p: float | None = None

    def update(self, p_values: Sequence[float] | np.ndarray, decisions: Sequence[Any] | np.ndarray | None = None
               ) -> dict:
        """Add inputs' p-values and decisions (1/True/"out" = flagged; None: ``p <= alpha``), run the tests and
        return the state."""
        p, out = _as_inputs(p_values, decisions, self.alpha)
        with self._lock:
            if len(p) == 0:
                return self._state()
            self._p.extend(p.tolist())
            self._out.extend(out.tolist())
            self.seen += len(p)
            change = self._test()
            state = self._state()
            record = {"time": time.time(), "seen": self.seen, "p_values": p.tolist(), "decisions": out.tolist(),
                      "ood_rate": state["ood_rate"], "alarm": self.alarm, "binomial_p": self.binomial_p,
                      "uniformity_p": self.uniformity_p, "alpha": self.alpha}
            self._history.append(record)
            if self.log_path is not None:
                self._append(record)
            if change:
                self._announce(change, state)
            return state

    def state(self) -> dict:
        """seen, window_fill, ood_rate (window), binomial_p, uniformity_p, alarm, alarms (raised so far),
        last_change (unix time or None), alpha and window."""
        with self._lock:
            return self._state()

    def history(self, limit: int | None = None) -> list[dict]:
        """The last ``limit`` update records (all kept ones when None), oldest first, as the log holds them."""
        with self._lock:
            records = list(self._history)
        return [dict(r) for r in (records if limit is None else records[max(0, len(records) - int(limit)):])]

    def snapshot(self, limit: int | None = None) -> dict:
        """``{"alpha", "window", "state", "records"}``: what ``oodforge monitor URL`` reads."""
        return {"alpha": self.alpha, "window": self.window, "state": self.state(), "records": self.history(limit)}

    def close(self, timeout: float = WEBHOOK_TIMEOUT_S + 1.0) -> None:
        """Wait (up to ``timeout`` seconds each) for webhook posts still under way."""
        for thread in list(self._posts):
            thread.join(timeout)

    # ------------------------------------------------------------------ internals (called under the lock)
    def _test(self) -> str | None:
        """Run the window tests; "raised", "cleared" or None."""
        if len(self._p) < self.min_fill:
            self.binomial_p = self.uniformity_p = None
            return None
        self.binomial_p, self.uniformity_p = window_tests(np.fromiter(self._p, float), np.fromiter(self._out, int),
                                                          self.alpha, self.calibration_size)
        if not self.alarm and (self.binomial_p < self.significance or self.uniformity_p < self.uniformity):
            self.alarm, self.alarms, self.last_change = True, self.alarms + 1, time.time()
            return "raised"
        if self.alarm and self.binomial_p > self.clear_level and self.uniformity_p > self.clear_level:
            self.alarm, self.last_change = False, time.time()
            return "cleared"
        return None

    def _state(self) -> dict:
        fill = len(self._out)
        return {"seen": self.seen, "window_fill": fill, "window": self.window, "alpha": self.alpha,
                "ood_rate": sum(self._out) / fill if fill else None, "binomial_p": self.binomial_p,
                "uniformity_p": self.uniformity_p, "alarm": self.alarm, "alarms": self.alarms,
                "last_change": self.last_change}

    def _append(self, record: dict) -> None:
        """One JSON line, written with one call on a file opened for appending, then flushed."""
        try:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, separators=(",", ":")) + "\n")
                handle.flush()
            self._log_failing = False
        except OSError as exc:
            if not self._log_failing:
                logger.error("cannot append to the monitor log %s: %s", self.log_path, exc.strerror or exc)
            self._log_failing = True

    def _announce(self, change: str, state: dict) -> None:
        rate = f"{state['ood_rate']:.1%}"
        tests = f"binomial p {state['binomial_p']:.2g}, uniformity p {state['uniformity_p']:.2g}"
        if change == "raised":
            logger.warning("drift alarm raised at image %d: %s of the last %d inputs flagged OOD (alpha %g); %s",
                           self.seen, rate, state["window_fill"], self.alpha, tests)
        else:
            logger.info("drift alarm cleared at image %d: %s of the last %d inputs flagged OOD (alpha %g); %s",
                        self.seen, rate, state["window_fill"], self.alpha, tests)
        if self.webhook is not None:
            self._posts = [t for t in self._posts if t.is_alive()]
            thread = threading.Thread(target=_post, args=(self.webhook, {"event": change, **state}), daemon=True,
                                      name="oodforge-monitor-webhook")
            thread.start()
            self._posts.append(thread)


def _post(url: str, payload: dict) -> None:
    """POST ``payload`` as JSON to ``url``; a failure is logged, never raised."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
            response.read()
    except Exception as exc:  # noqa: BLE001 - a webhook must never break monitoring
        logger.warning("drift webhook %s failed: %s", url, exc)


def _as_inputs(p_values: Any, decisions: Any, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Checked float p-values in [0, 1] and 0/1 decisions of the same length."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ConfigError("p_values must be finite numbers in [0, 1]")
    if decisions is None:
        return p, (p <= alpha).astype(np.int64)
    raw = np.asarray(decisions).reshape(-1)
    if raw.dtype.kind in "US":
        if not np.all(np.isin(raw, ("in", "out"))):
            raise ConfigError(f"decisions must be 'in' or 'out', got {sorted(set(raw.tolist()) - {'in', 'out'})}")
        out = (raw == "out").astype(np.int64)
    elif raw.dtype.kind in "biuf" and np.all(np.isin(raw, (0, 1))):
        out = raw.astype(np.int64)
    else:
        raise ConfigError("decisions must be 0/1, booleans or 'in'/'out'")
    if len(out) != len(p):
        raise ConfigError(f"{len(p)} p_values but {len(out)} decisions")
    return p, out


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"webhook must be an http:// or https:// URL, got {url!r}")
    return str(url)


def _writable(path: Path) -> Path:
    """``path``, once a file there can be opened for appending (its folder is made)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise WriteError(path, exc.strerror or str(exc), exc.errno) from None
    return path

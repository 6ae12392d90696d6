"""The drift monitor: its window tests against hand-computed binomial and Kolmogorov-Smirnov p-values, the alarm's
raise and clear rules on synthetic p-values, its log, webhook and thread safety; on real streams (the public
ResNet-20 guard on CIFAR-10, then Tiny ImageNet, then CIFAR-10 again) it stays quiet on ID traffic, raises soon
after the switch and clears after the switch back; and the monitor page."""

from __future__ import annotations

import http.server
import json
import logging
import math
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import typer
from scipy import stats
from typer.testing import CliRunner

from conftest import real_root
from oodforge.serve.monitor import DriftMonitor, window_tests
from oodforge.serve.monitor_page import alarm_periods, load_monitor_source, read_monitor_records, write_monitor_page
from oodforge.util.errors import ConfigError, DataError, MissingPathError, OodforgeError, WriteError

ALPHA = 0.05


def feed(monitor: DriftMonitor, p: np.ndarray, chunk: int = 10) -> list[dict]:
    """Feed ``p`` (decisions ``p <= alpha``) in chunks; the state after each update."""
    return [monitor.update(part, part <= monitor.alpha) for part in np.array_split(p, math.ceil(len(p) / chunk))]


def blocks_with_alarm(states: list[dict], start: int, stop: int, size: int) -> list[bool]:
    """For each block of ``size`` images in [start, stop): whether the alarm was on after any update in it."""
    return [any(s["alarm"] for s in states if begin < s["seen"] <= begin + size)
            for begin in range(start, stop - size + 1, size)]


# ------------------------------------------------------------------------------------- hand computations


def binomial_tail(k: int, n: int, rate: float) -> float:
    """P(X >= k), X ~ Binomial(n, rate), summed term by term."""
    return sum(math.comb(n, j) * rate**j * (1 - rate) ** (n - j) for j in range(k, n + 1))


def ks_greater(p: list[float]) -> tuple[float, float]:
    """One-sided KS statistic D+ = max_i (i/n - p_(i)) against Uniform(0, 1) and its exact p-value
    (Birnbaum and Tingey 1951: P(D+ >= d) = d * sum_j C(n, j) (1 - d - j/n)^(n-j) (d + j/n)^(j-1))."""
    x, n = sorted(p), len(p)
    d = max((i + 1) / n - v for i, v in enumerate(x))
    tail = d * sum(math.comb(n, j) * (1 - d - j / n) ** (n - j) * (d + j / n) ** (j - 1)
                   for j in range(math.floor(n * (1 - d)) + 1))
    return d, tail


WINDOW = [0.01, 0.02, 0.03, 0.3, 0.5, 0.7, 0.9, 0.04, 0.2, 0.6, 0.08, 0.12]


def test_window_tests_equal_hand_computed_binomial_and_ks_p_values() -> None:
    decisions = [int(v <= ALPHA) for v in WINDOW]  # 4 of 12 flagged
    binomial_p, uniformity_p = window_tests(WINDOW, decisions, ALPHA)
    assert binomial_p == pytest.approx(binomial_tail(4, 12, ALPHA), rel=1e-12)
    assert binomial_p == pytest.approx(float(stats.binom.sf(3, 12, ALPHA)), rel=1e-12)
    d, tail = ks_greater(WINDOW)
    direct = stats.kstest(WINDOW, "uniform", alternative="greater")
    assert direct.statistic == pytest.approx(d, abs=1e-12)
    assert uniformity_p == pytest.approx(tail, rel=1e-9)
    assert uniformity_p == pytest.approx(direct.pvalue, rel=1e-12)
    assert window_tests([0.5, 0.9], [0, 0], ALPHA)[0] == 1.0  # no flag: P(X >= 0) = 1


def betabinomial_tail(k: int, n: int, a: float, b: float) -> float:
    """P(X >= k), X ~ BetaBinomial(n, a, b): the sum over j >= k of C(n, j) B(j + a, n - j + b) / B(a, b)."""
    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    return sum(math.comb(n, j) * math.exp(log_beta(j + a, n - j + b) - log_beta(a, b)) for j in range(k, n + 1))


def test_calibration_aware_tests_equal_hand_computed_values() -> None:
    n = 99  # calibration scores: flagged below the r = floor(0.05 * 100) = 5th smallest
    binomial_p, uniformity_p = window_tests(WINDOW, [int(v <= ALPHA) for v in WINDOW], ALPHA, calibration_size=n)
    assert binomial_p == pytest.approx(betabinomial_tail(4, 12, 5, 95), rel=1e-9)
    grid = np.arange(2, n + 2) / (n + 1)  # the calibration images' own p-values
    d = max(np.mean(np.array(WINDOW) <= x) - np.mean(grid <= x) for x in WINDOW + grid.tolist())
    direct = stats.ks_2samp(WINDOW, grid, alternative="greater", method="asymp")
    assert direct.statistic == pytest.approx(d, abs=1e-12)
    assert uniformity_p == pytest.approx(direct.pvalue, rel=1e-12)
    assert window_tests([0.5], [0], 0.001, calibration_size=99)[0] == 1.0  # alpha too small to flag anything


def test_calibration_aware_tests_hold_their_level_over_calibration_draws() -> None:
    """Calibration sets (1,000) and windows (500) drawn from one distribution: the calibration-aware tests reject
    at about their level; the plain tests, which take the p-values of one calibration draw as uniform, more often."""
    rng = np.random.default_rng(5)
    n, size, draws = 1000, 500, 2000
    plain, aware = [], []
    for _ in range(draws):
        calibration = np.sort(rng.normal(size=n))
        p = (1 + np.searchsorted(calibration, rng.normal(size=size), side="right")) / (n + 1)
        plain.append(window_tests(p, p <= ALPHA, ALPHA))
        aware.append(window_tests(p, p <= ALPHA, ALPHA, calibration_size=n))
    aware_rate, plain_rate = (np.mean(np.array(tests) <= 0.05, axis=0) for tests in (aware, plain))
    assert np.all(aware_rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / draws)), aware_rate
    assert plain_rate[0] >= 0.07 and plain_rate[1] >= 0.1, plain_rate


def test_monitor_tests_the_last_window_only_and_only_when_full() -> None:
    monitor = DriftMonitor(ALPHA, window=12)
    state = monitor.update([0.9, 0.95, 0.99], [0, 0, 0])
    assert state["binomial_p"] is None and state["uniformity_p"] is None and state["window_fill"] == 3
    state = monitor.update(WINDOW, [int(v <= ALPHA) for v in WINDOW])  # pushes the first three out
    assert state["seen"] == 15 and state["window_fill"] == 12 and state["ood_rate"] == pytest.approx(4 / 12)
    assert state["binomial_p"] == pytest.approx(binomial_tail(4, 12, ALPHA), rel=1e-12)
    assert state["uniformity_p"] == pytest.approx(ks_greater(WINDOW)[1], rel=1e-9)
    assert state["alarm"] == (state["binomial_p"] < 1e-3 or state["uniformity_p"] < 1e-3)
    early = DriftMonitor(ALPHA, window=12, min_fill=3).update([0.01, 0.02, 0.03])  # decisions from p <= alpha
    assert early["binomial_p"] == pytest.approx(ALPHA**3) and early["alarm"]


def test_hysteresis_keeps_a_raised_alarm_until_both_tests_pass_the_clear_level() -> None:
    middling = [0.01] * 4 + list(np.linspace(0.5, 0.95, 16))  # binomial p 0.016: between 1e-3 and 0.05
    assert 1e-3 < window_tests(middling, [1] * 4 + [0] * 16, ALPHA)[0] < 0.05
    quiet = DriftMonitor(ALPHA, window=20)
    assert not quiet.update(middling)["alarm"]  # not enough to raise ...
    raised = DriftMonitor(ALPHA, window=20)
    assert raised.update([0.01] * 20)["alarm"]
    assert raised.update(middling)["alarm"]  # ... nor to clear
    calm = [0.01, 0.01] + list(np.linspace(0.1, 0.95, 18))
    state = raised.update(calm)
    assert min(state["binomial_p"], state["uniformity_p"]) > 0.05 and not state["alarm"]
    assert state["alarms"] == 1 and state["last_change"] is not None


def test_uniform_p_values_rarely_alarm_beta_raises_and_uniform_again_clears() -> None:
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(ALPHA, window=200)
    states = feed(monitor, rng.uniform(size=100 * 200))
    alarmed = blocks_with_alarm(states, 0, 100 * 200, 200)
    assert np.mean(alarmed) <= 0.05, np.mean(alarmed)
    assert not states[-1]["alarm"]
    states = feed(monitor, rng.beta(0.3, 1.0, size=400))  # P(p <= 0.05) = 0.05 ** 0.3 = 0.41
    raised = [s["seen"] for s in states if s["alarm"]]
    assert raised and raised[0] - 20_000 <= 200
    states = feed(monitor, rng.uniform(size=2000))
    cleared = [s["seen"] for s in states if not s["alarm"]]
    assert cleared and cleared[0] - 20_400 <= 2 * 200


def test_inputs_are_checked() -> None:
    monitor = DriftMonitor(ALPHA, window=5)
    for p, decisions, message in (([0.5, 1.5], None, "in \\[0, 1\\]"), ([0.5, float("nan")], None, "finite"),
                                  ([0.5, 0.2], [0], "2 p_values but 1 decisions"),
                                  ([0.5], ["maybe"], "'in' or 'out'"), ([0.5], [2], "0/1")):
        with pytest.raises(ConfigError, match=message):
            monitor.update(p, decisions)
    assert monitor.update([0.5, 0.01], ["in", "out"])["ood_rate"] == 0.5
    assert monitor.update([])["seen"] == 2
    for kwargs, message in (({"window": 0}, "window"), ({"min_fill": 9}, "min_fill"),
                            ({"calibration_size": 0}, "calibration_size"),
                            ({"clear_level": 1e-4}, "clear_level"), ({"webhook": "ftp://x"}, "webhook")):
        with pytest.raises(ConfigError, match=message):
            DriftMonitor(ALPHA, **{"window": 5, **kwargs})
    with pytest.raises(ConfigError, match="alpha"):
        DriftMonitor(1.5)


def test_log_lines_history_and_logger_messages(tmp_path: Path, caplog) -> None:
    log = tmp_path / "logs" / "monitor.jsonl"
    monitor = DriftMonitor(ALPHA, window=20, log_path=log)
    spread = [round(0.025 + 0.05 * i, 3) for i in range(20)]  # one flag, p-values even over (0, 1)
    batches = [[0.3] * 10 + [0.7] * 10, [0.01] * 20, spread, [0.02, 0.9]]
    with caplog.at_level(logging.INFO, logger="oodforge.serve"):
        for batch in batches:
            monitor.update(batch)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["p_values"] for r in lines] == batches
    assert [r["decisions"] for r in lines] == [[int(v <= ALPHA) for v in b] for b in batches]
    assert [r["seen"] for r in lines] == [20, 40, 60, 62] and [r["alarm"] for r in lines] == [False, True, False, False]
    assert set(lines[0]) == {"time", "seen", "p_values", "decisions", "ood_rate", "alarm", "binomial_p",
                             "uniformity_p", "alpha"}
    assert lines[1]["ood_rate"] == 1.0 and lines[1]["binomial_p"] == pytest.approx(ALPHA**20)
    assert monitor.history() == lines and monitor.history(2) == lines[2:]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "oodforge.serve"]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO]
    assert "raised at image 40" in messages[0][1] and "cleared at image 60" in messages[1][1]
    assert monitor.snapshot(1) == {"alpha": ALPHA, "window": 20, "state": monitor.state(), "records": lines[3:]}


def test_an_unwritable_log_is_refused_at_the_door(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match="file"):
        DriftMonitor(ALPHA, log_path=tmp_path / "file" / "monitor.jsonl")


class _Collector(http.server.BaseHTTPRequestHandler):
    """Keeps each POSTed JSON body; answers GET with the server's ``payload``."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps(self.server.payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.received, server.payload = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_webhook_receives_each_raise_and_clear(http_server) -> None:
    url = f"http://127.0.0.1:{http_server.server_address[1]}/hook"
    monitor = DriftMonitor(ALPHA, window=20, webhook=url)
    monitor.update([0.01] * 20)
    monitor.update(np.linspace(0.025, 0.975, 20))
    monitor.close()
    assert [(path, kind) for path, kind, _ in http_server.received] == [("/hook", "application/json")] * 2
    raised, cleared = (body for _, _, body in http_server.received)
    assert raised["event"] == "raised" and raised["alarm"] and raised["seen"] == 20 and raised["alarms"] == 1
    assert cleared["event"] == "cleared" and not cleared["alarm"] and cleared["seen"] == 40


def test_a_failing_webhook_is_logged_not_raised(caplog) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monitor = DriftMonitor(ALPHA, window=20, webhook=f"http://127.0.0.1:{port}/hook")
    with caplog.at_level(logging.WARNING, logger="oodforge.serve"):
        assert monitor.update([0.01] * 20)["alarm"]
        monitor.close()
    assert any("webhook" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)


def test_two_threads_updating_at_once_lose_nothing(tmp_path: Path) -> None:
    monitor = DriftMonitor(ALPHA, window=100, log_path=tmp_path / "m.jsonl")
    rng = np.random.default_rng(1)
    parts = [rng.uniform(size=(300, 10)) for _ in range(2)]
    start = threading.Barrier(2)

    def work(rows: np.ndarray) -> None:
        start.wait()
        for row in rows:
            monitor.update(row, row <= ALPHA)

    threads = [threading.Thread(target=work, args=(rows,)) for rows in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state = monitor.state()
    assert state["seen"] == 6000 and state["window_fill"] == 100
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["seen"] for r in records] == list(range(10, 6001, 10))  # one line per update, in order
    assert sorted(v for r in records for v in r["p_values"]) == sorted(np.concatenate(parts).ravel().tolist())
    assert len(monitor.history()) == 600


# ------------------------------------------------------------------------------------------- the page


def synthetic_records(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(ALPHA, window=200, log_path=tmp_path / "monitor.jsonl")
    for p in (rng.uniform(size=1000), rng.beta(0.3, 1.0, size=600), rng.uniform(size=1000),
              rng.beta(0.3, 1.0, size=400)):
        feed(monitor, p)
    return tmp_path / "monitor.jsonl"


def check_page(path: Path, records: list[dict]) -> None:
    page = path.read_text()
    assert path.name == "monitor.html"
    assert page.count('<img src="data:image/png;base64,') == 2
    periods = alarm_periods(records)
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td><td class=\"num\">([\d,]+)</td><td class=\"num\">"
                      r"([^<]+)</td>", page)
    assert [(int(a), int(b.replace(",", "")), None if c == "still on" else int(c.replace(",", "")))
            for a, b, c in rows] == [(i, s, e) for i, (s, e) in enumerate(periods, 1)]


def test_page_from_a_log_shows_the_figures_and_every_alarm(tmp_path: Path) -> None:
    log = synthetic_records(tmp_path)
    alpha, records = read_monitor_records(log)
    assert alpha == ALPHA and len(records) == 300
    periods = alarm_periods(records)
    # two Beta stretches: one alarm cleared in the uniform stretch, one still on at the end
    assert len(periods) == 2 and 1000 < periods[0][0] <= 1200 and 1600 < periods[0][1] <= 2000
    assert 2600 < periods[1][0] <= 2800 and periods[1][1] is None
    path = write_monitor_page(records, tmp_path / "page", ALPHA)
    check_page(path, records)


def test_alarm_periods_hand_made() -> None:
    flags = [False, True, True, False, False, True]
    records = [{"seen": 10 * (i + 1), "alarm": a} for i, a in enumerate(flags)]
    assert alarm_periods(records) == [(20, 40), (60, None)]
    assert alarm_periods(records[:1]) == []


def test_page_from_a_url(tmp_path: Path, http_server) -> None:
    records = [json.loads(line) for line in synthetic_records(tmp_path).read_text().splitlines()]
    for record in records:
        record.pop("alpha")
    http_server.payload = {"alpha": 0.1, "records": records}
    url = f"http://127.0.0.1:{http_server.server_address[1]}/v1/monitor"
    alpha, fetched = load_monitor_source(url)
    assert alpha == 0.1 and fetched == records
    assert load_monitor_source(url, alpha=0.05)[0] == 0.05
    check_page(write_monitor_page(fetched, tmp_path / "from-url", alpha), records)


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingPathError, match="nope.jsonl"):
        read_monitor_records(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seen": 1, "p_values": [0.5], "decisions": [0], "alarm": false}\n{"seen": 2,\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        read_monitor_records(bad)
    bad.write_text('{"seen": 1, "p_values": [0.5], "decisions": [0, 1], "alarm": false}\n')
    with pytest.raises(DataError, match="record 1"):
        read_monitor_records(bad)
    bad.write_text('{"seen": 1, "p_values": [0.5], "decisions": [0], "alarm": false}\n')
    with pytest.raises(ConfigError, match="--alpha"):
        load_monitor_source(bad)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot fetch http://127.0.0.1:{port}/v1/monitor") as caught:
        read_monitor_records(f"http://127.0.0.1:{port}/v1/monitor", timeout=2)
    assert isinstance(caught.value, OodforgeError) and "\n" not in str(caught.value)


def test_monitor_command(tmp_path: Path) -> None:
    from oodforge.cli.main import _fail_cleanly
    from oodforge.cli.monitor import monitor

    app = typer.Typer()
    app.command(name="monitor")(_fail_cleanly(monitor))
    app.callback()(lambda: None)
    log = synthetic_records(tmp_path)
    result = CliRunner().invoke(app, ["monitor", str(log), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "monitor.html").is_file()
    assert re.search(r"3000 images, \d+ flagged OOD \(\d+\.\d%\), 2 alarms \(on now\); wrote", result.output)
    result = CliRunner().invoke(app, ["monitor", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "missing.jsonl" in result.output
    result = CliRunner().invoke(app, ["monitor", str(log), "--out", str(tmp_path / "o3"), "--alpha", "2"])
    assert result.exit_code == 2 and "--alpha must lie in (0, 1)" in result.output


# ------------------------------------------------------------------------------------------ real streams

CALIBRATION = 1000
TINY = 3000  # Tiny ImageNet images streamed (the benchmark script streams all 10,000)


@pytest.fixture(scope="module")
def stream_p_values():
    """p-values of a ResNet-20 + energy guard (alpha 0.05, calibrated on 1,000 random CIFAR-10 test images): the
    other 9,000 CIFAR-10 test images in random order, Tiny ImageNet, and those CIFAR-10 images in a new order."""
    root = real_root("cifar10-jpeg.tar.gz", "tiny-imagenet-200-val.tar.gz", "weights/resnet20-12fca82f.th")
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.deploy.guard import Guard
    from oodforge.deploy.inputs import Preprocessing
    from oodforge.detectors import create_detector
    from oodforge.evaluation.extraction import image_loader
    from oodforge.models.loading import load_model

    benchmark = get_benchmark("cifar10")
    model, _ = load_model("resnet20", root / "weights" / "resnet20-12fca82f.th", benchmark)
    test = benchmark.id_set("test")
    guard = Guard(model, create_detector("energy"), classes=test.classes, alpha=ALPHA,
                  preprocessing=Preprocessing(benchmark.image_shape, benchmark.resize))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(test))
    logits, scores = guard.score_batches(image_loader(test, 500))
    guard.calibrate((logits[order[:CALIBRATION]], scores[order[:CALIBRATION]]))
    cifar = guard.p_values(scores[order[CALIBRATION:]]).numpy()
    tiny = benchmark.ood_set("tiny_imagenet").subset(np.arange(TINY))
    tiny_p = guard.p_values(guard.score_batches(image_loader(tiny, 500))[1]).numpy()
    return cifar, tiny_p, cifar[rng.permutation(len(cifar))]


@pytest.mark.slow
@pytest.mark.parametrize("calibration_size", [None, CALIBRATION], ids=["plain", "calibration-aware"])
def test_real_stream_quiet_on_cifar_alarms_on_tiny_imagenet_clears_after(stream_p_values, tmp_path: Path,
                                                                          calibration_size: int | None) -> None:
    window = 200
    cifar, tiny, cifar_again = stream_p_values
    monitor = DriftMonitor(ALPHA, window=window, log_path=tmp_path / "monitor.jsonl",
                           calibration_size=calibration_size)
    switch, back = len(cifar), len(cifar) + len(tiny)
    states = feed(monitor, np.concatenate([cifar, tiny, cifar_again]))
    quiet = blocks_with_alarm(states, 0, switch, window) + blocks_with_alarm(states, back + 2 * window,
                                                                             back + len(cifar_again), window)
    assert 1 - np.mean(quiet) >= 0.95, np.mean(quiet)
    raised = next(s["seen"] for s in states if s["seen"] > switch and s["alarm"])
    assert raised - switch <= window
    assert next(s for s in states if s["seen"] == back)["alarm"]
    cleared = next(s["seen"] for s in states if s["seen"] > back and not s["alarm"])
    assert cleared - back <= 2 * window
    records = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    check_page(write_monitor_page(records, tmp_path / "page", ALPHA), records)

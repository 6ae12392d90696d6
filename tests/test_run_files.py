"""Issue 13 items 6 and 7: a run folder's files change together, and re-sampling a synthetic set is atomic.

Kills are real (SIGKILL of a child process at a chosen point), not simulated by exceptions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from oodforge.cli import app
from oodforge.data.imageset import ImageSet
from oodforge.data.synthetic import load_synthetic, write_synthetic
from oodforge.runs.folder import COMMITTED, STAGING_PREFIX, scores_digest, write_together
from oodforge.runs.payload import save_run
from oodforge.runs.report import load_run

RUN_FILES = ("results.json", "scores.npz", "results.md", "report.html")


def payload_and_scores(seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """A small run as ``save_run`` receives it; ``seed`` changes every score and the metrics."""
    rng = np.random.default_rng(seed)
    scores = {"msp/cifar10": rng.normal(1.0, 1.0, 50), "msp/svhn": rng.normal(0.0, 1.0, 40)}
    row = {"method": "model", "detector": "msp", "ood_dataset": "svhn", "group": "far", "auroc": 0.5 + seed / 100,
           "aupr_in": 0.5, "aupr_out": 0.5, "fpr95": 0.9}
    return {"benchmark": "tiny", "id_dataset": "cifar10", "id_accuracy": 0.9, "ood_sets": {"svhn": "far"},
            "results": [row], "seed": seed}, scores


def files_of(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in RUN_FILES}


def run_child(script: str, ready: Path, timeout: float = 60.0) -> None:
    """Start ``script`` in a child Python, wait until it creates ``ready``, then SIGKILL it."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env={**os.environ,
                             "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert child.poll() is None, "the child ended before the kill point"
        assert time.monotonic() < deadline, "the child never reached the kill point"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_save_run_records_the_scores_digest(tmp_path):
    payload, scores = payload_and_scores(1)
    save_run(tmp_path, payload, scores)
    results, loaded = load_run(tmp_path)
    assert results["scores_sha256"] == scores_digest(scores) == scores_digest(loaded)
    assert scores_digest(scores) != scores_digest({**scores, "msp/svhn": scores["msp/svhn"] + 1e-9})
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_kill_before_commit_keeps_every_old_file(tmp_path):
    payload, scores = payload_and_scores(1)
    save_run(tmp_path, payload, scores)
    before = files_of(tmp_path)
    ready = tmp_path.parent / "ready-before"
    run_child(f"""
        import time
        from pathlib import Path
        from oodforge.runs.folder import write_together
        def slow(path):  # scores.npz is already staged when this runs
            Path({str(ready)!r}).touch()
            time.sleep(60)
        write_together(Path({str(tmp_path)!r}), {{"scores.npz": lambda p: p.write_bytes(b"new"),
                                                 "results.json": slow}})
    """, ready)
    assert list(tmp_path.glob(f"{STAGING_PREFIX}*")), "the killed write left its staging folder"
    assert files_of(tmp_path) == before
    results, loaded = load_run(tmp_path)  # the reader drops the dead writer's uncommitted folder
    assert results["seed"] == 1 and scores_digest(loaded) == results["scores_sha256"]
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_kill_after_commit_is_finished_by_the_next_reader(tmp_path):
    old_payload, old_scores = payload_and_scores(1)
    save_run(tmp_path, old_payload, old_scores)
    new_payload, new_scores = payload_and_scores(2)
    ready = tmp_path.parent / "ready-after"
    run_child(f"""
        import os, time
        from pathlib import Path
        import numpy as np
        import oodforge.runs.folder as rf
        from oodforge.runs.payload import save_run
        real_replace, moved = os.replace, []
        def replace_then_stall(src, dst):  # kill after the first file is renamed into the run folder
            real_replace(src, dst)
            if "{STAGING_PREFIX}" in str(src) and not str(dst).endswith("{COMMITTED}"):
                moved.append(dst)
                Path({str(ready)!r}).touch()
                time.sleep(60)
        rf.os.replace = replace_then_stall
        rng = np.random.default_rng(2)
        scores = {{"msp/cifar10": rng.normal(1.0, 1.0, 50), "msp/svhn": rng.normal(0.0, 1.0, 40)}}
        save_run(Path({str(tmp_path)!r}), {json.dumps(new_payload)}, scores)
    """, ready)
    staged = list(tmp_path.glob(f"{STAGING_PREFIX}*"))
    assert len(staged) == 1 and (staged[0] / COMMITTED).is_file()
    assert json.loads((tmp_path / "results.json").read_text())["seed"] == 1  # scores.npz is new, the rest old
    with np.load(tmp_path / "scores.npz") as npz:
        assert scores_digest({k: npz[k] for k in npz.files}) == scores_digest(new_scores)
    results, loaded = load_run(tmp_path)  # rolls the committed write forward
    assert results["seed"] == 2
    assert scores_digest(loaded) == scores_digest(new_scores) == results["scores_sha256"]
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_report_refuses_scores_of_another_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    save_run(first, *payload_and_scores(1))
    save_run(second, *payload_and_scores(2))
    (first / "scores.npz").write_bytes((second / "scores.npz").read_bytes())
    result = CliRunner().invoke(app, ["report", str(first)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "scores.npz" in lines[0]
    assert "does not belong" in lines[0]


def test_failed_write_leaves_the_folder_as_it_was(tmp_path):
    save_run(tmp_path, *payload_and_scores(1))
    before = files_of(tmp_path)

    def broken(path: Path) -> None:
        raise OSError(28, "No space left on device", str(path))

    with pytest.raises(OSError):
        write_together(tmp_path, {"scores.npz": lambda p: p.write_bytes(b"x"), "results.json": broken})
    assert files_of(tmp_path) == before and not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def tiny_set(seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet("tiny", rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), np.repeat(np.arange(3), 4),
                    ["a", "b", "c"])


def resample_in_child(folder: Path, ready: Path, stall: str) -> None:
    """Re-sample ``folder`` (seed 2) in a child whose ``stall`` code patches ``synthetic`` to stop at the kill
    point (touching ``READY``), and SIGKILL it there."""
    run_child(f"""
        import os, sys, time
        from pathlib import Path
        import numpy as np
        import oodforge.data.synthetic as synthetic
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_run_files import tiny_set
        READY = Path({str(ready)!r})
        {textwrap.indent(textwrap.dedent(stall), " " * 8).strip()}
        synthetic.write_synthetic(Path({str(folder)!r}), tiny_set(2), {{"kind": "id", "seed": 2}}, grid=False)
    """, ready)


def test_resampling_killed_mid_write_keeps_the_earlier_set(tmp_path):
    folder = tmp_path / "set"
    write_synthetic(folder, tiny_set(1), {"kind": "id", "seed": 1}, grid=False)
    resample_in_child(folder, tmp_path / "ready-sample", """
        real_save = np.save
        def save_then_stall(path, array):  # kill while the new set is half written
            real_save(path, array)
            READY.touch()
            time.sleep(60)
        synthetic.np.save = save_then_stall
    """)
    loaded = load_synthetic(folder)
    assert loaded.manifest["seed"] == 1 and np.array_equal(loaded.images, tiny_set(1).images)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # dead writer cleaned


def test_kill_between_the_two_renames_recovers_the_new_set(tmp_path):
    folder = tmp_path / "set"
    write_synthetic(folder, tiny_set(1), {"kind": "id", "seed": 1}, grid=False)
    resample_in_child(folder, tmp_path / "ready-swap", """
        real_rename = os.rename
        def rename_then_stall(src, dst):  # the earlier set is moved aside, the new one not yet in
            real_rename(src, dst)
            if ".old-" in str(dst):
                READY.touch()
                time.sleep(60)
        synthetic.os.rename = rename_then_stall
    """)
    assert not folder.exists()
    loaded = load_synthetic(folder)
    assert loaded.manifest["seed"] == 2 and np.array_equal(loaded.images, tiny_set(2).images)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resampling_replaces_the_set_whole(tmp_path):
    folder = tmp_path / "set"
    write_synthetic(folder, tiny_set(1), {"kind": "interpolated", "seed": 1},
                    extra={"pairs": np.zeros((12, 2), np.int64)}, grid=False)
    write_synthetic(folder, tiny_set(2), {"kind": "id", "seed": 2}, grid=False)
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "labels.npy", "manifest.json"]
    assert load_synthetic(folder).manifest["seed"] == 2
    with pytest.raises(ValueError, match="is a file"):
        (tmp_path / "file").write_text("x")
        write_synthetic(tmp_path / "file", tiny_set(1), {"kind": "id"}, grid=False)

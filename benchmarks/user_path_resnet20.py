"""Record: every detector's AUROC through the user's path (a ResNet-20 defined in the test file, wrapped
with ``wrap_model``, YAML benchmark of ``folder:`` specs) against ``oodforge score --benchmark cifar10``.

    OODFORGE_DATA=../shared/data python benchmarks/user_path_resnet20.py

Writes ``benchmarks/results/user_path_resnet20.{json,md}``, for every detector (the comparison itself
lives in ``tests/test_user_path_cifar10.py``, whose CI test runs nine of them).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]

from test_user_path_cifar10 import compare  # noqa: E402

DETECTORS = ",".join(n for n in __import__("oodforge").DETECTORS.names() if n != "cosine")  # cosine: no cosine head


def main() -> None:
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        rows = compare(DETECTORS, Path(folder))
    worst = max(abs(r["user"] - r["builtin"]) for r in rows)
    record = {"command": "python benchmarks/user_path_resnet20.py", "detectors": DETECTORS, "rows": rows,
              "max_abs_difference": worst, "wall_s": time.perf_counter() - tic}
    (HERE / "results" / "user_path_resnet20.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| detector | OOD set | AUROC % built-in | AUROC % user path | difference |", "|---|---|---|---|---|"]
    lines += [f"| {r['detector']} | {r['ood_dataset']} | {100 * r['builtin']:.2f} | {100 * r['user']:.2f} | "
              f"{100 * (r['user'] - r['builtin']):+.2f} |" for r in rows]
    (HERE / "results" / "user_path_resnet20.md").write_text(
        "# Pretrained ResNet-20 on CIFAR-10: user's path vs `oodforge score`\n\n"
        f"`{record['command']}`, float32, 2-core CPU; largest difference {100 * worst:.2f} AUROC points.\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

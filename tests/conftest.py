import os
from pathlib import Path

import pytest

REAL_DATA = Path(os.environ.get("OODFORGE_DATA", "")) if os.environ.get("OODFORGE_DATA") else None


def has_real(*parts: str) -> bool:
    """Whether $OODFORGE_DATA is set and holds ``parts``."""
    return REAL_DATA is not None and (REAL_DATA.joinpath(*parts)).exists()


needs_fashion = pytest.mark.skipif(not has_real("FashionMNIST", "raw"),
                                   reason="set OODFORGE_DATA to a folder with FashionMNIST/raw (see README)")
needs_mnist_family = pytest.mark.skipif(
    not (has_real("FashionMNIST", "raw") and has_real("MNIST", "raw") and has_real("notMNIST", "raw")),
    reason="set OODFORGE_DATA to a folder with FashionMNIST, MNIST and notMNIST (see README)")


def real_root(*needed: str) -> Path:
    """``$OODFORGE_DATA``, skipping the test when it is unset or lacks any of ``needed``."""
    if "OODFORGE_DATA" not in os.environ:
        pytest.skip("OODFORGE_DATA is not set")
    root = Path(os.environ["OODFORGE_DATA"])
    missing = [n for n in needed if not (root / n).exists()]
    if missing:
        pytest.skip(f"OODFORGE_DATA={root} lacks {', '.join(missing)}")
    return root

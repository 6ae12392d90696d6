"""design.md §1: which part of the library may import which, checked by reading every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "oodforge"


def module_name(path: Path) -> str:
    """``src/oodforge/data/datasets.py`` -> ``oodforge.data.datasets``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, package: str) -> set[str]:
    """Every absolute module an ``import`` or ``from ... import`` names, at any depth (lazy imports too);
    relative imports are resolved against ``package``."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _package(path: Path) -> str:
    return module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]


MODULES = {module_name(p): imported_modules(p.read_text(), _package(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, target: str) -> bool:
    return any(name == target or name.startswith(target + ".") for name in MODULES[module])


def _in(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


# (which modules, forbidden import, rule in design.md §1)
RULES = [
    ("oodforge.losses", "oodforge.detectors", "losses/ never imports detectors/"),
    ("oodforge.detectors", "oodforge.losses", "detectors/ never imports losses/"),
    ("oodforge.detectors", "oodforge.training.loop", "detectors/ never imports train.py"),
    ("oodforge.detectors", "oodforge.cli.main", "detectors/ never imports the CLI"),
    ("oodforge.data", "oodforge.models", "data/ knows no networks"),
    ("oodforge.models", "oodforge.training.loop", "models/ never imports the training loop"),
    ("oodforge.models", "oodforge.evaluation.runner", "models/ never imports the runner"),
    ("oodforge.models", "oodforge.bench.jobs", "models/ never imports the runner"),
    ("oodforge.models", "oodforge.cli.main", "models/ never imports the CLI"),
]


@pytest.mark.parametrize("part, forbidden, rule", RULES)
def test_layer_rule(part: str, forbidden: str, rule: str) -> None:
    offenders = sorted(m for m in MODULES if _in(m, part) and _imports(m, forbidden))
    assert not offenders, f"{rule}: {offenders} import {forbidden}"


def test_metrics_imports_no_oodforge_module() -> None:
    assert not [n for n in MODULES["oodforge.evaluation.metrics"] if n.startswith("oodforge")]


def test_scores_imports_only_torch() -> None:
    allowed = {"__future__", "torch"}
    assert {n.split(".")[0] for n in MODULES["oodforge.scores"]} <= allowed | {"__future__.annotations"}


def test_no_library_module_imports_the_cli() -> None:
    entry_points = {"oodforge.__main__", "oodforge.cli.main", "oodforge.cli.generate"}
    offenders = sorted(m for m in MODULES if m not in entry_points and _imports(m, "oodforge.cli.main"))
    assert not offenders


def test_reader_sees_lazy_and_relative_imports() -> None:
    source = "def f():\n    from oodforge.detectors.knn import KNN\nfrom ..detectors import base\nimport torch.nn\n"
    names = imported_modules(source, "oodforge.losses")
    assert {"oodforge.detectors.knn", "oodforge.detectors", "oodforge.detectors.base", "torch.nn"} <= names


def test_rules_cover_every_package_part() -> None:
    """The rules name parts that exist, so a rename cannot silently disable them."""
    for part, forbidden, _ in RULES:
        assert any(_in(m, part) for m in MODULES) and any(_in(m, forbidden) for m in MODULES), (part, forbidden)

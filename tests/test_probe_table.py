"""The probe table of the docs (docs/guides/checks.md) names tests that exist, and every test that says it
covers a probe row (``Row N:`` in its docstring) is named in that row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guides" / "checks.md"


def table_rows() -> dict[str, list[tuple[str, str]]]:
    """Row label -> (test file, test name) of every test its last cell names (``::name`` continues a file)."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"\d+|S\d+", cells[0]):
            continue
        tests, current = [], None
        for ref in re.findall(r"`([^`]+)`", cells[3]):
            path, _, name = ref.partition("::")
            current = path or current
            tests.append((current, name))
        rows[cells[0]] = tests
    return rows


def defined_tests(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_probe_row_names_tests_that_exist() -> None:
    rows = table_rows()
    assert [str(n) for n in range(1, 17)] == [k for k in rows if k.isdigit()]
    for label, tests in rows.items():
        assert tests, f"row {label} names no test"
        for path, name in tests:
            assert name in defined_tests(path), f"row {label}: {path}::{name} does not exist"


def test_every_test_that_claims_a_row_is_named_in_it() -> None:
    rows = table_rows()
    for path in sorted(ROOT.glob("tests/test_*.py")):
        for node in ast.parse(path.read_text()).body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            match = re.match(r"Rows? (\d+)(?: and (\d+))?:", doc or "")
            for row in filter(None, match.groups() if match else ()):
                named = {(p, n) for p, n in rows[row]}
                assert (f"tests/{path.name}", node.name) in named, f"{path.name}::{node.name} claims row {row}"

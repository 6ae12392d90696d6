"""The rules between the parts of the package (docs/reference/design.md), checked by reading every module's
imports, those inside functions too: no import circles, and which part may import which."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "oodforge"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``src/oodforge/data/datasets.py`` -> ``oodforge.data.datasets``."""
    parts = path.relative_to(root.parent).with_suffix("").parts
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


def read_package(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> every name its imports mention, for each module under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        modules[name] = imported_modules(path.read_text(), package)
    return modules


def import_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name that is an attribute of a module counts as that module).

    Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, but a package's ``__init__`` that only
    hands names on is no part of a circle a reader must untangle, so the edge goes to the named module alone.
    """
    graph = {}
    for module, names in modules.items():
        targets = set()
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


MODULES = read_package()
GRAPH = import_graph(MODULES)


def _in(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


def _imports(module: str, target: str) -> bool:
    return any(_in(name, target) for name in MODULES[module])


# (which modules, forbidden import, rule)
RULES = [
    ("oodforge.outputs", "oodforge", "outputs.py imports only torch"),
    ("oodforge.scores", "oodforge", "scores.py imports only torch"),
    ("oodforge.evaluation.metrics", "oodforge", "metrics takes arrays and imports no other oodforge module"),
    ("oodforge.util", "oodforge.data", "util/ is the ground floor"),
    ("oodforge.util", "oodforge.models", "util/ is the ground floor"),
    ("oodforge.util", "oodforge.detectors", "util/ is the ground floor"),
    ("oodforge.util", "oodforge.evaluation", "util/ is the ground floor"),
    ("oodforge.losses", "oodforge.detectors", "losses/ never imports detectors/"),
    ("oodforge.detectors", "oodforge.losses", "detectors/ never imports losses/"),
    ("oodforge.detectors", "oodforge.training", "detectors/ never imports training"),
    ("oodforge.detectors", "oodforge.evaluation", "detectors/ never imports evaluation"),
    ("oodforge.detectors", "oodforge.runs", "detectors/ never imports runs"),
    ("oodforge.detectors", "oodforge.models", "detectors/ never import the models' adapters: they get a model "
                                              "that has the interface"),
    ("oodforge.detectors", "oodforge.cli", "detectors/ never imports the CLI"),
    ("oodforge.data", "oodforge.models", "data/ knows no networks"),
    ("oodforge.data", "oodforge.evaluation", "data/ knows no evaluation"),
    ("oodforge.models", "oodforge.training", "models/ never imports the training loop"),
    ("oodforge.models", "oodforge.evaluation", "models/ never imports evaluation"),
    ("oodforge.models", "oodforge.bench", "models/ never imports bench"),
    ("oodforge.models", "oodforge.cli", "models/ never imports the CLI"),
    ("oodforge.evaluation", "oodforge.runs", "evaluation/ never imports runs/"),
    ("oodforge.evaluation", "oodforge.bench", "evaluation/ never imports bench/"),
    ("oodforge.evaluation", "oodforge.training", "evaluation/ never imports training/"),
    ("oodforge.training", "oodforge.runs", "training/ never imports runs/"),
    ("oodforge.training", "oodforge.bench", "training/ never imports bench/"),
    ("oodforge.runs", "oodforge.bench", "runs/ never imports bench/"),
    ("oodforge.runs", "oodforge.training", "runs/ never imports training/"),
    ("oodforge.generate", "oodforge.evaluation", "generate/ never imports evaluation/"),
    ("oodforge.deploy", "oodforge.runs", "deploy/ never imports runs/"),
    ("oodforge.deploy", "oodforge.bench", "deploy/ never imports bench/"),
    ("oodforge.deploy", "oodforge.training", "deploy/ never imports training/"),
    ("oodforge.deploy", "oodforge.cli", "deploy/ never imports the CLI"),
    ("oodforge.evaluation", "oodforge.deploy", "evaluation/ knows nothing of deployment"),
    ("oodforge.detectors", "oodforge.deploy", "detectors/ know nothing of deployment"),
    ("oodforge.models", "oodforge.deploy", "models/ know nothing of deployment"),
    ("oodforge.data", "oodforge.deploy", "data/ knows nothing of deployment"),
    ("oodforge.runs", "oodforge.deploy", "runs/ knows nothing of deployment"),
    ("oodforge.serve", "oodforge.runs", "serve/ never imports runs/"),
    ("oodforge.serve", "oodforge.bench", "serve/ never imports bench/"),
    ("oodforge.serve", "oodforge.training", "serve/ never imports training/"),
    ("oodforge.serve", "oodforge.generate", "serve/ never imports generate/"),
    ("oodforge.serve", "oodforge.losses", "serve/ never imports losses/"),
    ("oodforge.serve", "oodforge.cli", "serve/ never imports the CLI"),
] + [(part, "oodforge.serve", f"{part.rpartition('.')[2]}/ knows nothing of serving")
     for part in ("oodforge.util", "oodforge.data", "oodforge.models", "oodforge.detectors", "oodforge.losses",
                  "oodforge.evaluation", "oodforge.training", "oodforge.generate", "oodforge.runs", "oodforge.bench",
                  "oodforge.deploy")]
LIBRARY = [m for m in MODULES if not _in(m, "oodforge.cli") and m != "oodforge.__main__"]


def test_no_import_circles_at_module_level_or_inside_functions() -> None:
    assert cycles(GRAPH) == []


def test_the_cycle_check_finds_a_circle_closed_inside_a_function(tmp_path) -> None:
    """A temporary package whose circle is closed by an import inside a function is caught."""
    package = tmp_path / "oodforge"
    (package / "evaluation").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "evaluation" / "__init__.py").write_text("")
    (package / "evaluation" / "runner.py").write_text("from oodforge.evaluation.tuning import tune\n")
    (package / "evaluation" / "tuning.py").write_text("def tune():\n    from oodforge.evaluation import runner\n")
    (package / "evaluation" / "leaf.py").write_text("import torch\n")
    found = cycles(import_graph(read_package(package)))
    assert found == [["oodforge.evaluation.runner", "oodforge.evaluation.tuning"]]
    assert cycles(import_graph(read_package(PACKAGE))) == []


@pytest.mark.parametrize("part, forbidden, rule", RULES)
def test_layer_rule(part: str, forbidden: str, rule: str) -> None:
    offenders = sorted(m for m in MODULES if _in(m, part) and _imports(m, forbidden) and not _in(m, forbidden))
    if forbidden == "oodforge":  # a leaf: no oodforge module at all
        offenders = sorted(m for m in MODULES if _in(m, part) and any(_in(n, "oodforge") for n in MODULES[m]))
    assert not offenders, f"{rule}: {offenders} import {forbidden}"


def test_no_library_module_imports_the_cli() -> None:
    offenders = sorted(m for m in LIBRARY if _imports(m, "oodforge.cli"))
    assert not offenders


def test_top_level_holds_at_most_six_modules_besides_subpackages() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 6, modules


def test_reader_sees_lazy_and_relative_imports() -> None:
    source = "def f():\n    from oodforge.detectors.knn import KNN\nfrom ..detectors import base\nimport torch.nn\n"
    names = imported_modules(source, "oodforge.losses")
    assert {"oodforge.detectors.knn", "oodforge.detectors", "oodforge.detectors.base", "torch.nn"} <= names


def test_rules_cover_every_package_part() -> None:
    """The rules name parts that exist, so a rename cannot silently disable them."""
    for part, forbidden, _ in RULES:
        assert any(_in(m, part) for m in MODULES) and any(_in(m, forbidden) for m in MODULES), (part, forbidden)


def test_import_oodforge_exposes_the_api_lazily_and_completely() -> None:
    """``oodforge.__all__`` is ``oodforge.api.__all__`` (also the names its TYPE_CHECKING block imports), and
    ``import oodforge`` alone loads none of it."""
    import subprocess
    import sys

    import oodforge
    import oodforge.api

    assert sorted(oodforge.__all__) == sorted(oodforge.api.__all__)
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    typed = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "oodforge.api"
             for alias in node.names}
    assert typed == set(oodforge.api.__all__)
    assert all(getattr(oodforge, name) is getattr(oodforge.api, name) for name in oodforge.__all__)
    check = "import sys, oodforge; print('oodforge.api' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.split() == [
        "False", "False"]

"""Which code computes a number: library versions and source digests, for the keys of stored results.

A cached output or a stored evaluation is reused only when the code that made it is the same. For a
model that is every class it is built from: a class defined in an installed distribution (torch,
torchvision, timm, ...) is identified by that distribution's name and version; a class defined in
source the user can edit (a ``module:`` factory, an editable install, a notebook) by a digest of the
source of every loaded module under the same import root (so helpers imported from neighbouring files
count too), or, where no source file exists, of the class's compiled methods. oodforge itself is
identified the same way: its version when installed from a wheel, the digest of its source otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import marshal
import site
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from types import FunctionType, ModuleType

_INSTALLED_ROOTS = tuple(sorted({
    str(Path(p).resolve())
    for p in [*(sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")),
              *site.getsitepackages(), site.getusersitepackages()] if p}))


def code_identity(classes: set[type]) -> dict[str, str]:
    """``{module or distribution: version or digest}`` for the code that defines ``classes``."""
    identity: dict[str, str] = {}
    seen: set[str] = set()
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        module = sys.modules.get(cls.__module__)
        if getattr(module, "__file__", None) is not None and cls.__module__ in seen:
            continue  # one entry per module that has a source file
        seen.add(cls.__module__)
        identity.update(module_identity(cls.__module__, cls))
    return identity


def oodforge_identity() -> str:
    """oodforge's version when installed from a wheel, else its version plus a digest of its source."""
    return next(iter(module_identity("oodforge.util.code_identity").values()))


def module_identity(name: str, cls: type | None = None) -> dict[str, str]:
    """One entry identifying the code of module ``name`` (and ``cls``, when the module has no source file)."""
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if module is None or file is None:  # e.g. a class typed into a notebook: digest its compiled methods
        return {f"{name}.{cls.__qualname__ if cls else ''}": _class_digest(cls) if cls else "unknown"}
    path = _resolved(file)
    top = name.split(".", 1)[0]
    if str(path).startswith(_INSTALLED_ROOTS):
        return {top: _distribution_version(top)}
    root = _import_root(module, path)
    return {f"{top}@{root}": _source_digest(top, str(root), _package_sources(root))}


@functools.cache
def _distribution_version(top: str) -> str:
    """``dist==version`` for an installed top-level package (the stdlib: the Python version)."""
    names = [top, *(_top_level_owners().get(top) or [])]
    for name in names:
        try:
            return f"{name}=={version(name)}"
        except PackageNotFoundError:
            continue
    return f"python=={sys.version.split()[0]}"


@functools.lru_cache(maxsize=1)
def _top_level_owners() -> dict[str, list[str]]:
    """Top-level package -> distributions that install it (slow to build: once per process)."""
    return packages_distributions()


def _import_root(module: ModuleType, path: Path) -> Path:
    """The folder a module was imported from: its ``sys.path`` entry (the package's parent for packages)."""
    depth = module.__name__.count(".") + (1 if path.name == "__init__.py" else 0)
    return path.parents[depth]


def _package_sources(root: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of every source file of each top-level package or module under ``root`` that is
    loaded: all of a package's files, imported yet or not, so the answer does not depend on import order."""
    tops = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py"):
            path = _resolved(file)
            if path.is_relative_to(root) and not str(path).startswith(_INSTALLED_ROOTS):
                tops.add(path.relative_to(root).parts[0])
    files = []
    for top in tops:
        for path in [root / top] if top.endswith(".py") else (root / top).rglob("*.py"):
            if path.is_file():
                stat = path.stat()
                files.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(files))


@functools.cache
def _resolved(file: str) -> Path:
    """A module file's real path (memoized: resolving every loaded module's path again each time is slow)."""
    return Path(file).resolve()


@functools.lru_cache(maxsize=64)
def _source_digest(top: str, root: str, files: tuple[tuple[str, int, int], ...]) -> str:
    """A digest of the given source files' paths and bytes (memoized on their sizes and mtimes)."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).relative_to(root).as_posix().encode() + b"\0")
        digest.update(Path(path).read_bytes() + b"\0")
    try:
        installed = version(top)
    except PackageNotFoundError:
        installed = "source"
    return f"{installed}+{digest.hexdigest()[:16]}"


def _class_digest(cls: type) -> str:
    """A digest of a class's name and the bytecode of its functions (for classes without a source file)."""
    digest = hashlib.sha256(cls.__qualname__.encode())
    for klass in cls.__mro__:
        if klass.__module__ in ("builtins", "torch.nn.modules.module"):
            continue
        for key, value in sorted(vars(klass).items()):
            function = getattr(value, "__func__", value)
            if isinstance(function, FunctionType):
                digest.update(key.encode() + marshal.dumps(function.__code__))
    return digest.hexdigest()[:16]

"""The layout's rules, read from the source: layers one way down, no cycle, small modules, typed config reads.

The layer order lives in pyproject.toml (``[tool.importlinter]``) and the README's layout section.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tinyopt"
MAX_LINES = 400
# What a function may import inside itself: a dependency that takes a noticeable part of a second to
# import (or loads a backend), kept off the commands that do not need it, `tinyopt --help` first
# (benchmarks/bench_startup.py times it).
HEAVY = ("keras", "tensorflow", "jax", "mlflow", "optuna", "optuna_dashboard", "sklearn", "scipy", "matplotlib",
         "sqlalchemy", "PIL", "psutil", "rich", "numpy", "importlib.metadata")
SECTIONS = ("data", "model", "train", "study", "ensemble", "space")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _target(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The modules an import statement names (a ``from package import module`` names the module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" for alias in node.names]  # a name of a module stands for the module (_own)


def _imports(module: str) -> list[tuple[str, bool]]:
    """Every module ``module`` imports, and whether the import sits inside a function."""
    path = MODULES[module]
    found = []

    def walk(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                continue  # for the type checker only: never imported when the program runs
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend((name, inside) for name in _target(module, path, child))
            walk(child, inside or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    walk(ast.parse(path.read_text()), False)
    return found


def _heavy(name: str) -> bool:
    return any(name == heavy or name.startswith(f"{heavy}.") for heavy in HEAVY)


def _own(name: str) -> str | None:
    """The tinyopt module an imported name belongs to (None for another package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _heavy_at_import(module: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing ``module`` imports a heavy dependency (through its own module-level imports)."""
    for name, inside in _imports(module):
        if inside:
            continue
        if _heavy(name):
            return True
        own = _own(name)
        if own is not None and own != module and own not in seen and _heavy_at_import(own, seen | {module}):
            return True
    return False


def test_import_linter_keeps_the_layers_one_way_down():
    command = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(command).exists():
        pytest.fail("lint-imports is missing: pip install -e '.[dev]' installs import-linter")
    done = subprocess.run([command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_no_import_cycle_anywhere():
    graph = {module: {own for name, _ in _imports(module) if (own := _own(name)) not in (None, module)}
             for module in MODULES}
    cycles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(trail[trail.index(other):] + [other])
            elif other not in state:
                visit(other, [*trail, other])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_over_the_limit():
    sizes = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}
    assert {module: size for module, size in sizes.items() if size > MAX_LINES} == {}


def test_function_level_imports_only_keep_heavy_dependencies_off():
    light = []
    for module in MODULES:
        for name, inside in _imports(module):
            own = _own(name)
            if inside and not _heavy(name) and (own is None or not _heavy_at_import(own)):
                light.append(f"{module} imports {name} inside a function")
    assert light == []


def test_only_the_config_package_reads_config_tables():
    reads = re.compile(r"""\.get\(\s*["'](""" + "|".join(SECTIONS) + r""")["']""")
    found = [f"{path.relative_to(ROOT)}:{number}"
             for module, path in MODULES.items() if not module.startswith("tinyopt.core.config")
             for number, line in enumerate(path.read_text().splitlines(), 1) if reads.search(line)]
    assert found == []


def test_every_module_has_a_test_file_of_its_name():
    missing = []
    for path in MODULES.values():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        relative = path.relative_to(PACKAGE)
        expected = ROOT / "tests" / relative.parent / f"test_{relative.name}"
        if not expected.is_file():
            missing.append(str(expected.relative_to(ROOT)))
    assert missing == []

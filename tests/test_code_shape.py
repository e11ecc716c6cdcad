"""The house's size rules, checked on every run: short files, short functions, small
constructors, and the layers' imports (schemas/ and tasks/ never import torch or worker/)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "tasks", "worker")
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60
MAX_INIT_PARAMETERS = 7  # not counting self


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_source_file_is_over_the_line_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_over_the_line_limit() -> None:
    long = {}
    for path in _sources():
        for fn in _functions(ast.parse(path.read_text())):
            lines = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_constructor_takes_too_many_parameters() -> None:
    wide = {}
    for path in _sources():
        for fn in _functions(ast.parse(path.read_text())):
            if fn.name != "__init__":
                continue
            args = fn.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) - 1
            if count > MAX_INIT_PARAMETERS:
                wide[f"{path.relative_to(ROOT)}:{fn.lineno}"] = count
    assert not wide, f"__init__ with more than {MAX_INIT_PARAMETERS} parameters: {wide}"


def test_tasks_never_import_worker() -> None:
    for path in sorted((ROOT / "tasks").rglob("*.py")) + sorted((ROOT / "schemas").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n == "worker" or n.startswith("worker.")]
            assert not bad, f"{path.relative_to(ROOT)}:{node.lineno} imports {bad}"


@pytest.mark.parametrize("package", ["schemas", "tasks"])
def test_producer_layers_import_without_torch(package: str) -> None:
    """Every module of the producer layers imports with torch (and transformers) blocked."""
    code = (
        "import importlib, pkgutil, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    if m.name.startswith('tasks.gateway.') or m.name.endswith('.__main__'):\n"
        "        continue  # the gateway extra's own tests import it; __main__ runs the CLI\n"
        "    importlib.import_module(m.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


MAX_FOLDER_MODULES = 12  # not counting __init__.py: a folder larger than this is split by concern
FOLDER_RULE_PACKAGES = ("schemas", "tasks", "worker")


def test_no_folder_holds_more_than_a_dozen_modules() -> None:
    crowded = {}
    for package in FOLDER_RULE_PACKAGES:
        for folder in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]:
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            if len(modules) > MAX_FOLDER_MODULES:
                crowded[str(folder.relative_to(ROOT))] = len(modules)
    assert not crowded, f"folders with more than {MAX_FOLDER_MODULES} modules: {crowded}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Modules a module imports when it is imported (or type-checked): its top-level
    statements and `if TYPE_CHECKING:` blocks, not imports inside functions."""
    found: set[str] = set()
    nodes: list[ast.stmt] = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If):
            nodes.extend(node.body + node.orelse)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_no_two_modules_import_each_other() -> None:
    """No import circle, counting type-only imports: a circle means two modules own one thing."""
    graph = {_module_name(p): _top_level_imports(ast.parse(p.read_text())) for p in _sources()}
    graph = {m: {i for i in imports if i in graph and i != m} for m, imports in graph.items()}
    circles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            module, path = stack.pop()
            for nxt in graph[module]:
                if nxt == start and len(path) > 1:
                    circles.append(" -> ".join((*path, nxt)))
                elif nxt not in seen and not nxt.startswith(path[0] + "."):
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert not circles, f"import circles: {sorted(set(circles))[:5]}"


def test_the_wheel_holds_every_package() -> None:
    """pyproject's package list finds every folder of the three layers (worker/models, ...):
    a subpackage missing from it installs from a checkout (editable) and not from a wheel."""
    import tomllib

    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(find_packages(where=str(ROOT), include=config["packages"]["find"]["include"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for package in PACKAGES
               for p in (ROOT / package).rglob("__init__.py")}
    assert folders and folders <= found, f"not in the wheel: {sorted(folders - found)}"

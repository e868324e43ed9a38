"""The library stands alone (DESIGN.md, "experiments/ ... the library never imports them"): nothing under
src/ edits ``sys.path`` or imports the ``experiments`` scripts, read from the source's syntax trees."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
SOURCES = sorted(SRC.rglob("*.py"))


def _is_experiments(module: str | None) -> bool:
    return module is not None and (module == "experiments" or module.startswith("experiments."))


def violations(source: str, filename: str = "<src>") -> list[str]:
    """``file:line what`` for each ``sys.path`` use and each import of ``experiments`` (``import``,
    ``from ... import``, ``importlib.import_module`` / ``__import__`` with a literal name) in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"{where} sys.path")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_experiments(node.module):
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Import) and any(_is_experiments(a.name) for a in node.names):
            found.append(f"{where} import experiments")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _is_experiments(node.args[0].value) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            found.append(f"{where} dynamic import of {node.args[0].value}")
    return found


def test_sources_found():
    names = {p.relative_to(SRC).as_posix() for p in SOURCES}
    assert {"microscale/__init__.py", "microscale/cli.py", "microscale/bdr/tensors.py", "rlmcmc/__init__.py"} <= names


def test_src_never_edits_sys_path_nor_imports_experiments():
    found = [v for p in SOURCES for v in violations(p.read_text(), str(p.relative_to(SRC)))]
    assert found == []


@pytest.mark.parametrize("code, what", [
    ("import sys\nsys.path.insert(0, '.')", "sys.path"),
    ("import sys\nroot = sys.path[0]", "sys.path"),
    ("from experiments import all", "from experiments import"),
    ("from experiments.report import main", "from experiments.report import"),
    ("import experiments.all as run_all", "import experiments"),
    ("import importlib\nimportlib.import_module('experiments.all')", "dynamic import of experiments.all"),
    ("__import__('experiments')", "dynamic import of experiments"),
])
def test_checker_catches_each_form(code, what):
    assert [v.split(" ", 1)[1] for v in violations(code)] == [what]


def test_checker_passes_lookalikes():
    ok = ("from .experiments import x\nimport os\nos.path.join('a')\nimport experiments_lib\n"
          "p = 'sys.path'\nfrom experimental import y\n")
    assert violations(ok) == []

"""The package layout's rules, read from the source's import statements.

What a Flower run ships to every node (``client/``, ``server/`` and the shared library in
``common/``) never imports operator tooling (``common/ops/``), benchmarks or tests, and the two
apps never import each other: the ClientApp a holder approves carries no server code, and the
tooling can change without touching what runs inside a federation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` (a module of ``package``) imports, relative imports resolved;
    ``from a import b`` counts as importing ``a`` and ``a.b``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(p for p in (*(parts if node.level else []), node.module) if p)
            if module:
                names.add(module)
            names.update(f"{module}.{a.name}".lstrip(".") for a in node.names)
    return names


def _package(path: Path) -> str:
    return ".".join(path.relative_to(REPO).parts[:-1])


def _modules(folder: str, *, skip: str | None = None) -> list[Path]:
    return [p for p in sorted((REPO / folder).rglob("*.py"))
            if skip is None or not p.is_relative_to(REPO / skip)]  # fmt: skip


def _forbidden(paths: list[Path], prefixes: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(REPO)} imports {name}"
            for p in paths for name in sorted(_imports(p, _package(p)))
            if any(name == pre or name.startswith(pre + ".") for pre in prefixes)]  # fmt: skip


TOOLING = ("common.ops", "benchmarks", "tests")


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("client", (*TOOLING, "server")),
        ("server", (*TOOLING, "client")),
    ],
)
def test_the_apps_import_no_tooling_and_not_each_other(folder, forbidden):
    assert _forbidden(_modules(folder), forbidden) == []


def test_the_shared_library_imports_neither_app_nor_tooling():
    shared = _modules("common", skip="common/ops")
    assert shared, "common/ has no modules"
    assert _forbidden(shared, (*TOOLING, "client", "server")) == []


def test_the_check_sees_forbidden_imports_absolute_and_relative(tmp_path):
    """The rule is not vacuous: imports of the tooling or the other app are found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from common.ops import simulate\nfrom .. import server\n"
                     "from ..common.ops.deploy import x\nimport benchmarks.dp\n")  # fmt: skip
    found = _imports(probe, "client")
    assert {"common.ops", "common.ops.simulate", "server", "common.ops.deploy",
            "benchmarks.dp"} <= found  # fmt: skip

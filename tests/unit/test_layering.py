"""The package's layering, checked from the source (AST), so it stays true.

- the import graph has no cycle (imports inside functions count: a deferred import is still a dependency);
- no stage package imports another stage package;
- outside the stage packages, only cli.py and pipeline.py import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import finescope

STAGE_PACKAGES = ("curate", "prune", "recover", "evaluate", "report")
ORCHESTRATORS = ("cli", "pipeline")


def _module_name(root: Path, path: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the package's modules it imports, anywhere in its body (relative imports resolved)."""
    files = {_module_name(root, p, package): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in files]
                targets.update(subs or [mod])
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _stage_of(module: str, package: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == package and parts[1] in STAGE_PACKAGES else None


def layering_violations(graph: dict[str, set[str]], package: str) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        own = _stage_of(module, package)
        for target in sorted(targets):
            stage = _stage_of(target, package)
            if stage is None or stage == own:
                continue
            if own is not None:
                out.append(f"stage {module} imports another stage: {target}")
            elif module not in {f"{package}.{m}" for m in ORCHESTRATORS}:
                out.append(f"{module} imports stage internals: {target}")
    return out


SRC = Path(finescope.__file__).resolve().parent


def test_finescope_import_graph_has_no_cycle():
    graph = import_graph(SRC, "finescope")
    assert len(graph) > 30 and "finescope.storage" in graph["finescope.pipeline"]  # the graph is really read
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


def test_finescope_stages_import_no_other_stage_and_only_orchestrators_import_stages():
    assert layering_violations(import_graph(SRC, "finescope"), "finescope") == []


# ---------------------------------------------------------------------------------------- the checker itself


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    "files,cycle",
    [
        (
            {"__init__.py": "", "a.py": "from . import b\n", "b.py": "def f():\n    from .a import x\n"},
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
        (
            {
                "__init__.py": "",
                "a.py": "import pkg.curate.run\n",
                "curate/__init__.py": "",
                "curate/run.py": "from ..a import y\n",
            },
            ["pkg.a", "pkg.curate.run", "pkg.a"],
        ),
        ({"__init__.py": "", "a.py": "from .b import x\n", "b.py": "import os\n"}, None),
    ],
)
def test_cycle_finder_sees_deferred_and_relative_imports(tmp_path, files, cycle):
    assert find_cycle(import_graph(_package(tmp_path, files), "pkg")) == cycle


def test_layering_checker_flags_cross_stage_and_outside_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "cli.py": "from .prune import run\n",
            "storage.py": "from .curate.sae import S\n",
            "curate/__init__.py": "",
            "curate/sae.py": "",
            "curate/run.py": "from ..prune.solver import solve\n",
            "prune/__init__.py": "",
            "prune/run.py": "from .solver import solve\n",
            "prune/solver.py": "",
        },
    )
    assert layering_violations(import_graph(root, "pkg"), "pkg") == [
        "stage pkg.curate.run imports another stage: pkg.prune.solver",
        "pkg.storage imports stage internals: pkg.curate.sae",
    ]

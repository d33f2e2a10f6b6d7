"""The layout shows the architecture: imports inside ``grym_synth`` flow one way,

    api -> compose -> workflow -> {analysis, generation, planning, memory, coordinator} -> inference -> core

and the five services of the middle tier import each other without a cycle. Every import counts, including ones
inside functions: a cycle is broken by moving types, not by deferring an import. ``app`` and ``cli`` (the
composition root, with ``settings``) may import anything; nothing below imports them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "server" / "grym_synth"
RANK = {"api": 0, "compose": 1, "workflow": 2, "analysis": 3, "generation": 3, "planning": 3, "memory": 3,
        "coordinator": 3, "inference": 4, "core": 5}
ROOT_MODULES = {"app", "cli", "settings", "__main__", "__init__"}


def _edges() -> list[tuple[str, str, str]]:
    """(importing file, its subpackage, imported subpackage) for every grym_synth import."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("model_repository",) or (len(rel.parts) > 1 and rel.parts[1] == "v1"):
            continue
        source = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "grym_synth" and len(parts) > 1:
                    out.append((str(rel), source, parts[1]))
    return out


def test_every_subpackage_has_a_layer() -> None:
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages - {"model_repository"} == set(RANK), "a new subpackage needs a place in RANK"


def test_imports_flow_one_way() -> None:
    wrong = []
    for file, source, target in _edges():
        if source in ROOT_MODULES or source == target or target == "model_repository":
            continue
        if target in ROOT_MODULES:
            wrong.append(f"{file} imports the composition root ({target})")
            continue
        if RANK[target] < RANK[source]:
            wrong.append(f"{file} ({source}) imports {target}, a layer above it")
    assert not wrong, "\n".join(wrong)


def test_services_import_each_other_without_a_cycle() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for _, source, target in _edges():
        if source != target and RANK.get(source) == RANK.get(target) == 3:
            graph[source].add(target)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])

"""The package's import graph: every defectflow module imports only its own layer or lower ones, and the
module-level imports have no cycle. The layers (lowest first) are the picture in docs/pipeline.md:

    0  steps, schemas                      the table of steps, every document
    1  engines, plotting                   DFT / ASE engines; save_figure
    2  campaign                           the campaign file's model (engine settings are its fields)
    3  store                              job stores, cost + resume (tracking)
    4  generate, relax, train, levels     steps 1, 2, 4, 5c
    5  select, label                      step 3
    6  search                             step 5
    7  flows, results, preflight          the jobflow graph; reading a store; checks before a run
    8  replot, report, submit, schema_doc figures from a store; the HTML report; running and submitting; the
                                       campaign reference doc
    9  cli                                the command line

Imports inside functions count for the layers (they are real dependencies too).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "defectflow"

LAYERS = {
    "steps": 0, "schemas": 0,
    "engines": 1, "plotting": 1,
    "campaign": 2,
    "store": 3,
    "generate": 4, "relax": 4, "train": 4, "levels": 4,
    "select": 5, "label": 5,
    "search": 6,
    "flows": 7, "results": 7, "preflight": 7,
    "replot": 8, "report": 8, "submit": 8, "schema_doc": 8,
    "cli": 9,
}
#: within a layer, which modules may use which (no cycles among them): layer 4's step packages; the report (layer 8)
#: draws missing figures with replot
SAME_LAYER = {("relax", "train"), ("report", "replot")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported defectflow module, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("defectflow"):
            out.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("defectflow")]
    return out


def _group(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def test_every_package_has_a_layer():
    groups = {_group(m) for m in MODULES} - {None, "data"}
    assert groups <= set(LAYERS), f"give these a layer in tests/test_layers.py: {groups - set(LAYERS)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    src = _group(module)
    if src is None:
        return
    for target, _ in _imports(MODULES[module]):
        dst = _group(target)
        if dst is None or dst == src:
            continue
        assert LAYERS[dst] < LAYERS[src] or (LAYERS[dst] == LAYERS[src] and (src, dst) in SAME_LAYER), (
            f"{module} (layer {LAYERS[src]}: {src}) imports {target} (layer {LAYERS[dst]}: {dst})")


def test_module_level_imports_have_no_cycle():
    graph = {m: {t for t, top in _imports(p) if top} for m, p in MODULES.items()}

    def resolve(name):  # 'from defectflow.schemas import X' names the package module
        return name if name in graph else None

    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in filter(None, map(resolve, graph[node])):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    sys.setrecursionlimit(10000)
    for m in graph:
        if m not in state:
            visit(m, [m])


def test_importing_defectflow_pulls_in_no_heavy_dependency():
    """``import defectflow`` (and the CLI's module) must not import torch, mace or atomate2: the CLI starts in a
    second, and a user without a GPU stack can still validate campaigns."""
    import subprocess

    code = ("import sys, defectflow, defectflow.flows, defectflow.cli.main; "
            "print(sorted(m for m in ('torch', 'mace', 'atomate2', 'chgnet') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out

"""The package layering (issue 18): every import of every safeobs module, function-level ones included,
goes to the same layer or a lower one; runtime folders never import each other; kernels/ and core/ import
no optional runtime library; no import cycles between modules."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "safeobs"

# Lowest first.  The top (cli, __init__, __main__, the safeobs.emulator / safeobs.rounding aliases) may import
# anything; within a layer modules may import each other, except that runtime folders stay apart.
LAYERS = {
    "kernels": 0,
    "core": 1,
    "data": 2,
    "torch_ao": 3,
    "pt2e": 3,
    "torchao": 3,
    "onnx": 3,
    "openvino": 3,
    "tools": 4,
}
TOP = 5
RUNTIMES = {"torch_ao", "pt2e", "torchao", "onnx", "openvino"}
LOW_FORBIDDEN = ("torchao", "onnx", "onnxruntime", "openvino", "nncf")  # third-party, for kernels/ and core/


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """``(absolute module, line)`` of every import in the file, at any depth; ``from X import y`` gives
    ``((X, y), line)`` (y may be a submodule of X or a name in it)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [((mod, a.name), node.lineno) for a in node.names]
    return out


def layer_of(module: str) -> tuple[str | None, int]:
    """(folder, rank) of a safeobs module."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1], LAYERS[parts[1]]
    return None, TOP


def graph(root: Path) -> tuple[dict, dict]:
    """Module -> imported safeobs modules (existing ones only), and module -> raw import list."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    edges, raw = {}, {}
    for mod, path in files.items():
        raw[mod] = imports(path, root)
        targets = set()
        for imp, _ in raw[mod]:
            if isinstance(imp, tuple):  # from X import y: the submodule X.y if there is one, else X
                imp = f"{imp[0]}.{imp[1]}" if f"{imp[0]}.{imp[1]}" in files else imp[0]
            if imp == root.name or imp.startswith(root.name + "."):
                # the longest existing module prefix (from pkg import name: name may be a function)
                parts = imp.split(".")
                while parts and ".".join(parts) not in files:
                    parts.pop()
                if parts and ".".join(parts) != mod:
                    targets.add(".".join(parts))
        edges[mod] = targets
    return edges, raw


def violations(root: Path = ROOT) -> list[str]:
    edges, raw = graph(root)
    out = []
    for mod, targets in sorted(edges.items()):
        folder, rank = layer_of(mod)
        for t in sorted(targets):
            tfolder, trank = layer_of(t)
            if t == root.name:  # the package itself: its __init__ is the top layer
                tfolder, trank = None, TOP
            if trank > rank:
                out.append(f"{mod} (layer {folder or 'top'}) imports higher layer {t}")
            elif folder in RUNTIMES and tfolder in RUNTIMES and folder != tfolder:
                out.append(f"runtime {mod} imports another runtime {t}")
        if folder in ("kernels", "core"):
            for imp, line in raw[mod]:
                imp = imp[0] if isinstance(imp, tuple) else imp
                top = imp.split(".")[0]
                if top in LOW_FORBIDDEN:
                    out.append(f"{mod}:{line} ({folder}) imports {imp}")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return out


def cycles(edges: dict) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_layering_holds():
    assert violations() == []


def test_every_module_is_in_a_layer_folder_or_the_top():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "emulator.py", "rounding.py"]


@pytest.mark.parametrize(
    "where, code, expected",
    [
        ("kernels/emulator.py", "from ..torchao import emulator\n", "imports higher layer safeobs.torchao"),
        ("core/verify.py", "def f():\n    from ..torch_ao import qlayers\n", "imports higher layer"),
        ("torchao/__init__.py", "def f():\n    from ..tools import serialization\n", "imports higher layer"),
        ("torchao/emulator.py", "from ..onnx import emulator as _e\n", "imports another runtime"),
        ("core/solver.py", "def f():\n    import onnxruntime\n", "imports onnxruntime"),
        ("kernels/layout.py", "from . import emulator\n", "import cycle"),
    ],
)
def test_checker_catches_a_deliberate_violation(tmp_path, where, code, expected):
    copy = tmp_path / "safeobs"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / where, "a") as f:
        f.write("\n" + code)
    found = violations(copy)
    assert any(expected in v for v in found), found

"""The package's shape, checked from the source: dependencies run one way, the two backends never
import each other, nothing imports the CLI, no import cycles, no borrowed ``_private`` names.

Layers, top to bottom (a module may import its own layer and the ones below it):

    cli  ->  API (dropcli/__init__, dropcli/api*)
         ->  engines / analysis / training / prune
         ->  the backends' graph editing (backends/, backends/torch/{model,load,save,...}, backends/onnx/model)
         ->  variants
         ->  layer and node primitives (backends/torch/{layers,rnn,fx}, backends/onnx/{builder,layers})
         ->  model, io, errors

Every import counts, also the ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dropcli"

PRIMITIVES = {
    "dropcli.backends.torch.layers", "dropcli.backends.torch.rnn", "dropcli.backends.torch.fx",
    "dropcli.backends.onnx.builder", "dropcli.backends.onnx.layers",
    # the sparse-VD / SBP nn.Modules and their KL: layers that the sparse-vd variant builds on and
    # that prune trains; they stay at their import path because users' pickles name it
    "dropcli.prune.layers",
}
# the one module allowed to import both backends: torch -> ONNX export
BRIDGE = "dropcli.backends.export"


def layer_of(mod: str) -> int:
    parts = mod.split(".")
    if mod in ("dropcli",) or (len(parts) > 1 and parts[1] == "api"):
        return 6
    top = parts[1] if len(parts) > 1 else ""
    if top == "cli":
        return 7
    if mod in PRIMITIVES:
        return 2
    if top in ("engines", "analysis", "training", "prune"):
        return 5
    if top == "backends":
        return 4
    if top == "variants":
        return 3
    if top in ("model", "io", "errors"):
        return 1
    raise AssertionError(f"{mod}: no layer assigned; place it in the tree and in this test's layer_of")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = modules()


def resolve(target: str) -> str | None:
    """The dropcli module an import refers to (a name imported from a package may be a module)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(mod: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every dropcli import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    pkg = mod if is_pkg else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "dropcli" or a.name.startswith("dropcli."):
                    found.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "dropcli" or target.startswith("dropcli.")):
                continue
            names = [a.name for a in node.names]
            submods = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if submods:
                found.extend((s, [], node.lineno) for s in submods)
                names = [n for n in names if f"{target}.{n}" not in MODULES]
                if not names:
                    continue
            found.append((target, names, node.lineno))
    return found


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def edges() -> list[tuple[str, str, list[str], int]]:
    out = []
    for m, imps in GRAPH.items():
        for target, names, line in imps:
            t = resolve(target)
            if t is not None and t != m:
                out.append((m, t, names, line))
    return out


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_dependencies_run_one_way():
    bad = [f"{m}:{line} imports {t} (layer {layer_of(t)} above {layer_of(m)})"
           for m, t, _, line in edges() if layer_of(t) > layer_of(m)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_nothing_imports_the_cli():
    bad = [f"{m}:{line} imports {t}" for m, t, _, line in edges()
           if t.startswith("dropcli.cli") and not m.startswith("dropcli.cli")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("a,b", [("torch", "onnx"), ("onnx", "torch")])
def test_backends_do_not_import_each_other(a, b):
    bad = [f"{m}:{line} imports {t}" for m, t, _, line in edges()
           if m.startswith(f"dropcli.backends.{a}") and t.startswith(f"dropcli.backends.{b}")]
    assert not bad, "\n".join(bad)
    others = [f"{m}:{line} imports {t}" for m, t, _, line in edges()
              if t.startswith(f"dropcli.backends.{b}.") and m != BRIDGE
              and m.startswith("dropcli.backends.") and not m.startswith(f"dropcli.backends.{b}")
              and m.startswith(f"dropcli.backends.{a}")]
    assert not others, "\n".join(others)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, t, _, _ in edges():
        graph[m].add(t)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_borrowed():
    bad = [f"{m}:{line} imports {n} from {t}" for m, t, names, line in edges()
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_model_layer_is_neutral():
    """model/ is backend-neutral: no torch or onnx at import time (formats.py parses ONNX lazily), and
    nothing from dropcli but model/ and errors."""
    for mod, path in MODULES.items():
        if not mod.startswith("dropcli.model"):
            continue
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert not name.startswith(("torch", "onnx")), f"{mod} imports {name} at import time"
    bad = [f"{m}:{line} imports {t}" for m, t, _, line in edges()
           if m.startswith("dropcli.model") and not t.startswith(("dropcli.model", "dropcli.errors"))]
    assert not bad, "\n".join(bad)


def test_the_checks_see_a_violation(tmp_path):
    """The walker must find function-level and relative imports (else every check above passes vacuously)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from ..cli.common import _private\n    import dropcli.engines.runner\n")
    found = imports_of("dropcli.io.x", f)
    assert ("dropcli.cli.common", ["_private"], 2) in found
    assert ("dropcli.engines.runner", [], 3) in found

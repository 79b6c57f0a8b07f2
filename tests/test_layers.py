"""medseg's modules import only from lower layers (DESIGN.md §2), so data flows one way."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "medseg"

# module (dotted, relative to medseg) → layer; a package prefix covers its modules.
LAYERS = {
    "__init__": 0, "labels": 0, "config": 0, "errors": 0,
    "data.io": 0.5,                 # reading and atomic writing, under the pipeline
    "pipeline": 0.7,                # the pipeline spec and the one implementation of every step
    "data": 1, "transforms": 1, "models": 1, "losses": 1, "metrics": 1, "postprocess": 1,
    "deeplab": 0.9,                 # a registry network, imported by models
    "light": 0.9,                   # the light student networks, imported by models
    "grad_checkpoint": 1,           # training-time wrapping of a network's blocks
    "crf": 1,                       # dense-CRF post-processing (numpy), used by the engines
    "scoring": 1,                   # rule sets as data; metrics interprets them without importing
    "uncertainty": 1,               # member statistics and case scores, torch-free, both engines
    # Per-case outputs beside a mask: read and write through data/, used by both engines.
    "volumetry": 1.5, "viewer": 1.5,
    # The preprocessed dataset and its patch loader run the MONAI transforms of transforms.py.
    "data.preprocessed": 1.5, "data.patches": 1.5,
    # Raw scanner studies (torch-free): identification and registration over data/,
    # the QC picture, and the driver that hands atlas-space cases to predict.
    "raw": 1.2, "raw.qc": 1.5, "raw.run": 2.5,
    "engine": 1.8,                  # the predictor interface both engines implement (torch-free)
    "infer": 2,
    "teacher": 2.5,                 # a teacher's stored outputs for distillation (runs infer)
    "train": 3, "evaluate": 3, "predict": 3, "export": 3, "edge": 2,
    "report": 4,                    # uses evaluate
    "cv": 4, "bundle": 4, "distill": 4.5,
    "demo": 5,                      # the README demo drives cv
    "cli": 6, "__main__": 7,
}


def _layer(mod: str) -> int:
    parts = mod.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    raise AssertionError(f"module medseg.{mod} has no layer in tests/test_layers.py")


def _type_checking_nodes(tree) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only, never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            out |= {id(n) for b in node.body for n in ast.walk(b)}
    return out


def _imports(path: Path, runtime_only: bool = False):
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n == "medseg" and isinstance(node, ast.ImportFrom):
                yield from (a.name for a in node.names)
            elif n.startswith("medseg."):
                yield n[len("medseg."):]


def test_imports_point_down():
    bad = []
    for path in PKG.rglob("*.py"):
        mod = path.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
        mod = mod.removesuffix(".__init__") if mod != "__init__" else mod
        here = _layer(mod)
        for dep in _imports(path):
            if dep == "__version__":
                continue
            same_package = dep.split(".")[0] == mod.split(".")[0]
            if _layer(dep) > here or (_layer(dep) == here and not same_package and here > 0):
                bad.append(f"medseg.{mod} (L{here}) imports medseg.{dep} (L{_layer(dep)})")
    assert not bad, "\n".join(bad)


def test_nothing_imports_cli():
    for path in PKG.rglob("*.py"):
        if path.name not in ("cli.py", "__main__.py"):
            assert "medseg.cli" not in path.read_text(), path


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod = path.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
        mod = mod.removesuffix(".__init__") if mod != "__init__" else mod
        graph[mod] = {d for d in _imports(path, runtime_only=True) if d != "__version__"}
    return graph


def test_no_import_cycles_anywhere():
    """No module reaches itself through imports, inside a package too (e.g. data/):
    a depth-first search over every import (function-level imports included)."""
    graph = _module_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)

"""The package's layering, read from the source: ``core ← data ← training``, ``core ← infer ← serve``; ``training``
and ``infer`` never import each other; only ``cli`` (and the package root's lazy API) and ``bench`` may import
everything; nothing imports ``bench``; no import cycles. Every import counts, module-level and inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "vocdet"
SHARED = {"vocdet", "vocdet.config", "vocdet.errors", "vocdet.stopping"}  # version, config, errors, stop signals
# What each part may import besides itself and SHARED.
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "training": {"core", "data", "training"},
    "infer": {"core", "infer"},
    "serve": {"core", "infer", "serve"},
    "bench": {"core", "data", "training", "infer", "serve", "bench", "cli"},
    "cli": {"core", "data", "training", "infer", "serve", "cli"},
    "root": {"core", "data", "training", "infer", "serve"},  # vocdet/__init__.py: the lazy public API
    "config": set(),
    "errors": set(),
    "stopping": set(),
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """'vocdet.infer.detector' -> 'infer'; 'vocdet' -> 'root'; 'vocdet.cli' -> 'cli'."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "root"


def vocdet_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported vocdet module, line, under ``if TYPE_CHECKING``) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            typing_only |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from vocdet.bench import load` imports the module vocdet.bench.load
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "vocdet" or name.startswith("vocdet."):
                found.append((name, node.lineno, id(node) in typing_only))
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The vocdet module an import name refers to (``vocdet.core.boxes.letterbox`` -> ``vocdet.core.boxes``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def breaches(known: dict[str, Path]) -> list[str]:
    out = []
    for mod, path in known.items():
        own = part(mod)
        for name, line, _ in vocdet_imports(path):
            target = resolve(name, known)
            if target is None or target in SHARED or part(target) == own:
                continue
            if part(target) not in ALLOWED[own]:
                out.append(f"{mod}:{line}: {own} imports {target}")
    return out


def cycles(known: dict[str, Path]) -> list[list[str]]:
    graph = {m: set() for m in known}
    for mod, path in known.items():
        for name, _, typing_only in vocdet_imports(path):
            target = resolve(name, known)
            # the package root only re-exports lazily; `from vocdet import __version__` is no cycle
            if target and target != mod and target != "vocdet" and not typing_only:
                graph[mod].add(target)
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                found.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_every_part_of_the_package_is_a_known_layer() -> None:
    assert {part(m) for m in modules()} <= set(ALLOWED)


def test_layers_import_only_downwards() -> None:
    assert breaches(modules()) == []


def test_no_import_cycles() -> None:
    assert cycles(modules()) == []


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("vocdet.infer.predict", "from vocdet.training.run import evaluate", "infer imports vocdet.training.run"),
        ("vocdet.infer.detector", "    from vocdet.training import module", "infer imports vocdet.training.module"),
        ("vocdet.core.boxes", "from vocdet.infer.detector import Detector", "core imports vocdet.infer.detector"),
        ("vocdet.serve.app", "import vocdet.bench.load", "serve imports vocdet.bench.load"),
        ("vocdet.training.run", "from vocdet.serve.app import create_app", "training imports vocdet.serve.app"),
    ],
)
def test_a_breach_is_reported(tmp_path: Path, module: str, line: str, expected: str) -> None:
    """The checker itself: the same package with one forbidden import added (inside a function where indented)."""
    known = modules()
    path = known[module]
    copy = tmp_path / path.name
    body = f"def _added():\n{line}\n" if line.startswith(" ") else f"{line}\n"
    copy.write_text(path.read_text() + "\n\n" + body)
    known[module] = copy
    found = [b for b in breaches(known) if expected in b]
    assert found, f"no breach reported for {line!r} in {module}"


def test_a_cycle_is_reported(tmp_path: Path) -> None:
    known = modules()
    copy = tmp_path / "voc.py"
    copy.write_text(known["vocdet.core.voc"].read_text() + "\n\nfrom vocdet.core.detections import Detection\n")
    known["vocdet.core.voc"] = copy
    assert any("vocdet.core.voc" in c and "vocdet.core.detections" in c for c in cycles(known))

"""The package's layers, read from its imports with ``ast``: no cycle, nothing imports upward.

Layers, top to bottom (docs/architecture.md draws them): the faces (``ray_cache``,
``api``, ``reading``, ``cli``, ``display``, ``demo`` and the public re-exports ``fs``, ``train``), then
``steering``, then ``readers`` and ``files`` (side by side: neither imports the other),
then ``cluster``, ``node``, ``store`` and ``config``. ``testing`` (the loopback servers) imports
nothing of the package but itself and is imported only by the faces (the demo) and tests.
Every import counts, including those inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set, Tuple

import ray_cache

PKG = pathlib.Path(ray_cache.__file__).parent
FACES = {"ray_cache", "api", "reading", "cli", "display", "demo", "fs", "train", "folder", "spark"}
RANK = {"faces": 6, "steering": 5, "readers": 4, "files": 4, "cluster": 3, "node": 2, "store": 1,
        "config": 0}


def modules(root: pathlib.Path = PKG) -> Dict[str, pathlib.Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["ray_cache"] + parts)] = path
    return out


def imports_of(name: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
    """The package's modules that ``name`` imports (``from pkg import mod`` names the module)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            names: List[str] = []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here[: len(here) - (node.level - 1)] + ([node.module] if node.module else [])
                bases = [".".join(base_parts)]
            else:
                bases = [node.module or ""]
            names = [a.name for a in node.names]
        else:
            continue
        for base in bases:
            if not base.startswith("ray_cache"):
                continue
            candidates = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            if candidates:
                found.update(candidates)
            else:  # the deepest known module of the dotted path
                parts = base.split(".")
                while parts and ".".join(parts) not in known:
                    parts.pop()
                if parts:
                    found.add(".".join(parts))
    found.discard(name)
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in FACES):
        return "faces"
    return parts[1]


def graph(root: pathlib.Path = PKG) -> Dict[str, Set[str]]:
    mods = modules(root)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted(m for m in graph() if layer(m) not in RANK and layer(m) != "testing")
    assert unknown == []


def upward_imports(g: Dict[str, Set[str]]) -> List[Tuple[str, str]]:
    upward: List[Tuple[str, str]] = []
    for mod, deps in g.items():
        lm = layer(mod)
        for dep in deps:
            ld = layer(dep)
            if lm == ld:
                continue
            if ld == "testing" or lm == "testing":
                # the servers import only themselves; only the faces (demo) import them
                if not (lm == "faces" and ld == "testing"):
                    upward.append((mod, dep))
                continue
            if RANK[ld] >= RANK[lm] and not (lm == "steering" and ld == "readers"):
                upward.append((mod, dep))
    return sorted(upward)


def test_no_import_runs_up_the_layers():
    assert upward_imports(graph()) == [], "imports that run up (or sideways across) the layers"


def test_steering_is_the_only_layer_above_a_sibling():
    # readers and files stand side by side: neither may import the other
    g = graph()
    sideways = [(m, d) for m, deps in g.items() for d in deps
                if {layer(m), layer(d)} == {"readers", "files"}]
    assert sideways == []


def cycles_of(g: Dict[str, Set[str]]) -> List[List[str]]:
    cycles: List[List[str]] = []
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycle():
    assert cycles_of(graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    # The same checks on a made-up package: store imports cluster (upward, in a function),
    # and two files modules import each other (one of them relatively, under TYPE_CHECKING).
    root = tmp_path / "ray_cache"
    for sub in ("store", "cluster", "files"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "config.py").write_text("X = 1\n")
    (root / "cluster" / "routing.py").write_text("from ray_cache import config\n")
    (root / "store" / "fetch.py").write_text("def f():\n    from ray_cache.cluster import routing\n")
    (root / "files" / "fs.py").write_text("from ray_cache.files.file import F\n")
    (root / "files" / "file.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .fs import G\n")
    g = graph(root)
    assert upward_imports(g) == [("ray_cache.store.fetch", "ray_cache.cluster.routing")]
    assert cycles_of(g) == [["ray_cache.files.file", "ray_cache.files.fs", "ray_cache.files.file"]]


def test_no_module_is_over_the_size_rule():
    big = sorted((p.relative_to(PKG).as_posix(), n) for p in PKG.rglob("*.py")
                 if (n := len(p.read_text().splitlines())) > 450)
    assert big == [], "modules past ~400 lines: split them by job"

"""needle's layers import downward only, and no two modules import each other (directly or in a
ring): backend -> kernels -> core -> compiler -> tensor -> {static, jit} -> library -> caffe ->
apps."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "src", "needle")

#: lowest first; a module may import its own layer and the ones before it
LAYERS = [
    ("base", ["needle._version"]),
    ("backend", ["needle.backend", "needle.backend_ndarray"]),
    # how ops compute fast (im2col, Winograd, layouts, numba loops): below the op definitions
    ("kernels", ["needle.kernels"]),
    ("core", ["needle.core"]),
    ("compiler", ["needle.compiler"]),
    ("tensor", ["needle.autograd", "needle.function", "needle.ops", "needle.profiler"]),
    ("front-ends", ["needle.static", "needle.jit"]),
    # the modular library sits on the front-ends' hooks (a module traced, a graph minimized)
    ("library", ["needle.nn", "needle.optim", "needle.init", "needle.data",
                 "needle.checkpoint", "needle.distributed"]),
    # Caffe layers wrap library pieces (SoftmaxLoss, the optimizers' update rules, save/load)
    ("caffe", ["needle.caffe"]),
    # exchange formats read and write graphs of every front-end and library module
    ("interchange", ["needle.onnx", "needle.program"]),
    # remote Sessions ship graphs with program.graph_io and run them in a static Session
    ("remote", ["needle.remote"]),
    ("apps", ["needle.apps", "needle.cli", "needle.__main__", "needle.extend", "needle"]),
]


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every file of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.join(ROOT, "..")).replace(os.sep, ".")[:-3]
                found[rel.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(module: str, path: str) -> list[tuple[str, int]]:
    """(imported needle module, line) for every import in the file, lazy ones included."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # "from pkg import submodule" imports the submodule
                target = f"{base}.{alias.name}"
                found.append((target if target in MODULES else base, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == "needle"]


def _layer(module: str) -> int:
    best, length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    return best


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) < 0] == []


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path in MODULES.items():
        for target, line in _imports(module, path):
            if _layer(target) > _layer(module):
                upward.append(f"{module}:{line} ({LAYERS[_layer(module)][0]}) imports "
                              f"{target} ({LAYERS[_layer(target)][0]})")
    assert upward == []


def test_no_import_cycles_between_modules():
    # a package's __init__ importing its own files, and files reaching their own package,
    # are how Python packages work, not cycles of design
    edges = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _ in _imports(module, path):
            if target in MODULES and not module.startswith(target + ".") \
                    and not target.startswith(module + ".") and target != module:
                edges[module].add(target)
    cycles = []
    for start in MODULES:  # depth-first search for a path back to start
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert sorted(set(cycles))[:10] == []

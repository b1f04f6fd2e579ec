"""Graphviz DOT text for a declared graph, with the part a fetch needs highlighted."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from ..core.autodiff import find_topo_sort
from ..core.registry import fmt_shape


def _label(node: Any) -> str:
    name = node.meta.name if node.meta is not None and node.meta.name else None
    op = node.op.name if node.op is not None else type(node).__name__.lower()
    shape = fmt_shape(node.shape) if hasattr(node, "shape") else "tuple"
    head = f"{name}\\n{op}" if name else op
    return f"{head}\\n{shape} {node.dtype}" if hasattr(node, "dtype") else head


def to_dot(graph: Any, fetches: Any = None) -> str:
    """DOT text of every node reachable from the graph's fetches (or from its leaves' users).

    With ``fetches``, the nodes a run of them executes are filled; others are dashed.
    """
    from .session import _flatten

    flat = _flatten(fetches)[0] if fetches is not None else []
    roots = flat or [*graph.placeholders, *graph.variables, *graph.constants]
    nodes = find_topo_sort(roots)
    needed = {id(n) for n in find_topo_sort(flat)} if flat else set()
    lines = ["digraph needle {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    for node in nodes:
        style = 'style=filled, fillcolor="#cfe8ff"' if id(node) in needed else "style=dashed"
        if not flat:
            style = "style=solid"
        lines.append(f'  n{id(node)} [label="{_label(node)}", {style}];')
    for node in nodes:
        for inp in node.inputs:
            lines.append(f"  n{id(inp)} -> n{id(node)};")
    lines.append("}")
    return "\n".join(lines)


def render(dot_text: str, path: str, fmt: str = "svg") -> bool:
    """Render DOT text to ``path`` with Graphviz's ``dot`` if it is installed; False if not."""
    exe = shutil.which("dot")
    if exe is None:
        return False
    subprocess.run([exe, f"-T{fmt}", "-o", path], input=dot_text.encode(), check=True)
    return True

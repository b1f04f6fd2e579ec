"""Graphviz DOT text for a declared graph, with the part a run of some fetches executes highlighted.

``g.to_dot()`` shows every live node of the graph (op, name, static shape, dtype);
``g.to_dot(fetches, feed_dict)`` fills the nodes that run would execute (blue), the fed
nodes (orange) and the sources it reads (green), and draws the pruned rest dashed and grey.
``render(dot_text, "graph.svg")`` calls Graphviz's ``dot`` where it is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from ..core.autodiff import find_topo_sort
from ..core.interpret import build_program
from ..core.registry import fmt_shape

_EXECUTED = 'style=filled, fillcolor="#cfe8ff"'
_FED = 'style=filled, fillcolor="#ffd8a8"'
_SOURCE = 'style=filled, fillcolor="#d3f9d8"'
_PRUNED = 'style=dashed, color="#999999", fontcolor="#999999"'


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _label(node: Any) -> str:
    name = node.meta.name if node.meta is not None and node.meta.name else None
    op = node.op.name if node.op is not None else type(node).__name__.lower()
    aval = node.aval
    if isinstance(aval, tuple) and not hasattr(aval, "shape"):
        what = f"tuple of {len(aval)}"
    else:
        what = f"{fmt_shape(aval.shape)} {aval.dtype}"
    head = f"{_escape(name)}\\n{op}" if name and name != op else op
    return f"{head}\\n{what}"


def to_dot(graph: Any, fetches: Any = None, feed_dict: dict | None = None) -> str:
    """DOT text of the graph's live nodes (and the ancestors of ``fetches``).

    With ``fetches``, the nodes a ``Session.run(fetches, feed_dict)`` would execute are filled
    blue, fed nodes orange, read sources green, and everything pruned is dashed grey.
    """
    from .fetches import flatten_fetches

    flat = flatten_fetches(fetches)[0] if fetches is not None else []
    fed = {id(n) for n in (feed_dict or {})}
    roots = [*graph.placeholders, *graph.variables, *graph.constants, *graph.nodes(), *flat]
    nodes = find_topo_sort(roots)
    styles: dict[int, str] = {}
    if flat:
        program = build_program(flat, lambda n: n.op is None or id(n) in fed)
        styles.update({id(s.node): _EXECUTED for s in program.steps})
        styles.update({id(n): _FED if id(n) in fed else _SOURCE for n in program.sources})
    lines = ["digraph needle {", "  rankdir=LR;", '  node [shape=box, fontsize=10];']
    if flat:
        lines.append("  // blue: executed, orange: fed, green: read, dashed grey: pruned")
    for node in nodes:
        style = styles.get(id(node), _PRUNED) if flat else "style=solid"
        lines.append(f'  n{id(node)} [label="{_label(node)}", {style}];')
    for node in nodes:
        for inp in node.inputs:
            edge = "" if not flat or id(node) in styles and id(node) not in fed \
                else ' [style=dashed, color="#999999"]'
            lines.append(f"  n{id(inp)} -> n{id(node)}{edge};")
    lines.append("}")
    return "\n".join(lines)


def render(dot_text: str, path: str, fmt: str | None = None) -> bool:
    """Render DOT text to ``path`` (format from the suffix, e.g. ``.svg`` / ``.png``, unless
    ``fmt`` is given) with Graphviz's ``dot``. Returns False, writing nothing, if ``dot`` is
    not installed."""
    exe = shutil.which("dot")
    if exe is None:
        return False
    fmt = fmt or (str(path).rsplit(".", 1)[-1] if "." in str(path) else "svg")
    subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot_text.encode(), check=True,
                   capture_output=True)
    return True

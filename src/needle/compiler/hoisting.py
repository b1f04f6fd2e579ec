"""Hoisting per-position subexpressions out of a fused region's element loop.

A region's members are scalar expressions over its inputs' values (``x{k}``) and each other
(``t{m}``); some inputs vary along the loop's innermost axis only (a BatchNorm's per-channel
mean, variance, weight and bias, innermost on channels-last memory and in (B, C) matrices).
Every subexpression that reads only those, scalars and constants (BatchNorm's
``weight * (1 / sqrt(var + eps))``: a division and a square root) is computed once per
position of that axis before the loop and read from an array inside it. It is the same scalar
expression on the same values, evaluated in the same types, so the results keep their bits;
the element loop no longer divides and takes square roots per element.
(compiler/fusion.py's ``_kernel_source`` generates the loops.)
"""

from __future__ import annotations

import ast


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


class _Hoister(ast.NodeTransformer):
    """Replace each maximal subexpression that reads only invariant names (and at least one
    per-position one) by a new name ``h{n}``; ``found`` lists (name, source)."""

    def __init__(self, invariant: set[str], per_position: set[str], found: list) -> None:
        self.invariant = invariant
        self.per_position = per_position
        self.found = found

    def visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, ast.expr) and not isinstance(node, (ast.Name, ast.Constant,
                                                                ast.Attribute)):
            names = _names(node)
            if names <= self.invariant and names & self.per_position:
                name = f"h{len(self.found)}"
                self.found.append((name, ast.unparse(node)))
                return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)
        return self.generic_visit(node)


def hoist(exprs: list[str], per_position: set[str], invariant: set[str],
          stores: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split the members ``t{m} = exprs[m]`` into statements run once per position
    (``column``: members, and maximal subexpressions ``h{n}``, that read only the
    ``per_position`` names, ``invariant`` ones (scalars, constants), ``np`` and each other, and
    at least one per-position value) and statements run per element (``element``: the rest,
    with those subexpressions replaced by their names); also the per-position names that the
    element statements and ``stores`` (the output writes) read (``arrays``: each becomes an
    array indexed by the position)."""
    per_position = set(per_position)
    invariant = per_position | set(invariant) | {"np"}
    column: list[str] = []
    element: list[str] = []
    hoisted: list[tuple] = []
    for m, expr in enumerate(exprs):
        tree = ast.parse(expr, mode="eval").body
        names = _names(tree)
        if names <= invariant and names & per_position:  # the whole member is per position
            column.append(f"t{m} = {expr}")
            invariant.add(f"t{m}")
            per_position.add(f"t{m}")
            continue
        rewritten = _Hoister(invariant, per_position, hoisted).visit(tree)
        element.append(f"t{m} = {ast.unparse(rewritten)}")
    column += [f"{name} = {source}" for name, source in hoisted]
    used = set()
    for line in element + stores:
        used |= _names(ast.parse(line))
    arrays = sorted(name for name in per_position | {h for h, _ in hoisted} if name in used)
    return column, element, arrays

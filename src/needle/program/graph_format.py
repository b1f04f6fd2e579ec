"""The needle-graph format's shared facts: its name and version, the optimizers a file may
name, the ops written with references, and the scopes ids live in (see ``graph_io``)."""

from __future__ import annotations

from typing import Any

from ..optim import SGD, Adam, AdamW, Optimizer

FORMAT = "needle-graph"
VERSION = 1

#: the optimizers a graph file may name (a name outside this table is an error, never an import)
OPTIMIZERS: dict[str, type[Optimizer]] = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}

#: ops with objects among their attributes, written with ``refs`` / ``branches``
SPECIAL_OPS = ("store", "assign", "apply_updates", "cond", "while_loop")
#: internal ops whose attributes are plain data
PLAIN_INTERNAL_OPS = ("group", "with_dependencies", "print")


def branches_of(op: Any) -> list[tuple[str, Any]]:
    """A cond's or while_loop's branches by their key in the file; [] for other ops."""
    if op.name == "cond":
        return [("true", op.true_branch), ("false", op.false_branch)]
    if op.name == "while_loop":
        return [("cond", op.cond_branch), ("body", op.body_branch)]
    return []


class Scope:
    """Node -> id (writer) or id -> node (reader) bindings, falling back to a parent's."""

    def __init__(self, table: dict, parent: Scope | None = None) -> None:
        self.table = table
        self.parent = parent

    def get(self, key: Any) -> Any:
        scope: Scope | None = self
        while scope is not None:
            found = scope.table.get(key)
            if found is not None:
                return found
            scope = scope.parent
        return None


__all__ = ["FORMAT", "OPTIMIZERS", "PLAIN_INTERNAL_OPS", "SPECIAL_OPS", "Scope", "VERSION",
           "branches_of"]

"""GraphWriter: the nodes of a declared graph as needle-graph data, each node written once
across calls (the format and the API are described in ``graph_io``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..autograd import Value
from ..core.registry import REGISTRY, Aval
from ..nn.module import Buffer, Parameter
from ..static import control
from ..static.nodes import Constant, Placeholder, Variable
from .encoding import ProgramError, Unencodable, encode
from .graph_format import (
    FORMAT,
    OPTIMIZERS,
    PLAIN_INTERNAL_OPS,
    SPECIAL_OPS,
    VERSION,
    Scope,
    branches_of,
)


def _refs(op: Any) -> list:
    """The leaves an op writes or updates (not inputs, so not found by walking inputs)."""
    name = op.name
    if name == "store":
        return [op.target]
    if name == "assign":
        return [op.var]
    if name == "apply_updates":
        return [*op.params, *op.optimizer.params]
    found: list = []
    for _, branch in branches_of(op):
        for step in branch.program.steps:
            found += _refs(step.op)
    return found


def _source(node: Any) -> str | None:
    return node.meta.source if node.meta is not None else None


def _node_name(node: Any) -> str | None:
    return node.meta.name if node.meta is not None else None


def _where(node: Any) -> str:
    name = _node_name(node) or (node.op.name if node.op is not None else "leaf")
    source = _source(node)
    return f"{name} ({source})" if source else name


class GraphWriter:
    """Writes the nodes of a declared graph as data, each node once across ``add`` calls."""

    def __init__(self, session: Any = None) -> None:
        self.session = session
        # id(node) -> (node, written id): the node is kept alive, so its id() stays its own
        self._written: dict[int, tuple[Any, int]] = {}
        self._optimizers: dict[int, tuple[Any, int]] = {}
        self._leaf_kinds: dict[int, str] = {}  # written id -> leaf kind
        self._leaf_names: set[str] = set()
        self._next_id = 0

    def id_of(self, node: Any) -> int:
        """The id ``add`` gave ``node``; a KeyError if no ``add`` wrote it."""
        entry = self._written.get(id(node))
        if entry is None or entry[0] is not node:
            raise KeyError(f"{node!r} has not been written by this GraphWriter")
        return entry[1]

    def add(self, roots: Iterable[Any], names: dict[str, Any] | None = None,
            ) -> tuple[dict, dict[str, np.ndarray]]:
        """The delta (JSON-able) and its arrays for every node reachable from ``roots`` and
        ``names`` that no earlier ``add`` wrote; one ProgramError lists what cannot be."""
        names = dict(names or {})
        problems: list[str] = []
        for name, node in names.items():
            if not isinstance(name, str) or not isinstance(node, Value):
                problems.append(f"name {name!r}: not a graph node ({type(node).__name__})")
        if problems:
            raise ProgramError("cannot write the graph: " + "; ".join(problems))
        job = _Job(self, problems)
        job.user_names = {id(node): name for name, node in names.items()}
        order = job.collect([*roots, *names.values()])
        for node in order:
            job.write_node(node, job.scope)
        delta = {"format": FORMAT, "version": VERSION, "nodes": job.nodes,
                 "optimizers": job.optimizer_records,
                 "names": {name: job.scope.get(id(node))[1] for name, node in names.items()
                           if job.scope.get(id(node)) is not None}}
        if problems:
            raise ProgramError("cannot write the graph: " + "; ".join(dict.fromkeys(problems)))
        # only now are the nodes recorded as written: a failed add leaves the writer as it was
        self._written.update(job.table)
        self._optimizers.update(job.optimizers)
        self._leaf_kinds.update(job.leaf_kinds)
        self._leaf_names |= job.leaf_names
        self._next_id = job.next_id
        return delta, job.arrays


class _Job:
    """One ``GraphWriter.add``: what it writes, before it is committed to the writer."""

    def __init__(self, writer: GraphWriter, problems: list[str]) -> None:
        self.writer = writer
        self.problems = problems
        self.table: dict[int, tuple[Any, int]] = {}
        self.scope = Scope(self.table, Scope(writer._written))
        self.optimizers: dict[int, tuple[Any, int]] = {}
        self.optimizer_records: list[dict] = []
        self.leaf_kinds: dict[int, str] = {}
        self.leaf_names: set[str] = set()
        self.nodes: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.next_id = writer._next_id
        self.state_targets: set[int] = set()  # id(leaf) of leaves that effects write
        self.user_names: dict[int, str] = {}
        self.within: list[str] = []  # the cond / while_loop branches being written

    def where(self, node: Any) -> str:
        """A node for an error: its name and line, and the branch it is inside."""
        return _where(node) + (f" inside {self.within[-1]}" if self.within else "")

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    # -- which nodes, in which order ------------------------------------------------------------
    def collect(self, roots: list) -> list:
        """The unwritten nodes reachable from ``roots`` (inputs and written leaves), inputs
        first."""
        order: list = []
        done: set[int] = set()
        stack: list[tuple[Any, bool]] = [(r, False) for r in reversed(roots)]
        while stack:
            node, expanded = stack.pop()
            key = id(node)
            if key in done or self.scope.get(key) is not None:
                continue
            if expanded:
                done.add(key)
                order.append(node)
                continue
            stack.append((node, True))
            if node.op is None:
                continue
            refs = _refs(node.op)
            self.state_targets.update(id(r) for r in refs)
            for dep in reversed([*node.inputs, *refs]):
                if id(dep) not in done:
                    stack.append((dep, False))
        return order

    # -- one node -------------------------------------------------------------------------------
    def write_node(self, node: Any, scope: Scope, into: list | None = None) -> None:
        nid = self.new_id()
        scope.table[id(node)] = (node, nid)
        record = self.leaf_record(node, nid) if node.op is None else self.op_record(node, nid,
                                                                                      scope)
        if record is not None:
            (self.nodes if into is None else into).append(record)

    def unique_name(self, base: str) -> str:
        taken = self.writer._leaf_names | self.leaf_names
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        self.leaf_names.add(name)
        return name

    def leaf_record(self, node: Any, nid: int) -> dict | None:
        if isinstance(node, Placeholder):
            self.leaf_kinds[nid] = "placeholder"
            return {"id": nid, "kind": "placeholder", "name": self.unique_name(node.name),
                    "shape": list(node.shape), "dtype": np.dtype(node.dtype).name,
                    "source": _source(node)}
        if isinstance(node, Variable):
            session = self.writer.session
            value = session.variable_value(node) if session is not None else node.initial_value
            return self.variable(node, nid, value, node.name, node.trainable, "variable")
        if isinstance(node, Constant):
            return self.constant(node, nid, node.value, node.name)
        if isinstance(node, control._LoopVar):
            self.problems.append(f"{_where(node)}: a while_loop's loop variable outside its loop")
            return None
        if node._data is None:
            self.problems.append(f"{_where(node)}: a leaf without a value that is not a "
                                 "placeholder, Variable or constant")
            return None
        name = self.user_names.get(id(node)) or _node_name(node)
        if isinstance(node, Parameter) or (node.requires_grad and not isinstance(node, Buffer)):
            return self.variable(node, nid, node._data, name or f"parameter_{nid}", True,
                                 "parameter")
        if isinstance(node, Buffer) or id(node) in self.state_targets:
            return self.variable(node, nid, node._data, name or f"buffer_{nid}", False,
                                 "buffer")
        return self.constant(node, nid, node._data, name or f"constant_{nid}")

    def variable(self, node: Any, nid: int, value: Any, name: str, trainable: bool,
                 origin: str) -> dict:
        key = f"value.{nid}"
        self.arrays[key] = np.array(node.device.to_numpy(value), copy=True)
        self.leaf_kinds[nid] = "variable"
        return {"id": nid, "kind": "variable", "name": self.unique_name(name), "array": key,
                "trainable": bool(trainable), "origin": origin, "source": _source(node)}

    def constant(self, node: Any, nid: int, value: Any, name: str) -> dict:
        if id(node) in self.state_targets:
            self.problems.append(f"{_where(node)}: written by an effect but saved as a constant")
        key = f"value.{nid}"
        self.arrays[key] = np.array(node.device.to_numpy(value), copy=True)
        self.leaf_kinds[nid] = "constant"
        return {"id": nid, "kind": "constant", "name": self.unique_name(name), "array": key}

    def ref(self, leaf: Any, scope: Scope, what: str, node: Any) -> int | None:
        entry = scope.get(id(leaf))
        if entry is None:
            self.problems.append(f"{_where(node)}: its {what} is not in the graph")
            return None
        nid = entry[1]
        kind = self.leaf_kinds.get(nid) or self.writer._leaf_kinds.get(nid)
        if kind != "variable":
            self.problems.append(f"{_where(node)}: its {what} was written as a {kind}, not a "
                                 "Variable (write the graph with the effect in the first add)")
        return nid

    def op_record(self, node: Any, nid: int, scope: Scope) -> dict | None:
        op = node.op
        record = REGISTRY.get(op.name)
        if record is None or not isinstance(op, record.cls):
            self.problems.append(f"{self.where(node)}: op {op.name!r} ({type(op).__name__}) "
                                 "is Python code, not a registered op")
            return None
        if record.internal and op.name not in SPECIAL_OPS + PLAIN_INTERNAL_OPS:
            self.problems.append(f"{self.where(node)}: op {op.name!r} holds Python code or "
                                 "objects and cannot be written as data")
            return None
        inputs = []
        for x in node.inputs:
            entry = scope.get(id(x))
            if entry is None:
                self.problems.append(f"{_where(node)}: an input is not in the graph")
                return None
            inputs.append(entry[1])
        out: dict[str, Any] = {"id": nid, "kind": "op", "op": op.name, "attrs": {},
                               "inputs": inputs, "refs": {}}
        aval = node.aval
        if isinstance(aval, tuple) and not isinstance(aval, Aval):
            out["shapes"] = [list(a.shape) for a in aval]
            out["dtypes"] = [np.dtype(a.dtype).name for a in aval]
        else:
            out["shape"] = list(aval.shape)
            out["dtype"] = np.dtype(aval.dtype).name
        out["name"] = _node_name(node)
        out["source"] = _source(node)
        if op.name in SPECIAL_OPS:
            self.special(node, out, scope)
            return out
        for name in record.attrs:
            if not hasattr(op, name):
                self.problems.append(f"{_where(node)}: op {op.name!r} does not keep its "
                                     f"attribute {name!r}")
                continue
            try:
                out["attrs"][name] = encode(getattr(op, name), self.arrays, f"attr.{nid}.{name}")
            except Unencodable as exc:
                self.problems.append(f"{self.where(node)}: attribute {name!r} of {op.name!r} "
                                     f"is a {exc} (not data)")
        return out

    def special(self, node: Any, out: dict, scope: Scope) -> None:
        op = node.op
        if op.name == "store":
            out["attrs"] = {"momentum": float(op.momentum)}
            out["refs"] = {"target": self.ref(op.target, scope, "target", node)}
        elif op.name == "assign":
            out["attrs"] = {"mode": op.mode}
            out["refs"] = {"var": self.ref(op.var, scope, "Variable", node)}
        elif op.name == "apply_updates":
            out["attrs"] = {"restore_grads": bool(op.restore_grads),
                            "session_storage": op.storage is not None}
            out["refs"] = {"optimizer": self.optimizer(op.optimizer, scope, node),
                           "params": [self.ref(p, scope, "parameter", node) for p in op.params]}
        elif op.name == "cond":
            out["branches"] = {key: self.branch(branch, scope, node, [])
                               for key, branch in branches_of(op)}
        else:  # while_loop
            stand_ins = []
            for s in op.stand_ins:
                sid = self.new_id()
                stand_ins.append((s, sid))
            out["stand_ins"] = [{"id": sid, "shape": list(s.shape),
                                 "dtype": np.dtype(s.dtype).name} for s, sid in stand_ins]
            out["attrs"] = {"maximum_iterations": op.maximum_iterations,
                            "iteration_limit": op.iteration_limit, "label": op.label}
            out["branches"] = {key: self.branch(branch, scope, node, stand_ins)
                               for key, branch in branches_of(op)}

    def branch(self, branch: Any, scope: Scope, node: Any, stand_ins: list) -> dict:
        """A cond / while_loop branch: its steps as op nodes visible only inside it."""
        inner = Scope({id(s): (s, sid) for s, sid in stand_ins}, scope)
        nodes: list[dict] = []
        self.within.append(f"a branch of {_where(node)}")
        try:
            for step in branch.program.steps:
                self.write_node(step.node, inner, nodes)
        finally:
            self.within.pop()
        outputs = []
        for o in branch.outputs:
            entry = inner.get(id(o))
            if entry is None:
                self.problems.append(f"{_where(node)}: a branch output is not in the graph")
                continue
            outputs.append(entry[1])
        return {"nodes": nodes, "outputs": outputs}

    def optimizer(self, opt: Any, scope: Scope, node: Any) -> int | None:
        entry = self.optimizers.get(id(opt)) or self.writer._optimizers.get(id(opt))
        if entry is not None:
            return entry[1]
        name = type(opt).__name__
        if OPTIMIZERS.get(name) is not type(opt):
            self.problems.append(f"{_where(node)}: optimizer {type(opt).__qualname__} is not "
                                 f"one a graph file can name ({', '.join(OPTIMIZERS)})")
            return None
        oid = len(self.writer._optimizers) + len(self.optimizers)
        self.optimizers[id(opt)] = (opt, oid)
        state = opt.state_dict()
        arrays: dict[str, dict[str, str]] = {}
        for index, entry_state in state["state"].items():
            arrays[str(index)] = {}
            for sname, array in entry_state.items():
                key = f"optimizer.{oid}.{index}.{sname}"
                self.arrays[key] = array
                arrays[str(index)][sname] = key
        self.optimizer_records.append({
            "id": oid, "class": name,
            "hyperparams": {k: encode(v, self.arrays, f"optimizer.{oid}.{k}")
                            for k, v in state["hyperparams"].items()},
            "fused": opt.fused, "step_count": int(state["step_count"]),
            "params": [self.ref(p, scope, "optimizer parameter", node) for p in opt.params],
            "state": arrays})
        return oid


__all__ = ["GraphWriter"]

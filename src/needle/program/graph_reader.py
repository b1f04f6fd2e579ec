"""GraphReader: needle-graph data checked whole (one ProgramError listing every problem) and
rebuilt into a declared graph, delta by delta (the format and the API are in ``graph_io``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..autograd import make_from_op
from ..compiler import fused_update
from ..core.ops_state import ApplyUpdates, Store
from ..core.registry import REGISTRY, Aval
from ..optim import SGD, Optimizer
from ..static import control
from ..static.graph import Graph
from ..static.nodes import Variable, constant, placeholder
from ..static.runtime import current_session
from ..static.state_ops import Assign
from .encoding import ProgramError, check_format, decode
from .graph_format import (
    FORMAT,
    OPTIMIZERS,
    PLAIN_INTERNAL_OPS,
    SPECIAL_OPS,
    VERSION,
    Scope,
)


def _session_value(leaf: Any) -> Any:
    """The running Session's array of a Variable: where a rebuilt state write writes."""
    return current_session().variable_value(leaf)


class GraphReader:
    """Rebuilds the nodes of ``GraphWriter`` deltas inside ``self.graph``, checking each delta
    whole before building any of it."""

    def __init__(self) -> None:
        self.graph = Graph()
        self._nodes: dict[int, Any] = {}
        self._facts: dict[int, tuple[str, Any]] = {}  # id -> (kind, Aval or tuple of Avals)
        self.optimizers: dict[int, Optimizer] = {}
        self.names: dict[str, Any] = {}
        self.initial_values: dict[str, np.ndarray] = {}

    def node(self, nid: int) -> Any:
        """The rebuilt node for the writer's id ``nid``."""
        try:
            return self._nodes[nid]
        except KeyError:
            raise KeyError(f"no node {nid} has been read") from None

    def add(self, spec: Any, arrays: dict[str, np.ndarray]) -> None:
        """Check ``spec`` (one ProgramError listing every problem), then build its nodes."""
        checked = _Checker(self, arrays)
        checked.check(spec)
        with self.graph:
            builder = _Builder(self, spec, arrays)
            builder.build_nodes(spec["nodes"], Scope(self._nodes))
        self._facts.update(checked.facts)
        for name, nid in spec.get("names", {}).items():
            self.names[name] = self._nodes[nid]
        self.graph._names.update(self.names)


class _Checker:
    """Every problem of a delta at once, before anything is built."""

    def __init__(self, reader: GraphReader, arrays: Any) -> None:
        self.reader = reader
        self.arrays = arrays if isinstance(arrays, dict) else {}
        self.problems: list[str] = []
        self.facts: dict[int, tuple[str, Any]] = {}
        self.scope = Scope(self.facts, Scope(reader._facts))
        self.optimizer_records: dict[int, dict] = {}

    def check(self, spec: Any) -> None:
        check_format(spec, FORMAT, VERSION, "graph")
        if not isinstance(self.arrays, dict) or not all(
                isinstance(a, np.ndarray) and not a.dtype.hasobject
                for a in self.arrays.values()):
            raise ProgramError("malformed graph: its arrays are not a dict of numeric arrays")
        for rec in spec.get("optimizers", []) or []:
            if isinstance(rec, dict) and isinstance(rec.get("id"), int):
                self.optimizer_records[rec["id"]] = rec
        nodes = spec.get("nodes")
        if not isinstance(nodes, list):
            raise ProgramError("malformed graph: no node list")
        self.check_nodes(nodes, self.scope)
        for rec in self.optimizer_records.values():
            self.check_optimizer(rec)
        names = spec.get("names", {})
        if not isinstance(names, dict):
            self.problems.append("malformed names")
        else:
            for name, nid in names.items():
                if self.scope.get(nid) is None:
                    self.problems.append(f"name {name!r} refers to node {nid!r}, which is not "
                                         "defined")
        if self.problems:
            raise ProgramError("invalid graph: " + "; ".join(self.problems))

    def array(self, key: Any, what: str) -> np.ndarray | None:
        array = self.arrays.get(key) if isinstance(key, str) else None
        if array is None:
            self.problems.append(f"{what}: array {key!r} is missing")
        return array

    def check_nodes(self, nodes: list, scope: Scope) -> None:
        for rec in nodes:
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), int):
                self.problems.append(f"malformed node {str(rec)[:80]}")
                continue
            nid = rec["id"]
            if scope.get(nid) is not None:
                self.problems.append(f"node {nid}: id defined twice")
            fact = self.check_node(rec, scope)
            scope.table[nid] = fact if fact is not None else ("bad", None)

    def check_node(self, rec: dict, scope: Scope) -> tuple[str, Any] | None:
        nid, kind = rec["id"], rec.get("kind")
        what = f"node {nid}"
        try:
            if kind in ("placeholder", "variable", "constant") and not isinstance(
                    rec.get("name"), str):
                raise TypeError(f"name {rec.get('name')!r} is not a string")
            if kind == "placeholder":
                shape = tuple(rec["shape"])
                if not all(d is None or (isinstance(d, int) and d >= 0) for d in shape):
                    raise ValueError(f"bad shape {list(shape)}")
                return kind, Aval(shape, _dtype(rec["dtype"]))
            if kind in ("variable", "constant"):
                array = self.array(rec.get("array"), f"{what} ({kind} {rec.get('name')!r})")
                return (kind, None) if array is None else (kind, Aval(array.shape, array.dtype))
            if kind == "op":
                return self.check_op(rec, scope)
        except (KeyError, TypeError, ValueError) as exc:
            self.problems.append(f"{what}: malformed ({exc})")
            return None
        self.problems.append(f"{what}: unknown node kind {kind!r}")
        return None

    def check_op(self, rec: dict, scope: Scope) -> tuple[str, Any] | None:
        nid, name = rec["id"], rec.get("op")
        what = f"node {nid} ({name})"
        record = REGISTRY.get(name) if isinstance(name, str) else None
        if record is None:
            self.problems.append(f"node {nid}: unknown op {name!r}")
            return None
        if record.internal and name not in SPECIAL_OPS + PLAIN_INTERNAL_OPS:
            self.problems.append(f"{what}: op {name!r} is internal and cannot be loaded")
            return None
        inputs = rec.get("inputs", [])
        found = [scope.get(i) if isinstance(i, int) else None for i in inputs]
        missing = [i for i, f in zip(inputs, found) if f is None]
        if missing:
            self.problems.append(f"{what}: inputs {missing} are not defined before it "
                                 "(missing nodes or a cycle)")
            return None
        facts: list[tuple[str, Any]] = [f for f in found if f is not None]
        if any(f[0] == "bad" for f in facts):
            return None  # its input's problem is reported already
        avals = [f[1] for f in facts]
        refs = rec.get("refs") or {}
        if name in ("store", "assign"):
            key = "target" if name == "store" else "var"
            target = self.ref(refs.get(key), scope, what)
            if target is None:
                return None
            out: Any = target
            if name == "store" and len(avals) >= 1:
                value = avals[0]
                if None not in value.shape and int(np.prod(value.shape)) != int(
                        np.prod(target.shape)):
                    self.problems.append(f"{what}: value {list(value.shape)} does not fit "
                                         f"the target {list(target.shape)}")
        elif name == "apply_updates":
            oid = refs.get("optimizer")
            opt = self.optimizer_records.get(oid) if isinstance(oid, int) else None
            if opt is None and oid not in self.reader.optimizers:
                self.problems.append(f"{what}: optimizer {oid!r} is not defined")
            params = refs.get("params", [])
            if len(params) != len(avals):
                self.problems.append(f"{what}: {len(params)} parameters for {len(avals)} "
                                     "gradients")
            for p, grad in zip(params, avals):
                target = self.ref(p, scope, what)
                if target is not None and tuple(target.shape) != tuple(grad.shape):
                    self.problems.append(f"{what}: gradient {list(grad.shape)} for a "
                                         f"parameter {list(target.shape)}")
            if opt is not None:
                for p in opt.get("params", []):
                    if self.ref(p, scope, f"optimizer {oid}") is None:
                        break
            out = Aval((), np.dtype("float32"))
        elif name == "cond":
            out = self.check_cond(rec, scope, avals, what)
        elif name == "while_loop":
            out = self.check_while(rec, scope, avals, what)
        else:
            try:
                op = _make_op(rec, self.arrays)
                out = op.infer(*avals)
            except ProgramError as exc:
                self.problems.append(f"{what}: {exc}")
                return None
            except Exception as exc:  # noqa: BLE001 - reported with the node, nothing runs
                self.problems.append(f"{what}: {type(exc).__name__}: {exc}")
                return None
        if out is None:
            return None
        self.check_stored_shape(rec, out, what)
        return "op", out

    def check_stored_shape(self, rec: dict, out: Any, what: str) -> None:
        outs = [out] if isinstance(out, Aval) else list(out)
        stored = [rec.get("shape")] if "shape" in rec else list(rec.get("shapes") or [])
        if len(stored) != len(outs):
            self.problems.append(f"{what}: {len(outs)} outputs, {len(stored)} stored shapes")
            return
        for aval, shape in zip(outs, stored):
            if shape is None:
                continue
            if len(shape) != len(aval.shape) or any(
                    a is not None and b is not None and a != b for a, b in zip(shape, aval.shape)):
                self.problems.append(f"{what}: shape {tuple(aval.shape)} disagrees with the "
                                     f"stored {tuple(shape)}")

    def ref(self, nid: Any, scope: Scope, what: str) -> Aval | None:
        fact = scope.get(nid) if isinstance(nid, int) else None
        if fact is None or fact[0] != "variable":
            self.problems.append(f"{what}: refers to {nid!r}, which is not a Variable defined "
                                 "before it")
            return None
        return fact[1]

    def check_branch(self, sub: Any, scope: Scope, what: str) -> list | None:
        if not isinstance(sub, dict) or not isinstance(sub.get("nodes"), list):
            self.problems.append(f"{what}: malformed branch")
            return None
        before = len(self.problems)
        self.check_nodes(sub["nodes"], scope)
        found = [scope.get(o) if isinstance(o, int) else None for o in sub.get("outputs", [])]
        outs: list[tuple[str, Any]] = [o for o in found if o is not None]
        if len(outs) != len(found):
            self.problems.append(f"{what}: a branch output is not defined")
            return None
        if len(self.problems) > before or any(o[0] == "bad" or o[1] is None for o in outs):
            return None
        return [o[1] for o in outs]

    def check_cond(self, rec: dict, scope: Scope, avals: list, what: str) -> Any:
        branches = rec.get("branches") or {}
        outs = [self.check_branch(branches.get(k), Scope({}, scope), f"{what} {k} branch")
                for k in ("true", "false")]
        if outs[0] is None or outs[1] is None:
            return None
        if len(outs[0]) != len(outs[1]):
            self.problems.append(f"{what}: the branches return {len(outs[0])} and "
                                 f"{len(outs[1])} values")
            return None
        return tuple(outs[0])

    def check_while(self, rec: dict, scope: Scope, avals: list, what: str) -> Any:
        stand_ins = rec.get("stand_ins") or []
        n = len(stand_ins)
        inner: dict = {}
        for s, init in zip(stand_ins, avals):
            inner[s["id"]] = ("stand_in", Aval(tuple(s["shape"]), _dtype(s["dtype"])))
            if tuple(s["shape"]) != tuple(init.shape):
                self.problems.append(f"{what}: loop variable {list(init.shape)} vs its stand-in "
                                     f"{s['shape']}")
        if n > len(avals):
            self.problems.append(f"{what}: {n} loop variables, {len(avals)} inputs")
            return None
        branches = rec.get("branches") or {}
        cond_out = self.check_branch(branches.get("cond"), Scope({}, Scope(inner, scope)),
                                     f"{what} cond branch")
        body_out = self.check_branch(branches.get("body"), Scope({}, Scope(inner, scope)),
                                     f"{what} body branch")
        if cond_out is None or body_out is None:
            return None
        if len(cond_out) != 1 or len(body_out) != n:
            self.problems.append(f"{what}: the cond branch must return 1 value and the body "
                                 f"{n}")
            return None
        return tuple(avals[:n])

    def check_optimizer(self, rec: dict) -> None:
        oid = rec.get("id")
        what = f"optimizer {oid}"
        name = rec.get("class")
        cls = OPTIMIZERS.get(name) if isinstance(name, str) else None
        if cls is None:
            self.problems.append(f"{what}: unknown optimizer {name!r} (known: "
                                 f"{', '.join(OPTIMIZERS)})")
            return
        try:
            hyper = {k: decode(v, self.arrays, None) for k, v in rec["hyperparams"].items()}
            allowed = set(cls.hyperparams) | {"initial_lr"}
            unknown = sorted(set(hyper) - allowed)
            required = set(cls.hyperparams) - ({"dampening"} if cls is SGD else set())
            missing = sorted(required - set(hyper))
            if unknown or missing:
                raise ValueError(f"hyperparameters: unknown {unknown}, missing {missing}")
            cls._check_hyperparams(f"{what} ({name})",
                                   {k: v for k, v in hyper.items() if v is not None})
            if not isinstance(rec["step_count"], int) or rec["step_count"] < 0:
                raise ValueError(f"step count {rec['step_count']!r}")
            if rec.get("fused") not in (None, True, False):
                raise ValueError(f"fused {rec.get('fused')!r}")
            if rec.get("fused") is True and not fused_update.available():
                raise ValueError("it was saved with fused=True, which needs numba: pip install "
                                 "'needle[fast]'")
            params = rec["params"]
            shapes: list[Any] = []
            for p in params:
                fact = self.scope.get(p) if isinstance(p, int) else None
                if fact is None or fact[0] != "variable":
                    raise ValueError(f"parameter {p!r} is not a Variable of the graph")
                shapes.append(fact[1].shape if fact[1] is not None else None)
            names = (("u",) if hyper.get("momentum") else ()) if cls is SGD else cls.state_names
            for index, entry in rec["state"].items():
                i = int(index)
                if not 0 <= i < len(params):
                    raise ValueError(f"state for parameter {i} of {len(params)}")
                if set(entry) != set(names):
                    raise ValueError(f"parameter {i}: state names {sorted(entry)}, expected "
                                     f"{sorted(names)}")
                for sname, key in entry.items():
                    array = self.array(key, f"{what} state {i}.{sname}")
                    if array is not None and shapes[i] is not None and \
                            tuple(array.shape) != tuple(shapes[i]):
                        raise ValueError(f"state {i}.{sname} {array.shape} vs parameter "
                                         f"{shapes[i]}")
        except ProgramError as exc:
            self.problems.append(f"{what}: {exc}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.problems.append(f"{what}: malformed ({exc})")


def _dtype(name: Any) -> np.dtype:
    if not isinstance(name, str):
        raise TypeError(f"dtype {name!r}")
    dtype = np.dtype(name)
    if dtype.hasobject:
        raise ValueError(f"dtype {name!r}")
    return dtype


def _make_op(rec: dict, arrays: dict) -> Any:
    record = REGISTRY[rec["op"]]
    attrs = rec.get("attrs") or {}
    unknown = [k for k in attrs if k not in record.attrs]
    if unknown:
        raise ProgramError(f"unknown attributes {unknown}")
    return record.cls(**{k: decode(v, arrays, None) for k, v in attrs.items()})


class _Builder:
    """Makes the nodes of a checked delta inside the reader's graph."""

    def __init__(self, reader: GraphReader, spec: dict, arrays: dict) -> None:
        self.reader = reader
        self.arrays = arrays
        self.optimizer_records = {rec["id"]: rec for rec in spec.get("optimizers", [])}
        self.names = {nid: name for name, nid in spec.get("names", {}).items()}

    def build_nodes(self, nodes: list, scope: Scope) -> list:
        built = []
        for rec in nodes:
            node = self.build(rec, scope)
            scope.table[rec["id"]] = node
            built.append(node)
        return built

    def build(self, rec: dict, scope: Scope) -> Any:
        kind = rec["kind"]
        if kind == "placeholder":
            return placeholder(tuple(rec["shape"]), rec["dtype"], name=rec["name"])
        if kind == "variable":
            var = Variable(self.arrays[rec["array"]], name=rec["name"],
                           trainable=rec.get("trainable", True))
            self.reader.initial_values[var.name] = var.initial_value
            return var
        if kind == "constant":
            return constant(self.arrays[rec["array"]], name=rec["name"])
        return self.build_op(rec, scope)

    def build_op(self, rec: dict, scope: Scope) -> Any:
        name = rec["op"]
        inputs = tuple(scope.get(i) for i in rec["inputs"])
        refs = rec.get("refs") or {}
        attrs = rec.get("attrs") or {}
        op: Any
        if name == "store":
            op = Store(scope.get(refs["target"]), attrs.get("momentum", 1.0),
                       storage=_session_value)
        elif name == "assign":
            op = Assign(scope.get(refs["var"]), attrs.get("mode", "set"))
        elif name == "apply_updates":
            op = ApplyUpdates(self.optimizer(refs["optimizer"], scope),
                              tuple(scope.get(p) for p in refs["params"]),
                              storage=_session_value if attrs.get("session_storage", True)
                              else None,
                              restore_grads=bool(attrs.get("restore_grads", True)))
        elif name == "cond":
            op = self.cond_op(rec, scope, inputs)
        elif name == "while_loop":
            op = self.while_op(rec, scope, inputs)
        else:
            op = _make_op(rec, self.arrays)
        node = make_from_op(op, inputs)
        if node.meta is not None:
            if rec.get("name"):
                node.meta.name = rec["name"]
            if rec.get("source"):
                node.meta.source = rec["source"]
        return node

    def optimizer(self, oid: int, scope: Scope) -> Optimizer:
        opt = self.reader.optimizers.get(oid)
        if opt is not None:
            return opt
        rec = self.optimizer_records[oid]
        cls = OPTIMIZERS[rec["class"]]
        hyper = {k: decode(v, self.arrays, None) for k, v in rec["hyperparams"].items()}
        opt = cls([scope.get(p) for p in rec["params"]], lr=hyper["lr"], fused=rec.get("fused"))
        opt.load_state_dict({
            "optimizer": cls.__name__, "hyperparams": hyper, "step_count": rec["step_count"],
            "state": {int(i): {s: self.arrays[key] for s, key in entry.items()}
                      for i, entry in rec["state"].items()}})
        self.reader.optimizers[oid] = opt
        return opt

    def sub_builder(self, sub: dict, scope: Scope, bound: dict | None = None,
                    ) -> Callable[[], list]:
        """A function that makes a branch's nodes (its stand-ins bound to ``bound``)."""
        def build() -> list:
            inner = Scope({}, Scope(dict(bound or {}), scope))
            self.build_nodes(sub["nodes"], inner)
            return [inner.get(o) for o in sub["outputs"]]
        return build

    def cond_op(self, rec: dict, scope: Scope, inputs: tuple) -> Any:
        branches = rec["branches"]
        true_branch = control._Branch(self.sub_builder(branches["true"], scope), "cond: true_fn")
        false_branch = control._Branch(self.sub_builder(branches["false"], scope),
                                       "cond: false_fn")
        op = control.Cond(true_branch, false_branch, list(inputs[1:]))
        return control._mark_effects(op, true_branch, false_branch)

    def while_op(self, rec: dict, scope: Scope, inputs: tuple) -> Any:
        spec_stand_ins = rec["stand_ins"]
        n = len(spec_stand_ins)
        stand_ins = [control._loop_var(x, i) for i, x in enumerate(inputs[:n])]
        ids = [s["id"] for s in spec_stand_ins]
        internal = {id(s) for s in stand_ins}
        branches = rec["branches"]
        bound = dict(zip(ids, stand_ins))
        cond_branch = control._Branch(self.sub_builder(branches["cond"], scope, bound),
                                      "while_loop: cond_fn", internal)
        body_branch = control._Branch(self.sub_builder(branches["body"], scope, bound),
                                      "while_loop: body_fn", internal)

        def cond_fn(*state: Any) -> Any:  # re-made for a gradient, as the user's cond_fn
            return self.sub_builder(branches["cond"], scope, dict(zip(ids, state)))()[0]

        def body_fn(*state: Any) -> Any:
            return self.sub_builder(branches["body"], scope, dict(zip(ids, state)))()

        attrs = rec.get("attrs") or {}
        op = control.WhileLoop(cond_fn, body_fn, stand_ins, cond_branch, body_branch,
                               list(inputs[n:]), attrs.get("maximum_iterations"),
                               attrs.get("iteration_limit"), attrs.get("label") or "while_loop",
                               rec.get("source"))
        return control._mark_effects(op, cond_branch, body_branch)


__all__ = ["GraphReader"]

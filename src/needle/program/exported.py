"""ExportedProgram: a traced function as data, saved and loaded without the code that built it.

``ndl.export(fn_or_module, *example_inputs)`` traces with the JIT's tracer and keeps the
optimized graph as a list of registered ops with their attributes, the parameters and
constants it reads as arrays, and the input signature. ``prog.save(path)`` writes it into
needle's data-only archive (arrays with SHA-256, metadata as JSON, atomic); ``load_program``
reads it back, rebuilding each op from the registry by name: nothing in the file runs but
registered ops. Calling the program applies those ops to the inputs, so it runs eagerly,
inside a declared graph (placeholders in, lazy nodes out) and under ``ndl.jit`` alike.

File layout (format ``needle-program``, version 1), inside the checkpoint archive::

    program = {"format": "needle-program", "version": 1,
               "inputs": [{"id", "name", "shape" (None: the batch), "dtype"}],
               "values": [{"id", "array"}],              # parameters, buffers, constants
               "nodes":  [{"id", "op", "attrs", "inputs", "shape", "dtype", "source"}],
               "outputs": [ids], "single_output": bool, "training": bool | None,
               "arrays": {name: array}}
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import checkpoint
from ..autograd import Tensor, Value, make_from_op
from ..backend import cpu
from ..core.context import tracing, watching_nodes
from ..core.interpret import build_program
from ..core.registry import REGISTRY, Aval
from ..core.source import user_source
from ..jit import jit
from ..jit.tracing import Trace, TraceInput, trace_input
from .encoding import (
    Batch,
    ProgramError,
    Unencodable,
    check_format,
    decode,
    encode,
    has_batch,
)

FORMAT = "needle-program"
VERSION = 1


class ExportedProgram:
    """A traced graph of registered ops with its arrays: call it, print it, save it."""

    def __init__(self, spec: dict, arrays: dict[str, np.ndarray]) -> None:
        _validate(spec, arrays)
        self.spec = spec
        self.arrays = arrays
        self.input_names = [i["name"] for i in spec["inputs"]]
        self._values = {v["id"]: Tensor.make_const(arrays[v["array"]]) for v in spec["values"]}
        self._ops: dict[int | None, list] = {}  # batch size (None: fixed) -> op per node

    # -- running -----------------------------------------------------------------------------
    def _ops_for(self, batch: int | None) -> list:
        """Each node's op, attributes resolved for ``batch`` (built once per batch size)."""
        key = batch if any(has_batch(n["attrs"]) for n in self.spec["nodes"]) else None
        ops = self._ops.get(key)
        if ops is None:
            if len(self._ops) >= 16:  # bounded: one entry per batch size seen recently
                self._ops.pop(next(iter(self._ops)))
            ops = [_make_op(n, self.arrays, key) for n in self.spec["nodes"]]
            self._ops[key] = ops
        return ops

    def __call__(self, *inputs: Any) -> Any:
        """Apply the program to ``inputs`` (Tensors or arrays, in the exported order)."""
        declared = self.spec["inputs"]
        if len(inputs) != len(declared):
            raise TypeError(f"program takes {len(declared)} inputs "
                            f"({', '.join(self.input_names)}), got {len(inputs)}")
        env: dict[int, Any] = dict(self._values)
        batch = None
        for given, spec in zip(inputs, declared):
            tensor: Any = given if isinstance(given, Value) else Tensor(np.asarray(given),
                                                                        requires_grad=False)
            _check_input(spec, tensor)
            if spec["shape"] and spec["shape"][0] is None:
                batch = tensor.shape[0] if tensor.shape[0] is not None else batch
            env[spec["id"]] = tensor
        for node, op in zip(self.spec["nodes"], self._ops_for(batch)):
            env[node["id"]] = make_from_op(op, tuple(env[i] for i in node["inputs"]))
        outputs = [env[i] for i in self.spec["outputs"]]
        return outputs[0] if self.spec["single_output"] else tuple(outputs)

    # -- showing and saving ------------------------------------------------------------------
    def __str__(self) -> str:
        """The program as jaxpr-style text (traced on value-less inputs; nothing computed)."""
        stand_ins = [trace_input(_Like(spec), spec["name"]) for spec in self.spec["inputs"]]
        with tracing(Trace()):
            out = self(*stand_ins)
        outputs = [out] if self.spec["single_output"] else list(out)
        ids = {id(s) for s in stand_ins}
        return str(build_program(outputs, lambda n: n.op is None or id(n) in ids))

    def __repr__(self) -> str:
        sig = ", ".join(f"{i['name']}: {i['dtype']}{_shape_text(i['shape'])}"
                        for i in self.spec["inputs"])
        return f"ExportedProgram(({sig}), {len(self.spec['nodes'])} ops)"

    def save(self, path: str | os.PathLike) -> None:
        """Write the program into needle's data-only archive at ``path`` (atomically)."""
        checkpoint.save(path, program={**self.spec, "arrays": self.arrays})


class _Like:
    """Shape and dtype of a declared input, for a trace stand-in."""

    def __init__(self, spec: dict) -> None:
        self.shape = tuple(spec["shape"])
        self.dtype = np.dtype(spec["dtype"])
        self.requires_grad = False
        self.device = cpu()


def _shape_text(shape: list) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _check_input(spec: dict, tensor: Any) -> None:
    shape = tuple(tensor.shape)
    declared = spec["shape"]
    if len(shape) != len(declared) or any(d is not None and d != n
                                          for d, n in zip(declared, shape)):
        raise ValueError(f"program input {spec['name']!r}: expected shape "
                         f"{_shape_text(declared)}, got {shape}")
    if np.dtype(tensor.dtype) != np.dtype(spec["dtype"]):
        raise ValueError(f"program input {spec['name']!r}: expected dtype {spec['dtype']}, "
                         f"got {tensor.dtype}")


def _make_op(node: dict, arrays: dict, batch: int | None) -> Any:
    record = REGISTRY[node["op"]]
    attrs = {name: decode(value, arrays, batch) for name, value in node["attrs"].items()}
    return record.cls(**attrs)


# -- loading: everything checked before anything runs -------------------------------------------
def _validate(spec: Any, arrays: dict) -> None:
    """Every problem of a program's graph at once, as one ProgramError."""
    check_format(spec, FORMAT, VERSION, "program")
    problems: list[str] = []
    defined: set[int] = set()
    for item in spec.get("inputs", []):
        defined.add(item["id"])
    for item in spec.get("values", []):
        if item.get("array") not in arrays:
            problems.append(f"value {item.get('id')}: array {item.get('array')!r} is missing")
        defined.add(item["id"])
    for node in spec.get("nodes", []):
        op = node.get("op")
        record = REGISTRY.get(op)
        if record is None:
            problems.append(f"node {node.get('id')}: unknown op {op!r}")
        elif record.internal:
            problems.append(f"node {node.get('id')}: op {op!r} is internal and cannot be loaded")
        missing = [i for i in node.get("inputs", []) if i not in defined]
        if missing:
            problems.append(f"node {node.get('id')} ({op}): inputs {missing} are not defined "
                            "before it (missing nodes or a cycle)")
        if node.get("id") in defined:
            problems.append(f"node {node.get('id')}: id defined twice")
        defined.add(node.get("id"))
    missing_out = [i for i in spec.get("outputs", []) if i not in defined]
    if missing_out:
        problems.append(f"outputs {missing_out} are not defined")
    if not problems:
        problems += _shape_problems(spec, arrays)
    if problems:
        raise ProgramError("invalid program: " + "; ".join(problems))


def _shape_problems(spec: dict, arrays: dict) -> list[str]:
    """Run every op's shape rule on the declared inputs; name nodes that disagree."""
    avals: dict[int, Any] = {}
    for item in spec["inputs"]:
        avals[item["id"]] = Aval(tuple(item["shape"]), np.dtype(item["dtype"]))
    for item in spec["values"]:
        array = arrays[item["array"]]
        avals[item["id"]] = Aval(tuple(array.shape), array.dtype)
    problems = []
    for node in spec["nodes"]:
        try:
            op = _make_op(node, arrays, None)
            if any(has_batch(v) for v in node["attrs"].values()):
                avals[node["id"]] = Aval(tuple(node["shape"]), np.dtype(node["dtype"]))
                continue  # its attributes depend on the batch size: checked when it runs
            aval = op.infer(*[avals[i] for i in node["inputs"]])
        except Exception as exc:  # noqa: BLE001 - reported with the node, nothing runs
            problems.append(f"node {node['id']} ({node['op']}): {exc}")
            avals[node["id"]] = Aval(tuple(node.get("shape") or ()), np.dtype("float32"))
            continue
        avals[node["id"]] = aval
        if hasattr(aval, "shape"):
            stored = tuple(node["shape"]) if node.get("shape") is not None else None
            if stored is not None and (len(stored) != len(aval.shape) or any(
                    a is not None and b is not None and a != b
                    for a, b in zip(stored, aval.shape))):
                problems.append(f"node {node['id']} ({node['op']}): shape {aval.shape} "
                                f"disagrees with the stored {stored}")
    return problems


def load_program(path: str | os.PathLike) -> ExportedProgram:
    """An ExportedProgram from a file written by ``prog.save``; one ProgramError (or
    CheckpointError for a damaged archive) naming every problem, nothing executed."""
    data = checkpoint.load(path)
    program = data.get("program")
    if not isinstance(program, dict):
        raise ProgramError(f"{os.fspath(path)}: not a needle program")
    arrays = program.pop("arrays", {})
    if not isinstance(arrays, dict):
        raise ProgramError(f"{os.fspath(path)}: malformed arrays")
    return ExportedProgram(program, arrays)


# -- exporting ----------------------------------------------------------------------------------
def _trace(fn: Callable, inputs: list, sources: dict) -> Any:
    """The optimized Program of ``fn`` on ``inputs``; ``sources`` gets each node's user line."""
    def note(node: Any) -> None:
        sources[id(node)] = user_source()

    with watching_nodes(note):
        return jit(fn).lower(*inputs)


def _with_batch(value: Any, batch: int) -> Tensor:
    array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
    reps = int(np.ceil(batch / array.shape[0]))
    return Tensor(np.concatenate([array] * reps)[:batch], requires_grad=False)


def export(fn: Any, *example_inputs: Any, dynamic_batch: bool = True,
           input_names: list[str] | None = None) -> ExportedProgram:
    """Trace ``fn`` (a function of Tensors, or an ``nn.Module``) on ``example_inputs`` into an
    ExportedProgram. With ``dynamic_batch`` the first dimension of every input is the batch:
    the function is traced at a second batch size too, and attributes that follow it
    (reshape targets) become ``k * batch``; anything else that depends on it is refused.
    A module runs in the mode (train / eval) it was exported in. A ``needle.caffe`` Net is
    exported as its inference function (``net.inference_function()``: test phase, losses
    and accuracies dropped), its inputs named after its blobs; without example inputs, zeros
    of the shapes its spec declares stand in."""
    fn, example_inputs, input_names = _net_function(fn, example_inputs, input_names)
    inputs = [x if isinstance(x, Tensor) else Tensor(np.asarray(x), requires_grad=False)
              for x in example_inputs]
    if not inputs:
        raise ProgramError("export: give at least one example input")
    names = list(input_names or [f"x{i}" for i in range(len(inputs))])
    sources: dict[int, str | None] = {}
    program = _trace(fn, inputs, sources)
    other = None
    batch = inputs[0].shape[0] if inputs[0].shape else None
    if dynamic_batch:
        if batch is None or any(not x.shape or x.shape[0] != batch for x in inputs):
            raise ProgramError("export: dynamic_batch needs every input to share its first "
                               "dimension (pass dynamic_batch=False otherwise)")
        other = _trace(fn, [_with_batch(x, batch + 3) for x in inputs], {})
    training = getattr(fn, "training", None)
    return _to_program(program, other, batch,
                       batch + 3 if other is not None and batch is not None else None,
                       names, sources, training)


def _net_function(fn: Any, examples: tuple, names: list[str] | None) -> tuple:
    """A caffe Net (or its NetFunction) as the function to trace, its example inputs (cast
    to the Net's dtype, or made from its declared shapes) and its input names."""
    from ..caffe.inference import NetFunction
    from ..caffe.net import Net

    if isinstance(fn, Net):
        fn = fn.inference_function()
    if not isinstance(fn, NetFunction):
        return fn, examples, names
    return fn, tuple(fn.example_inputs(examples)), names or fn.input_names


def _to_program(program: Any, other: Any, b1: int | None, b2: int | None, names: list[str],
                sources: dict, training: Any) -> ExportedProgram:
    arrays: dict[str, np.ndarray] = {}
    ids: dict[int, int] = {}
    spec: dict[str, Any] = {"format": FORMAT, "version": VERSION, "inputs": [], "values": [],
                            "nodes": [], "outputs": [], "single_output": True,
                            "training": None if training is None else bool(training)}
    # the call's stand-ins are named arg0, arg1, ... by the tracer; other sources hold data
    stand_ins = {node.meta.name: node for node in program.sources
                 if isinstance(node, TraceInput) and node.meta is not None}
    for i, name in enumerate(names):
        node = stand_ins.get(f"arg{i}")
        if node is None:
            raise ProgramError(f"export: input {name!r} is not used by the function")
        ids[id(node)] = i
        shape: list | None = list(node.aval.shape)
        if other is not None and shape:
            shape[0] = None
        spec["inputs"].append({"id": i, "name": name, "shape": shape,
                               "dtype": np.dtype(node.aval.dtype).name})
    next_id = len(names)
    for node in program.sources:
        if id(node) in ids:
            continue
        if node._data is None:
            raise ProgramError("export: the function reads a value-less tensor that is not an "
                               "input (a placeholder of a declared graph?)")
        ids[id(node)] = next_id
        key = f"value.{next_id}"
        arrays[key] = np.ascontiguousarray(node.device.to_numpy(node._data))
        spec["values"].append({"id": next_id, "array": key})
        next_id += 1
    for slot, value in program.constants.items():
        ids[slot] = next_id
        key = f"constant.{next_id}"
        arrays[key] = np.ascontiguousarray(np.asarray(value))
        spec["values"].append({"id": next_id, "array": key})
        next_id += 1
    problems = []
    other_steps = other.steps if other is not None else None
    if other_steps is not None and [s.op.name for s in other_steps] != \
            [s.op.name for s in program.steps]:
        raise ProgramError("export: the function traces to different graphs at two batch "
                           "sizes; export it with dynamic_batch=False")
    for k, step in enumerate(program.steps):
        ids[step.out] = next_id
        record = REGISTRY.get(step.op.name)
        where = sources.get(id(step.node)) or "<unknown>"
        if record is None or record.internal or step.op.side_effect:
            problems.append(f"{step.op.name} at {where}: "
                            + ("an effect (training state) cannot be exported yet"
                               if step.op.side_effect else "not a registered op"))
            next_id += 1
            continue
        attrs = {}
        for name in record.attrs:
            value = getattr(step.op, name, _MISSING)
            if other_steps is not None and value is not _MISSING:
                value = _symbolic(value, getattr(other_steps[k].op, name, _MISSING), b1, b2,
                                  f"{step.op.name}.{name} at {where}", problems)
            try:
                attrs[name] = encode(value, arrays, f"attr.{next_id}.{name}") \
                    if value is not _MISSING else None
            except Unencodable as exc:
                problems.append(f"{step.op.name} at {where}: attribute {name!r} is a "
                                f"{exc} (not data)")
            if value is _MISSING:
                problems.append(f"{step.op.name} at {where}: attribute {name!r} is not kept "
                                "by the op")
        aval = step.node.aval
        shape = list(aval.shape) if hasattr(aval, "shape") else None
        if shape is not None and other_steps is not None and shape:
            other_aval = other_steps[k].node.aval
            shape = [None if a != b else a for a, b in zip(shape, other_aval.shape)]
        spec["nodes"].append({
            "id": next_id, "op": step.op.name, "attrs": attrs,
            "inputs": [ids[s] for s in step.inputs], "shape": shape,
            "dtype": np.dtype(aval.dtype).name if hasattr(aval, "dtype") else None,
            "source": where})
        next_id += 1
    if problems:
        raise ProgramError("export: " + "; ".join(problems))
    outputs = program.outputs[: len(program.outputs) - _residual_count(program)]
    spec["outputs"] = [ids[s] for s in outputs]
    spec["single_output"] = len(spec["outputs"]) == 1
    return ExportedProgram(spec, arrays)


_MISSING = object()


def _residual_count(program: Any) -> int:
    """Outputs after the function's own (random values a gradient plan would need)."""
    return sum(1 for s in program.steps if s.op.random and s.out in program.outputs)


def _symbolic(a: Any, b: Any, b1: int | None, b2: int | None, what: str,
              problems: list[str]) -> Any:
    """``a`` with the parts that follow the batch size (``k * b1`` here, ``k * b2`` in the
    other trace) written as ``Batch(k)``; a part that changes otherwise is a problem."""
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        items = [_symbolic(x, y, b1, b2, what, problems) for x, y in zip(a, b)]
        return tuple(items) if isinstance(a, tuple) else items
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and \
            a.shape == b.shape and np.array_equal(a, b)
        if not same:
            problems.append(f"{what} depends on the batch size")
        return a
    if a == b:
        return a
    if isinstance(a, int) and isinstance(b, int) and b1 and b2 and a % b1 == 0 and \
            b % b2 == 0 and a // b1 == b // b2:
        return Batch(a // b1)
    problems.append(f"{what} depends on the batch size ({a!r} vs {b!r})")
    return a


__all__ = ["ExportedProgram", "FORMAT", "VERSION", "export", "load_program"]

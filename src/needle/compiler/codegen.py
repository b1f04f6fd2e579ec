"""The code generator: a Program as one generated straight-line Python function.

The Session, the JIT and the branches of cond / while_loop run their programs through it;
``core/interpret.py`` keeps the IR (Program, Step) and the walking interpreter it falls back to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.context import _get as _thread_state
from ..core.interpret import Program, Step, snapshot, snapshot_slots, step_error


def _inline(step: Step, args: list[str]) -> str | None:
    """``step.op.emit`` where every shape involved is known, else None."""
    node = step.node
    if step.op.name == "tuple_get_item":  # indexing a tuple: no shape involved (~30 steps of
        return step.op.emit(args, node)  # a jitted MLP-ResNet step were Python calls)
    for value in (node, *node.inputs):
        aval = value.aval
        if not hasattr(aval, "shape") or None in aval.shape:
            return None
    return step.op.emit(args, node)


def _bind_helpers(op: Any, bound: dict[str, Any]) -> bool:
    """Bind the functions an op's emitted expressions call besides ``np`` (its class
    attribute ``emit_helpers``: name -> function); False if a name is bound to another object."""
    return all(bound.setdefault(name, helper) is helper
               for name, helper in op.emit_helpers.items())


class CompiledProgram:
    """A Program as one generated Python function: ``outputs = compiled(source_values)``.

    Each slot becomes a local variable, each step one line ``v7 = f7(v3, s0)`` calling the op's
    bound ``compute``, each free a ``del``; constants and the compute functions are bound as
    default arguments (fast local loads). Nothing is looked up per step at run time, which
    is where a walking interpreter spends its time on graphs of small ops.

    While ``ndl.profile()`` is active in the calling thread, a call runs a second generated
    function instead (``profiled=True``: the same lines, each step between a clock read and
    a call recording it), made at the first such call; the usual one is left unchanged.
    """

    def __init__(self, program: Program, inplace: dict[int, int] | None = None,
                 profiled: bool = False) -> None:
        self.program = program
        self._inplace = inplace
        self._profiled: CompiledProgram | None = None
        direct = inplace is not None
        inplace = inplace or {}
        names: dict[int, str] = {}
        for i, node in enumerate(program.sources):
            names[id(node)] = f"s{i}"
        bound: dict[str, Any] = {}
        for i, (slot, value) in enumerate(program.constants.items()):
            names[slot] = f"c{i}"
            bound[f"c{i}"] = value
        for i, step in enumerate(program.steps):
            names[step.out] = f"v{i}"
        frees = program.frees or [[] for _ in program.steps]
        snap = snapshot_slots(program)
        lines = [f"    {names[n]} = snapshot({names[n]})" for n in map(id, program.sources)
                 if n in snap]
        if snap:
            bound["snapshot"] = snapshot
        self._line_step: dict[int, int] = {}  # source line number -> step index
        self._arg_names: list[list[str]] = []
        body_start = 3  # def line, unpacking line, then steps (line numbers are 1-based)
        for i, step in enumerate(program.steps):
            fn = f"f{i}"
            args = [names[s] for s in step.inputs]
            self._arg_names.append(args)
            if profiled:
                lines.append("    _t = _prof.begin()")
            self._line_step[body_start + len(lines)] = i
            call = step.op.ufunc() if direct else None
            inline = _inline(step, args) if direct and call is None else None
            if inline is not None and not _bind_helpers(step.op, bound):
                inline = None  # (a helper's name taken by another object: call compute)
            if inline is not None:  # the op's own NumPy expression for these shapes
                lines.append(f"    v{i} = {inline}")
            elif call is None:
                bound[fn] = step.op.compute
                lines.append(f"    v{i} = {fn}({', '.join(args)})")
            else:  # the ufunc itself, with literal extras bound as defaults, maybe in place
                name, extras = call
                bound[fn] = getattr(np, name)
                for k, value in enumerate(extras):
                    bound[f"k{i}_{k}"] = value
                    args = [*args, f"k{i}_{k}"]
                out = f", out={names[inplace[i]]}" if i in inplace else ""
                lines.append(f"    v{i} = {fn}({', '.join(args)}{out})")
            if step.out in snap:
                lines.append(f"    v{i} = snapshot(v{i})")
            if profiled:
                inputs = "".join(f"{a}, " for a in self._arg_names[i])
                lines.append(f"    _prof.step(_steps[{i}], _t, ({inputs}), v{i})")
            dead = [names[s] for s in frees[i]]
            if dead:
                lines.append(f"    del {', '.join(dead)}")
        n_src = len(program.sources)
        unpack = f"    ({''.join(f's{i}, ' for i in range(n_src))}) = sources" if n_src \
            else "    pass"
        outputs = ", ".join(names[s] for s in program.outputs)
        if profiled:
            bound["_steps"] = program.steps
        params = "".join(f", {k}={k}" for k in bound)
        prof = ", _prof" if profiled else ""
        source = "\n".join([f"def _needle_program(sources{prof}{params}):", unpack, *lines,
                            f"    return [{outputs}]", ""])
        namespace = dict(bound)
        namespace["np"] = np
        code = compile(source, "<needle program>", "exec")
        exec(code, namespace)  # noqa: S102 - the source is generated above, from our own names
        self._fn = namespace["_needle_program"]
        self._bound = bound
        self.source = source

    def __call__(self, sources: list) -> list:
        current = _thread_state(None)
        if current is not None and current.profiler is not None:
            return self._call_profiled(sources, current.profiler)
        try:
            return self._fn(sources)
        except Exception as exc:  # noqa: BLE001 - rewrapped with the failing node's origin
            raise self._locate(exc) from exc

    def _call_profiled(self, sources: list, profiler: Any) -> list:
        """Run the instrumented variant, recording every step into ``profiler``."""
        variant = self._profiled
        if variant is None:
            variant = self._profiled = CompiledProgram(self.program, self._inplace, True)
        depth = profiler.depth()
        try:
            return variant._fn(sources, profiler)
        except Exception as exc:  # noqa: BLE001 - rewrapped with the failing node's origin
            profiler.abort(depth)
            raise variant._locate(exc) from exc

    def _locate(self, exc: Exception) -> Exception:
        """The NodeRunError for an exception raised inside the generated function."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code is not self._fn.__code__:
            tb = tb.tb_next
        if tb is None or tb.tb_lineno not in self._line_step:
            return exc
        index = self._line_step[tb.tb_lineno]
        local = tb.tb_frame.f_locals
        args = [local.get(name, self._bound.get(name)) for name in self._arg_names[index]]
        return step_error(self.program.steps[index], args, exc)


def compile_program(program: Program, inplace: dict[int, int] | None = None) -> CompiledProgram:
    """The straight-line executable for ``program`` (see :class:`CompiledProgram`).

    With ``inplace`` (step index -> dead input slot, from ``compiler.buffers.plan_inplace``;
    may be empty), every ufunc step calls NumPy directly, and those steps write into that
    input's array (``out=``). None keeps every step a call of ``op.compute``.
    """
    return CompiledProgram(program, inplace)

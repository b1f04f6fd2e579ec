"""Control flow as graph nodes: ``cond`` runs only the taken branch; ``while_loop`` repeats a body.

Python ``if`` and ``while`` cannot look at values that do not exist yet, so a declared graph
needs nodes for them (the lecture notes' chief complaint about static graphs). A branch or a
body is traced once into a sub-program; the node runs it with the values it captured from the
enclosing graph. Both are differentiable: the gradient of a cond is a cond of the branches'
gradients, and a while_loop with ``maximum_iterations`` differentiates as that many guarded
steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..autograd import Tensor, Value, make_from_op, new_leaf
from ..compiler.codegen import CompiledProgram, compile_program
from ..core import api as F
from ..core import autodiff
from ..core.context import watching_nodes
from ..core.interpret import build_program, plan_frees, run_program
from ..core.registry import Aval, NodeMeta, Op, ShapeError, fmt_shape, register
from ..core.source import user_source
from . import runtime

#: The most iterations a ``while_loop`` without ``maximum_iterations`` may run: one that is
#: still going then is taken for a loop that never ends and raises (per loop:
#: ``iteration_limit=``; for every loop, set this attribute).
MAX_UNBOUNDED_ITERATIONS = 1_000_000


@contextlib.contextmanager
def _recording_created(created: set[int]):
    """Collect the ids of lazy nodes made inside the block."""

    def hook(node: Any) -> None:
        created.add(id(node))

    with watching_nodes(hook):
        yield


def _as_list(outputs: Any, what: str) -> tuple[list, bool]:
    if isinstance(outputs, Value):
        return [outputs], True
    if isinstance(outputs, list | tuple) and all(isinstance(o, Value) for o in outputs):
        return list(outputs), False
    raise TypeError(f"{what} must return a graph tensor or a list/tuple of them, got "
                    f"{type(outputs).__name__}")


_EFFECT_FLAGS = ("side_effect", "writes_state", "random")


class _Branch:
    """A traced function: its outputs, the nodes it made, and its sub-program."""

    def __init__(self, fn: Callable[[], Any], what: str, internal: set[int] | None = None) -> None:
        created: set[int] = set(internal or ())
        with _recording_created(created):
            result = fn()
        self.outputs, self.single = _as_list(result, what)
        self.internal = created
        self.program = build_program(self.outputs,
                                     lambda n: n.op is None or id(n) not in created)
        plan_frees(self.program)
        self.captures = list(self.program.sources)
        # a branch that assigns, prints or draws random numbers makes its node do so too
        self.flags = {flag for flag in _EFFECT_FLAGS
                      if any(getattr(s.op, flag, False) for s in self.program.steps)}
        self._compiled: CompiledProgram | None = None

    def run(self, values: dict[int, Any]) -> tuple:
        """The branch outputs, given the values of (at least) its captures by node id."""
        sources = [values[id(c)] for c in self.captures]
        observers = runtime.step_observers()
        if observers:  # a RunMetadata is listening: walk the steps and report each
            env = {id(c): v for c, v in zip(self.captures, sources)}
            env = run_program(self.program, env, on_step=observers[-1])
            return tuple(env[slot] for slot in self.program.outputs)
        if self._compiled is None:
            self._compiled = compile_program(self.program)
        return tuple(self._compiled(sources))


_OpT = TypeVar("_OpT", bound=Op)


def _mark_effects(op: _OpT, *branches: _Branch) -> _OpT:
    for flag in set().union(*(b.flags for b in branches)):
        setattr(op, flag, True)
    return op


def _union(*lists: list) -> list:
    seen: dict[int, Any] = {}
    for items in lists:
        for node in items:
            seen.setdefault(id(node), node)
    return list(seen.values())


@register("cond", inputs=("*captures",), internal=True)
class Cond(Op):
    """Run the true or the false branch by the value of a boolean scalar; outputs a tuple."""

    returns_tuple = True

    def __init__(self, true_branch: _Branch, false_branch: _Branch, captures: list) -> None:
        self.true_branch = true_branch
        self.false_branch = false_branch
        self.captures = captures

    def attrs(self) -> tuple:
        return (("branches", id(self)),)

    def compute(self, pred, *values):
        by_id = {id(c): v for c, v in zip(self.captures, values)}
        branch = self.true_branch if bool(pred) else self.false_branch
        return branch.run(by_id)

    def gradient(self, out_grad, node):
        pred, captures = node.inputs[0], list(node.inputs[1:])
        wanted = [c for c in captures if c.requires_grad]
        if not wanted:
            return (None,) * len(node.inputs)
        seeds = [out_grad[i] for i in range(len(self.true_branch.outputs))]

        def branch_grads(branch: _Branch) -> Callable[[], list]:
            def build() -> list:
                grads = autodiff.gradients(branch.outputs, wanted, seeds, stop_at_wrt=True)
                return [g if g is not None else F.full_like(c, 0) for g, c in zip(grads, wanted)]
            return build

        internal = self.true_branch.internal | self.false_branch.internal
        grads = _cond(pred, branch_grads(self.true_branch), branch_grads(self.false_branch),
                      internal)
        by_id = {id(c): g for c, g in zip(wanted, grads)}
        return (None, *[by_id.get(id(c)) for c in captures])

    def infer(self, pred: Aval, *values: Aval) -> tuple:
        return tuple(o.aval for o in self.true_branch.outputs)


def _cond(pred: Tensor, true_fn: Callable, false_fn: Callable,
          internal: set[int] | None = None) -> list:
    true_branch = _Branch(true_fn, "cond: true_fn", internal)
    false_branch = _Branch(false_fn, "cond: false_fn", internal)
    if len(true_branch.outputs) != len(false_branch.outputs):
        raise ValueError(f"cond: true_fn returns {len(true_branch.outputs)} values, false_fn "
                         f"{len(false_branch.outputs)}")
    for i, (a, b) in enumerate(zip(true_branch.outputs, false_branch.outputs)):
        if len(a.shape) != len(b.shape) or any(
                x is not None and y is not None and x != y for x, y in zip(a.shape, b.shape)):
            raise ShapeError(f"cond: output {i} has shape {fmt_shape(a.shape)} in true_fn but "
                             f"{fmt_shape(b.shape)} in false_fn")
    captures = _union(true_branch.captures, false_branch.captures)
    op = _mark_effects(Cond(true_branch, false_branch, captures), true_branch, false_branch)
    node = make_from_op(op, (pred, *captures))
    outputs = [node[i] for i in range(len(true_branch.outputs))]
    return outputs[0] if true_branch.single else outputs


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    """``true_fn()`` if ``pred`` else ``false_fn()``, deciding when the graph runs.

    Both functions take no arguments and return a tensor or a list of tensors of matching
    shapes; only the taken branch is executed. A Python bool ``pred`` picks a branch now.
    """
    if isinstance(pred, bool | np.bool_):
        return true_fn() if pred else false_fn()
    if pred.size != 1 if pred._data is not None else any(d not in (1,) for d in pred.shape):
        raise ShapeError(f"cond: pred must be a scalar boolean, got shape {fmt_shape(pred.shape)}")
    return _cond(pred, true_fn, false_fn)


class _LoopVar(Tensor):
    """A stand-in for a loop variable while the body is traced (a graph leaf without data)."""

    __slots__ = ()


def _loop_var(like: Tensor, i: int) -> _LoopVar:
    return new_leaf(_LoopVar, None, aval=Aval(tuple(like.shape), like.dtype),
                    requires_grad=like.requires_grad, device=like.device,
                    meta=NodeMeta(name=f"loop_var_{i}"))


@register("while_loop", inputs=("*values",), internal=True)
class WhileLoop(Op):
    """Repeat ``body`` while ``cond`` holds (at most ``maximum_iterations`` times)."""

    returns_tuple = True

    def __init__(self, cond_fn: Callable, body_fn: Callable, stand_ins: list,
                 cond_branch: _Branch, body_branch: _Branch, captures: list,
                 maximum_iterations: int | None, iteration_limit: int | None = None,
                 label: str = "while_loop", source: str | None = None) -> None:
        self.cond_fn, self.body_fn = cond_fn, body_fn
        self.stand_ins = stand_ins
        self.cond_branch, self.body_branch = cond_branch, body_branch
        self.captures = captures
        self.maximum_iterations = maximum_iterations
        self.iteration_limit = iteration_limit
        self.label = label
        self.source = source

    def _runaway(self, limit: int) -> RuntimeError:
        where = f" (created at {self.source})" if self.source else ""
        return RuntimeError(
            f"while_loop {self.label!r}{where} ran {limit} iterations and cond_fn is still true; "
            "give maximum_iterations=N to bound it, or iteration_limit=N (default "
            "needle.static.control.MAX_UNBOUNDED_ITERATIONS) if it really needs more")

    def attrs(self) -> tuple:
        return (("loop", id(self)),)

    def compute(self, *values):
        n = len(self.stand_ins)
        state, outer = list(values[:n]), values[n:]
        by_id = {id(c): v for c, v in zip(self.captures, outer)}
        steps = 0
        bound = self.maximum_iterations
        # NOTE: without maximum_iterations a guard bounds the loop: one that never ends raises
        # instead of hanging the Session (read at run time, so the module default can change)
        guard = None if bound is not None else (
            self.iteration_limit if self.iteration_limit is not None
            else MAX_UNBOUNDED_ITERATIONS)
        while bound is None or steps < bound:
            by_id.update({id(s): v for s, v in zip(self.stand_ins, state)})
            (go,) = self.cond_branch.run(by_id)
            if not bool(go):
                break
            if steps == guard:
                raise self._runaway(guard)
            state = list(self.body_branch.run(by_id))
            steps += 1
        return tuple(state)

    def gradient(self, out_grad, node):
        if self.maximum_iterations is None:
            raise NotImplementedError("while_loop: gradients need maximum_iterations (the loop "
                                      "is differentiated as that many guarded steps)")
        n = len(self.stand_ins)
        inputs = list(node.inputs)
        state = inputs[:n]
        for _ in range(self.maximum_iterations):
            go = self.cond_fn(*state)
            current = state
            state = cond(go, lambda s=current: _as_list(self.body_fn(*s), "while_loop: body_fn")[0],
                         lambda s=current: [F.add_scalar(v, 0) for v in s])
            state = state if isinstance(state, list) else [state]
        seeds = [out_grad[i] for i in range(n)]
        wanted = [x for x in inputs if x.requires_grad]
        grads = autodiff.gradients(state, wanted, seeds) if wanted else []
        by_id = {id(x): g for x, g in zip(wanted, grads)}
        return tuple(by_id.get(id(x)) for x in inputs)

    def infer(self, *avals: Aval) -> tuple:
        return tuple(avals[: len(self.stand_ins)])


def while_loop(cond_fn: Callable[..., Any], body_fn: Callable[..., Any], loop_vars: Any,
               maximum_iterations: int | None = None, *, iteration_limit: int | None = None,
               name: str | None = None) -> Any:
    """Run ``loop_vars = body_fn(*loop_vars)`` while ``cond_fn(*loop_vars)`` is true.

    ``loop_vars`` is a tensor or a list of tensors; the body returns the same number of
    tensors with the same shapes. Differentiable when ``maximum_iterations`` is given.

    A loop without ``maximum_iterations`` is guarded: once it has run ``iteration_limit``
    iterations (default ``MAX_UNBOUNDED_ITERATIONS``, 1,000,000) and ``cond_fn`` is still
    true, the run raises a RuntimeError naming the loop (``name``) and the line that made
    it, instead of never returning.
    """
    for label, value in (("maximum_iterations", maximum_iterations),
                         ("iteration_limit", iteration_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                                  or value < 0):
            raise ValueError(f"while_loop: {label} must be an int >= 0 or None, got {value!r}")
    init, single = _as_list(loop_vars, "while_loop: loop_vars")
    stand_ins = [_loop_var(v, i) for i, v in enumerate(init)]
    internal = {id(s) for s in stand_ins}
    cond_branch = _Branch(lambda: cond_fn(*stand_ins), "while_loop: cond_fn", internal)
    body_branch = _Branch(lambda: body_fn(*stand_ins), "while_loop: body_fn", internal)
    if len(body_branch.outputs) != len(init):
        raise ValueError(f"while_loop: body_fn returns {len(body_branch.outputs)} values for "
                         f"{len(init)} loop variables")
    for v, out in zip(init, body_branch.outputs):
        if tuple(v.shape) != tuple(out.shape):
            raise ShapeError(f"while_loop: body_fn changes a loop variable's shape from "
                             f"{fmt_shape(v.shape)} to {fmt_shape(out.shape)}")
    captures = [c for c in _union(cond_branch.captures, body_branch.captures)
                if id(c) not in internal]
    op = _mark_effects(WhileLoop(cond_fn, body_fn, stand_ins, cond_branch, body_branch,
                                 captures, maximum_iterations,
                                 None if iteration_limit is None else int(iteration_limit),
                                 name or "while_loop", user_source()),
                       cond_branch, body_branch)
    node = make_from_op(op, (*init, *captures))
    if name is None and node.meta is not None and node.meta.name:
        op.label = node.meta.name  # the graph's unique name, as Session errors show it
    outputs = [node[i] for i in range(len(init))]
    return outputs[0] if single else outputs

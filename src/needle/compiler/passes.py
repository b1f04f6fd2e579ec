"""Program rewrites: common-subexpression elimination, constant folding, dead steps, frees.

Passes never modify the user's graph nodes: they rewrite a Program's steps and slots.
An op with ``side_effect = True`` (assign, print, train ops) or ``random = True`` (dropout
masks) is never merged or folded, and a side-effect step is never dropped.

With static shapes (the JIT traces with concrete shapes, and its signature guards them),
constant folding also folds the steps whose value depends on their inputs' shapes and dtypes
only (``full_like``: the ``1`` that seeds ``loss.backward()``), and with them the chain that
scales and broadcasts that seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import cpu
from ..core.interpret import Program, plan_frees
from ..core.registry import Aval, Op
from . import fused_update
from .attention_probs_rewrite import rewrite_attention_probs
from .batchnorm_relu_conv_rewrite import rewrite_batchnorm_relu_convs
from .batchnorm_relu_mean_rewrite import rewrite_batchnorm_relu_means
from .batchnorm_relu_pool_rewrite import rewrite_batchnorm_relu_pools
from .batchnorm_relu_rewrite import rewrite_batchnorm_relu_grads
from .linear_epilogue_rewrite import rewrite_linear_epilogues
from .vocab_head_rewrite import rewrite_vocab_heads


def _pure(op: Any) -> bool:
    return not op.side_effect and not op.random


def _rename(program: Program, alias: dict[int, int]) -> None:
    """Point every use of an aliased slot at its replacement."""
    if not alias:
        return
    for step in program.steps:
        step.inputs = tuple(alias.get(s, s) for s in step.inputs)
    program.outputs = [alias.get(s, s) for s in program.outputs]


def eliminate_dead_steps(program: Program) -> int:
    """Drop steps whose values nothing needs (after merging or folding made them unused)."""
    needed = set(program.outputs)
    kept = []
    for step in reversed(program.steps):
        if step.out in needed or step.op.side_effect:
            kept.append(step)
            needed.update(step.inputs)
    dropped = len(program.steps) - len(kept)
    program.steps = kept[::-1]
    program.constants = {k: v for k, v in program.constants.items() if k in needed}
    return dropped


def eliminate_common_subexpressions(program: Program) -> int:
    """Merge steps applying the same op (equal ``op.key()``) to the same input slots."""
    seen: dict[tuple, int] = {}
    alias: dict[int, int] = {}
    for step in program.steps:
        step.inputs = tuple(alias.get(s, s) for s in step.inputs)
        if not _pure(step.op):
            continue
        try:
            key = (step.op.key(), step.inputs)
            hash(key)
        except TypeError:  # an attribute that cannot be hashed: leave the step alone
            continue
        if key in seen:
            alias[step.out] = seen[key]
        else:
            seen[key] = step.out
    _rename(program, alias)
    before = len(program.steps)
    eliminate_dead_steps(program)
    return before - len(program.steps)


def reads_only_shapes(op: Op, n_inputs: int) -> bool:
    """Whether ``op`` applied to ``n_inputs`` arrays gives a value that depends on their
    shapes and dtypes only, not on their values: a pure elementwise op whose scalar form
    names none of its operands (``full_like``). Asked of the op's own definition, so no op
    is special-cased here."""
    if not _pure(op) or n_inputs == 0 or type(op).scalar_expr is Op.scalar_expr:
        return False
    markers = [f"__needle_operand_{k}__" for k in range(n_inputs)]
    try:
        expr = op.scalar_expr(markers, lambda value: "0")
    except Exception:  # noqa: BLE001 - a scalar form that needs more than names: not folded
        return False
    return expr is not None and not any(m in expr for m in markers)


def _shape_value(step: Any) -> Any:
    """The value of a step that reads only its inputs' shapes (``reads_only_shapes``),
    computed on zeros of those shapes, or None where a shape is unknown or the step does not
    run on the CPU."""
    if getattr(step.node, "device", None) != cpu() or len(step.node.inputs) != len(step.inputs):
        return None
    dummies = []
    for node in step.node.inputs:
        aval = node.aval
        shape = getattr(aval, "shape", None)
        if shape is None or not isinstance(aval, Aval) or None in shape:
            return None
        dummies.append(np.zeros(shape, aval.dtype))
    return step.op.compute(*dummies)


def fold_constants(program: Program, constant_value: Callable[[Any], Any],
                   static_shapes: bool = False) -> int:
    """Compute at plan time every pure step whose inputs are all constants.

    ``constant_value(node)`` gives a source node's fixed value, or None if it can change
    between runs (placeholders, Variables, parameters). With ``static_shapes`` (every
    value's shape is the one traced: the JIT), steps that read only their inputs' shapes
    (``reads_only_shapes``) are folded too, whatever their inputs.

    NOTE: a folded value is one array shared by every run. With ``static_shapes`` a fetched
    value is never folded (each call returns its own array, as before), and folded arrays
    are made read-only, so a view of one that escapes (an op returning its input) fails
    loudly when written instead of changing later runs.
    """
    known: dict[int, Any] = dict(program.constants)
    for node in program.sources:
        value = constant_value(node)
        if value is not None:
            known[id(node)] = value
    fetched = set(program.outputs) if static_shapes else set()
    remaining = []
    folded = 0
    for step in program.steps:
        value = None
        if step.out in fetched:
            pass
        elif _pure(step.op) and all(s in known for s in step.inputs):
            value = step.op.compute(*[known[s] for s in step.inputs])
        elif static_shapes and reads_only_shapes(step.op, len(step.inputs)):
            value = _shape_value(step)
        if value is None:
            remaining.append(step)
            continue
        if static_shapes and isinstance(value, np.ndarray):
            value.flags.writeable = False
        known[step.out] = value
        folded += 1
    program.steps = remaining
    program.constants = known
    eliminate_dead_steps(program)
    return folded


def fuse_update_rules(program: Program) -> int:
    """Let each optimizer step run its update rule as one compiled loop (``fused_update``).

    Steps whose op offers ``with_fused_rule()`` get that copy; 0 where numba is missing.
    """
    if not fused_update.available():
        return 0
    fused = 0
    for step in program.steps:
        make_fused = getattr(step.op, "with_fused_rule", None)
        if make_fused is not None:
            step.op = make_fused()
            fused += 1
    return fused


def optimize(program: Program, constant_value: Callable[[Any], Any],
             static_shapes: bool = False) -> Program:
    """The shared pipeline: fold constants, merge duplicates, drop dead steps, fuse update
    rules, plan frees. ``static_shapes``: every value has its traced shape on every run (the
    JIT), so shape-only steps fold too (``fold_constants``). A language model's vocabulary
    head and loss become one fused op first (compiler/vocab_head_rewrite.py), and so do the
    BatchNorm + ReLU pairs (compiler/batchnorm_relu_*.py), a linear's ReLU or residual
    add (compiler/linear_epilogue_rewrite.py), and attention keeps its probabilities for
    its backward (compiler/attention_probs_rewrite.py)."""
    heads = rewrite_vocab_heads(program)
    bn_relu = rewrite_batchnorm_relu_grads(program)
    bn_relu_convs = rewrite_batchnorm_relu_convs(program)
    bn_relu_means = rewrite_batchnorm_relu_means(program)
    bn_relu_pools = rewrite_batchnorm_relu_pools(program)
    linear_relus, linear_residuals = rewrite_linear_epilogues(program)
    attentions = rewrite_attention_probs(program)
    before = len(program.steps)
    folded = fold_constants(program, constant_value, static_shapes)
    merged = eliminate_common_subexpressions(program)
    fused = fuse_update_rules(program)
    plan_frees(program)
    program.passes = [
        "prune",
        f"vocab_head_rewrite ({heads} heads fused)",
        f"batchnorm_relu_rewrite ({bn_relu} relu_grad + batch_norm_grad pairs fused)",
        f"batchnorm_relu_conv_rewrite ({bn_relu_convs} BatchNorm + ReLU outputs read by "
        "the convolutions' loops)",
        f"batchnorm_relu_mean_rewrite ({bn_relu_means} BatchNorm + ReLU outputs averaged "
        "where they are made)",
        f"batchnorm_relu_pool_rewrite ({bn_relu_pools[0]} max_pool2d_scatter + "
        f"batch_norm_relu_grad pairs fused, {bn_relu_pools[1]} BatchNorm + ReLU outputs "
        "pooled where they are made)",
        f"linear_epilogue_rewrite ({linear_relus} linear + relu, {linear_residuals} linear "
        "+ residual add pairs fused)",
        f"attention_probs_rewrite ({attentions} attentions keep their probabilities for "
        "the backward)",
        f"constant_folding ({folded} steps folded)",
        f"cse ({merged} steps merged)",
        f"dead_step_elimination ({before - folded - merged - len(program.steps)} dropped)",
        f"fuse_update_rules ({fused} optimizer steps fused)" if fused_update.available()
        else "fuse_update_rules (skipped: numba is not installed)",
        "memory_plan (free after last use)",
    ]
    return program


# -- memory prediction ------------------------------------------------------------------------
def _nbytes(aval: Any) -> int:
    if isinstance(aval, tuple) and not isinstance(aval, Aval):
        return sum(_nbytes(a) for a in aval)
    size = 1
    for d in aval.shape:
        size *= 1 if d is None else d
    return size * aval.dtype.itemsize


def infer_avals(program: Program, source_avals: dict[int, Any]) -> dict[int, Any]:
    """Shapes and dtypes of every step's value given the sources' (fed shapes fill None dims).

    Each op's own shape rule runs again on the concrete input shapes; where a rule cannot
    (an op without one), the node's declared aval is used.
    """
    avals: dict[int, Any] = dict(source_avals)
    for slot, value in program.constants.items():
        avals[slot] = _aval_of(value)
    for step in program.steps:
        try:
            avals[step.out] = step.op.infer(*[avals[s] for s in step.inputs])
        except Exception:  # noqa: BLE001 - prediction only: fall back to the declared aval
            avals[step.out] = step.node.aval
    return avals


def _aval_of(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_aval_of(v) for v in value)
    return Aval(tuple(value.shape), value.dtype)


def predict_peak_bytes(program: Program, free_early: bool,
                       source_avals: dict[int, Any] | None = None) -> int:
    """Peak bytes of intermediate values held at once, from shapes alone.

    With ``free_early`` each value is released after its last use (the memory plan);
    without it every value lives to the end of the run. ``source_avals`` (slot -> Aval of a
    fed or stored value) resolves unknown dims; dims still unknown count as 1.
    """
    frees = program.frees
    if free_early and not frees:
        probe = Program(program.steps, program.sources, program.outputs, program.constants)
        plan_frees(probe)
        frees = probe.frees
    avals = infer_avals(program, source_avals or {})
    live = 0
    peak = 0
    for i, step in enumerate(program.steps):
        live += _nbytes(avals[step.out])
        peak = max(peak, live)
        if free_early:
            for slot in frees[i]:
                live -= _nbytes(avals[slot])
    return peak

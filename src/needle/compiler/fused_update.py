"""Elementwise fusion of an update rule: record its NumPy calls once, run them as one loop.

An optimizer's update rule is written once, as in-place NumPy calls on flat arrays
(``xp.multiply(v, beta2, out=v)``, ...): a dozen passes over memory. ``run_fused`` calls the
rule with symbolic stand-ins whose array module records each call instead of computing it,
turns the record into a single loop (scratch arrays become local variables, every array is
read and written once per element) and runs that loop compiled by numba, on one thread.

The results are bit-for-bit those of the NumPy calls: the same float32 operations in the same
order, Python scalars cast to the arrays' dtype as NumPy 2 does (NEP 50), and no fast-math
(no reassociation or fused multiply-add). numba is optional (``pip install 'needle[fast]'``):
without it, or for a rule that uses a call outside the small set below, ``run_fused`` returns
False and the caller runs the rule with NumPy. Measured in ``benchmarks/fusion_choice.py``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend.numba_support import numba_module

__all__ = ["NotFusable", "available", "run_fused"]

# the calls a rule may make, as the expression each becomes in the loop body
_BINARY = {"add": "{} + {}", "subtract": "{} - {}", "multiply": "{} * {}", "divide": "{} / {}"}
_UNARY = {"sqrt": "np.sqrt({})", "negative": "-{}"}


class NotFusable(Exception):
    """The rule did something the recorder cannot turn into a loop."""


def _numba() -> Any:
    """numba or None (a seam of its own, so tests can take numba away from fusion alone)."""
    return numba_module()


def available() -> bool:
    """Whether numba is installed, so update rules can be fused."""
    return _numba() is not None


class Symbol:
    """A stand-in for a flat array while a rule is recorded: a memory argument or a register."""

    __slots__ = ("needle_array_module", "ref", "shape", "dtype")
    __array_ufunc__ = None  # NumPy must not treat it as data (a direct np.add(...) is refused)

    def __init__(self, recorder: Recorder, ref: tuple, shape: tuple, dtype: Any) -> None:
        self.needle_array_module = recorder  # what backend.array_module returns for it
        self.ref = ref
        self.shape = shape
        self.dtype = dtype


class Recorder:
    """Array module stand-in: each call appends ``(name, operand refs, output ref)``.

    Refs are ``("m", k)`` for the k-th memory array (read and written in place),
    ``("r", k)`` for a scratch register and ``("s", k)`` for the k-th scalar. Recording runs on
    every step (the scalars change with the step count), so it is kept lean.
    """

    def __init__(self, arrays: tuple) -> None:
        first = arrays[0]
        self.shape, self.dtype = first.shape, first.dtype
        if len(self.shape) != 1 or self.dtype not in (np.float32, np.float64):
            raise NotFusable("the rule's arrays must be flat float32 or float64 arrays")
        self.memory: list[np.ndarray] = []
        self.memory_refs: dict[int, tuple] = {}  # id(array) -> its ref
        self.scalars: list[Any] = []
        self.statements: list[tuple] = []
        self.registers = 0
        self.symbols = [Symbol(self, self._memory_ref(a), self.shape, self.dtype)
                        for a in arrays]

    # -- operands ------------------------------------------------------------------------------
    def _memory_ref(self, array: np.ndarray) -> tuple:
        if type(array) is not np.ndarray or array.shape != self.shape \
                or array.dtype != self.dtype:
            raise NotFusable(f"every array must be a NumPy array of shape {self.shape} and "
                             f"dtype {self.dtype}")
        ref = self.memory_refs[id(array)] = ("m", len(self.memory))
        self.memory.append(array)
        return ref

    def _ref(self, operand: Any) -> tuple:
        kind = type(operand)
        if kind is Symbol:
            if operand.needle_array_module is not self:
                raise NotFusable("a symbol of another recording")
            return operand.ref
        if kind is float or kind is int:  # Python numbers: weak, cast to the dtype (NEP 50)
            self.scalars.append(operand)
            return ("s", len(self.scalars) - 1)
        if kind is np.ndarray:  # state the rule reads directly (Adam's m, v)
            ref = self.memory_refs.get(id(operand))
            return ref if ref is not None else self._memory_ref(operand)
        raise NotFusable(f"an operand of type {kind.__name__}")

    def _record(self, name: str, refs: tuple, out: Any) -> Any:
        if out is None:  # a fresh result: a register
            out = self.empty_like(None)
        target = self._ref(out)
        if target[0] == "s":
            raise NotFusable("out= is a scalar")
        self.statements.append((name, refs, target))
        return out

    # -- the array-module calls a rule may make --------------------------------------------
    def add(self, a: Any, b: Any, out: Any = None) -> Any:
        return self._record("add", (self._ref(a), self._ref(b)), out)

    def subtract(self, a: Any, b: Any, out: Any = None) -> Any:
        return self._record("subtract", (self._ref(a), self._ref(b)), out)

    def multiply(self, a: Any, b: Any, out: Any = None) -> Any:
        return self._record("multiply", (self._ref(a), self._ref(b)), out)

    def divide(self, a: Any, b: Any, out: Any = None) -> Any:
        return self._record("divide", (self._ref(a), self._ref(b)), out)

    def sqrt(self, a: Any, out: Any = None) -> Any:
        return self._record("sqrt", (self._ref(a),), out)

    def negative(self, a: Any, out: Any = None) -> Any:
        return self._record("negative", (self._ref(a),), out)

    def empty_like(self, like: Any, dtype: Any = None) -> Symbol:
        """Scratch: a register, local to one element's computation."""
        if dtype is not None and np.dtype(dtype) != self.dtype:
            raise NotFusable("scratch of another dtype")
        self.registers += 1
        return Symbol(self, ("r", self.registers - 1), self.shape, self.dtype)

    def __getattr__(self, name: str) -> Any:
        raise NotFusable(f"the rule calls xp.{name}, which fusion does not cover")


def _loop_source(statements: list[tuple]) -> str:
    """The loop body: each memory array loaded once, each one written stored once."""
    lines: list[str] = []
    current: dict[tuple, str] = {}
    written: list[tuple] = []

    def read(ref: tuple) -> str:
        kind, k = ref
        if kind == "s":
            return f"s{k}"
        if ref not in current:
            if kind == "r":
                raise NotFusable("a scratch array is read before it is written")
            current[ref] = f"x{len(lines)}"
            lines.append(f"{current[ref]} = m{k}[i]")
        return current[ref]

    for name, operands, target in statements:
        args = [read(r) for r in operands]
        expr = (_BINARY.get(name) or _UNARY[name]).format(*args)
        var = f"x{len(lines)}"
        lines.append(f"{var} = {expr}")
        current[target] = var
        if target[0] == "m" and target not in written:
            written.append(target)
    lines += [f"m{k}[i] = {current[('m', k)]}" for _, k in written]
    return "\n".join("        " + line for line in lines)


@functools.lru_cache(maxsize=64)
def _compile(statements: tuple, n_memory: int, n_scalars: int) -> Callable[..., None]:
    numba = _numba()
    params = ", ".join([f"m{k}" for k in range(n_memory)] + [f"s{k}" for k in range(n_scalars)])
    source = (f"def fused_rule({params}):\n"
              "    for i in range(m0.shape[0]):\n"
              f"{_loop_source(list(statements))}\n")
    namespace: dict[str, Any] = {"np": np}
    exec(compile(source, "<fused update rule>", "exec"), namespace)  # noqa: S102 - generated
    # NOTE: one thread on purpose: a numba thread pool beside OpenBLAS's fought it for the
    # cores (the loop 20x slower inside a training step, the step 2.5x). error_model="numpy"
    # (IEEE results, no ZeroDivisionError checks) is what lets LLVM vectorize the loop: 8x.
    kernel = numba.njit(error_model="numpy", fastmath=False, nogil=True)(
        namespace["fused_rule"])
    kernel.source = source
    return kernel


#: id tuples of memory arrays already checked to be contiguous, writable and disjoint, with
#: weak references that confirm the ids still name those arrays (nothing is kept alive here)
_checked: dict[tuple, tuple] = {}


def _check_memory(memory: list[np.ndarray]) -> None:
    key = tuple(map(id, memory))
    refs = _checked.get(key)
    if refs is not None and all(ref() is array for ref, array in zip(refs, memory)):
        return
    for i, array in enumerate(memory):
        if not (array.flags.c_contiguous and array.flags.writeable):
            raise NotFusable("every array must be contiguous and writable")
        if any(np.may_share_memory(array, other) for other in memory[:i]):
            raise NotFusable("two arrays of the rule share memory")
    if len(_checked) > 64:
        _checked.clear()
    _checked[key] = tuple(weakref.ref(array) for array in memory)


def _record(rule: Callable[..., None], arrays: tuple) -> Recorder:
    recorder = Recorder(arrays)
    rule(*recorder.symbols)
    _check_memory(recorder.memory)
    return recorder


def run_fused(rule: Callable[..., None], *arrays: np.ndarray) -> bool:
    """Run ``rule(*arrays)`` as one compiled loop; False (nothing done) if it cannot be.

    ``rule`` receives stand-ins for ``arrays`` (flat arrays of one shape and dtype) and makes
    in-place calls on ``array_module(stand_in)``; other NumPy arrays it passes as operands
    (optimizer state) are read and written in place too, and arrays it gets from
    ``empty_like`` are scratch. It must not compute with the stand-ins any other way.
    """
    if _numba() is None:
        return False
    try:
        recorder = _record(rule, arrays)
        kernel = _compile(tuple(recorder.statements), len(recorder.memory),
                          len(recorder.scalars))
    except (NotFusable, TypeError):  # TypeError: the rule computed on a stand-in directly
        return False
    dtype = recorder.dtype.type
    try:
        kernel(*recorder.memory, *[dtype(s) for s in recorder.scalars])
    except _numba().core.errors.NumbaError:  # compiling failed: nothing was written yet
        return False
    return True


def fused_source(rule: Callable[..., None], *arrays: np.ndarray) -> str:
    """The loop body ``run_fused`` would compile for this rule (for docs and debugging)."""
    return _loop_source(_record(rule, arrays).statements)

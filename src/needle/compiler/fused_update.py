"""Elementwise fusion of an update rule: record its NumPy calls once, run them as one loop.

An optimizer's update rule is written once, as in-place NumPy calls on flat arrays
(``xp.multiply(v, beta2, out=v)``, ...): a dozen passes over memory. ``run_fused`` calls the
rule with symbolic stand-ins whose array module records each call instead of computing it,
turns the record into a single loop (scratch arrays become local variables, every array is
read and written once per element) and runs that loop compiled by numba: on one thread, or
for rules over PARALLEL_MIN_ELEMENTS or more, as a prange loop over fixed blocks on numba's
TBB threads (backend/parallel_loops.py; each element computed alike, so the same bits).

The results are bit-for-bit those of the NumPy calls: the same float32 operations in the same
order, Python scalars cast to the arrays' dtype as NumPy 2 does (NEP 50), and no fast-math
(no reassociation or fused multiply-add). numba is optional (``pip install 'needle[fast]'``):
without it, or for a rule that uses a call outside the small set below, ``run_fused`` returns
False and the caller runs the rule with NumPy. Measured in ``benchmarks/fusion_choice.py``.

Recording runs on every step, because the rule computes its scalars (learning rate, bias
corrections) in Python as it goes. A ``FusedRule`` (one per optimizer) keeps the last
recording and its compiled loop: the next step replays the rule on the same recorder and,
when it made the same calls on the same arrays, runs the kept loop with the new scalars as
arguments; any other recording (a hyperparameter change that alters which calls are made,
new state arrays) is recorded afresh and compiled (or found in the compile cache).

An array the rule only reads may come in pieces (``run_fused(parts=...)``: an optimizer's
gradients, one array per parameter, where the backward left them): the loop then runs once
per piece, on that piece and the matching stretch of the other arrays, so the gradients are
never copied into one flat array first (in a jitted MLP step that copy was a fifth of the
update's time). Slices indexed from zero keep the inner loop vectorized (indexing the whole
arrays at ``base + j`` was 4x slower).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import parallel_loops
from ..backend.numba_support import numba_module

__all__ = ["FusedRule", "NotFusable", "available", "run_fused"]

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


def _binary_call(name: str) -> Callable[..., Any]:
    """The recorder's ``xp.<name>(a, b, out=None)`` for a binary ufunc: one Python call per
    call of the rule (a method forwarding to a shared one made two; this runs on every
    step, a dozen times)."""

    def call(self: Recorder, a: Any, b: Any, out: Any = None) -> Any:
        # (the common operands, a symbol of this recording, a Python float and an array
        # seen before (Adam's m, v), and the common targets, inline)
        refs = self.memory_refs
        kind = type(a)
        if kind is Symbol and a.needle_array_module is self:
            ra = a.ref
        else:
            ra = (kind is np.ndarray and refs.get(id(a))) or self._ref(a)
        kind = type(b)
        if kind is Symbol and b.needle_array_module is self:
            rb = b.ref
        elif kind is float:
            scalars = self.scalars
            rb = ("s", len(scalars))
            scalars.append(b)
        else:
            rb = (kind is np.ndarray and refs.get(id(b))) or self._ref(b)
        kind = type(out)
        if kind is Symbol and out.needle_array_module is self:
            self.statements.append((name, (ra, rb), out.ref))
            return out
        target = kind is np.ndarray and refs.get(id(out))
        if target:
            self.statements.append((name, (ra, rb), target))
            return out
        return self._record(name, (ra, rb), out)

    call.__name__ = call.__qualname__ = name
    return call


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

    def restart(self, arrays: tuple) -> bool:
        """Get ready to record the same rule again on ``arrays`` (the arrays of the first
        recording, the same objects); False if they are not. Memory arrays seen so far keep
        their refs, so a replay that makes the same calls records the same statements."""
        memory = self.memory
        if len(arrays) > len(memory):
            return False
        for a, m in zip(arrays, memory):  # (a loop, not any(<generator>): runs every step)
            if a is not m:
                return False
        self.scalars = []
        self.statements = []
        self.registers = 0
        return True

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
        # (a symbol of this recording, the common operand, is looked up inline: this runs for
        # every call of the rule, on every step)
        target = out.ref if type(out) is Symbol and out.needle_array_module is self \
            else self._ref(out)
        if target[0] == "s":
            raise NotFusable("out= is a scalar")
        self.statements.append((name, refs, target))
        return out

    # -- the array-module calls a rule may make --------------------------------------------
    add = _binary_call("add")
    subtract = _binary_call("subtract")
    multiply = _binary_call("multiply")
    divide = _binary_call("divide")

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


def _loop_source(statements: list[tuple], parted: tuple[int, ...] | None = None) -> str:
    """The loop body: each memory array loaded once, each one written stored once.

    ``parted`` (the body of a loop over pieces, see ``_compile``): memory array k is read as
    the current piece ``pk`` when k is in ``parted``, else as its stretch ``qk``, at ``j``."""
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
            lines.append(f"{current[ref]} = m{k}[i]" if parted is None
                         else f"{current[ref]} = {'p' if k in parted else 'q'}{k}[j]")
        return current[ref]

    for name, operands, target in statements:
        args = [read(r) for r in operands]
        expr = (_BINARY.get(name) or _UNARY[name]).format(*args)
        var = f"x{len(lines)}"
        lines.append(f"{var} = {expr}")
        current[target] = var
        if target[0] == "m" and target not in written:
            if parted is not None and target[1] in parted:
                raise NotFusable("the rule writes an array it reads in pieces")
            written.append(target)
    store = "m{}[i]" if parted is None else "q{}[j]"
    lines += [f"{store.format(k)} = {current[('m', k)]}" for _, k in written]
    indent = " " * (8 if parted is None else 12)
    return "\n".join(indent + line for line in lines)


@functools.lru_cache(maxsize=64)
def _compile(statements: tuple, n_memory: int, n_scalars: int,
             parted: tuple[int, ...] = ()) -> Callable[..., None]:
    numba = _numba()
    params = ", ".join([f"m{k}" for k in range(n_memory)] + [f"s{k}" for k in range(n_scalars)])
    if parted:  # one inner loop per piece, on that piece's stretch of the whole arrays
        first = parted[0]
        # NOTE: slices, all indexed by j: with one index per array LLVM vectorizes the loop
        # as it does the plain one (indexing the whole arrays at base + j did not: 4x slower)
        stretches = "".join(
            f"        p{k} = m{k}[piece]\n" if k in parted
            else f"        q{k} = m{k}[base:base + n]\n" for k in range(n_memory))
        source = (f"def fused_rule({params}):\n"
                  "    base = 0\n"
                  f"    for piece in range(len(m{first})):\n"
                  f"        n = m{first}[piece].shape[0]\n"
                  f"{stretches}"
                  "        for j in range(n):\n"
                  f"{_loop_source(list(statements), parted)}\n"
                  "        base += n\n")
    else:
        source = (f"def fused_rule({params}):\n"
                  "    for i in range(m0.shape[0]):\n"
                  f"{_loop_source(list(statements))}\n")
    namespace: dict[str, Any] = {"np": np}
    exec(compile(source, "<fused update rule>", "exec"), namespace)  # noqa: S102 - generated
    # NOTE: this loop runs on one thread (numba's OpenMP / workqueue pools beside OpenBLAS's
    # fought it for the cores: the loop 20x slower inside a training step); large rules run
    # on numba's TBB threads instead, as _compile_parallel's loop. error_model="numpy"
    # (IEEE results, no ZeroDivisionError checks) is what lets LLVM vectorize the loop: 8x.
    kernel = numba.njit(error_model="numpy", fastmath=False, nogil=True)(
        namespace["fused_rule"])
    kernel.source = source
    return kernel


#: elements per block of the parallel loop: fixed, so the blocks depend on the shapes alone
#: (each element's arithmetic is the same on any block: the bits never depend on them)
PARALLEL_BLOCK = 16384
#: rules over at least this many elements run on numba's threads where it has them
#: (backend/parallel_loops.py). Measured (Adam, serial vs prange alternating, a loaded 2-core
#: machine): 2^16 elements 1.15-1.36x the serial time, 2^17 0.93-0.95x, 2^18 0.65-0.78x; the
#: MLP-ResNet's 110,860 parameters on prange made its jitted epoch 1.08-1.11x slower
PARALLEL_MIN_ELEMENTS = 1 << 17


@functools.lru_cache(maxsize=64)
def _compile_parallel(statements: tuple, n_memory: int, n_scalars: int,
                      parted: tuple[int, ...] = ()) -> Callable[..., None]:
    """The rule's loop as a numba ``prange`` over blocks: ``blocks`` rows are (piece, start,
    length, base): elements ``start:start + length`` of piece ``piece`` (the arrays in
    ``parted``), at ``base:base + length`` of the whole arrays (see ``_blocks``). Without
    ``parted`` every array is whole and ``piece`` and ``start`` are unused. Each block runs
    the serial loop's body on its stretch, so every element is computed as the serial loop
    computes it."""
    params = ", ".join([f"m{k}" for k in range(n_memory)] + ["blocks"]
                       + [f"s{k}" for k in range(n_scalars)])
    stretches = "".join(
        f"        p{k} = m{k}[blocks[b, 0]][start:start + n]\n" if k in parted
        else f"        q{k} = m{k}[base:base + n]\n" for k in range(n_memory))
    source = (f"def fused_rule_blocks({params}):\n"
              "    for b in prange(blocks.shape[0]):\n"
              "        start = blocks[b, 1]\n"
              "        n = blocks[b, 2]\n"
              "        base = blocks[b, 3]\n"
              f"{stretches}"
              "        for j in range(n):\n"
              f"{_loop_source(list(statements), parted)}\n")
    namespace: dict[str, Any] = {"np": np, "prange": _numba().prange}
    exec(compile(source, "<fused update rule, blocks>", "exec"), namespace)  # noqa: S102
    # (no disk cache for generated source: njit_parallel compiles it once per process)
    kernel = parallel_loops.njit_parallel(namespace["fused_rule_blocks"])
    kernel.source = source
    return kernel


#: why the prange loops failed to compile, once they did (a latch: one thread from then on;
#: a test may append to it to force the one-thread loop)
_PARALLEL_FAILED: list[str] = []


def _blocks(sizes: tuple[int, ...]) -> np.ndarray:
    """The (piece, start, length, base) rows of ``_compile_parallel``'s loop for pieces of
    ``sizes`` (one piece: a whole array): each piece cut into PARALLEL_BLOCK-element blocks,
    the last one shorter; fixed by the sizes alone."""
    rows = []
    base = 0
    for piece, size in enumerate(sizes):
        for start in range(0, size, PARALLEL_BLOCK):
            rows.append((piece, start, min(PARALLEL_BLOCK, size - start), base + start))
        base += size
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


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


class FusedRule:
    """One optimizer's fused update between steps: the recorder and the loop compiled from it.

    ``kernel_for`` replays the rule on the kept recorder; the kept loop serves when the replay
    made the same calls on the same arrays (only the scalars differ), else the rule is
    recorded afresh. It holds the arrays of the last recording (the optimizer's own flat
    buffers), so it belongs to the optimizer and dies with it.
    """

    __slots__ = ("recorder", "statements", "n_memory", "parted", "kernel", "parallel",
                 "block_sizes", "blocks")

    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self.statements: list[tuple] | None = None
        self.n_memory = 0
        self.parted: tuple[int, ...] = ()
        self.kernel: Callable[..., None] | None = None
        #: the loop's prange variant and its blocks for pieces of ``block_sizes`` (made on
        #: first use: see ``parallel_for``)
        self.parallel: Callable[..., None] | None = None
        self.block_sizes: list[int] | None = None
        self.blocks: np.ndarray | None = None

    def forget(self) -> None:
        """Drop the recording (its arrays too); the next step records afresh."""
        recorder = self.recorder
        if recorder is not None:  # its symbols point back at it: break the cycle, so the
            recorder.symbols = []  # arrays it holds (the last step's gradients) go now,
            recorder.memory = []  # not when the cyclic garbage collector next runs
        self.recorder = self.statements = self.kernel = self.parallel = None
        self.n_memory = 0
        self.parted = ()

    def kernel_for(self, rule: Callable[..., None], arrays: tuple,
                   parted: tuple[int, ...] = ()) -> tuple[Any, Recorder]:
        """The compiled loop for this step's recording of ``rule`` and that recording
        (``parted``: the arrays that come in pieces, see ``run_fused``)."""
        recorder = self.recorder
        if recorder is not None and parted == self.parted and recorder.restart(arrays):
            rule(*recorder.symbols)
            if len(recorder.memory) == self.n_memory and recorder.statements == self.statements:
                return self.kernel, recorder
        self.forget()  # another structure: record afresh (no stale arrays kept as arguments)
        recorder = _record(rule, arrays)
        kernel = _compile(tuple(recorder.statements), len(recorder.memory),
                          len(recorder.scalars), parted)
        self.recorder, self.statements, self.kernel = recorder, recorder.statements, kernel
        self.n_memory = len(recorder.memory)
        self.parted = parted
        return kernel, recorder

    def parallel_for(self, recorder: Recorder, sizes: list[int]) -> tuple[Any, np.ndarray]:
        """The kept recording's prange loop and its blocks for pieces of ``sizes``."""
        kernel = self.parallel
        if kernel is None:
            kernel = self.parallel = _compile_parallel(
                tuple(recorder.statements), len(recorder.memory), len(recorder.scalars),
                self.parted)
        if sizes != self.block_sizes:
            self.blocks = _blocks(tuple(sizes))
            self.block_sizes = sizes
        assert self.blocks is not None
        return kernel, self.blocks


def _padded_pieces(pieces: tuple) -> tuple:
    """``pieces`` with empty arrays appended up to a power of two: numba compiles the loop
    once per tuple length (its type), so models with 27, 28 or 30 parameters share one."""
    n = len(pieces)
    size = 1 << max(2, (n - 1).bit_length())
    if size == n:
        return pieces
    return pieces + (np.empty(0, pieces[0].dtype),) * (size - n)


def run_fused(rule: Callable[..., None], *arrays: np.ndarray,
              cache: FusedRule | None = None, parts: dict[int, tuple] | None = None) -> bool:
    """Run ``rule(*arrays)`` as one compiled loop; False (nothing done) if it cannot be.

    ``rule`` receives stand-ins for ``arrays`` (flat arrays of one shape and dtype) and makes
    in-place calls on ``array_module(stand_in)``; other NumPy arrays it passes as operands
    (optimizer state) are read and written in place too, and arrays it gets from
    ``empty_like`` are scratch. It must not compute with the stand-ins any other way, and it
    may be called more than once per step (it only records). ``cache`` (the caller's
    ``FusedRule``) keeps the recording and its loop for the next step.

    ``parts`` ({position in ``arrays``: tuple of flat C-contiguous arrays of its dtype}) gives
    an array the rule only reads as pieces that, end to end, stand for it (an optimizer's
    gradients where the backward left them): the loop reads them in place, so they are never
    copied into ``arrays[position]`` (which then only gives the recording its shape). The
    caller makes sure no piece shares memory with an array the rule writes.
    """
    numba = _numba()
    if numba is None:
        return False
    parted: tuple[int, ...] = ()
    sizes: list[int] = []
    if parts:
        parted = tuple(sorted(parts))
        sizes = list(map(len, parts[parted[0]]))  # (flat pieces: len is the size)
        total = sum(sizes)
        for position in parted:  # (the loop walks the first one's pieces: all must match)
            if total != arrays[position].shape[0] or (
                    position != parted[0] and list(map(len, parts[position])) != sizes):
                raise ValueError("run_fused: the pieces do not add up to the array they stand "
                                 "for")
    try:
        if cache is None:
            recorder = _record(rule, arrays)
            kernel = _compile(tuple(recorder.statements), len(recorder.memory),
                              len(recorder.scalars), parted)
        else:
            kernel, recorder = cache.kernel_for(rule, arrays, parted)
    except (NotFusable, TypeError):  # TypeError: the rule computed on a stand-in directly
        if cache is not None:
            cache.forget()
        return False
    dtype = recorder.dtype.type
    memory: list[Any] = recorder.memory
    if parted and parts:
        memory = list(memory)
        for position in parted:
            memory[position] = _padded_pieces(parts[position])
    scalars = list(map(dtype, recorder.scalars))
    if recorder.shape[0] >= PARALLEL_MIN_ELEMENTS and not _PARALLEL_FAILED \
            and parallel_loops.parallel_threads():
        try:
            if cache is not None:
                parallel, blocks = cache.parallel_for(recorder, sizes or [recorder.shape[0]])
            else:
                parallel = _compile_parallel(tuple(recorder.statements), len(recorder.memory),
                                             len(recorder.scalars), parted)
                blocks = _blocks(tuple(sizes or [recorder.shape[0]]))
            parallel(*memory, blocks, *scalars)
            return True
        except numba.core.errors.NumbaError as exc:  # not compiled: nothing was written yet;
            _PARALLEL_FAILED.append(str(exc).splitlines()[0])  # the one-thread loop from now
    try:
        kernel(*memory, *scalars)
    except numba.core.errors.NumbaError:  # compiling failed: nothing was written yet
        if cache is not None:
            cache.forget()
        return False
    return True


def fused_source(rule: Callable[..., None], *arrays: np.ndarray) -> str:
    """The loop body ``run_fused`` would compile for this rule (for docs and debugging)."""
    return _loop_source(_record(rule, arrays).statements)

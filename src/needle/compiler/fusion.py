"""Region fusion: maximal runs of elementwise steps become one generated numba loop.

A *region* is a set of steps of one Program whose ops have a scalar form
(``Op.scalar_expr``), whose values all have one known *loop shape* (inputs may broadcast to
it), float32/float64/bool dtypes and CPU arrays. The pass replaces each region of two or more
steps by one step running a loop over the loop shape that loads each input element once,
computes every member as a scalar expression in registers, and stores only the values that
something outside the region reads (``FusedRegion``). Nothing in between is written to memory,
and one call replaces one NumPy call per member.

Ordering: a region runs where its last member stood. A region stops growing ("is sealed") as
soon as a step outside it reads one of its values, and at every step that writes state or has
a side effect, so moving the earlier members down never reorders a read past a write.

Results: the loop does each member's float operations in the same order and precision as
NumPy (operands cast as NumPy casts them, Python scalars cast to the array dtype, no
fast-math, no FMA contraction), so ``+ - * /``, ``maximum``, comparisons, ``where``, ``abs``,
``sign``, ``sqrt``, casts and the powers NumPy special-cases (2, 1, 0, 0.5, -1) give the same
bits; ``exp``, ``log``, ``tanh`` and other powers call the C library where NumPy uses its own
SIMD code and may differ in the last bit (tested to 2e-6 relative). On big arrays NumPy's
vectorized versions of those beat a scalar loop by 3-10x (benchmarks/fusion_choice.py), so
they join regions only up to ``TRANSCENDENTAL_MAX_SIZE`` elements; elsewhere they stay NumPy
calls between regions.

Memory plan: a region stores an output into the array of an input that dies with it, when
the program allocated that array and nothing took a view of it (``write_in_place``).

Layouts: the loop follows the memory order of its lead input (the first of the loop's full
shape): channels-last memory behind an NCHW view (what the convolution kernels return) runs
a kernel compiled for that axis order on transposed views, and the outputs keep that layout
(``FusedRegion.in_memory_order``; 3-4x faster than looping in the logical order there).
In any order, subexpressions of inputs that vary along the innermost axis only (a
BatchNorm's per-channel ``weight / sqrt(var + eps)`` there) are computed once per position of
that axis before the loop, by the same scalar expressions (compiler/hoisting.py,
``HOIST_LAST_AXIS``): the same bits, without a division and a square root per element (the
CNN steps' BatchNorm + ReLU regions 0.57-0.84x the time warm, 0.82-0.87x with the input out
of cache).

Threads: a loop of ``SPLIT_MIN_ELEMENTS`` or more runs as blocks of rows of its lead
input's memory order that needle's threads draw (``FusedRegion.in_blocks``; the rule of
kernels/threaded_elementwise.py), each element computed as in the one-call loop. Where numba's
parallel loops run on TBB (backend/parallel_loops.py), a loop of ``PRANGE_MIN_ELEMENTS`` or more
runs its blocks instead from one generated ``prange`` loop that calls the compiled block loop
(``FusedRegion._prange_runner``): no hand-off to needle's threads (~100 us each).

Kernels are cached by the region's structure (member op keys, wiring, each input's
broadcasting pattern, dtypes; not the sizes, which the loop reads from its inputs) in a
bounded LRU cache whose keys hold the values they name. numba needs 0.1-1 s per new kernel, so
compiled plans fuse once called ``FUSE_AFTER_CALLS`` times (``tiered``), and run on a fused
copy of their Program (``lower()``, ONNX export and ``run_metadata`` see the plain ops).
``NEEDLE_FUSION=0`` turns fusion off (A/B runs); without numba (or ``NEEDLE_NUMBA=0``) it is
skipped.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import cpu, cpu_threads, parallel_loops
from ..backend.numba_support import numba_module
from ..core.interpret import Program, Step, plan_frees, snapshot_slots
from ..core.ops_shape import TupleGetItem
from ..core.registry import Aval, Op, fmt_shape
from ..kernels import threaded_elementwise
from . import hoisting

#: dtypes a region computes in (bool only for masks and comparisons)
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.bool_))
#: ops whose scalar form calls the C library (slower than NumPy's SIMD loops on big arrays)
TRANSCENDENTAL = frozenset({"exp", "log", "tanh", "sigmoid", "power_scalar"})
#: largest loop (elements) a transcendental op joins a region in. Measured (2 cores,
#: float32): numba's scalar tanh/exp/log cost 3-11 ns per element where NumPy's SIMD loops
#: cost under 1 ns (1000 elements: tanh 11.5 vs 1.0 us, exp 3.5 vs 0.9 us)
TRANSCENDENTAL_MAX_SIZE = 64
#: compiled kernels kept (least recently used dropped first)
CACHE_SIZE = 256
#: fewest members worth a region (a single ufunc call is as fast as a one-op loop)
MIN_REGION = 2
#: smallest loop (elements) for a region whose every value is read outside it (it saves the
#: re-reads of memory, not the stores, and costs an item step per value)
ALL_STORED_MIN_SIZE = 4096
#: smallest loop (elements) run in blocks on needle's threads (``FusedRegion.in_blocks``), and
#: the elements per block: the threaded elementwise passes' rule
SPLIT_MIN_ELEMENTS = threaded_elementwise.SPLIT_MIN_ELEMENTS
BLOCK_ELEMENTS = threaded_elementwise.BLOCK_ELEMENTS
#: smallest loop (elements) whose blocks run from one numba prange loop (where
#: ``parallel_loops.parallel_threads()`` is nonzero), and the elements per block: the rule of
#: the threaded elementwise passes
PRANGE_MIN_ELEMENTS = threaded_elementwise.PRANGE_MIN_ELEMENTS
PRANGE_BLOCK_ELEMENTS = threaded_elementwise.PRANGE_BLOCK_ELEMENTS
#: the nested loops compute subexpressions of inputs that vary along the last axis only once
#: per position of that axis (``_kernel_source``); False: per element (A/B runs; read when a
#: kernel is compiled, and part of the cache key)
HOIST_LAST_AXIS = True


def enabled() -> bool:
    """Whether the pass runs: numba importable and ``NEEDLE_FUSION`` not ``0``."""
    return os.environ.get("NEEDLE_FUSION", "1") != "0" and numba_module() is not None


# -- finding regions ----------------------------------------------------------------------------
def _known(aval: Any) -> tuple | None:
    """``(shape, dtype)`` of a fully known array aval of a dtype regions compute in, or None."""
    shape = getattr(aval, "shape", None)
    if shape is None or isinstance(aval, tuple) and not isinstance(aval, Aval):
        return None
    if None in shape:
        return None
    dtype = np.dtype(aval.dtype)
    return (tuple(shape), dtype) if dtype in _DTYPES else None


def _broadcasts_to(shape: tuple, loop: tuple) -> bool:
    if len(shape) > len(loop):
        return False
    return all(d == n or d == 1 for d, n in zip(shape[::-1], loop[::-1]))


def _fusible(step: Step) -> tuple | None:
    """The loop shape of ``step`` if it can join a region, else None."""
    op = step.op
    if op.side_effect or op.random or op.writes_state or op.returns_tuple:
        return None
    if type(op).scalar_expr is Op.scalar_expr:
        return None
    node = step.node
    out = _known(node.aval)
    if out is None or not out[0] or 0 in out[0]:  # 0-d results are NumPy scalars; empty: no
        return None
    shape, dtype = out
    if getattr(node, "device", None) != cpu():
        return None
    if len(node.inputs) != len(step.inputs):
        return None
    for inp in node.inputs:
        known = _known(inp.aval)
        if known is None or not _broadcasts_to(known[0], shape):
            return None
        if getattr(inp, "device", cpu()) != cpu():
            return None
    if op.name in TRANSCENDENTAL and int(np.prod(shape)) > TRANSCENDENTAL_MAX_SIZE:
        return None
    if dtype.kind == "b" and op.name not in ("compare", "compare_scalar"):
        return None  # bool arithmetic (logical ops) has no float form here
    if _scalar_source(step, [f"a{k}" for k in range(len(step.inputs))], {}) is None:
        return None
    return shape


def find_regions(program: Program) -> list[list[int]]:
    """Step indices of each maximal fusible region (in program order), largest first found.

    A step joins every open region that produced one of its inputs and has its loop shape
    (merging them); a region is sealed when a step outside it reads one of its values, or at
    a step that writes state or has side effects.
    """
    region_of: dict[int, int] = {}  # slot -> region id of the member that computes it
    members: dict[int, list[int]] = {}
    shape_of: dict[int, tuple] = {}
    sealed: set[int] = set()
    parent: dict[int, int] = {}

    def find(r: int) -> int:
        while parent.get(r, r) != r:
            r = parent[r]
        return r

    for i, step in enumerate(program.steps):
        if step.op.side_effect or step.op.writes_state:
            sealed.update(find(r) for r in members)
        shape = _fusible(step)
        producers = {find(region_of[s]) for s in step.inputs if s in region_of}
        if shape is None:
            sealed.update(producers)
            continue
        joinable = [r for r in producers if r not in sealed and shape_of[r] == shape]
        for r in producers:  # read from outside a region it does not join: seal it
            if r not in joinable:
                sealed.add(r)
        if joinable:
            target = joinable[0]
            for other in joinable[1:]:
                parent[other] = target
                members[target].extend(members.pop(other))
                shape_of.pop(other)
        else:
            target = i
            members[target] = []
            shape_of[target] = shape
            parent[target] = target
        members[target].append(i)
        region_of[step.out] = target
    return [sorted(m) for m in members.values() if len(m) >= MIN_REGION]


# -- generating a kernel ------------------------------------------------------------------------
def _cast(expr: str, have: np.dtype, want: np.dtype) -> str:
    return expr if have == want else f"np.{want.name}({expr})"


def _scalar_source(step: Step, args: list[str], consts: dict[str, Any]) -> str | None:
    """The member's scalar expression over ``args`` (operands cast as NumPy casts them);
    Python constants it needs are added to ``consts``."""
    node = step.node
    out_dtype = np.dtype(node.aval.dtype)
    in_dtypes = [np.dtype(i.aval.dtype) for i in node.inputs]
    if out_dtype.kind == "f":
        work = out_dtype
    else:  # comparisons: operands in their common type
        work = np.result_type(*in_dtypes) if in_dtypes else out_dtype
    cast_args = [_cast(a, d, work) for a, d in zip(args, in_dtypes)]

    def const(value: Any) -> str:
        name = f"k{len(consts)}"
        consts[name] = work.type(value)
        return name

    return step.op.scalar_expr(cast_args, const)


class _Kernel:
    """A compiled region: the numba dispatcher and the Python source it was made from."""

    def __init__(self, fn: Callable[..., Any], source: str) -> None:
        self.fn = fn
        self.source = source


def _pattern(shape: tuple, loop: tuple) -> str:
    """Per axis of an input, ``f`` (it runs along the loop's axis) or ``b`` (size 1 broadcast
    along a longer axis); the input's axes align with the loop's last ones."""
    tail = loop[len(loop) - len(shape):]
    return "".join("b" if d == 1 and n != 1 else "f" for d, n in zip(shape, tail))


def _kernel_source(ndim: int, patterns: tuple, members: tuple, outputs: tuple,
                   into: tuple, given_outputs: bool = False) -> tuple[str, dict[str, Any]]:
    """Python source of the loop: ``ndim`` nested loops whose sizes come from the inputs
    (so one kernel serves every loop shape with the same broadcasting pattern), each input
    element loaded once, each member one scalar expression, each output stored once.
    ``into[k]`` is the input whose array output ``k`` overwrites (None: a new array); each
    element is read before it is written, so that is safe for same-shape inputs.
    ``given_outputs``: the outputs are parameters after the inputs (``out0, ...``; a block of
    a split loop writes into its rows of the caller's arrays).
    Subexpressions of inputs that vary along the last axis only are computed once per position
    of that axis before the loops (``HOIST_LAST_AXIS``; compiler/hoisting.py)."""
    consts: dict[str, Any] = {}
    params = ", ".join([f"a{k}" for k in range(len(patterns))]
                       + ([f"out{k}" for k in range(len(outputs))] if given_outputs else []))
    lines = [f"def fused_region({params}):"]
    for d in range(ndim):  # each axis's size from an input that runs along it
        source = next((k, d - (ndim - len(p))) for k, p in enumerate(patterns)
                      if len(p) >= ndim - d and p[d - (ndim - len(p))] == "f")
        lines.append(f"    n{d} = a{source[0]}.shape[{source[1]}]")
    shape = ", ".join(f"n{d}" for d in range(ndim)) + ("," if ndim == 1 else "")
    for k, (_, dtype) in enumerate(outputs):
        if given_outputs:
            lines.append(f"    o{k} = out{k}")
        else:
            lines.append(f"    o{k} = np.empty(({shape}), np.{dtype.name})" if into[k] is None
                         else f"    o{k} = a{into[k]}")
    out_index = ", ".join(f"i{d}" for d in range(ndim))
    stores = [f"o{k}[{out_index},] = t{member}" for k, (member, _) in enumerate(outputs)]
    exprs, member_consts = _member_exprs(members)
    consts.update(member_consts)
    # inputs that vary along the last axis only: subexpressions of theirs computed once per
    # position of that axis (hoisting.hoist: BatchNorm's weight / sqrt(var + eps) per channel)
    last_only = {k for k, p in enumerate(patterns)
                 if p and ("b" * (ndim - len(p)) + p) == "b" * (ndim - 1) + "f"}
    fixed = {k for k, p in enumerate(patterns) if "f" not in p}  # scalars, all broadcast
    hoisted: tuple = ([], exprs, [])
    if ndim >= 2 and last_only and HOIST_LAST_AXIS:
        hoisted = hoisting.hoist(exprs, {f"x{k}" for k in last_only},
                                 {f"x{k}" for k in fixed} | set(consts), stores)
    column, element, tiled = hoisted
    if not column:  # nothing computed per position: no arrays of copies
        tiled = []
    indent = "    "
    if tiled:
        last = f"n{ndim - 1}"
        position_loads = [f"x{k} = a{k}[{'0, ' * (len(patterns[k]) - 1)}j,]"
                          for k in sorted(last_only)]
        lines += [f"    x{k} = a{k}[{'0, ' * len(patterns[k])}]" if patterns[k] else
                  f"    x{k} = a{k}" for k in sorted(fixed)]
        lines += ["    j = 0", *(f"    {st}" for st in position_loads + column)]
        lines += [f"    hp_{name} = np.full({last}, {name})" for name in tiled]
        lines += [f"    for j in range({last}):", *(f"        {st}" for st in
                                                     position_loads + column)]
        lines += [f"        hp_{name}[j] = {name}" for name in tiled]
    else:
        fixed = set()
        last_only = set()
        element = [f"t{m} = {expr}" for m, expr in enumerate(exprs)]
    for d in range(ndim):
        lines.append(f"{indent}for i{d} in range(n{d}):")
        indent += "    "
    for k, p in enumerate(patterns):
        if k in fixed or k in last_only:
            continue
        offset = ndim - len(p)
        index = ", ".join(f"i{offset + j}" if c == "f" else "0" for j, c in enumerate(p))
        lines.append(f"{indent}x{k} = a{k}[{index},]" if p else f"{indent}x{k} = a{k}")
    lines += [f"{indent}{name} = hp_{name}[i{ndim - 1}]" for name in tiled]
    lines += [f"{indent}{st}" for st in element + stores]
    lines.append(f"    return {', '.join(f'o{k}' for k in range(len(outputs)))}")
    return "\n".join(lines) + "\n", consts


_cache: OrderedDict[tuple, _Kernel] = OrderedDict()
_cache_lock = threading.Lock()


def _compile(key: tuple, structure: tuple, signature: tuple,
             given_outputs: bool = False) -> _Kernel:
    """The kernel for ``structure`` (compiled for C-contiguous ``signature`` types), cached;
    ``given_outputs``: the variant taking its outputs as parameters (``_kernel_source``)."""
    key = (*key, "given outputs") if given_outputs else key
    key = key if HOIST_LAST_AXIS else (*key, "not hoisted")
    with _cache_lock:
        kernel = _cache.get(key)
        if kernel is not None:
            _cache.move_to_end(key)
            return kernel
    numba = numba_module()
    loop, inputs, members, outputs, into = structure
    source, consts = _kernel_source(len(loop), tuple(_pattern(shape, loop) for shape, _ in inputs),
                                    members, outputs, into, given_outputs)
    namespace: dict[str, Any] = {"np": np, **consts}
    exec(compile(source, "<needle fused region>", "exec"), namespace)  # noqa: S102 - generated
    # NOTE: error_model="numpy" (IEEE results, no ZeroDivisionError checks) lets LLVM
    # vectorize; no fastmath, so every operation rounds as NumPy's does
    fn = numba.njit(error_model="numpy", fastmath=False, nogil=True)(namespace["fused_region"])
    fn.compile(signature)
    kernel = _Kernel(fn, source)
    with _cache_lock:
        _cache[key] = kernel
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return kernel


def _prange_source(cut: tuple, num_outputs: int) -> str:
    """Python source of the prange loop over ``count`` blocks of rows that calls ``kernel``
    (a global: the compiled block loop) on each: inputs ``a{k}`` sliced where ``cut[k]``,
    outputs ``out{k}`` always."""
    ins = [f"a{k}" for k in range(len(cut))]
    outs = [f"out{k}" for k in range(num_outputs)]
    args = [f"a{k}[s:e]" if c else f"a{k}" for k, c in enumerate(cut)] + [
        f"{o}[s:e]" for o in outs]
    return "\n".join([f"def fused_blocks({', '.join(ins + outs)}, count):",
                      "    n = out0.shape[0]",
                      "    for b in prange(count):",
                      "        s = n * b // count",
                      "        e = n * (b + 1) // count",
                      f"        kernel({', '.join(args)})"]) + "\n"


_prange_cache: OrderedDict[tuple, Any] = OrderedDict()


def _compile_prange(kernel: Any, cut: tuple, num_outputs: int, signature: tuple) -> Any:
    """The prange loop of ``_prange_source`` around ``kernel`` (a numba dispatcher), compiled
    for ``signature``; cached by the dispatcher (kept alive by the key), the cut pattern and
    the signature."""
    key = (kernel, cut, num_outputs, signature)
    with _cache_lock:
        fn = _prange_cache.get(key)
        if fn is not None:
            _prange_cache.move_to_end(key)
            return fn
    from numba import prange

    namespace: dict[str, Any] = {"kernel": kernel, "prange": prange}
    exec(compile(_prange_source(cut, num_outputs), "<needle fused blocks>", "exec"),  # noqa: S102
         namespace)
    # (no disk cache for generated source; numba's njit would try and fail)
    fn = numba_module().njit(error_model="numpy", nogil=True, parallel=True)(
        namespace["fused_blocks"])
    fn.compile(signature)
    with _cache_lock:
        _prange_cache[key] = fn
        while len(_prange_cache) > CACHE_SIZE:
            _prange_cache.popitem(last=False)
    return fn


def _member_exprs(members: tuple) -> tuple[list[str], dict[str, Any]]:
    """Each member's scalar expression over ``x{k}`` (inputs) and ``t{m}`` (members), and
    the constants they name (``_kernel_source``'s expressions)."""
    consts: dict[str, Any] = {}
    exprs = []
    for step, refs in members:
        args = [f"x{r[1]}" if r[0] == "in" else f"t{r[1]}" for r in refs]
        expr = _scalar_source(step, args, consts)
        assert expr is not None  # (a step without a scalar form never joins a region)
        exprs.append(expr)
    return exprs, consts


def cache_info() -> dict[str, int]:
    """Kernels cached now and the bound."""
    return {"size": len(_cache), "max_size": CACHE_SIZE}


def clear_cache() -> None:
    """Drop every cached kernel (tests; a long-running process that changed models)."""
    with _cache_lock:
        _cache.clear()
        _prange_cache.clear()


# -- the fused step -----------------------------------------------------------------------------
class RegionNode:
    """The node a fused step reports: its value's aval(s), external inputs and a name."""

    __slots__ = ("op", "inputs", "aval", "meta", "device", "members")

    def __init__(self, op: FusedRegion, inputs: tuple, aval: Any, meta: Any,
                 members: list) -> None:
        self.op = op
        self.inputs = inputs
        self.aval = aval
        self.meta = meta
        self.device = cpu()
        self.members = members


def _lead_input(structure: tuple) -> int | None:
    """The first input of the loop's full shape (of 2 or more dims): the one whose memory
    order the loop follows (``FusedRegion.in_memory_order``), or None."""
    loop, inputs = structure[0], structure[1]
    if len(loop) < 2:
        return None
    return next((k for k, (shape, _) in enumerate(inputs) if shape == loop), None)


def _guarded(kernel: _Kernel, inputs: tuple, lead: int | None = None,
             relayout: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """The kernel behind a generated Python check of its inputs' shapes.

    NOTE: the loop does not check bounds, so an input of another shape than the plan's (a
    parameter replaced by an array of another shape) must fail here, not read out of bounds.
    The check is in Python because a ``raise`` in the numba kernel doubled its compile time.
    0-d inputs (NumPy scalars or 0-d arrays) are passed as scalars of their dtype.
    With ``lead``, a call whose lead input is not C-contiguous (channels-last memory behind
    an NCHW view) goes to ``relayout`` instead, which loops in that input's memory order.
    """
    params = [f"a{k}" for k in range(len(inputs))]
    namespace: dict[str, Any] = {"kernel": kernel.fn, "relayout": relayout}
    checks = []
    args = []
    for k, (shape, dtype) in enumerate(inputs):
        if shape:
            checks.append(f"a{k}.shape != {shape!r}")
            args.append(f"a{k}")
        else:
            namespace[f"t{k}"] = dtype.type
            args.append(f"t{k}(a{k})")
    expected = ", ".join(fmt_shape(shape) for shape, _ in inputs)
    lines = [f"def run({', '.join(params)}):"]
    if checks:
        got = ", ".join(f"{{fmt_shape(np.shape(a{k}))}}" for k in range(len(inputs)))
        lines += [f"    if {' or '.join(checks)}:",
                  f"        raise ValueError(f'fused region: inputs of shapes {got}, expected "
                  f"{expected}')"]
        namespace.update(fmt_shape=fmt_shape, np=np)
    if lead is not None and relayout is not None:
        lines += [f"    if not a{lead}.flags.c_contiguous:",
                  f"        return relayout({', '.join(params)})"]
    lines.append(f"    return kernel({', '.join(args)})")
    exec(compile("\n".join(lines) + "\n", "<needle fused region call>", "exec"),  # noqa: S102
         namespace)
    return namespace["run"]


class FusedRegion(Op):
    """Run a region's generated loop: inputs in, the values read outside the region out
    (one array, or a tuple of them)."""

    name = "fused_region"

    def __init__(self, kernel: _Kernel, op_names: tuple, structure: tuple) -> None:
        self.kernel = kernel
        self.op_names = op_names
        self.structure = structure
        self.num_outputs = len(structure[3])
        self.returns_tuple = self.num_outputs > 1
        self._by_order: dict[tuple, _Kernel] = {}  # axis order -> the kernel looping in it
        self._blocks_by_order: dict[tuple, Any] = {}  # axis order -> the given-outputs kernel
        self._prange_by_cut: dict[tuple, Any] = {}  # (order, inputs cut) -> the prange loop
        self._lead = _lead_input(structure)
        # the generated call itself is the compute (compiled plans bind it: no extra frame)
        self._whole = _guarded(kernel, structure[1], self._lead, self.in_memory_order)
        self.compute = self._whole  # type: ignore[method-assign]
        if self._lead is not None and math.prod(structure[0]) >= min(SPLIT_MIN_ELEMENTS,
                                                                       PRANGE_MIN_ELEMENTS):
            self.compute = self.in_blocks  # type: ignore[method-assign]

    def in_blocks(self, *arrays: Any) -> Any:
        """Run a large region as blocks of rows (of its lead input's memory order) that
        needle's threads draw (backend/cpu_threads.run_chunks), writing into outputs
        allocated here (or into the inputs ``into`` names); the one-call loop where the
        split cannot apply (one thread, inputs not as planned, memory in no axis order).
        From ``PRANGE_MIN_ELEMENTS`` on numba's TBB threads, the blocks run from one prange
        loop (``_prange_runner``) instead of needle's threads.

        NOTE: every element is computed by the same scalar expressions as in the one-call
        loop, so the results are bitwise those of it, whatever the thread count. The hot
        jitted CNN step (benchmarks/cnn_step.py --jit, strides 1,1,1) fuses each BatchNorm
        with its ReLU: in one call such a region took 5.5 ms per call (profiled, loaded
        2-core machine), more than the two threaded ops unfused (3.4 ms); in blocks 2.6 ms,
        and the step 91 -> 67 ms (medians, alternating in one process)."""
        loop, inputs, members, outputs, into = self.structure
        if cpu_threads.NUM_THREADS < 2 or any(
                shape and (type(a) is not np.ndarray or a.shape != shape)
                for a, (shape, _) in zip(arrays, inputs)):
            return self._whole(*arrays)
        size = math.prod(loop)
        in_prange = size >= PRANGE_MIN_ELEMENTS and parallel_loops.parallel_threads() > 0
        if not in_prange and size < SPLIT_MIN_ELEMENTS:
            return self._whole(*arrays)
        lead = arrays[self._lead]  # type: ignore[index]
        order = tuple(sorted(range(len(loop)), key=lambda d: -abs(lead.strides[d])))
        rows = loop[order[0]]
        count = min(rows, -(-size // (PRANGE_BLOCK_ELEMENTS if in_prange else BLOCK_ELEMENTS)))
        if count < 2 or not lead.transpose(order).flags.c_contiguous:
            return self._whole(*arrays)
        views = [a.reshape(_padded(shape, len(loop))).transpose(order) if shape else
                 dtype.type(a) for a, (shape, dtype) in zip(arrays, inputs)]
        ordered = tuple(loop[d] for d in order)
        outs = [views[into[k]] if into[k] is not None else np.empty(ordered, dtype)
                for k, (_, dtype) in enumerate(outputs)]
        kernel = self._blocks_kernel(order, views, outs)
        if kernel is None:
            return self._whole(*arrays)
        cut = [bool(shape) and v.shape[0] == rows for v, (shape, _) in zip(views, inputs)]
        runner = self._prange_runner(order, kernel, tuple(cut), views, outs) if in_prange \
            else None
        if runner is not None:
            runner(*views, *outs, count)
        else:
            if in_prange and size < SPLIT_MIN_ELEMENTS:
                return self._whole(*arrays)
            bounds = [rows * i // count for i in range(count + 1)]

            def block(i: int) -> None:
                s, e = bounds[i], bounds[i + 1]
                kernel(*(v[s:e] if c else v for v, c in zip(views, cut)),
                       *(o[s:e] for o in outs))

            cpu_threads.run_chunks(block, count, cpu_threads.NUM_THREADS)
        back = tuple(order.index(d) for d in range(len(order)))
        if self.num_outputs == 1:
            return outs[0].transpose(back)
        return tuple(o.transpose(back) for o in outs)

    def _blocks_kernel(self, order: tuple, views: list, outs: list) -> Any:
        """The given-outputs kernel looping in ``order`` (compiled here, on this thread, for
        the types of ``views`` and ``outs``), or None where numba cannot compile it."""
        if order in self._blocks_by_order:
            return self._blocks_by_order[order]
        loop, inputs, members, outputs, into = self.structure
        permuted = tuple((_reorder(shape, len(loop), order) if shape else shape, dtype)
                         for shape, dtype in inputs)
        structure = (tuple(loop[d] for d in order), permuted, members, outputs, into)
        numba = numba_module()
        try:
            signature = tuple(numba.typeof(v) for v in (*views, *outs))
            fn: Any = _compile(_key(structure), structure, signature, given_outputs=True).fn
        except Exception:  # noqa: BLE001 - the one-call loop runs instead
            fn = None
        self._blocks_by_order[order] = fn
        return fn

    def _prange_runner(self, order: tuple, kernel: Any, cut: tuple, views: list,
                       outs: list) -> Any:
        """The prange loop running ``kernel`` (the given-outputs block loop) over ``count``
        blocks of rows: inputs marked in ``cut`` and the outputs sliced, the others passed
        whole (``_prange_source``); compiled here for the types of ``views`` and ``outs``,
        None where numba cannot compile it.

        NOTE: numba's parallel=True compile is slow: this loop took 0.45-0.5 s on the 2-core
        machine against 0.14 s for the block loop it calls; making the block loop's outer
        loop a prange compiled as slowly (0.45 s), so the loop is generated around the
        compiled block loop, which needle's threads' path runs as well."""
        if (order, cut) in self._prange_by_cut:
            return self._prange_by_cut[(order, cut)]
        numba = numba_module()
        try:
            signature = (*(numba.typeof(v) for v in (*views, *outs)), numba.int64)
            fn: Any = _compile_prange(kernel, cut, self.num_outputs, signature)
        except Exception:  # noqa: BLE001 - needle's threads run the blocks instead
            fn = None
        self._prange_by_cut[(order, cut)] = fn
        return fn

    def in_memory_order(self, *arrays: Any) -> Any:
        """Run the region looping in the memory order of its lead input when that is not
        C order (channels-last memory behind an NCHW view): every input is viewed with its
        axes in that order (broadcast inputs padded to the loop's rank first), a kernel
        compiled for that order runs on the views, and the outputs are viewed back, so
        they keep the inputs' layout as NumPy's ufuncs do. Looping in the logical order
        over such memory was 3-4x slower (and slower than NumPy).

        NOTE: the results are those of the C-order loop: every element is computed by the
        same scalar expressions; only the visiting order differs."""
        loop, inputs, members, outputs, into = self.structure
        lead = arrays[self._lead]  # type: ignore[index]
        order = tuple(sorted(range(len(loop)), key=lambda d: -abs(lead.strides[d])))
        if not lead.transpose(order).flags.c_contiguous:  # no axis order makes it C order
            return self.kernel.fn(*_scalars(arrays, inputs))
        kernel = self._by_order.get(order)
        if kernel is None:
            permuted = tuple((_reorder(shape, len(loop), order) if shape else shape, dtype)
                             for shape, dtype in inputs)
            structure = (tuple(loop[d] for d in order), permuted, members, outputs, into)
            kernel = _compile(_key(structure), structure,
                              _signature(numba_module(), permuted))
            self._by_order[order] = kernel
        views = [a.reshape(_padded(shape, len(loop))).transpose(order) if shape else
                 dtype.type(a) for a, (shape, dtype) in zip(arrays, inputs)]
        result = kernel.fn(*views)
        back = tuple(order.index(d) for d in range(len(order)))
        if self.num_outputs == 1:
            return result.transpose(back)
        return tuple(o.transpose(back) for o in result)

    def attrs(self) -> tuple:
        return (("ops", self.op_names),)

    def key(self) -> tuple:
        return (type(self), self)  # never merged with another region by CSE

    def compute(self, *arrays: Any) -> Any:  # (replaced per instance in __init__)
        raise NotImplementedError

    def infer(self, *avals: Any) -> Any:
        raise NotImplementedError("fused_region: the step's node carries its avals")


def _structure(program: Program, indices: list[int], loop: tuple,
               keep: set[int]) -> tuple[tuple, list[int], list[int]]:
    """The region's structure (cache key material), its input slots and its output slots."""
    steps = [program.steps[i] for i in indices]
    inside = {s.out: m for m, s in enumerate(steps)}
    input_slots: list[int] = []
    input_pos: dict[int, int] = {}
    input_desc: list[tuple] = []
    members: list[tuple] = []
    for step in steps:
        refs = []
        for slot, node in zip(step.inputs, step.node.inputs):
            if slot in inside:
                refs.append(("t", inside[slot]))
                continue
            if slot not in input_pos:
                input_pos[slot] = len(input_slots)
                input_slots.append(slot)
                shape, dtype = _known(node.aval)  # type: ignore[misc]
                input_desc.append((shape, dtype))
            refs.append(("in", input_pos[slot]))
        members.append((step, tuple(refs)))
    outputs = [s.out for s in steps if s.out in keep]
    out_desc = tuple((inside[slot], np.dtype(steps[inside[slot]].node.aval.dtype))
                     for slot in outputs)
    structure = (loop, tuple(input_desc), tuple(members), out_desc, (None,) * len(outputs))
    return structure, input_slots, outputs


def _padded(shape: tuple, ndim: int) -> tuple:
    """``shape`` with leading 1s up to ``ndim`` axes (how it broadcasts against the loop)."""
    return (1,) * (ndim - len(shape)) + tuple(shape)


def _reorder(shape: tuple, ndim: int, order: tuple) -> tuple:
    """``shape``, padded to ``ndim`` axes, with its axes in ``order``."""
    padded = _padded(shape, ndim)
    return tuple(padded[d] for d in order)


def _scalars(arrays: tuple, inputs: tuple) -> list:
    """The arrays as the kernel takes them: 0-d inputs as scalars of their dtype."""
    return [a if shape else dtype.type(a) for a, (shape, dtype) in zip(arrays, inputs)]


def _key(structure: tuple) -> tuple:
    """What the kernel depends on: loop rank, each input's broadcasting pattern and dtype,
    each member's op key, dtypes and wiring, the stored members (not the sizes)."""
    loop, inputs, members, outputs, into = structure
    member_keys = tuple((step.op.key(), np.dtype(step.node.aval.dtype).name,
                         tuple(np.dtype(i.aval.dtype).name for i in step.node.inputs), refs)
                        for step, refs in members)
    return (len(loop), tuple((_pattern(s, loop), d.name) for s, d in inputs), member_keys,
            tuple((m, d.name) for m, d in outputs), into)


def _signature(numba: Any, inputs: tuple) -> tuple:
    types = []
    for shape, dtype in inputs:
        scalar = numba.from_dtype(dtype)
        if not shape:
            types.append(scalar)
        elif len(shape) == 1:
            types.append(scalar[::1])
        else:
            types.append(scalar[(slice(None),) * (len(shape) - 1) + (slice(None, None, 1),)])
    return tuple(types)


def fuse_regions(program: Program) -> int:
    """Replace each fusible region of ``program`` by one ``FusedRegion`` step (and a
    ``tuple_get_item`` per output where it has several); the number of regions fused.
    Plan the frees afterwards (``plan_frees``)."""
    if not enabled():
        return 0
    regions = find_regions(program)
    if not regions:
        return 0
    numba = numba_module()
    readers: dict[int, set[int]] = {}
    for i, step in enumerate(program.steps):
        for slot in step.inputs:
            readers.setdefault(slot, set()).add(i)
    kept_slots = set(program.outputs) | snapshot_slots(program)
    replaced: dict[int, list[Step]] = {}  # index of a region's last member -> new steps
    dropped: set[int] = set()
    fused = 0
    for indices in regions:
        members = set(indices)
        keep = {program.steps[i].out for i in indices
                if program.steps[i].out in kept_slots
                or readers.get(program.steps[i].out, set()) - members}
        loop = _known(program.steps[indices[0]].node.aval)[0]  # type: ignore[index]
        structure, input_slots, outputs = _structure(program, indices, loop,
                                                                    keep)
        if not outputs or (len(outputs) >= len(indices)
                           and int(np.prod(loop)) < ALL_STORED_MIN_SIZE):
            continue  # every value stored: only re-reads saved, and on small arrays no gain
        try:
            kernel = _compile(_key(structure), structure, _signature(numba, structure[1]))
        except Exception:  # noqa: BLE001 - a region numba cannot compile stays as it was
            continue
        op = FusedRegion(kernel, tuple(program.steps[i].op.name for i in indices), structure)
        steps = [program.steps[i] for i in indices]
        by_slot = {s.out: s for s in steps}
        last = steps[-1].node
        input_nodes = tuple(next(n for s in steps for sl, n in zip(s.inputs, s.node.inputs)
                                 if sl == slot) for slot in input_slots)
        if len(outputs) == 1:
            node = RegionNode(op, input_nodes, by_slot[outputs[0]].node.aval, last.meta, steps)
            new = [Step(op, tuple(input_slots), outputs[0], node)]
        else:
            avals = tuple(by_slot[s].node.aval for s in outputs)
            node = RegionNode(op, input_nodes, avals, last.meta, steps)
            new = [Step(op, tuple(input_slots), id(node), node)]
            new += [Step(TupleGetItem(k), (id(node),), slot, by_slot[slot].node)
                    for k, slot in enumerate(outputs)]
        replaced[indices[-1]] = new
        dropped.update(indices[:-1])
        fused += 1
    program.steps = [s for i, step in enumerate(program.steps) if i not in dropped
                     for s in replaced.get(i, [step])]
    return fused


def fused_copy(program: Program) -> tuple[Program, int]:
    """A copy of ``program`` with its regions fused and frees planned afresh, and the number
    of regions fused; ``program`` itself is left as it is (``lower()``, ONNX export
    and step-by-step runs keep seeing the plain ops). The same program when nothing fused."""
    if not enabled():
        return program, 0
    copy = Program(list(program.steps), program.sources, program.outputs, program.constants,
                   passes=list(program.passes), nodes_before=program.nodes_before)
    fused = fuse_regions(copy)
    if not fused:
        return program, 0
    plan_frees(copy)
    write_in_place(copy)
    return copy, fused


def write_in_place(program: Program) -> int:
    """Let each region store an output into the array of an input that dies with it (same
    shape and dtype, allocated by the program, read by nothing that may keep a view); the
    number of outputs so placed. Needs the frees planned (``plan_frees``)."""
    numba = numba_module()
    region_items = {s.out for s in program.steps  # slots of the regions' output tuples
                    if isinstance(s.op, FusedRegion) and s.op.returns_tuple}
    fresh: set[int] = set()
    viewed: set[int] = set()  # read by a step that may return a view of it or keep it
    for step in program.steps:
        if not (step.op.ufunc() is not None or isinstance(step.op, FusedRegion)
                or isinstance(step.op, TupleGetItem) and step.inputs[0] in region_items):
            viewed.update(step.inputs)
    keep = set(program.outputs) | snapshot_slots(program)
    placed = 0
    for i, step in enumerate(program.steps):
        op = step.op
        if isinstance(op, FusedRegion):
            loop, inputs, members, outputs, into = op.structure
            dead = set(program.frees[i]) if program.frees else set()
            chosen = list(into)
            taken: set[int] = set()
            for k, (_, dtype) in enumerate(outputs):
                for j, (slot, (shape, in_dtype)) in enumerate(zip(step.inputs, inputs)):
                    if (slot in fresh and slot in dead and slot not in viewed
                            and slot not in keep and j not in taken and shape == loop
                            and in_dtype == dtype and step.inputs.count(slot) == 1):
                        chosen[k] = j
                        taken.add(j)
                        break
            if taken:
                structure = (loop, inputs, members, outputs, tuple(chosen))
                try:
                    kernel = _compile(_key(structure), structure, _signature(numba, inputs))
                except Exception:  # noqa: BLE001 - keep the allocating kernel
                    kernel = None
                if kernel is not None:
                    new_op = FusedRegion(kernel, op.op_names, structure)
                    step.op = new_op
                    step.node.op = new_op
                    placed += len(taken)
        if (step.op.ufunc() is not None or isinstance(step.op, FusedRegion)
                or isinstance(step.op, TupleGetItem) and step.inputs[0] in region_items):
            fresh.add(step.out)
    return placed


# -- when to fuse: plans called often --------------------------------------------------------------
_fuse_lock = threading.Lock()
#: calls of a plan before its regions are compiled: numba takes 0.1-1 s per new kernel, which
#: a plan called a few times (a test, an evaluation) never earns back
FUSE_AFTER_CALLS = 50


class TieredProgram:
    """Run a compiled program; from its ``FUSE_AFTER_CALLS``-th call on, run the program with
    its regions fused instead (compiled then, once). Attributes of the program in use
    (``source``, ``program``) are passed through."""

    def __init__(self, program: Program, plain: Callable[[list], list],
                 build: Callable[[Program], Callable[[list], list]]) -> None:
        self.plain_program = program
        self._build = build
        self._left = FUSE_AFTER_CALLS
        self._fused = False
        self.current = plain
        if self._left <= 0:
            self._fuse()

    def _fuse(self) -> None:
        with _fuse_lock:  # two threads reaching the threshold together: one fuses
            if self._fused:
                return
            self._fused = True
            fused, regions = fused_copy(self.plain_program)
            if regions:
                self.current = self._build(fused)
                self.plain_program.passes.append(
                    f"region_fusion ({regions} regions; {len(fused.steps)} steps run)")

    def __call__(self, sources: list) -> list:
        if self._left > 0:
            self._left -= 1
            if self._left <= 0:
                self._fuse()
        return self.current(sources)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["current"], name)


def tiered(program: Program, plain: Callable[[list], list],
           build: Callable[[Program], Callable[[list], list]]) -> Callable[[list], list]:
    """``plain`` (the compiled ``program``) as is when fusion is off or finds no region, else
    a :class:`TieredProgram` that switches to ``build(fused copy)`` once the plan is hot."""
    if not enabled() or not find_regions(program):
        return plain
    return TieredProgram(program, plain, build)

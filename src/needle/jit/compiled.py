"""ndl.jit: trace a function once per signature, optimize the graph, replay it on later calls.

A compiled plan is a graph op (``JitCall``): applied to the call's tensors and the parameters
the trace read, it runs the optimized Program. A plan is differentiable (its gradient is
another compiled plan, built from the trace's outputs by the same autodiff), so a jitted
module trains with ``loss.backward()`` like an eager one. A plan with effects (a whole
training step: ``opt.step()``, BatchNorm's running statistics) applies them on every call of
the forward plan, never in the gradient plan.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..autograd import Tensor, TracerConversionError, make_from_op, new_leaf
from ..backend import cpu
from ..compiler import optimize as optimize_program
from ..compiler.buffers import plan_inplace
from ..compiler.codegen import compile_program
from ..compiler.fusion import tiered
from ..core import api as F
from ..core import autodiff
from ..core.context import (
    active_trace,
    add_grad_hook,
    is_grad_enabled,
    remove_grad_hook,
    tracing,
)
from ..core.interpret import Program, ancestors, build_program, plan_frees
from ..core.ops_shape import TupleGetItem
from ..core.ops_state import ApplyUpdates
from ..core.registry import Aval, Op, register
from ..kernels import blas_policy
from .guards import Guard, GuardCollector, Unguarded, compile_checks
from .signature import (
    describe_difference,
    flatten,
    flatten_tensor_args,
    rebuild,
    static_key,
)
from .tracing import Trace, trace_input

#: plans kept per jitted function (least recently used dropped first); ``ndl.jit(fn,
#: cache_size=N)`` overrides it per function
CACHE_SIZE = 64
#: a function traced this many times again warns once, naming the guard that keeps failing
#: (as torch.compile's recompile limit does)
RECOMPILE_WARNING = 8
#: retraces and fallbacks remembered for explain()
_MAX_RECORDS = 100


class JitError(RuntimeError):
    """A jitted function cannot be compiled as written (strict mode), with the fixes."""


# -- records for explain() ------------------------------------------------------------------------
@dataclass
class EntryRecord:
    """One cached plan: its signature, graph sizes and the passes applied."""

    signature: tuple
    nodes_before: int
    nodes_after: int
    passes: list[str]
    effects: int
    calls: int = 0
    fallback: bool = False
    #: the Python values the plan is guarded on (globals, closure cells, module attributes)
    guards: list[str] = field(default_factory=list)
    #: values baked into the plan that no guard checks (``file:line: what``)
    unguarded: list[str] = field(default_factory=list)


@dataclass
class RetraceRecord:
    """A call whose signature matched no cached plan, and the guard that failed."""

    reason: str
    signature: tuple


@dataclass
class FallbackRecord:
    """A trace abandoned for eager execution: why, and where in the user's code."""

    reason: str
    source: str | None
    signature: tuple


@dataclass
class JitReport:
    """``compiled.explain()``: structured facts about traces, caches, retraces and fallbacks."""

    traces: int
    cache_entries: list[EntryRecord]
    retraces: list[RetraceRecord]
    fallbacks: list[FallbackRecord]
    optimize: bool
    #: values baked into some plan without a guard (np.random draws, NumPy arrays read)
    unguarded: list[Unguarded] = field(default_factory=list)

    @property
    def num_cache_entries(self) -> int:
        return len(self.cache_entries)


# -- the op that runs a plan ----------------------------------------------------------------------
@register("jit_call", inputs=("*values",), internal=True)
class JitCall(Op):
    """Run a compiled Program on (call tensors..., parameters...) and return its outputs."""

    returns_tuple = True
    #: the profiler files this op and its plan's steps under the JIT (``core/profiling.py``)
    profile_category = "jit"

    def __init__(self, plan: CompiledPlan) -> None:
        self.plan = plan
        # effects (BatchNorm's running statistics, an optimizer step) run in the forward plan
        # only; the gradient plan is built from the outputs alone, so a plan with effects is
        # differentiable too (a jitted BatchNorm model trains with loss.backward())
        self.side_effect = bool(plan.program_effects)

    def attrs(self) -> tuple:
        return (("plan", id(self.plan)),)

    def compute(self, *values):
        plan = self.plan
        run = plan.executable  # built on first use; it also fixes plan.source_order
        # OpenBLAS on one thread for the whole run of a plan with large products, those in
        # blocks on numba's threads: its worker never wakes to spin into the next prange
        # passes (plans without them keep OpenBLAS's threads: see holds_blas)
        if plan.holds_blas:
            with blas_policy.hold_one_thread():
                results = run([values[i] for i in plan.source_order])
        else:
            results = run([values[i] for i in plan.source_order])
        outputs = results[: plan.num_outputs + len(plan.residuals)]
        for i in plan.repeated_outputs:  # the same value returned twice: each its own array
            outputs[i] = outputs[i].copy()
        return tuple(outputs)

    def gradient(self, out_grad, node):
        plan = self.plan
        backward = plan.backward_plan()
        seeds = [out_grad[i] for i in range(plan.num_outputs)]
        residuals = [F.stop_gradient(node[plan.num_outputs + k])
                     for k in range(len(plan.residuals))]
        grads = make_from_op(JitCall(backward), (*node.inputs, *residuals, *seeds))
        result: list = [None] * len(node.inputs)
        for k, position in enumerate(backward.wrt_positions):
            result[position] = grads[k]
        return tuple(result)

    def infer(self, *avals: Aval) -> tuple:
        return tuple(o.aval for o in (*self.plan.outputs, *self.plan.residuals))


class CompiledPlan:
    """A traced graph turned into a Program, with its sources in call order."""

    def __init__(self, outputs: list, sources: list, effects: list, optimize: bool) -> None:
        self.outputs = outputs
        self.sources = sources
        self.num_outputs = len(outputs)
        self.program_effects = effects
        self.source_slots = [id(s) for s in sources]
        source_ids = set(self.source_slots)

        def is_source(n: Any) -> bool:
            return id(n) in source_ids or n.op is None

        # NOTE: random values (Dropout's masks) are extra outputs: the gradient plan, which
        # otherwise recomputes what it needs from the sources, must see the same draws
        self.residuals = [n for n in ancestors(outputs, is_source)
                          if n.op is not None and n.op.random]
        program = build_program([*outputs, *self.residuals, *effects], is_source)
        self.nodes_before = len(program.steps)
        if optimize:
            optimize_program(program, lambda n: None, static_shapes=True)
        else:
            plan_frees(program)
            program.passes = ["prune", "memory_plan"]
        self.program: Program = program
        self.optimize = optimize
        first: dict[int, int] = {}
        self.repeated_outputs = [i for i, slot in enumerate(program.outputs[: self.num_outputs])
                                 if first.setdefault(slot, i) != i]
        self._executable: Callable[[list], list] | None = None
        #: the ops picking each output from a call's TensorTuple, made once (they hold only
        #: an index; ``result[i]`` would validate and build a new one on every call)
        self.output_items = [TupleGetItem(i) for i in range(self.num_outputs)]
        self.source_order: list[int] = []
        self.wrt_positions: list[int] = []
        self._backward: CompiledPlan | None = None
        #: whether a run holds OpenBLAS on one thread (kernels/blas_policy.py): where some
        #: step makes a product large enough to split into blocks (``Op.large_products``);
        #: elsewhere the hold only cost (one-core products, ~4 us a call)
        self.holds_blas = any(step.op.large_products(step.node) for step in program.steps)

    @property
    def executable(self) -> Callable[[list], list]:
        """The Program as one generated function (built at the first call, once the plan's
        sources are final)."""
        if self._executable is None:
            position = {slot: i for i, slot in enumerate(self.source_slots)}
            self.source_order = [position[id(n)] for n in self.program.sources]
            # NumPy-specific lowering (direct ufunc calls, out=, inlined expressions) only
            # where every value lives on the CPU; other devices call each op's compute
            on_cpu = all(n.device == cpu() for n in self.sources)
            inplace = plan_inplace(self.program) if self.optimize and on_cpu else None
            self._executable = compile_program(self.program, inplace)
            if self.optimize and on_cpu:  # elementwise regions as numba loops once hot
                self._executable = tiered(self.program, self._executable,
                                          lambda p: compile_program(p, plan_inplace(p)))
            if inplace:
                self.program.passes.append(f"buffer_reuse ({len(inplace)} steps in place)")
        return self._executable

    def backward_plan(self) -> CompiledPlan:
        """The plan of the gradients of the outputs with respect to the sources (built once)."""
        if self._backward is None:
            with tracing(Trace()):
                seeds = [trace_input(o, f"out_grad{i}", requires_grad=o.dtype.kind in "fc")
                         for i, o in enumerate(self.outputs)]
                positions = [i for i, s in enumerate(self.sources) if s.requires_grad]
                wrt = [self.sources[i] for i in positions]
                grads = autodiff.gradients(self.outputs, wrt, seeds, stop_at_wrt=True)
                grads = [g if g is not None else F.full_like(s, 0) for g, s in zip(grads, wrt)]
            # the forward's random values come in as inputs, between the sources and the seeds
            plan = CompiledPlan(grads, [*self.sources, *self.residuals, *seeds], [],
                                self.optimize)
            plan.wrt_positions = positions
            self._backward = plan
        return self._backward


# -- gradients a traced backward leaves on leaves --------------------------------------------------
class _GradWrites:
    """Hears, while ``fn`` is traced, which leaves a ``backward()`` inside it gave a gradient
    (a gradient hook), so every call can set those ``.grad`` attributes as eager code does.

    Without it a jitted ``loss.backward()`` left an argument's ``.grad`` unset (the stand-in
    got it) and a captured tensor's ``.grad`` a trace node with no value.
    """

    def __init__(self) -> None:
        self.leaves: dict[int, Any] = {}  # id -> leaf, in the order backward reached them

    def grad_ready(self, leaf: Any, grad: Any) -> None:
        self.leaves.setdefault(id(leaf), leaf)

    def backward_done(self) -> dict:
        return {}

    def plan(self, stand_ins: list, effects: list) -> tuple[list, list]:
        """(gradient nodes to add as plan outputs, writes): each write is (argument index or
        tensor, output index or None) and means "after a call, set this ``.grad``". A
        captured tensor's ``.grad`` is cleared of its trace node here; calls set it.

        A gradient an optimizer step of the trace consumed needs no output: the step
        (``apply_updates``) sets that ``.grad`` itself when the plan runs, and an output
        would keep every gradient array alive to the end of the plan (MLP-ResNet's jitted
        step 1.2x slower)."""
        position = {id(s): i for i, s in enumerate(stand_ins)}
        stepped = {id(g) for e in effects if isinstance(e.op, ApplyUpdates) for g in e.inputs}
        outputs: list = []
        writes: list = []
        for leaf in self.leaves.values():
            target = position.get(id(leaf), leaf)
            grad = leaf.grad
            if grad is None:
                writes.append((target, None))
            elif grad._data is None and id(grad) in stepped and not isinstance(target, int):
                pass  # apply_updates sets it
            elif grad._data is None:  # a node of this trace: its value comes from the plan
                writes.append((target, len(outputs)))
                outputs.append(grad)
            if not isinstance(target, int):
                leaf.grad = None
        return outputs, writes


# -- the user-facing compiled function -------------------------------------------------------------
class _Entry:
    """One cached plan (or a fallback) and everything that must hold to replay it."""

    def __init__(self, plan: CompiledPlan | None, template: Any, module_guard: tuple,
                 leaf_sources: list, record: EntryRecord, guards: list[Guard] | None = None,
                 keep: list | None = None, grad_writes: list | None = None,
                 num_user_outputs: int = 0) -> None:
        self.plan = plan
        #: (argument index or tensor, extra output index or None): ``.grad`` set after a call
        self.grad_writes = grad_writes or []
        self.num_user_outputs = num_user_outputs
        self.template = template
        self.module_guard = module_guard
        self.leaf_sources = leaf_sources
        self.record = record
        self.guards = guards or []
        self.check = compile_checks(self.guards)
        self.keep = keep  # objects the signature names by identity, kept alive

    def failed_guard(self) -> str | None:
        """None if the plan may be replayed, else what changed since it was traced."""
        index = self.check()
        if index >= 0:
            return self.guards[index].explain_failure()
        for module, flag in self.module_guard:
            if module.training != flag:
                return f"{type(module).__name__}.training changed from {flag} to {not flag}"
        return None


class CompiledFunction:
    """The result of ``ndl.jit(fn)``: call it like ``fn``; ``explain()`` says what happened."""

    def __init__(self, fn: Callable, strict: bool = False, optimize: bool = True,
                 static_argnames: tuple[str, ...] = (), modules: list | None = None,
                 cache_size: int | None = None) -> None:
        self.fn = fn
        self.strict = strict
        self.optimize = optimize
        self.static_argnames = tuple(static_argnames)
        self.cache_size = CACHE_SIZE if cache_size is None else int(cache_size)
        if self.cache_size < 1:
            raise ValueError(f"ndl.jit: cache_size must be at least 1, got {cache_size}")
        self._modules = modules or []
        # signature -> plans traced for it (one per set of guards), least recently used first
        self._cache: OrderedDict[tuple, list[_Entry]] = OrderedDict()
        self._num_entries = 0
        self._lock = threading.Lock()  # guards changes to the cache and the records
        self._trace_lock = threading.RLock()  # a trace may call the function again (inlined)
        self._last_signature: tuple | None = None
        self._traces = 0
        self._retraces: deque[RetraceRecord] = deque(maxlen=_MAX_RECORDS)
        self._num_retraces = 0
        self._warned = False
        self._fallbacks: deque[FallbackRecord] = deque(maxlen=_MAX_RECORDS)
        self._unguarded: dict[tuple, Unguarded] = {}
        try:
            self._signature_of: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            self._signature_of = None
        functools.update_wrapper(self, fn, updated=())

    # -- calling ---------------------------------------------------------------------------------
    def _signature(self, args: tuple, kwargs: dict) -> tuple[tuple, list, Any, list]:
        leaves: list = []
        sig: list = []
        keep: list = []
        static: dict = {}
        template = None if kwargs or self.static_argnames else flatten_tensor_args(
            args, leaves, sig)  # the common call: tensors only, the signature fast
        if template is None:
            if self.static_argnames and self._signature_of is not None:
                bound = self._signature_of.bind(*args, **kwargs).arguments
                static = {name: bound[name] for name in self.static_argnames if name in bound}
                sig.extend((f"static {k}", static_key(v)) for k, v in static.items())
                keep.extend(static.values())
            template = flatten((args, kwargs), "call", leaves, sig, static_ids={
                id(v) for v in static.values()}, keep=keep)
        sig.append(("grad mode", ("value", "bool", is_grad_enabled())))
        sig.extend((f"module[{i}].training", ("value", "bool", m.training))
                   for i, m in enumerate(self._modules))
        return tuple(sig), leaves, template, keep

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if active_trace() is not None:  # called inside another trace: inline it
            return self.fn(*args, **kwargs)
        signature, leaves, template, keep = self._signature(args, kwargs)
        entry = None
        failed = None
        # NOTE: no lock on this hot path: dict and OrderedDict calls are atomic under the GIL,
        # and a plan another thread drops meanwhile at worst makes this call trace again
        group = self._cache.get(signature)
        if group is not None:
            self._cache.move_to_end(signature)
            for candidate in group:
                failed = candidate.failed_guard()
                if failed is None:
                    entry = candidate
                    break
        if entry is None:
            with self._trace_lock:  # one trace at a time: a thread that waited may find it
                entry = self._lookup(signature)
                if entry is None:
                    entry, eager_result = self._compile(signature, leaves, template, keep,
                                                        args, kwargs, failed)
                    if entry.plan is None:  # fell back to eager (it already ran)
                        return eager_result
        entry.record.calls += 1
        if entry.plan is None:
            return self.fn(*args, **kwargs)
        return self._run(entry, leaves)

    def _lookup(self, signature: tuple) -> _Entry | None:
        """The cached plan for ``signature`` whose guards hold now, or None."""
        for candidate in self._cache.get(signature, ()):
            if candidate.failed_guard() is None:
                return candidate
        return None

    def _run(self, entry: _Entry, leaves: list) -> Any:
        plan = entry.plan
        assert plan is not None  # (an entry without a plan falls back before _run)
        inputs = (*leaves, *entry.leaf_sources)
        result = make_from_op(JitCall(plan), inputs)
        items = plan.output_items
        if not entry.grad_writes:
            return rebuild(entry.template, [make_from_op(item, (result,)) for item in items])
        n = entry.num_user_outputs
        outputs = [make_from_op(items[i], (result,)) for i in range(n)]
        for target, index in entry.grad_writes:
            leaf = leaves[target] if isinstance(target, int) else target
            if not isinstance(leaf, Tensor):
                continue  # an array argument: nothing holds its gradient
            # as eager backward leaves it; detached (create_graph through a plan: not kept)
            leaf.grad = None if index is None else new_leaf(
                Tensor, result.realize_data()[n + index], device=leaf.device)
        return rebuild(entry.template, outputs)

    # -- the cache -------------------------------------------------------------------------------
    def _add(self, signature: tuple, entry: _Entry) -> None:
        """Cache ``entry``; past ``cache_size`` plans, drop the least recently used one."""
        with self._lock:
            self._cache.setdefault(signature, []).append(entry)
            self._cache.move_to_end(signature)
            self._num_entries += 1
            while self._num_entries > self.cache_size:
                oldest_signature, oldest = next(iter(self._cache.items()))
                oldest.pop(0)
                if not oldest:
                    del self._cache[oldest_signature]
                self._num_entries -= 1

    def _note_retrace(self, signature: tuple, failed_guard: str | None) -> None:
        """Record why this call traced again; warn once when it keeps happening."""
        if self._last_signature is None:
            self._last_signature = signature
            return
        if failed_guard is not None:
            reason = failed_guard
        elif signature in self._cache:
            reason = "a module's training flag changed since the cached trace"
        else:
            reason = describe_difference(self._last_signature, signature)
        self._last_signature = signature
        self._retraces.append(RetraceRecord(reason, signature))
        self._num_retraces += 1
        if self._num_retraces >= RECOMPILE_WARNING and not self._warned:
            self._warned = True
            name = getattr(self.fn, "__qualname__", repr(self.fn))
            reasons = Counter(r.reason.split(" changed from ")[0].split(": ")[0]
                              for r in self._retraces)
            common = reasons.most_common(1)[0][0]
            warnings.warn(
                f"ndl.jit: {name} has been traced {self._traces + 1} times; the guard that "
                f"keeps failing: {common} (last: {reason}). Each trace costs time and a cache "
                f"slot (at most {self.cache_size} are kept). Pass values that change on every "
                "call as tensors, or mark them with static_argnames only if they take few "
                "values.", RuntimeWarning, stacklevel=4)

    # -- tracing ---------------------------------------------------------------------------------
    def _compile(self, signature: tuple, leaves: list, template: Any, keep: list, args: tuple,
                 kwargs: dict, failed_guard: str | None) -> tuple[_Entry, Any]:
        """Trace ``fn`` for this signature; on a fallback, run it eagerly and return its result."""
        traced = self._trace(signature, leaves, template, keep, failed_guard)
        if isinstance(traced, TracerConversionError):
            return self._fall_back(traced, signature, keep, args, kwargs)
        return traced, None

    def _trace(self, signature: tuple, leaves: list, template: Any, keep: list,
               failed_guard: str | None) -> _Entry | TracerConversionError:
        """Trace ``fn`` on stand-ins for ``leaves`` and cache the plan (or return why the
        trace needs values it cannot have)."""
        with self._lock:
            self._note_retrace(signature, failed_guard)
            self._traces += 1
        trace = Trace()
        collector = GuardCollector(self.fn)
        stand_ins = [trace_input(t, f"arg{i}") for i, t in enumerate(leaves)]
        grad_writes = _GradWrites()
        add_grad_hook(grad_writes)
        try:
            with tracing(trace), collector:
                call_args, call_kwargs = rebuild(template, stand_ins)
                out = self.fn(*call_args, **call_kwargs)
        except TracerConversionError as exc:
            return exc
        finally:
            remove_grad_hook(grad_writes)
        guards, unguarded = collector.result()
        if unguarded:
            if self.strict:
                name = getattr(self.fn, "__qualname__", repr(self.fn))
                raise JitError(
                    f"jitted {name} bakes values into its plan that no guard can check "
                    "(strict=True refuses them):\n  " + "\n  ".join(map(str, unguarded)))
            with self._lock:
                for item in unguarded:
                    self._unguarded.setdefault((item.what, item.source), item)
        out_leaves: list = []
        out_template = flatten(out, "out", out_leaves, [])
        num_user_outputs = len(out_leaves)
        grad_outputs, writes = grad_writes.plan(stand_ins, trace.effects)
        plan = CompiledPlan([*out_leaves, *grad_outputs], list(stand_ins), trace.effects,
                            self.optimize)
        # parameters, buffers and other tensors with data that the trace read: inputs too,
        # read afresh on every call (so updates made between calls are seen)
        known = set(plan.source_slots)
        extra = [n for n in plan.program.sources if id(n) not in known]
        plan.sources.extend(extra)
        plan.source_slots.extend(id(n) for n in extra)
        modules = {id(m): m for m in trace.modules}
        guard = tuple((m, m.training) for m in modules.values())
        record = EntryRecord(signature, plan.nodes_before, len(plan.program.steps),
                             list(plan.program.passes), len(trace.effects),
                             guards=[g.description for g in guards],
                             unguarded=[str(u) for u in unguarded])
        entry = _Entry(plan, out_template, guard, extra, record, guards, keep, writes,
                       num_user_outputs)
        self._add(signature, entry)
        return entry

    def _fall_back(self, exc: TracerConversionError, signature: tuple, keep: list, args: tuple,
                   kwargs: dict) -> tuple[_Entry, Any]:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        if self.strict:
            raise JitError(
                f"{exc.source or '<unknown>'}: {exc.what} of a traced tensor inside jitted "
                f"{name}: its value is not known while tracing, so Python cannot branch on "
                "it. Fixes: pass that value as a static argument "
                "(ndl.jit(fn, static_argnames=('flag',)) and a Python bool/number), or express "
                "the branch in the graph with needle.static.cond(pred, true_fn, false_fn); or "
                "drop strict=True to run such calls eagerly.") from exc
        with self._lock:
            self._fallbacks.append(FallbackRecord(exc.what, exc.source, signature))
        record = EntryRecord(signature, 0, 0, [], 0, calls=1, fallback=True)
        entry = _Entry(None, None, (), [], record, keep=keep)
        self._add(signature, entry)
        return entry, self.fn(*args, **kwargs)  # eager, correct

    # -- reporting -------------------------------------------------------------------------------
    def lower(self, *args: Any, **kwargs: Any) -> Program:
        """The optimized program a call with these arguments runs, traced (and cached) if
        needed but not run: ``print(f.lower(x))`` shows the printable IR. The backward plan,
        when there is one, is ``f.lower(x)`` of the gradient; a call that falls back to eager
        has no program (JitError)."""
        signature, leaves, template, keep = self._signature(args, kwargs)
        with self._trace_lock:
            entry = self._lookup(signature)
            if entry is None:
                trace = self._trace(signature, leaves, template, keep, None)
                if isinstance(trace, TracerConversionError):
                    raise JitError(f"{trace.source or '<unknown>'}: {trace.what} of a traced "
                                   "tensor: this call runs eagerly and has no program")
                entry = trace
        if entry.plan is None:
            raise JitError("this signature falls back to eager execution: it has no program")
        return entry.plan.program

    def explain(self) -> JitReport:
        """What happened so far: traces, cached plans (with their guards), retraces and why,
        fallbacks, and the values baked in without a guard."""
        with self._lock:
            entries = [e.record for group in self._cache.values() for e in group]
            return JitReport(self._traces, entries, list(self._retraces), list(self._fallbacks),
                             self.optimize, list(self._unguarded.values()))


def jit(fn: Callable | None = None, *, strict: bool = False, optimize: bool = True,
        static_argnames: tuple[str, ...] | list[str] = (), cache_size: int | None = None) -> Any:
    """Compile ``fn`` (a function of Tensors, or an ``nn.Module``) by tracing it.

    ``ndl.jit(fn)``, ``@ndl.jit`` or ``@ndl.jit(strict=True)``. The plan is cached per input
    signature (shapes, dtypes, device, requires_grad, Python values, container structure, grad
    mode, and the training flags of the modules the trace used) and replayed while the
    guards on the values the trace read hold (globals, closure cells, module attributes and
    parameters; see docs/jit.md). A call that matches no plan is traced again. Converting a
    traced tensor to a Python value falls back to eager for that signature (``strict=True``
    raises instead, and also refuses values baked in without a guard). ``optimize=False``
    skips the graph passes. At most ``cache_size`` plans are kept (least recently used
    dropped first; default ``needle.jit.compiled.CACHE_SIZE``).
    """
    if fn is None:
        return lambda f: jit(f, strict=strict, optimize=optimize,
                             static_argnames=static_argnames, cache_size=cache_size)
    if getattr(type(fn), "__needle_module__", False) is True:  # an nn.Module (jit is below nn)
        module: Any = fn
        return CompiledFunction(module.__call__, strict, optimize, tuple(static_argnames),
                                modules=[m for _, m in module.named_modules()],
                                cache_size=cache_size)
    return CompiledFunction(fn, strict, optimize, tuple(static_argnames),
                            cache_size=cache_size)


__all__ = ["CACHE_SIZE", "RECOMPILE_WARNING", "CompiledFunction", "EntryRecord",
           "FallbackRecord", "JitCall", "JitError", "JitReport", "RetraceRecord", "jit"]

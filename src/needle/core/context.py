"""Per-thread state of the core: grad mode, graph recording, the active trace, front-end hooks.

Everything that changes how an op applied *now* behaves lives in one :class:`ThreadState`
per thread, never in module globals: a thread that traces a function, builds a graph or
evaluates under ``no_grad()`` does not change what another thread's ops do (as PyTorch keeps
grad mode thread-local). Front-ends (``static``, ``jit``, ``nn``, ``optim``) talk to it
through the functions below, never through each other's globals.

The state sits in a ``ContextVar``: reading it is one lookup on the hot path of every op.
A new thread starts with the defaults (grad enabled, no trace, no graph).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any


class ThreadState:
    """What ops made in this thread must know: grad mode, recording, trace, graphs, hooks."""

    __slots__ = ("grad_enabled", "saved_grad_modes", "recording", "trace", "node_hooks",
                 "graphs", "sessions", "step_observers", "grad_hooks",
                 "profiler")

    def __init__(self) -> None:
        #: whether new nodes record the graph that backward needs
        self.grad_enabled = True
        #: the modes that enclosing ``no_grad()`` / ``enable_grad()`` blocks replaced
        self.saved_grad_modes: list[bool] = []
        #: >0 while a front-end needs every node to keep op and inputs (a graph being built)
        self.recording = 0
        #: the JIT trace in progress (it makes every op lazy and collects effects), or None
        self.trace: Any = None
        #: callables told about every lazy node made in this thread (innermost last)
        self.node_hooks: list[Callable[[Any], None]] = []
        #: declared graphs entered with ``with graph:`` (innermost last)
        self.graphs: list = []
        #: Sessions whose ``run`` is executing (state ops find their Variables there)
        self.sessions: list = []
        #: callables told about every step a Session runs (RunMetadata, cond branches)
        self.step_observers: list = []
        #: gradient hooks of the next backward in this thread (see ``add_grad_hook``)
        self.grad_hooks: list = []
        #: the profile recorder while ``ndl.profile()`` is active in this thread
        #: (``core/profiling.py``), else None: executors check it once per op or program
        self.profiler: Any = None


_STATE: contextvars.ContextVar[ThreadState] = contextvars.ContextVar("needle_state")
_get = _STATE.get


def state() -> ThreadState:
    """This thread's state (made with the defaults on first use in a thread)."""
    current = _get(None)
    if current is None:
        current = ThreadState()
        _STATE.set(current)
    return current


state()  # the importing thread's state exists before any asyncio task copies the context


# -- grad mode -------------------------------------------------------------------------------
def is_grad_enabled() -> bool:
    """Whether new nodes in this thread record the graph needed for backward."""
    return state().grad_enabled


class GradMode(contextlib.ContextDecorator):
    """Context manager / decorator that sets this thread's grad mode inside its block.

    The mode it replaces is saved on the thread's own stack, so one object may be entered by
    several threads at once (a module-level ``NO_GRAD = ndl.no_grad()``, a decorated
    function) and each thread gets its own mode back.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def __enter__(self) -> None:
        current = state()
        current.saved_grad_modes.append(current.grad_enabled)
        current.grad_enabled = self.enabled

    def __exit__(self, *exc: object) -> None:
        current = state()
        current.grad_enabled = current.saved_grad_modes.pop()


# -- recording and tracing -------------------------------------------------------------------
@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Every node made inside keeps its op and inputs, even without gradients."""
    current = state()
    current.recording += 1
    try:
        yield
    finally:
        current.recording -= 1


@contextlib.contextmanager
def tracing(trace: Any) -> Iterator[Any]:
    """While active in this thread, every op makes a lazy node and tells ``trace`` of it."""
    current = state()
    previous = current.trace
    current.trace = trace
    try:
        yield trace
    finally:
        current.trace = previous


def active_trace() -> Any:
    """The trace in progress in this thread, or None."""
    return state().trace


def unobserved_eager() -> bool:
    """Whether ops made now in this thread run eagerly with nothing watching their nodes: no
    trace, no declared graph recording, no profiler. Layers may then compute values that no
    gradient reads (BatchNorm's statistics and running averages) without making nodes."""
    current = state()
    return current.trace is None and not current.recording and current.profiler is None


def module_called(module: Any) -> None:
    """A Module is being called: the active trace guards on it (training flag, attributes)."""
    current = _get(None)  # a thread without state yet has no trace either
    if current is not None and current.trace is not None:
        current.trace.module_called(module)


# -- hooks on lazy nodes ---------------------------------------------------------------------
#: process-wide hooks told about every lazy node in any thread (a front-end's bookkeeping,
#: installed once at import); they act on the calling thread's state
_GLOBAL_NODE_HOOKS: list[Callable[[Any], None]] = []


def add_node_hook(hook: Callable[[Any], None]) -> None:
    """Tell ``hook`` about every lazy node made from now on, in every thread."""
    _GLOBAL_NODE_HOOKS.append(hook)


@contextlib.contextmanager
def watching_nodes(hook: Callable[[Any], None]) -> Iterator[None]:
    """Tell ``hook`` about every lazy node made in this thread inside the block."""
    hooks = state().node_hooks
    hooks.append(hook)
    try:
        yield
    finally:
        hooks.remove(hook)


def lazy_node_made(node: Any, current: ThreadState) -> None:
    """Run the hooks for a new lazy node and let the active trace record it."""
    for hook in _GLOBAL_NODE_HOOKS:
        hook(node)
    for hook in current.node_hooks:
        hook(node)
    if current.trace is not None:
        current.trace.node_made(node)


# -- gradient hooks --------------------------------------------------------------------------
def add_grad_hook(hook: Any) -> None:
    """Tell ``hook`` about the gradients of this thread's backward passes from now on.

    ``hook.grad_ready(leaf, grad)`` is called as soon as a leaf's gradient is final (all
    of its consumers processed: the reverse sweep will not add to it), and
    ``hook.backward_done()`` once the sweep ends; it returns ``{leaf: replacement}`` for
    gradients the hook changed (a data-parallel wrapper's averaged ones) and may remove the
    hook. Adding a hook twice keeps one entry. Declared graphs (``st.minimize``) call them
    too, with graph gradients. Without hooks backward pays one lookup.
    """
    hooks = state().grad_hooks
    if not any(h is hook for h in hooks):
        hooks.append(hook)


def remove_grad_hook(hook: Any) -> None:
    """Stop telling ``hook`` about gradients (no error if it was not added)."""
    hooks = state().grad_hooks
    hooks[:] = [h for h in hooks if h is not hook]


# -- front-end services ----------------------------------------------------------------------
#: name -> callable a front-end provides to the library (so the library imports no front-end)
_SERVICES: dict[str, Callable[..., Any]] = {}


def provide(name: str, fn: Callable[..., Any]) -> None:
    """A front-end offers ``fn`` under ``name`` (``static`` offers ``"minimize_declared"``)."""
    _SERVICES[name] = fn


def service(name: str) -> Callable[..., Any]:
    """The callable a front-end provided under ``name`` (``import needle`` loads them all)."""
    fn = _SERVICES.get(name)
    if fn is None:
        raise LookupError(f"no front-end provides {name!r}: import needle (or the front-end "
                          "that provides it) first")
    return fn


__all__ = [
    "GradMode", "ThreadState", "active_trace", "add_grad_hook", "add_node_hook",
    "is_grad_enabled", "remove_grad_hook",
    "lazy_node_made", "module_called", "provide", "recording", "service", "state", "tracing",
    "unobserved_eager",
    "watching_nodes",
]

"""Guards on the Python values a trace read: what must still hold for a compiled plan to replay.

A traced function reads more than its arguments: globals (a scale, a Tensor, a helper), the
cells it closes over, and attributes of the objects it is given or reaches (a module's
``p``, ``momentum``, ``training``, its Parameters, the list of its layers). Each such value
is baked into the trace. While tracing, a :class:`GuardCollector` watches the Python frames
the trace runs (``sys.setprofile``, this thread only) and reads their bytecode for access
paths: ``LOAD_GLOBAL name`` / ``LOAD_DEREF name`` / an argument, followed by attribute
loads. Each path's value at trace time becomes a guard: scalars and containers by value,
Tensors, modules and other objects by identity (the guard keeps them alive, so an identity
is never confused with a later object's). A call whose guards fail traces again.

Values the collector sees but cannot guard are reported: random draws made in Python while
tracing (``np.random``, ``random``), whose values are baked in, and NumPy arrays read from
globals or attributes (their contents are baked in; pass them as arguments instead).

Code in needle itself is analysed only for ``nn.Module`` methods (their ``self.<attr>``
reads are hyperparameters and structure); the standard library and installed packages are
not analysed. Closure cells of functions other than the jitted one cannot be reached from a
frame and are not guarded.
"""

from __future__ import annotations

import dis
import random
import sys
import sysconfig
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..autograd import Tensor
from ..core.source import is_needle_file

_MISSING = object()
_SCALARS = (bool, int, str, bytes, complex, type(None))
_GENERATORS = (np.random.Generator, np.random.RandomState, random.Random)
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib",
                                                             "platlib")})


# -- fingerprints: values compared by value, objects by identity -------------------------------
class Same:
    """Equal only to a ``Same`` of the very same object (kept alive while the guard lives)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return type(other) is Same and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __repr__(self) -> str:
        return f"<{type(self.obj).__name__} object>"


def fingerprint(value: Any, depth: int = 0) -> Any:
    """A comparable stand-in for ``value``: scalars by exact value (NaN equals NaN, -0.0 is
    not 0.0), containers by their items, anything else by identity."""
    kind = type(value)
    if kind is float:
        return (float, value.hex())
    if kind in _SCALARS:
        return (kind, value)
    if isinstance(value, np.generic):
        return (kind, value.tobytes())
    if kind is list or kind is tuple or kind is dict:
        if depth >= 3 or len(value) > 256:
            return (kind, len(value), Same(value))
        items = value.items() if kind is dict else value
        return (kind, tuple(fingerprint(item, depth + 1) for item in items))
    return Same(value)


def _read(obj: Any, name: str) -> Any:
    """``obj.name`` without running code: the instance dict, else a plain class attribute."""
    own = getattr(obj, "__dict__", None)
    if own is not None and name in own:
        return own[name]
    for klass in type(obj).__mro__:
        if name in klass.__dict__:
            value = klass.__dict__[name]
            return _MISSING if hasattr(type(value), "__get__") else value
    return _MISSING


# -- one guard --------------------------------------------------------------------------------
@dataclass
class Guard:
    """A path from a root (a globals dict, a closure cell, an object) to a value it read.

    ``steps``: ("key", name) a dict item, ("cell", "") a cell's contents, ("attr", name) an
    attribute from the instance dict, ("cattr", name) a plain class attribute.
    """

    root: Any
    steps: tuple
    expected: Any
    by_identity: bool
    description: str
    shown: str = ""  # the value at trace time, as the retrace reason shows it
    value: Any = None  # the value at trace time (kept alive with the guard)

    def current(self) -> Any:
        """The value the path leads to now (``_MISSING`` when it leads nowhere)."""
        value = self.root
        try:
            for kind, name in self.steps:
                if kind == "key":
                    value = value.get(name, _MISSING)
                elif kind == "cell":
                    value = value.cell_contents
                else:
                    value = _read(value, name)
                if value is _MISSING:
                    return _MISSING
        except Exception:  # noqa: BLE001 - an empty cell, an object without attributes
            return _MISSING
        return value

    def explain_failure(self) -> str:
        now = self.current()
        if now is _MISSING:
            return f"{self.description} no longer exists"
        if self.by_identity:
            return f"{self.description} is another object (a {type(now).__name__})"
        return f"{self.description} changed from {self.shown} to {_show(now)}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value_test(i: int, guard: Guard, bound: dict) -> str:
    """Python text that is true when the value in ``v`` fails guard ``i`` (inlined for the
    common kinds: each is a few comparisons, where a ``fingerprint`` call costs ~0.3 us)."""
    value = guard.value
    kind = type(value)
    bound[f"t{i}"] = kind
    if guard.by_identity:
        bound[f"e{i}"] = value
        return f"v is not e{i}"
    if value is None:
        return "v is not None"
    if kind is float and value != value:
        return "v.__class__ is not float or v == v"  # NaN: only NaN is unequal to itself
    if kind is bool:  # True and False are the only bools: identity is the exact test
        bound[f"e{i}"] = value
        return f"v is not e{i}"
    if kind in (int, str, bytes) or (kind is float and value != 0.0):
        # immutable: the very object read at trace time (the usual case) passes at once
        bound[f"e{i}"] = value
        return f"v is not e{i} and (v.__class__ is not t{i} or v != e{i})"
    if kind in (list, tuple) and len(value) <= 16 and not any(
            isinstance(item, (*_SCALARS, float, np.generic, list, tuple, dict))
            for item in value):
        # a list of layers, Sequential's modules: the same objects in the same order
        for k, item in enumerate(value):
            bound[f"e{i}_{k}"] = item
        items = "".join(f" or v[{k}] is not e{i}_{k}" for k in range(len(value)))
        test = f"v.__class__ is not t{i} or len(v) != {len(value)}{items}"
        if kind is tuple:  # immutable: the very tuple read at trace time holds the same items
            bound[f"e{i}"] = value
            return f"v is not e{i} and ({test})"
        return test
    bound[f"e{i}"] = guard.expected
    return f"_fp(v) != e{i}"


def compile_checks(guards: list[Guard]) -> Callable[[], int]:
    """One generated function checking every guard in order: -1 if all hold, else the index
    of the first that fails (a loop over Guard objects costs ~10x more on every call)."""
    if not guards:
        return lambda: -1
    lines = ["    try:"]
    bound: dict[str, Any] = {"M": _MISSING, "_read": _read, "_fp": fingerprint}
    dicts: dict[int, str] = {}  # root id -> local name of its instance dict
    for i, guard in enumerate(guards):
        bound[f"r{i}"] = guard.root
        expr = f"r{i}"
        for position, (kind, name) in enumerate(guard.steps):
            if kind == "key":
                expr = f"{expr}.get({name!r}, M)"
            elif kind == "cell":
                expr = f"{expr}.cell_contents"
            elif kind == "attr" and position == 0:
                # many guards read attributes of one module: fetch its dict once
                local = dicts.get(id(guard.root))
                if local is None:
                    local = dicts[id(guard.root)] = f"d{i}"
                    lines.append(f"        i = {i}")
                    lines.append(f"        d{i} = r{i}.__dict__")
                expr = f"{local}.get({name!r}, M)"
            elif kind == "attr":
                expr = f"{expr}.__dict__.get({name!r}, M)"
            else:
                expr = f"_read({expr}, {name!r})"
        lines.append(f"        i = {i}")
        lines.append(f"        v = {expr}")
        lines.append(f"        if {_value_test(i, guard, bound)}: return {i}")
    lines += ["    except Exception:", "        return i", "    return -1"]
    params = ", ".join(f"{k}={k}" for k in bound)
    source = "\n".join([f"def check({params}):", *lines])
    namespace: dict[str, Any] = dict(bound)
    exec(compile(source, "<needle jit guards>", "exec"), namespace)  # noqa: S102 - generated
    return namespace["check"]


# -- reading bytecode for access paths ----------------------------------------------------------
@dataclass(frozen=True)
class _Path:
    root_kind: str  # "global", "free" or "arg"
    root_name: str
    attrs: tuple
    method: bool  # a method is called on the value (it may be mutated: compare identity)


_PATHS_OF_CODE: OrderedDict[types.CodeType, tuple[_Path, ...]] = OrderedDict()
_MAX_CODES = 2048


def access_paths(code: types.CodeType) -> tuple[_Path, ...]:
    """Every ``root.attr.attr`` chain the code loads (cached per code object, bounded)."""
    paths = _PATHS_OF_CODE.get(code)
    if paths is not None:
        _PATHS_OF_CODE.move_to_end(code)
        return paths
    n_args = code.co_argcount + code.co_kwonlyargcount
    n_args += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)  # *args, **kwargs
    arg_names = set(code.co_varnames[:n_args])
    found: dict[_Path, None] = {}
    current: list | None = None

    def close(method: bool = False) -> None:
        if current is not None:
            found[_Path(current[0], current[1], tuple(current[2]), method)] = None

    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in ("LOAD_ATTR", "LOAD_METHOD") and current is not None and isinstance(
                ins.argval, str):
            if op == "LOAD_METHOD":
                close(method=True)  # the object the method is looked up on, not the method
                current = None
            else:
                current[2].append(ins.argval)
            continue
        close()
        current = None
        name = ins.argval
        if not isinstance(name, str):
            continue
        if op == "LOAD_GLOBAL":
            current = ["global", name, []]
        elif op in ("LOAD_DEREF", "LOAD_CLASSDEREF") and name in code.co_freevars:
            current = ["free", name, []]
        elif op in ("LOAD_FAST", "LOAD_DEREF") and name in arg_names:
            current = ["arg", name, []]
    close()
    paths = tuple(found)
    _PATHS_OF_CODE[code] = paths
    if len(_PATHS_OF_CODE) > _MAX_CODES:
        _PATHS_OF_CODE.popitem(last=False)
    return paths


# -- watching a trace ------------------------------------------------------------------------------
@dataclass
class Unguarded:
    """A value baked into a plan that no guard can check: what, and where it was read."""

    what: str
    source: str | None

    def __str__(self) -> str:
        return f"{self.source or '<unknown>'}: {self.what}"


def _global_numpy_state() -> tuple:
    """Where NumPy's global (legacy) generator stands: its key's bytes and position."""
    _, key, pos, *_ = np.random.get_state()
    # (the legacy tuple, get_state's default; NumPy's stubs also allow its dict form)
    return key.tobytes(), pos  # type: ignore[attr-defined]


def _is_module(value: Any) -> bool:
    """Whether ``value`` is an ``nn.Module`` (told by a class flag: jit sits below nn)."""
    return getattr(type(value), "__needle_module__", False) is True


def _is_library_file(filename: str) -> bool:
    return filename.startswith("<frozen") or filename.startswith(_LIBRARY_DIRS)


def _where(frame: Any) -> str | None:
    """``file:line`` of the innermost frame from ``frame`` outward that is not needle's."""
    while frame is not None and is_needle_file(frame.f_code.co_filename):
        frame = frame.f_back
    return None if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _random_call(fn: Any) -> str | None:
    """The dotted name of a C function that draws random numbers or reads the clock."""
    owner = getattr(fn, "__self__", None)
    module = type(owner).__module__ if owner is not None else ""
    name = getattr(fn, "__name__", "?")
    if module == "random":
        return f"random.{name}"
    if getattr(fn, "__module__", None) == "time" or getattr(owner, "__name__", None) == "time":
        return f"time.{name}"
    return None


class GuardCollector:
    """Collects guards and reports while a trace runs (a context manager around it)."""

    def __init__(self, top_function: Any = None) -> None:
        self._top_code, self._top_cells, self._top_source = None, {}, None
        fn = getattr(top_function, "__func__", top_function)
        code = getattr(fn, "__code__", None)
        if code is not None:
            self._top_code = code
            self._top_cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
            self._top_source = f"{code.co_filename}:{code.co_firstlineno}"
        self.guards: dict[tuple, Guard] = {}
        self.unguarded: dict[tuple, Unguarded] = {}
        self._previous: Any = None
        self._chain: Any = None
        self._numpy_state: Any = None

    # -- the profile hook --------------------------------------------------------------------
    def __enter__(self) -> GuardCollector:
        # NOTE: NumPy's random functions are Cython, invisible to a profiler: a draw from the
        # global generator shows as a change of its state
        self._numpy_state = _global_numpy_state()
        # a Python profile function keeps getting its events; a C profiler (cProfile) cannot
        # be called from here and misses the trace's events (its results are still right)
        previous = sys.getprofile()
        self._previous = previous
        self._chain = previous if isinstance(previous, types.FunctionType | types.MethodType) \
            else None
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        previous = self._previous
        if previous is None or self._chain is not None:
            sys.setprofile(previous)
        else:  # a C profiler (cProfile.Profile) turns itself back on
            sys.setprofile(None)
            previous.enable()
        if _global_numpy_state() != self._numpy_state:
            self._report("np.random's global generator drew numbers while tracing: they are "
                         "baked into the plan and repeat on every call; draw them with needle's "
                         "random ops (ops.bernoulli_like, nn.Dropout) or pass them as "
                         "arguments",
                         self._top_source)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if self._chain is not None:
            self._chain(frame, event, arg)
        try:
            if event == "call":
                self._on_call(frame)
            elif event == "c_call":
                what = _random_call(arg)
                # a library's own clock reads (logging's timestamps, tqdm, a test runner's
                # garbage-collector timing callbacks) time the work, they do not feed it
                if what is not None and not (what.startswith("time.")
                                             and _is_library_file(frame.f_code.co_filename)):
                    self._report(f"{what} called while tracing: the numbers it drew are baked "
                                 "into the plan and repeat on every call; draw them with "
                                 "needle ops or pass them as arguments", _where(frame))
        except Exception:  # noqa: BLE001,S110 - a guard that cannot be read is not one
            pass

    def _on_call(self, frame: Any) -> None:
        code = frame.f_code
        filename = code.co_filename
        if is_needle_file(filename) or frame.f_globals.get("__name__", "").startswith(
                ("needle.", "namedtuple_")):
            # needle's own code: only a Module method's reads of self (hyperparameters,
            # layers, parameters) are values the trace bakes in
            if not code.co_argcount or code.co_varnames[0] != "self":
                return
            this = frame.f_locals.get("self")
            if not _is_module(this):
                return
            for path in access_paths(code):
                if path.root_kind == "arg" and path.root_name == "self" and path.attrs:
                    self._guard_path(this, (), path.attrs, type(this).__name__, frame,
                                     path.method)
            return
        if _is_library_file(filename):
            return
        local = None
        for path in access_paths(code):
            if path.root_kind == "global":
                scope = frame.f_globals
                if path.root_name not in scope:
                    continue  # a builtin
                self._guard_path(scope, (("key", path.root_name),), path.attrs,
                                 f"global {path.root_name!r}", frame, path.method)
            elif path.root_kind == "free":
                cell = self._top_cells.get(path.root_name) if code is self._top_code else None
                if cell is not None:
                    self._guard_path(cell, (("cell", ""),), path.attrs,
                                     f"closure variable {path.root_name!r}", frame, path.method)
            elif path.attrs:
                if local is None:
                    local = frame.f_locals
                root = local.get(path.root_name, _MISSING)
                if root is _MISSING or isinstance(root, Tensor | np.ndarray):
                    continue  # tensor arguments are guarded by the call signature
                name = type(root).__name__ if _is_module(root) else path.root_name
                self._guard_path(root, (), path.attrs, name, frame, path.method)

    # -- recording -----------------------------------------------------------------------------
    def _guard_path(self, root: Any, steps: tuple, attrs: tuple, name: str, frame: Any,
                    method: bool = False) -> None:
        """Guard the value ``root`` -> ``steps`` -> ``attrs`` leads to (as far as it is data)."""
        value = root
        for kind, key in steps:
            value = value.get(key, _MISSING) if kind == "key" else value.cell_contents
        if value is _MISSING:
            return
        path = list(steps)
        reached_end = False
        for attr in attrs:
            if isinstance(value, types.ModuleType):
                break  # np.random, math.pi: a module's attributes are code and constants
            following = _read(value, attr)
            if following is _MISSING:
                break  # a property or a method: guard the object it belongs to
            own = getattr(value, "__dict__", None)
            path.append(("attr" if type(own) is dict and attr in own else "cattr", attr))
            value = following
            name = f"{name}.{attr}"
        else:
            reached_end = True
        if not path:
            return  # the root itself: an argument, guarded by the call signature
        key = (id(root), tuple(path))
        if key in self.guards:
            return
        # a method called on the value itself (list.append) may mutate it: compare identity
        by_identity = (method and reached_end) or not isinstance(
            value, (*_SCALARS, float, np.generic, list, tuple, dict))
        expected = Same(value) if by_identity else fingerprint(value)
        self.guards[key] = Guard(root, tuple(path), expected, by_identity, name,
                                 "" if by_identity else _show(value), value)
        if isinstance(value, _GENERATORS):
            self._report(f"random generator {name} used while tracing: the numbers it drew "
                         "are baked into the plan and repeat on every call; draw them with "
                         "needle ops or pass them as arguments", _where(frame))
        elif isinstance(value, np.ndarray):
            self._report(f"NumPy array {name} read while tracing: its values are baked into "
                         "the plan (changes to it are not seen); pass it as an argument or "
                         "keep it in a Tensor", _where(frame))

    def _report(self, what: str, source: str | None) -> None:
        self.unguarded.setdefault((what, source), Unguarded(what, source))

    def result(self) -> tuple[list[Guard], list[Unguarded]]:
        """The guards (in the order first read) and the reports."""
        return list(self.guards.values()), list(self.unguarded.values())


__all__ = ["Guard", "GuardCollector", "Same", "Unguarded", "access_paths", "compile_checks",
           "fingerprint"]

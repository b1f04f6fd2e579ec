"""The Optimizer base class (parameters, per-parameter state, state dicts) and weight decay."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..autograd import Tensor, init_leaf, new_leaf
from ..backend import array_module, device_of
from ..compiler import fused_update
from ..core import context
from ..core.ops_state import apply_updates

__all__ = ["Optimizer", "coupled_weight_decay", "decoupled_weight_decay"]


# -- weight decay: the one transform every optimizer shares ------------------------------------
def coupled_weight_decay(grad: Any, param: Any, weight_decay: float, out: Any | None) -> Any:
    """The gradient of ``loss + wd/2 * ||p||^2``: ``g = grad + wd * p`` (``grad`` is not modified).

    Returns ``grad`` itself when ``weight_decay`` is 0, else ``out`` (a scratch array shaped like
    ``param``) holding ``g``.
    """
    if weight_decay == 0.0:
        return grad
    xp = array_module(param)
    xp.multiply(param, weight_decay, out=out)
    xp.add(out, grad, out=out)
    return out


def decoupled_weight_decay(param: Any, lr: float, weight_decay: float) -> None:
    """Shrink the parameter in place before the update (AdamW): ``p *= 1 - lr * wd``."""
    if weight_decay != 0.0:
        array_module(param).multiply(param, 1.0 - lr * weight_decay, out=param)


# -- the base class ------------------------------------------------------------------------------
#: the state / scratch index of the all-parameters update
_FLAT = -1
#: the fewest parameter elements for which an eager step fuses by default (``fused=None``):
#: below it NumPy's dozen passes cost less than recording the rule and calling the loop
#: (measured crossover ~8k elements for Adam), and the loop's compile (~0.3 s) would not pay
EAGER_FUSE_MIN_ELEMENTS = 1 << 14
#: a gradient of at least this many elements is not copied into the flat gradient: the
#: update runs on its own segment of the flat arrays, reading the gradient where it is (a
#: language model's 10k x 128 tables: the copy was a third of an SGD step's memory traffic)
SEGMENT_MIN_ELEMENTS = 1 << 18


class _Segment:
    """One stretch ``[start, stop)`` of the flat arrays updated on its own: its views of the
    parameter, gradient and state arrays (made once, so a kept fused loop replays on them)
    and its own fused-loop cache."""

    __slots__ = ("start", "stop", "param", "grad", "state", "rule")

    def __init__(self, flat: _FlatBuffers, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.param = flat.param[start:stop]
        self.grad = flat.grad[start:stop]
        self.state = {name: array[start:stop] for name, array in flat.state.items()}
        self.rule = fused_update.FusedRule()


_new_object = object.__new__  # (bound once: a fresh gradient leaf per parameter per step)


class _FlatBuffers:
    """Parameters, gradients and optimizer state laid end to end in one array each."""

    def __init__(self, shapes: list[tuple], dtype: Any) -> None:
        self.shapes = shapes
        sizes = [int(np.prod(s)) for s in shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        total = self.offsets[-1]
        self.param = np.empty(total, dtype=dtype)
        self.grad = np.empty(total, dtype=dtype)
        self.param_views = self.views_of(self.param)
        self.state: dict[str, Any] = {}
        #: (start, stop) -> its _Segment, for steps with large gradients (see _segmented_step)
        self.segments: dict[tuple[int, int], _Segment] = {}

    def views_of(self, flat: Any) -> list:
        """One view of ``flat`` per parameter, shaped like it."""
        return [flat[a:b].reshape(shape)
                for a, b, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def holds(self, datas: list) -> bool:
        """Whether these parameter arrays are this buffer's own views (see ``adopt``)."""
        return all(d is v for d, v in zip(datas, self.param_views))

    def adopt(self, params: list) -> bool:
        """Make each parameter's array its view of ``self.param`` (values copied in), so the
        update runs on the parameters' own memory with no gather or write-back.

        Done only when every array belongs to its parameter alone: an array that is a view of
        other memory, or that anything else references (a user's ``p.numpy()``, a Caffe Blob,
        another Tensor) keeps its identity, so whoever shares it still sees the updates. The
        flat buffer then gathers and writes back instead. (A known trick: FSDP's flat
        parameters and fused multi-tensor optimizers lay parameters out the same way.)
        """
        for p in params:
            # the attribute and getrefcount's own argument: nothing else holds the array
            if p._data.base is not None or sys.getrefcount(p._data) != 2:
                return False
        for p, view in zip(params, self.param_views):
            np.copyto(view, p._data)
            p._data = view
        return True



def _plain(value: Any) -> Any:
    """A hyperparameter as a Python number, so NumPy float64 scalars never promote float32 math."""
    if value is None:  # an optional setting left at its default (SGD's dampening)
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    return float(value)


def _number_in(low: float, high: float, high_open: bool) -> Callable[[Any], bool]:
    """A test: a real, finite number in [low, high) or [low, high] (NaN and inf fail)."""

    def test(value: Any) -> bool:
        if isinstance(value, bool | np.bool_ | str | bytes):
            return False
        try:
            value = float(value)
        except (TypeError, ValueError):
            return False
        return math.isfinite(value) and low <= value and (
            value < high if high_open else value <= high)

    return test


#: The valid values of every optimizer's hyperparameters, by name: (test, the rule in words).
#: The constructors and ``load_state_dict`` both check through ``_check_hyperparams``, so a
#: state dict can never set what a constructor refuses.
HYPERPARAM_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (_number_in(0.0, math.inf, True), "a finite number >= 0"),
    "initial_lr": (_number_in(0.0, math.inf, True), "a finite number >= 0"),
    # needle damps the momentum buffer by 1 - momentum, so momentum stays below 1
    "momentum": (_number_in(0.0, 1.0, True), "in [0, 1)"),
    "dampening": (lambda v: v is None or _number_in(0.0, 1.0, False)(v), "None or in [0, 1]"),
    "beta1": (_number_in(0.0, 1.0, True), "in [0, 1)"),
    "beta2": (_number_in(0.0, 1.0, True), "in [0, 1)"),
    "eps": (_number_in(0.0, math.inf, True), "a finite number >= 0"),
    "weight_decay": (_number_in(0.0, math.inf, True), "a finite number >= 0"),
    "nesterov": (lambda v: isinstance(v, bool | np.bool_), "True or False"),
}


class Optimizer:
    """Base of every optimizer: holds ``.params``, hyperparameters and per-parameter state.

    Subclasses list their hyperparameter names in ``hyperparams`` and their per-parameter
    arrays in ``state_names``, and implement ``_update(index, param, grad)`` on backend arrays
    with a pure update function. ``step()`` skips parameters whose ``.grad`` is None, never
    modifies ``.grad`` and never builds graph nodes. ``lr`` is a plain attribute that
    learning-rate schedulers set.

    ``fused`` (PyTorch's name) says whether the update over all parameters runs as one
    compiled loop instead of a dozen NumPy passes (``compiler/fused_update.py``, bit-for-bit
    the same results): None (default) fuses optimized compiled plans (``ndl.jit``, a
    Session's train op) and eager steps over at least ``EAGER_FUSE_MIN_ELEMENTS`` parameter
    elements whenever numba is installed, and runs NumPy otherwise; True fuses every step and
    refuses to be made without numba; False never fuses. The loop is recorded at the first
    step and reused while the rule makes the same calls.
    """

    #: hyperparameter attribute names saved by ``state_dict`` (``lr`` first)
    hyperparams: tuple[str, ...] = ("lr",)
    #: per-parameter arrays kept across steps, created as zeros on a parameter's first update
    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor], lr: float, fused: bool | None = None) -> None:
        params = list(params)
        name = type(self).__name__
        if fused and not fused_update.available():
            raise ImportError(f"{name}(fused=True) needs numba: pip install 'needle[fast]'")
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"{name}: params[{i}] is a {type(p).__name__}, expected a Tensor "
                                "(pass model.parameters())")
            if id(p) in seen:
                raise ValueError(f"{name}: params[{i}] appears more than once; each parameter "
                                 "must be listed once or it would be updated twice per step")
            seen.add(id(p))
        self._check_hyperparams(name, {"lr": lr})
        self.params: list[Tensor] = params
        self.lr = float(lr)
        #: None: fuse where numba is there and it pays; True: always (needs numba); False: never
        self.fused = fused
        #: the lr before any scheduler changed it (set by the first scheduler attached)
        self.initial_lr: float | None = None
        #: number of ``step()`` calls so far
        self.step_count = 0
        #: parameter index -> {state name: backend array}
        self.state: dict[int, dict[str, Any]] = {}
        # scratch arrays per parameter index: reused every step, never saved
        self._scratch: dict[Any, list[Any]] = {}
        # all parameters end to end, for the one-shot update (see _flat_step)
        self._flat: _FlatBuffers | None = None
        # the fused update's recording and compiled loop, kept between steps
        self._fused_rule = fused_update.FusedRule()
        # the stretch of the flat arrays being updated (None: all of them); see _segmented_step
        self._segment: _Segment | None = None
        datas = self._flat_eligible([p._data for p in params])
        if datas is not None:
            self._flat = _FlatBuffers([d.shape for d in datas], datas[0].dtype)
            del datas  # adopt() checks that only the parameters hold their arrays
            self._flat.adopt(params)

    @classmethod
    def _check_hyperparams(cls, where: str, values: dict[str, Any]) -> None:
        """Raise one ValueError naming the first value outside its rule (``HYPERPARAM_RULES``;
        names without a rule are not checked). Subclasses add rules between values."""
        for key, value in values.items():
            rule = HYPERPARAM_RULES.get(key)
            if rule is not None and not rule[0](value):
                raise ValueError(f"{where}: {key} must be {rule[1]}, got {value!r}")

    # -- gradients ---------------------------------------------------------------------------
    def reset_grad(self) -> None:
        """Forget every parameter's gradient: ``p.grad = None``."""
        for p in self.params:
            p.grad = None

    def zero_grad(self) -> None:
        """Alias of ``reset_grad`` (PyTorch's name)."""
        self.reset_grad()

    def minimize(self, loss: Tensor) -> Tensor:
        """One eager training step: ``reset_grad()``, ``loss.backward()``, ``step()``.

        Returns ``loss``. For a declared graph's loss (no value yet, outside a JIT trace) it
        returns the train op instead, as ``needle.static.minimize`` does.
        """
        if loss._data is None and context.active_trace() is None:  # a declared graph's loss
            return context.service("minimize_declared")(self, loss)
        self.reset_grad()
        # the gradients are only read by step(), so they need no graph of their own
        loss.backward(create_graph=False)
        self.step()
        return loss

    # -- the update --------------------------------------------------------------------------
    def step(self) -> None:
        """Update every parameter that has a gradient, in place.

        While ``ndl.jit`` traces, gradients have no values yet: the step is recorded as a graph
        node that the compiled function runs on every call.
        """
        if context.active_trace() is not None and any(
                p.grad is not None and p.grad._data is None for p in self.params):
            apply_updates(self, {p: p.grad for p in self.params if p.grad is not None})
            return
        flat = self._flat
        self._apply_step(fuse=self.fused is True or (
            self.fused is None and flat is not None
            and flat.param.size >= EAGER_FUSE_MIN_ELEMENTS))

    def run_update(self, params: tuple, grads: tuple, storage: Any = None,
                   restore_grads: bool = False, fuse_rule: bool = False) -> None:
        """What a graph's ``apply_updates`` node runs: give ``params`` these gradient arrays
        (the optimizer's other parameters none, as after ``reset_grad()``) and update.

        ``storage(p)``, if given, is the array the update writes for ``p`` (a Session's value
        of a Variable); ``restore_grads`` puts the ``.grad`` attributes back afterwards; the
        update runs as one compiled loop if ``fuse_rule`` and ``fused`` allows.
        """
        plain_step = type(self).step is Optimizer.step
        fuse = self.fused is True or (fuse_rule and self.fused is None)
        if storage is None and not restore_grads and plain_step and fuse \
                and self._fast_run_update(params, grads):
            return
        given = {id(p): g for p, g in zip(params, grads)}
        # only what this call changes is put back (nothing, under the JIT)
        saved_grads = [(p, p.grad) for p in self.params] if restore_grads else []
        saved_data = [(p, p._data) for p in params] if storage is not None else []
        try:
            for p in self.params:
                g = given.get(id(p))
                if isinstance(g, np.generic):  # a full reduction's NumPy scalar
                    g = np.asarray(g)
                p.grad = None if g is None else new_leaf(Tensor, g, device=p.device)
                if g is not None and storage is not None:
                    p._data = storage(p)  # updated in place by the step
            if plain_step:
                self._apply_step(fuse)
            else:  # a subclass with its own step()
                self.step()
        finally:
            for p, data in saved_data:
                p._data = data
            for p, grad in saved_grads:
                p.grad = grad

    def _apply_step(self, fuse: bool) -> None:
        """``step()`` on gradients with values; ``fuse`` runs the flat update as one loop."""
        self.step_count += 1
        self._begin_step()
        self._update_all(fuse)

    def _update_all(self, fuse: bool) -> None:
        """The update rule on every parameter with a gradient: one flat update if it can be."""
        if self._flat_step(fuse):
            return
        for index, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            self._update(index, self._param_array(p), grad.realize_data())

    # -- one update over all parameters at once ---------------------------------------------
    def _flat_step(self, fuse: bool = False) -> bool:
        """Run the update rule once over all parameters laid end to end; False if it cannot.

        Every rule is elementwise, so updating one concatenated array gives bit-for-bit the
        per-parameter results, with a dozen NumPy calls instead of a dozen per parameter.
        The parameters' arrays are views of that array when the optimizer could adopt them
        (``_FlatBuffers.adopt``); otherwise they are gathered and written back, so memory they
        share with other objects (a Caffe Blob, a user's view) stays shared. Used on the CPU
        when every parameter has a gradient and all share one float dtype.
        """
        params = self.params
        flat = self._flat
        if fuse and flat is not None:  # an eager step's common case: one pass of checks
            pieces = self._held_grad_pieces(flat)
            if pieces is not None:
                if self._fused_in_place(flat, pieces):
                    return True
                fuse = False  # the rule cannot be fused: NumPy below, not asked again
        grads: list[Any] = [None if p.grad is None else p.grad._data for p in params]
        if any(g is None or type(g) is not np.ndarray for g in grads):
            return False
        datas = self._flat_eligible([p._data for p in params])
        if datas is None:
            return False
        flat = self._flat
        shapes = [data.shape for data in datas]
        if flat is None or flat.shapes != shapes or flat.param.dtype != datas[0].dtype:
            flat = self._flat = _FlatBuffers(shapes, datas[0].dtype)
        if flat.holds(datas):
            if fuse:
                pieces = self._grad_pieces(flat, grads)
                if pieces is not None:
                    if self._fused_in_place(flat, pieces):
                        return True
                    fuse = False  # the rule cannot be fused: NumPy below, not asked again
            if max(g.size for g in grads) >= SEGMENT_MIN_ELEMENTS:
                self._segmented_step(flat, grads, fuse)
                return True
            np.concatenate([g.reshape(-1) for g in grads], out=flat.grad)
            self._flat_update(flat, fuse)
            return True
        np.concatenate([g.reshape(-1) for g in grads], out=flat.grad)
        np.concatenate([d.reshape(-1) for d in datas], out=flat.param)
        self._flat_update(flat, fuse)
        for data, view in zip(datas, flat.param_views):
            np.copyto(data, view)
        return True

    def _segmented_step(self, flat: _FlatBuffers, grads: list, fuse: bool) -> None:
        """The flat update in stretches: each large gradient's parameter on its own, reading
        the gradient array in place, and each run of parameters between them as one stretch
        with its gradients copied into the flat gradient. The same rule on every element, so
        the same bits as one update over everything."""
        if self.state_names:
            self._flat_state()  # (before the segments take their views of it)
        offsets, dtype = flat.offsets, flat.grad.dtype
        # read in place: large, contiguous, of the flat dtype (others are copied, and cast)
        own = [g.size >= SEGMENT_MIN_ELEMENTS and g.dtype == dtype and g.flags.c_contiguous
               for g in grads]
        i, n = 0, len(grads)
        while i < n:
            if own[i]:
                stop = i + 1
                grad = grads[i].reshape(-1)
            else:
                stop = i
                while stop < n and not own[stop]:
                    stop += 1
                grad = None
            key = (offsets[i], offsets[stop])
            segment = flat.segments.get(key)
            if segment is None:
                segment = flat.segments[key] = _Segment(flat, *key)
            if grad is None:
                np.concatenate([g.reshape(-1) for g in grads[i:stop]], out=segment.grad)
                grad = segment.grad
            self._segment = segment
            try:
                if not (fuse and fused_update.run_fused(self._record_flat_rule, segment.param,
                                                        grad, cache=segment.rule)):
                    self._update(_FLAT, segment.param, grad)
            finally:
                self._segment = None
            i = stop

    def _held_grad_pieces(self, flat: _FlatBuffers) -> tuple | None:
        """``_grad_pieces`` of the parameters' gradients for an eager step, checking in the
        same pass what ``_flat_step``'s general path checks in several: every parameter has
        a gradient and is still on its own writable view of the flat parameters (so the flat
        buffers hold all of them, shaped and typed as they were laid out). None when any of
        it fails: the general path then decides (per parameter, gathered, or copied). Saves
        ~10 us of an eager MLP-ResNet step's ~170 us ``step()`` (28 parameters)."""
        dtype = flat.grad.dtype
        params, views = self.params, flat.param_views
        if len(params) != len(views):
            return None
        written = None  # (ids of the arrays the update writes: built only if a view needs it)
        pieces = []
        for p, view in zip(params, views):
            grad = p.grad
            if grad is None or p._data is not view or not view.flags.writeable:
                return None
            g = grad._data
            if type(g) is not np.ndarray or (g.dtype is not dtype and g.dtype != dtype):
                return None
            piece = g.ravel()  # a contiguous view, or a copy of a gradient that is not one
            if piece.size != view.size or not piece.flags.writeable:
                return None
            base = g.base
            if base is not None and piece.base is not None:  # a view of another array
                if type(base) is not np.ndarray or not base.flags.owndata:
                    return None
                if written is None:
                    written = {id(flat.param), *map(id, flat.state.values())}
                if id(base) in written:
                    return None
            pieces.append(piece)
        return tuple(pieces)

    def _fused_in_place(self, flat: _FlatBuffers, pieces: tuple) -> bool:
        """The fused update reading each gradient where the backward left it (``pieces``
        from ``_grad_pieces``; no copy into the flat gradient: a fifth of the update's time
        in a jitted MLP step); False (nothing done) if the rule cannot be fused."""
        return fused_update.run_fused(self._record_flat_rule, flat.param, flat.grad,
                                      cache=self._fused_rule, parts={1: pieces})

    @staticmethod
    def _grad_pieces(flat: _FlatBuffers, grads: list | tuple, params: tuple | None = None,
                     own: list | None = None) -> tuple | None:
        """Each gradient as a flat array, to be read in place by the fused update; None
        unless every one is a writable NumPy array of its parameter's size and the flat dtype
        that cannot share memory with what the update writes: it owns its memory, it was copied
        here (not contiguous), or it views an array owning its memory that is not the flat
        parameters or state (a view of anything else might alias them). With ``params`` and
        ``own`` (the optimizer's parameters), also None unless ``params`` are ``own`` in
        order, each still on its view of the flat parameters. One pass: it runs on
        every jitted step."""
        dtype = flat.grad.dtype
        # (ids of arrays the flat buffers keep alive: a set lookup per piece, not a scan)
        written = {id(flat.param), *map(id, flat.state.values())}
        pieces = []
        for g, view, p, mine in zip(grads, flat.param_views, params or grads, own or grads):
            if type(g) is not np.ndarray or g.size != view.size \
                    or (g.dtype is not dtype and g.dtype != dtype):
                return None
            # (the view's writable flag was checked when it was made: it is internal to the
            # optimizer, which hands it to the parameter alone)
            if params is not None and (p is not mine or p._data is not view):
                return None
            piece = g.ravel()  # a contiguous view, or a copy of a gradient that is not one
            if not piece.flags.writeable:  # (numba types read-only arrays apart: no one loop)
                return None
            base = g.base
            if base is not None and piece.base is not None and (
                    type(base) is not np.ndarray or not base.flags.owndata
                    or id(base) in written):
                return None
            pieces.append(piece)
        return tuple(pieces)

    def _fast_run_update(self, params: tuple, grads: tuple) -> bool:
        """``run_update`` of a fused step over all parameters in their flat buffers, with
        the per-step checks in one pass (a jitted training step's common case); False,
        having changed nothing, when it is not that case."""
        flat = self._flat
        own = self.params
        if flat is None or len(params) != len(own) or len(grads) != len(own):
            return False
        pieces = self._grad_pieces(flat, grads, params, own)
        if pieces is None:
            return False
        for p, g in zip(own, grads):  # (new_leaf's keyword pass-through costs 40% more here)
            p.grad = init_leaf(_new_object(Tensor), g, device=p.device)
        self.step_count += 1
        self._begin_step()
        if not self._fused_in_place(flat, pieces):
            self._update_all(fuse=False)  # the rule cannot be fused: NumPy, as step() does
        return True

    def _flat_update(self, flat: _FlatBuffers, fuse: bool) -> None:
        """The update rule on the flat arrays: one compiled loop if ``fuse`` and it can be
        (the loop recorded at an earlier step is reused while the rule makes the same calls)."""
        if fuse and fused_update.run_fused(self._record_flat_rule, flat.param, flat.grad,
                                           cache=self._fused_rule):
            return
        self._update(_FLAT, flat.param, flat.grad)

    def _record_flat_rule(self, param: Any, grad: Any) -> None:
        """The update rule as ``run_fused`` records it: on stand-ins for the flat arrays, with
        the scratch it asks for made by the recorder (the loop's locals)."""
        saved = self._scratch
        self._scratch = {}
        try:
            self._update(_FLAT, param, grad)
        finally:
            self._scratch = saved

    @staticmethod
    def _flat_eligible(datas: list) -> list | None:
        """``datas`` if one flat update can cover them (at least 4 writable NumPy arrays of one
        float dtype), else None."""
        # (graph Variables have no array of their own: a Session holds their values)
        if len(datas) < 4 or type(datas[0]) is not np.ndarray:
            return None
        dtype = datas[0].dtype
        if dtype.kind != "f":
            return None
        for data in datas:
            if type(data) is not np.ndarray or data.dtype != dtype or not data.flags.writeable:
                return None
        return datas

    def _begin_step(self) -> None:
        """Hook run once per ``step()`` before the per-parameter updates."""

    def _update(self, index: int, param: Any, grad: Any) -> None:
        """Apply the update rule to one parameter's array ``param`` in place."""
        raise NotImplementedError(f"{type(self).__name__} does not define _update()")

    @staticmethod
    def _param_array(p: Tensor) -> Any:
        """The parameter's backend array, made writable first if it is a read-only view."""
        data = p.realize_data()
        flags = getattr(data, "flags", None)
        if flags is not None and not getattr(flags, "writeable", True):
            # e.g. a parameter built with ndl.from_numpy on a broadcast view
            data = data.copy()
            p._data = data
        return data

    def _state(self, index: int, param: Any) -> dict[str, Any]:
        """The state arrays of parameter ``index``, zeros (like ``param``) on first use."""
        if index == _FLAT:
            flat_state = self._flat_state()
            return flat_state if self._segment is None else self._segment.state
        state = self.state.get(index)
        if state is None:
            state = self.state[index] = {}
        if len(state) != len(self.state_names):
            # first update, or a hyperparameter change (momentum 0 -> 0.9) needs a new array
            xp = array_module(param)
            for name in self.state_names:
                if name not in state:
                    state[name] = xp.zeros_like(param)
        return state

    def _flat_state(self) -> dict[str, Any]:
        """State arrays over all parameters end to end; each parameter's state becomes a view.

        Built from the per-parameter arrays where they exist (after a checkpoint was loaded or
        after steps with a missing gradient), so switching between the paths keeps the state.
        """
        flat = self._flat
        assert flat is not None  # (the _FLAT state exists only with the flat buffers)
        if set(flat.state) != set(self.state_names):
            for name in self.state_names:
                if name in flat.state:
                    continue
                parts = [self.state.get(i, {}).get(name) for i in range(len(self.params))]
                array = np.zeros(flat.param.shape, dtype=flat.param.dtype)
                for part, view in zip(parts, flat.views_of(array)):
                    if part is not None:
                        np.copyto(view, part)
                flat.state[name] = array
            for i, view_set in enumerate(zip(*[flat.views_of(flat.state[n])
                                               for n in self.state_names])):
                self.state[i] = dict(zip(self.state_names, view_set))
            flat.segments.clear()  # their views were of the old state arrays
        return flat.state

    def _buffer(self, index: int, param: Any, k: int = 0) -> Any:
        """Scratch array number ``k`` for parameter ``index`` (contents are garbage)."""
        key: Any = index
        if index == _FLAT and self._segment is not None:  # one set per stretch: no reallocation
            key = (_FLAT, self._segment.start)
        buffers = self._scratch.setdefault(key, [])
        while len(buffers) <= k:
            buffers.append(None)
        buf = buffers[k]
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype:
            buf = buffers[k] = array_module(param).empty_like(param)
        return buf

    # -- state dicts -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit, as plain data (no objects).

        ``{"optimizer": class name, "hyperparams": {name: number}, "step_count": int,
        "state": {param index: {state name: NumPy array (a copy)}}}``.
        """
        hyper = {name: getattr(self, name) for name in self.hyperparams}
        if self.initial_lr is not None:
            hyper["initial_lr"] = self.initial_lr
        state = {
            index: {name: np.array(device_of(arr).to_numpy(arr), copy=True)
                    for name, arr in entry.items()}
            for index, entry in sorted(self.state.items())
        }
        return {"optimizer": type(self).__name__, "hyperparams": hyper,
                "step_count": self.step_count, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters, the step count and state arrays (copied onto each
        parameter's device and dtype). Parameter indices may be ints or strings."""
        name = type(self).__name__
        saved_type = state_dict.get("optimizer")
        if saved_type != name:
            raise ValueError(f"{name}.load_state_dict: the state dict belongs to {saved_type}")
        hyper = dict(state_dict["hyperparams"])
        missing = [h for h in self.hyperparams if h not in hyper]
        if missing:
            raise KeyError(f"{name}.load_state_dict: hyperparameters {missing} are missing")
        # the constructor's checks: a state dict cannot set what the constructor refuses
        checked = {h: hyper[h] for h in self.hyperparams}
        if hyper.get("initial_lr") is not None:
            checked["initial_lr"] = hyper["initial_lr"]
        self._check_hyperparams(f"{name}.load_state_dict", checked)
        new_hyper = {h: _plain(hyper[h]) for h in self.hyperparams}
        old_hyper = {h: getattr(self, h) for h in self.hyperparams}
        # hyperparameters first: they decide which state arrays exist (SGD's momentum)
        for h, value in new_hyper.items():
            setattr(self, h, value)
        try:
            new_state = self._load_state(state_dict["state"])
        except Exception:
            for h, value in old_hyper.items():
                setattr(self, h, value)
            raise
        initial_lr = hyper.get("initial_lr")
        self.initial_lr = None if initial_lr is None else float(initial_lr)
        self.step_count = int(state_dict["step_count"])
        self.state = new_state
        self._scratch = {}
        if self._flat is not None:  # rebuilt from the loaded per-parameter state
            self._flat.state = {}

    def _load_state(self, saved: dict[Any, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Checked copies of saved per-parameter arrays on each parameter's device and dtype."""
        new_state: dict[int, dict[str, Any]] = {}
        problems = []
        for key, entry in saved.items():
            index = int(key)
            if not 0 <= index < len(self.params):
                problems.append(f"state for parameter {index}, but the optimizer has "
                                f"{len(self.params)} parameters")
                continue
            p = self.params[index]
            if set(entry) != set(self.state_names):
                problems.append(f"parameter {index}: state names {sorted(entry)}, expected "
                                f"{sorted(self.state_names)}")
                continue
            arrays = {}
            for sname in self.state_names:
                arr = np.asarray(entry[sname])
                if tuple(arr.shape) != tuple(p.shape):
                    problems.append(f"parameter {index} {sname}: checkpoint "
                                    f"{tuple(arr.shape)} vs parameter {tuple(p.shape)}")
                    continue
                arrays[sname] = p.device.array(np.array(arr, dtype=p.dtype, copy=True))
            new_state[index] = arrays
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + "; ".join(problems))
        return new_state

    def __repr__(self) -> str:
        hyper = ", ".join(f"{h}={getattr(self, h)}" for h in self.hyperparams)
        return f"{type(self).__name__}({len(self.params)} params, {hyper})"

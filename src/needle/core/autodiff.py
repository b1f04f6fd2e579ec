"""Reverse-mode autodiff: iterative topological sort, adjoint accumulation, central un-broadcasting.

Every gradient is built with ops, so it is itself a graph node (differentiable again, and
lazy when the forward nodes are lazy). Op gradient rules return adjoints of the broadcast
output's shape; this module alone sums them back to each input's shape and dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from . import context
from .registry import F, NodeMeta, fit_to_input


def find_topo_sort(node_list: Iterable[Any], requires_grad_only: bool = False,
                   stop: set[int] | None = None) -> list:
    """Every node reachable from ``node_list`` in post-order DFS order, inputs in argument order.

    Iterative (an explicit stack), so graphs thousands of nodes deep do not hit Python's
    recursion limit. With ``requires_grad_only`` it does not descend into nodes that need no
    gradient; nodes whose ids are in ``stop`` are included but not descended into.
    """
    visited: set[int] = set()
    order: list = []
    for root in node_list:
        if id(root) in visited:
            continue
        visited.add(id(root))
        stack = [(root, iter(() if stop and id(root) in stop else root.inputs))]
        while stack:
            node, children = stack[-1]
            for child in children:
                if id(child) in visited or (requires_grad_only and not child.requires_grad):
                    continue
                visited.add(id(child))
                stack.append((child, iter(() if stop and id(child) in stop else child.inputs)))
                break
            else:
                stack.pop()
                order.append(node)
    return order


def _grad_topo_sort(outputs: list) -> list:
    """``find_topo_sort(outputs, requires_grad_only=True)``, the same order, for the reverse
    sweep, with less work per node: nodes themselves in the visited set (identity-hashed, as
    the sweep's adjoints dict keys them) instead of their ids, and a flat stack of nodes
    instead of (node, iterator) pairs.

    A node is expanded when it is popped (so a child reached through an earlier sibling is
    visited there, as the recursive DFS does): it goes back on the stack under a ``None``
    marker, with its unvisited inputs above it in reverse, so they are popped in argument
    order; the marker, popped after all of them, emits the node (post-order).
    """
    visited: set = set()
    add = visited.add
    order: list = []
    emit = order.append
    for root in outputs:
        if root in visited:
            continue
        stack = [root]
        push, pop = stack.append, stack.pop
        while stack:
            node = pop()
            if node is None:  # its inputs are all done
                emit(pop())
                continue
            if node in visited:  # reached through an earlier sibling's inputs
                continue
            add(node)
            inputs = node.inputs
            n_inputs = len(inputs)
            if n_inputs == 0:  # a leaf: nothing below it
                emit(node)
                continue
            push(node)
            push(None)
            if n_inputs == 2:  # most ops: unrolled
                a, b = inputs
                if b.requires_grad and b not in visited:
                    push(b)
                if a.requires_grad and a not in visited:
                    push(a)
            elif n_inputs == 1:
                a = inputs[0]
                if a.requires_grad and a not in visited:
                    push(a)
            else:
                for child in reversed(inputs):
                    if child.requires_grad and child not in visited:
                        push(child)
    return order


def _accumulate(adjoints: dict, node: Any, grad: Any) -> None:
    previous = adjoints.get(node)
    adjoints[node] = grad if previous is None else previous + grad


def _tuple_adjoint(node: Any, parts: dict[int, Any]) -> Any:
    """The adjoint of a TensorTuple from the adjoints of its items (zeros where none)."""
    items = []
    for i in range(len(node)):
        part = parts.get(i)
        items.append(part if part is not None else F.full_like(node[i], 0))
    return F.make_tuple(*items)


def reverse_mode(outputs: list, out_grads: list, on_grad: Callable[[Any, Any], None],
                 stop: set[int] | None = None) -> None:
    """Propagate adjoints from ``outputs`` back through the graph.

    ``on_grad(node, grad)`` is called with the total adjoint of every leaf and of every node
    that carries ``meta`` (front-ends mark the non-leaf nodes whose gradients they want), once
    all of the node's consumers have been processed. Nodes whose ids are in ``stop`` are
    treated as leaves (reported, not differentiated further).

    NOTE: adjoints of ``tuple_get_item`` nodes are gathered per item and combined once per
    tuple, so a sequence split into n steps costs O(n) gradient nodes, not O(n^2) zeros.
    """
    topo = (find_topo_sort(outputs, requires_grad_only=True, stop=stop) if stop
            else _grad_topo_sort(outputs))
    adjoints: dict = {}
    tuple_parts: dict = {}
    for out, grad in zip(outputs, out_grads):
        _accumulate(adjoints, out, grad)
    pop_adjoint, get_adjoint = adjoints.pop, adjoints.get  # (bound once: the hot loop)
    for node in reversed(topo):
        grad = pop_adjoint(node, None)
        if tuple_parts:
            parts = tuple_parts.pop(node, None)
            if parts:
                from_items = _tuple_adjoint(node, parts)
                grad = from_items if grad is None else grad + from_items
        if grad is None:
            continue
        op = node.op
        if op is None or node.meta is not None:
            on_grad(node, grad)
            if op is None:
                continue
        if stop and id(node) in stop:
            continue
        if op.selects_item:
            source = node.inputs[0]
            if source.requires_grad:
                _accumulate(tuple_parts.setdefault(source, {}), op.index, grad)
            continue
        in_grads = op.gradient(grad, node)  # gradient_as_tuple, inlined (hot loop)
        if type(in_grads) is not tuple:
            in_grads = tuple(in_grads) if isinstance(in_grads, list) else (in_grads,)
        inputs = node.inputs
        n_grads = len(in_grads)
        if not 0 < n_grads < 3 or n_grads != len(inputs):
            for inp, in_grad in zip(inputs, in_grads):
                if in_grad is not None and inp.requires_grad:
                    _add_edge(adjoints, inp, in_grad)
            continue
        # one or two inputs (most ops): the last edge inline, no zip (the hot loop)
        inp, in_grad = inputs[0], in_grads[0]
        if n_grads == 2:
            in_grad_b = in_grads[1]
            if in_grad_b is not None:
                inp_b = inputs[1]
                if inp_b.requires_grad:
                    if in_grad is not None and inp.requires_grad:  # a's edge first
                        _add_edge(adjoints, inp, in_grad)
                    inp, in_grad = inp_b, in_grad_b
        if in_grad is None or not inp.requires_grad:
            continue
        g_data, i_data = in_grad._data, inp._data
        # eager fast path (as in _add_edge): arrays of the same shape and dtype need no
        # sum_to / astype (dtypes compared by identity first: NumPy's builtin dtypes are
        # singletons); tuple inputs (make_tuple, split) take tuple adjoints as they are
        if g_data is None or i_data is None:
            if type(i_data) is not tuple and (inp.op is None or not inp.op.returns_tuple):
                in_grad = fit_to_input(in_grad, inp)
        elif type(i_data) is not tuple and (
                g_data.shape != i_data.shape or (g_data.dtype is not i_data.dtype
                                                 and g_data.dtype != i_data.dtype)):
            in_grad = fit_to_input(in_grad, inp)
        previous = get_adjoint(inp)
        adjoints[inp] = in_grad if previous is None else previous + in_grad


def _add_edge(adjoints: dict, inp: Any, in_grad: Any) -> None:
    """Add ``in_grad`` (an op gradient's adjoint for input ``inp``) to ``inp``'s adjoint,
    summed back to its shape and cast to its dtype first where they differ.

    The eager fast path first: arrays of the same shape and dtype need no sum_to / astype
    (dtypes compared by identity first: NumPy's builtin dtypes are singletons); tuple inputs
    (make_tuple, split) take tuple adjoints as they are. ``reverse_mode`` inlines this for
    the last edge of each node (keep the two the same).
    """
    g_data, i_data = in_grad._data, inp._data
    if g_data is None or i_data is None:
        if type(i_data) is not tuple and (inp.op is None or not inp.op.returns_tuple):
            in_grad = fit_to_input(in_grad, inp)
    elif type(i_data) is not tuple and (
            g_data.shape != i_data.shape or (g_data.dtype is not i_data.dtype
                                             and g_data.dtype != i_data.dtype)):
        in_grad = fit_to_input(in_grad, inp)
    previous = adjoints.get(inp)
    adjoints[inp] = in_grad if previous is None else previous + in_grad


def backward(output: Any, out_grad: Any) -> None:
    """``Tensor.backward``: set ``.grad`` on leaves that require it (and on retained nodes).

    The thread's gradient hooks (``context.add_grad_hook``) hear of each leaf's gradient as
    soon as it is final, and may replace gradients when the sweep ends.
    """
    hooks = context.state().grad_hooks
    if hooks:
        run_grad_hooks(list(hooks), lambda on_grad: reverse_mode([output], [out_grad], on_grad))
        return
    reverse_mode([output], [out_grad], _store_grad)


def _store_grad(node: Any, grad: Any) -> None:
    """``backward``'s ``on_grad``: ``.grad`` of a leaf, or of a node that retains it."""
    if node.op is None or node.meta.retain_grad:
        node.grad = grad


def run_grad_hooks(hooks: list, sweep: Callable[[Callable[[Any, Any], None]], None]) -> None:
    """Run ``sweep(on_grad)`` with ``hooks`` told of each leaf's final gradient (``.grad`` set
    first), then let each hook finish and set the gradients it replaced."""

    def store(node: Any, grad: Any) -> None:
        if node.op is None or node.meta.retain_grad:
            node.grad = grad
            if node.op is None:
                for hook in hooks:
                    hook.grad_ready(node, grad)

    sweep(store)
    for hook in hooks:
        for node, grad in (hook.backward_done() or {}).items():
            node.grad = grad


def hooked_gradients(leaves: list, grads: list) -> list:
    """``grads`` (of ``leaves``, computed at once: a declared graph's train op) after the
    thread's gradient hooks saw them, last leaf first (the order a backward sweep reaches
    a model's parameters), with the gradients the hooks replaced."""
    hooks = list(context.state().grad_hooks)
    if not hooks:
        return list(grads)
    pairs = [(leaf, grad) for leaf, grad in zip(leaves, grads) if grad is not None]
    replaced: dict[int, Any] = {}
    for hook in hooks:
        for leaf, grad in reversed(pairs):
            hook.grad_ready(leaf, grad)
        for leaf, grad in (hook.backward_done() or {}).items():
            replaced[id(leaf)] = grad
    return [replaced.get(id(leaf), grad) for leaf, grad in zip(leaves, grads)]


def gradients(outputs: list, wrt: list, out_grads: list | None = None,
              stop_at_wrt: bool = False) -> list:
    """Adjoints of ``outputs`` with respect to each node of ``wrt`` (None where unreached).

    With ``stop_at_wrt`` the sweep does not go below the ``wrt`` nodes (a sub-graph's
    gradient with respect to its inputs).
    """
    if out_grads is None:
        out_grads = [F.full_like(o, 1) for o in outputs]
    wanted = {id(x) for x in wrt}
    found: dict[int, Any] = {}
    for x in wrt:  # mark non-leaf targets so reverse_mode reports them
        if x.op is not None and x.meta is None:
            x.meta = NodeMeta()

    def collect(node: Any, grad: Any) -> None:
        if id(node) in wanted:
            found[id(node)] = grad

    reverse_mode(list(outputs), list(out_grads), collect, wanted if stop_at_wrt else None)
    return [found.get(id(x)) for x in wrt]


def per_input(inputs: Any, grads_of: Any) -> tuple:
    """One adjoint per input position from ``grads_of(distinct inputs)``: an input passed
    twice (``attention(x, x, x)``) gets its whole adjoint once and None at its other
    positions, since the engine adds the adjoints of all positions."""
    distinct: list = []
    for x in inputs:
        if all(x is not y for y in distinct):
            distinct.append(x)
    found = dict(zip(map(id, distinct), grads_of(distinct)))
    out = []
    for x in inputs:
        out.append(found.pop(id(x), None))
    return tuple(out)

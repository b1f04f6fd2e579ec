"""The typed stub of the generated op API (src/needle/core/api.pyi) is current and true.

``ndl.ops.<name>`` functions are made by ``exec`` and Tensor's op methods by ``setattr``, so
type checkers and IDEs read them from the stub; it is generated from the registry by
``python -m needle.core.stubgen``.
"""

from __future__ import annotations

import ast
import difflib
import inspect

import needle as ndl
from needle.core import api, stubgen
from needle.core.registry import REGISTRY


def _stub_tree() -> ast.Module:
    with open(stubgen.STUB_PATH, encoding="utf-8") as f:
        return ast.parse(f.read())


def test_api_stub_is_current():
    with open(stubgen.STUB_PATH, encoding="utf-8") as f:
        checked_in = f.read()
    fresh = stubgen.render()
    diff = "".join(list(difflib.unified_diff(
        checked_in.splitlines(keepends=True), fresh.splitlines(keepends=True),
        "src/needle/core/api.pyi (checked in)", "regenerated"))[:40])
    assert checked_in == fresh, (
        f"src/needle/core/api.pyi is out of date; regenerate it with `{stubgen.COMMAND}`\n{diff}")


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, str, object]]:
    """(name, kind, default) of a stub function's parameters, as inspect names them."""
    args = fn.args
    out: list[tuple[str, str, object]] = []
    defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(args.args, defaults):
        out.append((arg.arg, "POSITIONAL_OR_KEYWORD", _default(default)))
    if args.vararg is not None:
        out.append((args.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", _default(default)))
    return out


def _default(node: ast.expr | None) -> object:
    if node is None:
        return inspect.Parameter.empty
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return ...  # a default the stub does not spell out
    return ast.literal_eval(node)


def _runtime_params(fn) -> list[tuple[str, str, object]]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        default = p.default
        if default is not inspect.Parameter.empty and not (
                default is None or type(default) in (bool, int, float, str, tuple)):
            default = ...
        out.append((p.name, p.kind.name, default))
    return out


def test_stub_signatures_match_the_generated_functions():
    functions = {n.name: n for n in _stub_tree().body if isinstance(n, ast.FunctionDef)}
    assert set(functions) - {"install_tensor_methods"} == {
        name for name in api.OP_FUNCTIONS if REGISTRY[name].cls.__module__.startswith(
            "needle.core.")}
    for name, fn in functions.items():
        assert _stub_params(fn) == _runtime_params(getattr(api, name)), name
        if name != "install_tensor_methods":
            assert getattr(ndl.ops, name) is getattr(api, name)
            assert getattr(ndl, name) is getattr(api, name)


def test_stub_declares_the_tensor_methods():
    cls = next(n for n in _stub_tree().body
               if isinstance(n, ast.ClassDef) and n.name == "TensorMethods")
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    expected = {m: r for r in REGISTRY.values() if r.cls.__module__.startswith("needle.core.")
                for m in r.methods}
    assert set(methods) == set(expected)
    for method, record in expected.items():
        runtime = _runtime_params(getattr(api, record.name))
        assert _stub_params(methods[method]) == [("self", "POSITIONAL_OR_KEYWORD",
                                                  inspect.Parameter.empty), *runtime[1:]]
        # the method Tensor has at run time is the op function (or Tensor's own, which the
        # type checker also prefers to the stub's)
        own = vars(ndl.Tensor)[method]
        assert own is getattr(api, record.name) or method in _tensor_own_methods()


def _tensor_own_methods() -> set[str]:
    """Methods Tensor's class body defines (the generated ones are set after it)."""
    with open(inspect.getsourcefile(ndl.autograd), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Tensor")
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def test_tensor_has_no_runtime_base_from_the_stub():
    # TensorMethods exists only for type checkers: at run time Tensor's base is Value alone
    assert ndl.Tensor.__bases__ == (ndl.autograd.Value,)
    assert not hasattr(api, "TensorMethods")


def test_stub_declares_every_op_class_of_the_core_where_it_is_defined():
    """``ndl.ops.EWiseAdd`` and the other core op classes (set into ``needle.ops`` from the
    registry at run time) are re-exported by the stub from the module that defines each,
    so type checkers see the same class the registry holds."""
    tree = _stub_tree()
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module, node.level)
    exported = next(ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and node.targets[0].id == "__all__")
    for record in REGISTRY.values():
        module = record.cls.__module__
        if not module.startswith("needle.core."):
            continue  # a front-end's internal op (Cond, JitCall) or a user's op
        name = record.cls.__name__
        assert name in exported and name in imported, name
        assert f"needle.core.{imported[name][0]}" == module, (name, module)
        assert getattr(ndl.ops, name) is record.cls

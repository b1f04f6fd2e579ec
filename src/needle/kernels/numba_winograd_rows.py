"""Winograd F(4x4, 3x3)'s 1-D transforms on 16 channels at once, as numba intrinsics that emit
the vector loads, arithmetic and stores themselves (numba_winograd.py's ``_bt``, ``_at`` and
``_a`` call them on each run of 16 channels and keep their element loops for the rest).

Why: those loops run one per output row over the C channels, 72 to 96 short loops a tile;
LLVM compiled each to a 256-bit body interleaved 32 channels an iteration behind a run-time
overlap check, so at 16 channels a transform ran scalar and at any C the checks and loop
set-up cost more than the arithmetic (one thread, 4096 tiles: the input transform 1.17 ms at
8 channels, 1.55 at 16, 1.73 at 32). Here nothing is a loop and nothing can alias: six rows
are loaded, the transform's outputs computed and stored.

Each output is the element loop's expression evaluated in the same order with the same
float32 roundings (no fused multiply-adds: fmul and fadd/fsub as written, left to right), so
the same bits. ``src`` and ``dst`` are C-contiguous 2-D float32 arrays (rows of C channels);
``k`` is the first of the 16 channels, rows and channels in range.
"""

from __future__ import annotations

from typing import Any

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["a1", "a16", "at1", "at16", "bt1", "bt16"]

_LANES = 16


def _rows_types(src: Any, dst: Any, *scalars: Any) -> bool:
    """Whether the arguments type-check: two C-contiguous 2-D float32 arrays and integers."""
    return (all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"
                and a.dtype == types.float32 for a in (src, dst))
            and all(isinstance(s, types.Integer) for s in scalars))


class _Rows:
    """The codegen's view of one call: row loads from ``src``, row stores into ``dst``, and
    float32 constants, at channel ``k``: ``lanes`` channels at once (a vector of 16, or one
    float)."""

    def __init__(self, context, builder, signature, args, lanes: int) -> None:  # type: ignore[no-untyped-def]
        self.context, self.builder = context, builder
        src_type, s0, ss, dst_type, d0, ds, k = signature.args
        self.src_type, self.dst_type = src_type, dst_type
        cast = lambda value, ty: context.cast(builder, value, ty, types.intp)  # noqa: E731
        self.src = context.make_array(src_type)(context, builder, args[0])
        self.dst = context.make_array(dst_type)(context, builder, args[3])
        self.s0, self.ss = cast(args[1], s0), cast(args[2], ss)
        self.d0, self.ds = cast(args[4], d0), cast(args[5], ds)
        self.k = cast(args[6], k)
        self.lanes = lanes
        scalar = cgutils.ir.FloatType()
        self.vector = scalar if lanes == 1 else cgutils.ir.VectorType(scalar, lanes)

    def _pointer(self, array_type, array, row):  # type: ignore[no-untyped-def]
        pointer = cgutils.get_item_pointer(self.context, self.builder, array_type, array,
                                           [row, self.k], wraparound=False)
        return self.builder.bitcast(pointer, self.vector.as_pointer())

    def load(self, i: int):  # type: ignore[no-untyped-def]
        """src row s0 + i * ss at channels k .. k + lanes - 1."""
        row = self.builder.add(self.s0, self.builder.mul(self.ss, self.context.get_constant(
            types.intp, i)))
        return self.builder.load(self._pointer(self.src_type, self.src, row), align=4)

    def store(self, a: int, value) -> None:  # type: ignore[no-untyped-def]
        """dst row d0 + a * ds at channels k .. k + lanes - 1."""
        row = self.builder.add(self.d0, self.builder.mul(self.ds, self.context.get_constant(
            types.intp, a)))
        self.builder.store(value, self._pointer(self.dst_type, self.dst, row), align=4)

    def constant(self, value: float):  # type: ignore[no-untyped-def]
        scalar = cgutils.ir.Constant(cgutils.ir.FloatType(), value)
        return scalar if self.lanes == 1 else cgutils.ir.Constant(self.vector,
                                                                  [scalar] * self.lanes)


def _rows_intrinsic(args: tuple, inputs: int, outputs, lanes: int = _LANES):  # type: ignore[no-untyped-def]
    """(signature, codegen) of a transform intrinsic called with ``args`` (src, s0, ss, dst,
    d0, ds, k), or None where they do not type-check: the codegen loads ``inputs`` rows of
    ``lanes`` channels, ``outputs(builder, rows, constant)`` returns the output rows, in
    order."""
    if not _rows_types(args[0], args[3], *args[1:3], *args[4:]):
        return None

    def codegen(context, builder, signature, values):  # type: ignore[no-untyped-def]
        rows = _Rows(context, builder, signature, values, lanes)
        for a, value in enumerate(outputs(builder, [rows.load(i) for i in range(inputs)],
                                          rows.constant)):
            rows.store(a, value)
        return context.get_dummy_value()

    return types.none(*args), codegen


def _bt_rows(b, x, constant):  # type: ignore[no-untyped-def]
    """B^T's six rows (numba_winograd._bt's expressions, left to right)."""
    two, four, five = constant(2.0), constant(4.0), constant(5.0)
    return [b.fadd(b.fsub(b.fmul(four, x[0]), b.fmul(five, x[2])), x[4]),
            b.fsub(b.fadd(x[3], x[4]), b.fmul(four, b.fadd(x[1], x[2]))),
            b.fsub(b.fadd(b.fmul(four, b.fsub(x[1], x[2])), x[4]), x[3]),
            b.fsub(b.fadd(b.fmul(two, b.fsub(x[3], x[1])), x[4]), x[2]),
            b.fsub(b.fadd(b.fmul(two, b.fsub(x[1], x[3])), x[4]), x[2]),
            b.fadd(b.fsub(b.fmul(four, x[1]), b.fmul(five, x[3])), x[5])]


def _at_rows(b, x, constant):  # type: ignore[no-untyped-def]
    """A^T's four rows (numba_winograd._at's expressions, left to right)."""
    two, four, eight = constant(2.0), constant(4.0), constant(8.0)
    return [b.fadd(b.fadd(b.fadd(b.fadd(x[0], x[1]), x[2]), x[3]), x[4]),
            b.fadd(b.fsub(x[1], x[2]), b.fmul(two, b.fsub(x[3], x[4]))),
            b.fadd(b.fadd(x[1], x[2]), b.fmul(four, b.fadd(x[3], x[4]))),
            b.fadd(b.fadd(b.fsub(x[1], x[2]), b.fmul(eight, b.fsub(x[3], x[4]))), x[5])]


def _a_rows(b, x, constant):  # type: ignore[no-untyped-def]
    """A's six rows (numba_winograd._a's expressions, left to right)."""
    two, four, eight = constant(2.0), constant(4.0), constant(8.0)
    return [x[0],
            b.fadd(b.fadd(b.fadd(x[0], x[1]), x[2]), x[3]),
            b.fsub(b.fadd(b.fsub(x[0], x[1]), x[2]), x[3]),
            b.fadd(b.fadd(b.fadd(x[0], b.fmul(two, x[1])), b.fmul(four, x[2])),
                   b.fmul(eight, x[3])),
            b.fsub(b.fadd(b.fsub(x[0], b.fmul(two, x[1])), b.fmul(four, x[2])),
                   b.fmul(eight, x[3])),
            x[3]]


@intrinsic
def bt16(typingctx, src, s0, ss, dst, d0, ds, k):  # type: ignore[no-untyped-def]
    """dst rows d0 + a*ds (a < 6) = B^T (src rows s0 + i*ss, i < 6) at channels k .. k + 15."""
    return _rows_intrinsic((src, s0, ss, dst, d0, ds, k), 6, _bt_rows)


@intrinsic
def at16(typingctx, src, s0, ss, dst, d0, ds, k):  # type: ignore[no-untyped-def]
    """dst rows d0 + a*ds (a < 4) = A^T (src rows s0 + i*ss, i < 6) at channels k .. k + 15."""
    return _rows_intrinsic((src, s0, ss, dst, d0, ds, k), 6, _at_rows)


@intrinsic
def a16(typingctx, src, s0, ss, dst, d0, ds, k):  # type: ignore[no-untyped-def]
    """dst rows d0 + a*ds (a < 6) = A (src rows s0 + i*ss, i < 4) at channels k .. k + 15."""
    return _rows_intrinsic((src, s0, ss, dst, d0, ds, k), 4, _a_rows)


@intrinsic
def bt1(typingctx, src, s0, ss, dst, d0, ds, k):  # type: ignore[no-untyped-def]
    """bt16 on the one channel k (the channels past the last run of 16)."""
    return _rows_intrinsic((src, s0, ss, dst, d0, ds, k), 6, _bt_rows, 1)


@intrinsic
def at1(typingctx, src, s0, ss, dst, d0, ds, k):  # type: ignore[no-untyped-def]
    """at16 on the one channel k."""
    return _rows_intrinsic((src, s0, ss, dst, d0, ds, k), 6, _at_rows, 1)


@intrinsic
def a1(typingctx, src, s0, ss, dst, d0, ds, k):  # type: ignore[no-untyped-def]
    """a16 on the one channel k."""
    return _rows_intrinsic((src, s0, ss, dst, d0, ds, k), 4, _a_rows, 1)

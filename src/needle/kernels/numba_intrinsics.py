"""LLVM-level helpers for needle's numba loops, as numba ``@intrinsic``s: a register tile on
the stack, 512-bit vectors for a function, a prefetch hint. Shared by the loops that need them
(numba_direct_conv.py, numba_vocab_head.py and their callers).

Each changes how a loop is compiled, never what it computes.
"""

from __future__ import annotations

from typing import Any

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["add_tile_row", "copy_tile_row", "prefetch_to_l2", "stack_f32", "store_tile_columns",
           "wide_vectors"]


@intrinsic
def stack_f32(typingctx, size):  # type: ignore[no-untyped-def]
    """A pointer to ``size`` (a literal) float32 values on the stack (numba has no stack
    arrays): ``numba.carray`` over it is a tile LLVM can keep in registers."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return cgutils.alloca_once(builder, context.get_data_type(types.float32),
                                   size=context.get_constant(types.intp, count))

    return types.CPointer(types.float32)(size), codegen


@intrinsic
def wide_vectors(typingctx):  # type: ignore[no-untyped-def]
    """Ask LLVM for 512-bit vectors in the calling function (its attributes
    prefer-vector-width and min-legal-vector-width); a no-op on CPUs without them."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        attributes = builder.function.attributes
        set.add(attributes, '"prefer-vector-width"="512"')
        set.add(attributes, '"min-legal-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


#: llvm.prefetch's name for an ``i8*`` (LLVM 15+ renames it for its opaque ``ptr`` itself)
_PREFETCH = "llvm.prefetch.p0i8"


@intrinsic
def prefetch_to_l2(typingctx, row, index):  # type: ignore[no-untyped-def]
    """A hint to bring the cache line holding ``row[index]`` (a 1-d array, index in range)
    into L2 (llvm.prefetch: read, locality 2). Nothing is read or changed; LLVM drops it on
    targets without a prefetch instruction. (Locality 3, into L1 as well, measured slower:
    7.6 vs 7.0 us a row of 10,000; two rows of 40 KB do not both fit L1.)"""
    if not isinstance(row, types.Array) or row.ndim != 1 or not isinstance(index, types.Integer):
        return None
    sig = types.none(row, index)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]],
                                           wraparound=False)
        ir = cgutils.ir  # (llvmlite's IR builder, as numba imports it)
        byte_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer.type, i32, i32, i32]),
            _PREFETCH)
        builder.call(function, [byte_pointer, i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return sig, codegen



def _tile_row_types(dst: Any, index: Any, tile: Any, count: Any) -> bool:
    """Whether (dst, index, tile, count) type-check for the tile-row stores: a C-contiguous
    float32 ``dst`` indexed by a tuple of ``dst.ndim`` integers, a ``stack_f32`` tile, a
    literal count."""
    return (isinstance(dst, types.Array) and dst.layout == "C" and dst.dtype == types.float32
            and isinstance(index, types.BaseTuple) and len(index) == dst.ndim
            and all(isinstance(t, types.Integer) for t in getattr(index, "types", ()))
            and tile == types.CPointer(types.float32) and isinstance(count, types.IntegerLiteral))


def _row_pointer(context, builder, array_type, array_value, index_type, index_value, count):
    """A pointer to ``count`` float32 values from array[index] (a <count x float>*)."""
    array = context.make_array(array_type)(context, builder, array_value)
    indices = [context.cast(builder, value, ty, types.intp)
               for value, ty in zip(cgutils.unpack_tuple(builder, index_value), index_type.types)]
    pointer = cgutils.get_item_pointer(context, builder, array_type, array, indices,
                                       wraparound=False)
    ir = cgutils.ir
    return builder.bitcast(pointer, ir.VectorType(ir.FloatType(), count).as_pointer())


def _tile_pointer(context, builder, tile, start_type, start, count):
    """A pointer to ``count`` float32 values of a stack tile from ``start``."""
    first = context.cast(builder, start, start_type, types.intp)
    ir = cgutils.ir
    return builder.bitcast(builder.gep(tile, [first]),
                           ir.VectorType(ir.FloatType(), count).as_pointer())



def _row_and_tile(context, builder, signature, args, count):  # type: ignore[no-untyped-def]
    """The (dst row, tile row) pointers of a tile-row store whose first four arguments are
    (dst, index, tile, start)."""
    target = _row_pointer(context, builder, signature.args[0], args[0], signature.args[1],
                          args[1], count)
    return target, _tile_pointer(context, builder, args[2], signature.args[3], args[3], count)

@intrinsic
def copy_tile_row(typingctx, dst, index, tile, start, count):  # type: ignore[no-untyped-def]
    """dst[index][:count] = tile[start : start + count]: ``count`` (a literal) consecutive
    values of a ``stack_f32`` tile stored from ``dst[index]`` on (C-contiguous float32, the
    last index the first column; in range). One vector load and store: a register tile's
    epilogue written as a loop of element stores compiled to scalar ones (LLVM could not
    tell the tile from ``dst``)."""
    if not _tile_row_types(dst, index, tile, count):
        return None
    width = count.literal_value

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        target, source = _row_and_tile(context, builder, signature, args, width)
        builder.store(builder.load(source, align=4), target, align=4)
        return context.get_dummy_value()

    return types.none(dst, index, tile, start, count), codegen


@intrinsic
def add_tile_row(typingctx, dst, index, tile, start, count, other, other_index):  # type: ignore[no-untyped-def]
    """dst[index][:count] = tile[start : start + count] + other[other_index][:count]: as
    ``copy_tile_row``, plus a row of ``other`` (a bias, or ``dst`` itself to accumulate),
    each value one IEEE float32 addition, as the element loop's."""
    if not (_tile_row_types(dst, index, tile, count)
            and _tile_row_types(other, other_index, tile, count)):
        return None
    width = count.literal_value

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        target, source = _row_and_tile(context, builder, signature, args, width)
        addend = _row_pointer(context, builder, signature.args[5], args[5], signature.args[6],
                              args[6], width)
        total = builder.fadd(builder.load(source, align=4), builder.load(addend, align=4))
        builder.store(total, target, align=4)
        return context.get_dummy_value()

    return types.none(dst, index, tile, start, count, other, other_index), codegen


@intrinsic
def store_tile_columns(typingctx, dst, index, tile, cols):  # type: ignore[no-untyped-def]
    """dst[i, j, x + p, k + q] = tile[q * cols + p] for q < 8, p < cols, (i, j, x, k) =
    ``index``: a ``stack_f32`` tile of 8 channels x ``cols`` positions (a literal multiple of
    8) stored transposed into a C-contiguous float32 NHWC ``dst`` (in range), each position's
    8 channels one 256-bit store, made by 8 x 8 transposes of shuffles (24 per 8 positions).
    Written as an element loop the transpose compiled to 8 * cols scalar extracts and stores,
    more than the tile's multiply-adds in a first layer (3 channels, 27 taps)."""
    if not (isinstance(dst, types.Array) and dst.ndim == 4 and dst.layout == "C"
            and dst.dtype == types.float32 and isinstance(index, types.BaseTuple)
            and len(index) == 4
            and all(isinstance(t, types.Integer) for t in getattr(index, "types", ()))
            and tile == types.CPointer(types.float32)
            and isinstance(cols, types.IntegerLiteral) and cols.literal_value % 8 == 0):
        return None
    n_cols = cols.literal_value

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ir = cgutils.ir
        i32 = ir.IntType(32)
        base = builder.bitcast(_row_pointer(context, builder, signature.args[0], args[0],
                                            signature.args[1], args[1], 8),
                               ir.FloatType().as_pointer())
        array = context.make_array(signature.args[0])(context, builder, args[0])
        step = cgutils.unpack_tuple(builder, array.shape)[3]  # floats from one position to the next

        def shuffle(a, b, mask):  # type: ignore[no-untyped-def]
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 8), mask))

        for p0 in range(0, n_cols, 8):
            rows = [builder.load(_tile_pointer(context, builder, args[2], types.intp,
                                               context.get_constant(types.intp,
                                                                    q * n_cols + p0), 8),
                                 align=4) for q in range(8)]
            pairs = []  # rows 2m, 2m+1 interleaved: positions (0, 1, 4, 5) and (2, 3, 6, 7)
            for q in range(0, 8, 2):
                pairs.append(shuffle(rows[q], rows[q + 1], [0, 8, 1, 9, 4, 12, 5, 13]))
                pairs.append(shuffle(rows[q], rows[q + 1], [2, 10, 3, 11, 6, 14, 7, 15]))
            quads = []  # 4 rows of positions (p, p + 4) for p = 0, 1, 2, 3
            for a, b in ((0, 2), (1, 3), (4, 6), (5, 7)):
                quads.append(shuffle(pairs[a], pairs[b], [0, 1, 8, 9, 4, 5, 12, 13]))
                quads.append(shuffle(pairs[a], pairs[b], [2, 3, 10, 11, 6, 7, 14, 15]))
            columns = [None] * 8
            for p, (a, b) in enumerate(((0, 4), (1, 5), (2, 6), (3, 7))):
                columns[p] = shuffle(quads[a], quads[b], [0, 1, 2, 3, 8, 9, 10, 11])
                columns[p + 4] = shuffle(quads[a], quads[b], [4, 5, 6, 7, 12, 13, 14, 15])
            for p, column in enumerate(columns):
                offset = builder.mul(step, context.get_constant(types.intp, p0 + p))
                target = builder.bitcast(builder.gep(base, [offset]), column.type.as_pointer())
                builder.store(column, target, align=4)
        return context.get_dummy_value()

    return types.none(dst, index, tile, cols), codegen

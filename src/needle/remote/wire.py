"""Values on the wire: arrays as dtype + shape + raw bytes, errors as an allow-listed kind.

No pickle anywhere: an array is rebuilt with ``np.frombuffer`` from a dtype name that must be
a plain numeric or bool type, and an error is rebuilt only from the classes named in
``ERROR_KINDS``; any other exception arrives as :class:`RemoteError` with its type in the
message.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ..checkpoint import CheckpointError
from ..core.interpret import NodeRunError
from ..core.registry import CheckError, ShapeError
from ..program.encoding import ProgramError
from ._grpc import pb

#: dtypes an array on the wire may have (no object, string or structured dtypes)
DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64", "complex64", "complex128"])


#: longest error message sent back (the rest is cut, with a note)
MAX_ERROR_CHARS = 16_000


class RemoteError(RuntimeError):
    """A remote call failed: the server is unreachable, refused the request, or raised an
    exception that is not one of the kinds rebuilt as themselves."""


class ProtocolError(ValueError):
    """A message that is not what the protocol allows (bad dtype, size, ids)."""


#: exception kinds rebuilt on the other side as themselves (most specific first)
ERROR_KINDS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (
        NodeRunError, ShapeError, CheckError, ProgramError, CheckpointError, ProtocolError,
        RemoteError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError,
        FloatingPointError, OverflowError, ArithmeticError, NotImplementedError,
        RuntimeError, MemoryError)
}


#: dtype -> its name on the wire, and back (looked up, not computed, on every array)
_NAMES = {np.dtype(name): name for name in DTYPES}
_LITTLE = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}


def encode_array(value: Any, out: Any = None) -> Any:
    """``value`` (an array or NumPy scalar) as a protobuf Array (filled into ``out`` if given)."""
    array = np.asarray(value)  # (np.ascontiguousarray would make a 0-d array 1-d)
    name = _NAMES.get(array.dtype)
    if name is None:
        if array.dtype.name not in DTYPES:
            raise ProtocolError(f"cannot send an array of dtype {array.dtype} (numbers and "
                                "bool only)")
        name = array.dtype.name  # a big-endian array: sent little-endian
        array = array.astype(_LITTLE[name])
    message = pb.Array() if out is None else out
    message.dtype = name
    message.shape.extend(array.shape)
    message.data = array.tobytes()  # C order, whatever the array's layout
    return message


def _varint(value: int) -> bytes:
    """``value`` (0 or more) as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def array_field(field: int, value: Any) -> list:
    """The protobuf encoding of ``value`` as an Array in field number ``field`` of the message
    it is appended to: the bytes ``encode_array`` and ``SerializeToString`` give, as pieces
    for one ``b"".join`` that copies the array's data once (instead of three times: tobytes,
    the protobuf field, the serialized message). Protobuf appends a repeated field's items in
    the order they come, wherever in the message they are."""
    array = np.asarray(value)
    name = _NAMES.get(array.dtype)
    if name is None:
        encode_array(array)  # the ProtocolError for a dtype not allowed
        name = array.dtype.name  # a big-endian array: sent little-endian
        array = array.astype(_LITTLE[name])
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    if not array.nbytes:
        return [_array_head(field, name, array.shape, 0)]
    return [_array_head(field, name, array.shape, array.nbytes),
            memoryview(array.reshape(-1)).cast("B")]  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def _array_head(field: int, name: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """Everything of an Array field but its data's bytes (a step sends the same few shapes)."""
    raw = name.encode()
    head = [b"\x0a", _varint(len(raw)), raw]  # 1: dtype
    if shape:
        packed = b"".join(_varint(d) for d in shape)
        head += [b"\x12", _varint(len(packed)), packed]  # 2: shape (packed)
    if nbytes:
        head += [b"\x1a", _varint(nbytes)]  # 3: data (its bytes follow)
    body = b"".join(head)
    return _varint(field << 3 | 2) + _varint(len(body) + nbytes) + body


def decode_array(message: Any, copy: bool = True) -> np.ndarray:
    """A NumPy array from a protobuf Array; ProtocolError if it is inconsistent. With
    ``copy=False`` a read-only view of the message's bytes (what a feed needs: a Session
    never writes into fed arrays)."""
    dtype = _LITTLE.get(message.dtype)
    if dtype is None:
        raise ProtocolError(f"array dtype {message.dtype!r} is not allowed")
    shape = tuple(message.shape)
    if len(shape) > 32 or any(d < 0 for d in shape):
        raise ProtocolError(f"array shape {shape} is not a shape")
    count = math.prod(shape)
    if count * dtype.itemsize != len(message.data):
        raise ProtocolError(f"array of shape {shape} and dtype {message.dtype} needs "
                            f"{count * dtype.itemsize} bytes, got {len(message.data)}")
    array = np.frombuffer(message.data, dtype=dtype, count=count).reshape(shape)
    if dtype.isnative and not copy:
        return array
    return array.astype(dtype.newbyteorder("="), copy=True)


def encode_value(value: Any, out: Any) -> None:
    """A fetched value (array, None, or tuple of values) into a protobuf Value."""
    if value is None:
        out.none = True
    elif isinstance(value, tuple):
        out.items.SetInParent()
        for item in value:
            encode_value(item, out.items.items.add())
    else:
        encode_array(value, out.array)


def decode_value(message: Any, depth: int = 0) -> Any:
    """The value ``encode_value`` wrote."""
    kind = message.WhichOneof("kind")
    if kind == "array":
        return decode_array(message.array)
    if kind == "items" and depth < 16:
        return tuple(decode_value(item, depth + 1) for item in message.items.items)
    if kind == "none":
        return None
    raise ProtocolError(f"malformed value (kind {kind!r})")


def encode_error(exc: BaseException, out: Any) -> None:
    """An exception into a protobuf Error: its nearest allow-listed kind, and its message."""
    kind = next((cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in ERROR_KINDS
                 and ERROR_KINDS[cls.__name__] is cls), None)
    message = _message(exc)
    if kind != type(exc).__name__:  # a class of its own: its name stays in the message
        message = f"{type(exc).__name__}: {message}"
    if len(message) > MAX_ERROR_CHARS:  # (a reply must stay far below the message limit)
        message = message[:MAX_ERROR_CHARS] + f" ... ({len(message)} characters in all)"
    out.kind = kind or "RemoteError"
    out.message = message


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]  # str(KeyError) would quote it
    return str(exc)


def decode_error(message: Any) -> Exception:
    """The exception a protobuf Error names (RemoteError for a kind not on the allow-list)."""
    cls = ERROR_KINDS.get(message.kind)
    if cls is None:
        return RemoteError(f"{message.kind}: {message.message}")
    return cls(message.message)


__all__ = ["DTYPES", "ERROR_KINDS", "ProtocolError", "RemoteError", "array_field", "decode_array",
           "decode_error", "decode_value", "encode_array", "encode_error", "encode_value"]

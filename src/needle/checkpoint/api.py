"""save / load / checkpoint_info: the public face of needle's data-only checkpoints."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from .archive import FORMAT_NAME, FORMAT_VERSION, CheckpointReader, write_atomic
from .errors import CheckpointError
from .tree import array_nodes, flatten, path_name, unflatten


def _writer() -> str:
    from .._version import __version__

    return f"needle {__version__}"


def save(path: str | os.PathLike, /, **items: Any) -> None:
    """Save ``items`` to one checkpoint file at ``path``, atomically.

    Each item is an object with a ``state_dict()`` method (module, optimizer, scheduler, data
    loader: its state dict is stored) or a plain value: NumPy arrays and scalars, Tensors (stored
    as their ``.numpy()``), int, float, bool, str, None, and dicts (str or int keys), lists and
    tuples of these, nested freely. ``np.random.get_state()`` fits as is (see :func:`rng_state`).

    The file is written beside ``path`` and renamed onto it, so a crash leaves the previous
    checkpoint intact. Unsupported values raise ``TypeError`` before anything is written.

    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
    >>> save(path, weights={"w": np.ones((2, 3), np.float32)}, epoch=3)
    >>> ckpt = load(path)
    >>> ckpt["epoch"], ckpt["weights"]["w"].shape
    (3, (2, 3))
    """
    root, arrays = flatten(items)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "writer": _writer(), "items": root}
    write_atomic(path, meta, arrays)


def load(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """Load a checkpoint written by :func:`save`: a dict mirroring the saved items, in order.

    Arrays and Tensors come back as NumPy arrays, objects with ``state_dict()`` as their state
    dict, so restoring reads::

        ckpt = ndl.load("ckpt.npz")
        model.load_state_dict(ckpt["model"])        # accepts arrays or Tensors
        optimizer.load_state_dict(ckpt["optimizer"])
        ndl.checkpoint.set_rng_state(ckpt["rng"])

    Nothing in the file is executed: only ``np.load(..., allow_pickle=False)`` and ``json``.
    With ``verify`` (the default) every array is checked against its SHA-256. Raises
    :class:`CheckpointError` naming the file and the fault (missing, truncated, corrupted,
    another format, needs pickle, unknown format version).
    """
    with CheckpointReader(path) as reader:
        try:
            return unflatten(reader.meta["items"],
                             lambda node, where: _load_leaf(reader, node, where, verify),
                             reader.path)
        except RecursionError:
            raise CheckpointError(f"{reader.path}: corrupted metadata: nested too deeply") from None


def _load_leaf(reader: CheckpointReader, node: dict, path: tuple, verify: bool) -> Any:
    array = reader.read_array(node, path, verify)
    return array[()] if node["type"] == "numpy_scalar" else array


class ArrayInfo(NamedTuple):
    """What :func:`load_metadata` leaves in place of an array: its description, not its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def size(self) -> int:
        """The number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))


def load_metadata(path: str | os.PathLike) -> dict:
    """Like :func:`load`, but every array is an :class:`ArrayInfo` (name, dtype, shape, bytes)
    and only NumPy scalars are read: the values of a checkpoint without its arrays' data.

    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
    >>> save(path, weights={"w": np.ones((2, 3), np.float32)}, epoch=3)
    >>> meta = load_metadata(path)
    >>> meta["epoch"], meta["weights"]["w"].shape, meta["weights"]["w"].nbytes
    (3, (2, 3), 24)
    """
    with CheckpointReader(path) as reader:
        def leaf(node: dict, where: tuple) -> Any:
            if node["type"] == "numpy_scalar":
                return _load_leaf(reader, node, where, verify=True)
            return ArrayInfo(path_name(where), _dtype_name(node["dtype"]), tuple(node["shape"]),
                             node["nbytes"])

        try:
            return unflatten(reader.meta["items"], leaf, reader.path)
        except RecursionError:
            raise CheckpointError(f"{reader.path}: corrupted metadata: nested too deeply") from None


def verify_checkpoint(path: str | os.PathLike) -> tuple[int, dict[str, str]]:
    """Read every array and check it against the SHA-256 the file stores for it.

    Returns ``(number of arrays, {name: problem})``, the second empty when all match. Unlike
    :func:`load`, which stops at the first bad array, every array is checked and named.
    Raises :class:`CheckpointError` only when the file itself (its zip or metadata) is bad.
    """
    with CheckpointReader(path) as reader:
        try:
            found = list(array_nodes(reader.meta["items"], reader.path))
        except RecursionError:
            raise CheckpointError(f"{reader.path}: corrupted metadata: nested too deeply") from None
        bad = {}
        for where, node in found:
            try:
                reader.read_array(node, where, verify=True)
            except CheckpointError as exc:
                text = str(exc)
                prefix = f"{reader.path}: "
                bad[path_name(where)] = text[len(prefix):] if text.startswith(prefix) else text
        return len(found), bad


def _no_arrays(node: dict, path: tuple) -> None:
    raise AssertionError("a scalar node holds no array")


def _dtype_name(descr: str) -> str:
    try:
        return np.dtype(descr).name
    except (TypeError, ValueError):
        return descr


def checkpoint_info(path: str | os.PathLike, *, verify: bool = False) -> dict:
    """Summarize a checkpoint from its metadata without loading the arrays.

    Returns ``{"path", "file_bytes", "format", "version", "writer", "items", "arrays",
    "num_arrays", "array_bytes", "verified", "metadata"}``: ``items`` maps each item name to
    ``{"type", "state_dict_of", "num_arrays", "array_bytes"}`` (plus ``"value"`` for a number,
    string or None); ``arrays`` lists ``{"name", "kind", "shape", "dtype", "bytes", "member"}``
    for every array. With ``verify`` every array is also read and checked against its SHA-256.
    """
    with CheckpointReader(path) as reader:
        meta = reader.meta
        try:
            found = list(array_nodes(meta["items"], reader.path))
        except RecursionError:
            raise CheckpointError(f"{reader.path}: corrupted metadata: nested too deeply") from None
        arrays = []
        for where, node in found:
            if verify:
                reader.read_array(node, where, verify=True)
            arrays.append({"name": path_name(where), "kind": node["type"],
                           "shape": tuple(node["shape"]), "dtype": _dtype_name(node["dtype"]),
                           "bytes": node["nbytes"],
                           "member": node["member"], "item": where[0] if where else None})
        root = meta["items"]
        items = {}
        for name, node in zip(root["keys"], root["values"]):
            mine = [a for a in arrays if a["item"] == name]
            summary = {"type": node["type"], "state_dict_of": node.get("state_dict_of"),
                       "num_arrays": len(mine), "array_bytes": sum(a["bytes"] for a in mine)}
            if node["type"] in ("none", "bool", "int", "float", "str"):
                summary["value"] = unflatten(node, _no_arrays, reader.path, (name,))
            items[name] = summary
        for entry in arrays:
            del entry["item"]
        return {"path": reader.path, "file_bytes": os.path.getsize(reader.path),
                "format": meta["format"], "version": meta["version"],
                "writer": meta.get("writer"), "items": items, "arrays": arrays,
                "num_arrays": len(arrays), "array_bytes": sum(a["bytes"] for a in arrays),
                "verified": verify, "metadata": meta}


def format_size(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``3.2 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def format_info(info: dict, arrays: bool = True) -> str:
    """A human-readable listing of :func:`checkpoint_info`'s result (for ``needle info``): a
    header, one line per item and, with ``arrays``, one line per array."""
    lines = [f"{info['path']}: {info['format']} v{info['version']}, written by "
             f"{info['writer'] or 'unknown'}, {format_size(info['file_bytes'])}, "
             f"{info['num_arrays']} arrays ({format_size(info['array_bytes'])})"
             + (", checksums verified" if info["verified"] else "")]
    root = info.get("metadata", {}).get("items", {})
    nodes = dict(zip(root.get("keys", []), root.get("values", [])))
    for name, item in info["items"].items():
        if "value" in item:
            lines.append(f"  {name}: {item['type']} {item['value']!r}")
            continue
        source = f" (state_dict of {item['state_dict_of']})" if item["state_dict_of"] else ""
        entries = nodes.get(name, {}).get("keys", nodes.get(name, {}).get("items"))
        if item["num_arrays"] == 0 and isinstance(entries, list):
            lines.append(f"  {name}: {item['type']}{source} of {len(entries)} entries")
            continue
        lines.append(f"  {name}: {item['type']}{source}, {item['num_arrays']} array(s), "
                     f"{format_size(item['array_bytes'])}")
    if arrays:
        lines.extend(format_arrays(info["arrays"]))
    return "\n".join(lines)


def format_arrays(arrays: list[dict], bad: dict[str, str] | None = None,
                  indent: str = "    ") -> list[str]:
    """One aligned line per array of :func:`checkpoint_info`: name, dtype, shape, size (and,
    for a name in ``bad``, its problem)."""
    bad = bad or {}
    width = max((len(a["name"]) for a in arrays), default=0)
    lines = []
    for array in arrays:
        line = (f"{indent}{array['name']:<{width}}  {array['dtype']:<8} "
                f"{str(array['shape']):<16} {format_size(array['bytes'])}")
        if array["name"] in bad:
            line += f"  BAD: {bad[array['name']]}"
        lines.append(line.rstrip())
    return lines

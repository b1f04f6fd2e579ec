"""The checkpoint file: a zip (.npz) of .npy arrays plus ``meta.json``; atomic writes, safe reads.

Layout (``ZIP_STORED``, fixed timestamps, so equal contents give equal bytes):

- ``meta.json``: ``{"format": "needle-checkpoint", "version": 1, "writer": ..., "items": node}``,
  where ``node`` describes the saved values (see :mod:`needle.checkpoint.tree`);
- one ``.npy`` member per array, named after its place in the tree (``model/fc.weight.npy``).

Any .npz reader sees the arrays (``np.load(path)["model/fc.weight"]``). Reading never runs code:
``np.load(..., allow_pickle=False)`` and ``json`` only, object arrays refused before their data
is read, every array checked against its SHA-256.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import stat
import time
import zipfile
import zlib
from typing import Any

import numpy as np

from .errors import CheckpointError, CheckpointNotFoundError
from .tree import MAX_DEPTH, ArrayEntry, array_sha256, path_name

try:  # POSIX: a writer holds a lock on its temporary file, so others can tell it is alive
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

FORMAT_NAME = "needle-checkpoint"
FORMAT_VERSION = 1
META_MEMBER = "meta.json"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the zip epoch: no wall-clock time in the bytes
# What a damaged zip or .npy member can raise while being read.
# (RuntimeError covers encrypted members and RecursionError from absurdly nested JSON.)
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, ValueError, OSError,
                EOFError, KeyError, NotImplementedError, RuntimeError)
# The temporary files of write_atomic: ".<name>.<12 hex digits>.tmp" beside the target.
_TEMP_TOKEN = re.compile(r"[0-9a-f]{12}\.tmp")
# Without file locks, a temporary file this much older than a save is taken as abandoned.
_STALE_WITHOUT_LOCKS_S = 3600.0
# JSON nesting allowed in meta.json: MAX_DEPTH tree levels take two JSON levels each, plus
# the envelope and an array entry's shape list.
_MAX_JSON_DEPTH = 2 * MAX_DEPTH + 8
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


# -- writing ---------------------------------------------------------------------------------------
def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _write_array(fileobj: Any, array: np.ndarray) -> None:
    """Write one array in .npy format (a separate function so tests can make it fail)."""
    np.lib.format.write_array(fileobj, array, allow_pickle=False)


def _write_zip(fileobj: Any, meta_bytes: bytes, arrays: list[ArrayEntry]) -> None:
    with zipfile.ZipFile(fileobj, mode="w", compression=zipfile.ZIP_STORED,
                         allowZip64=True) as archive:
        archive.writestr(_zip_info(META_MEMBER), meta_bytes)
        for entry in arrays:
            # force_zip64: the size is unknown while streaming and may exceed 4 GiB.
            with archive.open(_zip_info(entry.member), mode="w", force_zip64=True) as member:
                _write_array(member, entry.array)


def _temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(6)}.tmp"


def _is_own_temp(entry_name: str, name: str) -> bool:
    """Whether ``entry_name`` has the exact form of write_atomic's temporary files for ``name``."""
    prefix = f".{name}."
    return entry_name.startswith(prefix) and bool(_TEMP_TOKEN.fullmatch(entry_name[len(prefix):]))


def _lock(fd: int, blocking: bool) -> bool:
    """Take an exclusive lock on an open file; False if another holder has it. Raises OSError
    when the file system has no locks."""
    flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        return False
    return True


def _remove_stale_temps(directory: str, name: str, started: float) -> None:
    """Delete temporary files that earlier saves of ``name`` left behind when killed.

    Only files of write_atomic's own naming (``.<name>.<12 hex>.tmp``), regular files (not
    links), last modified before this save started, and not locked: a live writer holds a lock
    on its temporary file until it is renamed, and the kernel drops the lock when a writer dies.
    Where locks are not available, only files an hour older than this save are removed.
    """
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if not _is_own_temp(entry.name, name):
            continue
        with contextlib.suppress(OSError):
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime >= started:
                continue  # created or written since this save began: maybe a live writer
            if fcntl is None:
                if entry.stat(follow_symlinks=False).st_mtime < started - _STALE_WITHOUT_LOCKS_S:
                    os.unlink(entry.path)
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                try:
                    unlocked = _lock(fd, blocking=False)
                except OSError:  # no locks on this file system: fall back to the age
                    unlocked = entry.stat(follow_symlinks=False).st_mtime \
                        < started - _STALE_WITHOUT_LOCKS_S
                if unlocked:
                    os.unlink(entry.path)
            finally:
                os.close(fd)


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """Create a fresh hidden file beside the target (same file system, so os.replace is atomic)."""
    for _ in range(100):
        temp = os.path.join(directory, _temp_name(name))
        try:
            # Mode 0o666 lets the umask decide, as for a plain open(); mkstemp would force 0o600.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise FileNotFoundError(
                f"cannot save checkpoint {os.path.join(directory, name)}: "
                f"directory {directory} does not exist") from None
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks: age rule only
                _lock(fd, blocking=True)
        return fd, temp
    raise FileExistsError(f"cannot create a temporary file beside {os.path.join(directory, name)}")


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) everywhere.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, meta: dict, arrays: list[ArrayEntry]) -> None:
    """Write the checkpoint to a temporary file, fsync it, then rename it onto ``path``.

    A crash or an error at any point leaves ``path`` as it was (the old checkpoint or nothing);
    on errors the temporary file is removed. A process killed mid-save cannot remove its
    temporary file, so each save first deletes the abandoned ones of earlier saves of the same
    file (see ``_remove_stale_temps``). Like ``open()``, a symlink is written through.
    """
    started = time.time()
    target = os.path.realpath(os.fspath(path))
    directory, name = os.path.split(target)
    meta_bytes = json.dumps(meta, allow_nan=False, ensure_ascii=False).encode("utf-8")
    _remove_stale_temps(directory, name, started)
    fd, temp = _create_temp(directory, name)
    file = os.fdopen(fd, "wb")
    try:
        if hasattr(os, "fchmod") and os.path.isfile(target):
            os.fchmod(file.fileno(), stat.S_IMODE(os.stat(target).st_mode))
        _write_zip(file, meta_bytes, arrays)
        file.flush()
        os.fsync(file.fileno())
        if os.name == "nt":  # Windows cannot rename an open file; POSIX keeps the lock held
            file.close()
        os.replace(temp, target)
    except BaseException:
        file.close()
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        file.close()
    _fsync_directory(directory)


# -- reading ---------------------------------------------------------------------------------------
def _open(path: str) -> Any:
    try:
        return open(path, "rb")  # noqa: SIM115 (closed by CheckpointReader.close)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file (a part of the path "
                                      "is a file, not a folder)") from None
    except PermissionError:
        raise CheckpointError(f"{path}: cannot read the checkpoint: permission denied") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: "
                              f"{exc.strerror or exc}") from None


def _sniff(path: str, head: bytes) -> None:
    """Refuse, by its first bytes, a file that is not a zip archive, naming what it looks like."""
    if head.startswith(_ZIP_MAGICS):
        return
    if not head:
        what = "the file is empty"
    elif head.startswith(b"\x93NUMPY"):
        what = "it is a single .npy array"
    elif head.startswith(b"\x80"):
        what = ("it is a Python pickle (such as a legacy PyTorch .pt file); "
                "needle never unpickles files")
    else:
        what = f"it is not a zip (.npz) archive; it starts with {head[:8]!r}"
    raise CheckpointError(f"{path}: not a needle checkpoint: {what}")


def _describe_foreign_zip(names: list[str]) -> str:
    if any(name.endswith(".pkl") for name in names):
        return "a zip holding pickled data (such as a PyTorch .pt file); needle never unpickles"
    if names and all(name.endswith(".npy") for name in names):
        return f"a plain .npz of arrays ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
    return "a zip archive"


def _read_npy_header(member: Any) -> tuple:
    """``(shape, fortran_order, dtype)`` from a .npy header (versions 1.0, 2.0 and 3.0)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    # 3.0 (UTF-8 field names) has only a private reader; its place moved in NumPy 2
    for module in (np.lib.format, getattr(np.lib, "_format_impl", None)):
        reader = getattr(module, "_read_array_header", None)
        if reader is not None:
            return reader(member, version)
    raise ValueError(f".npy format version {version} is not readable by this NumPy")


def _json_depth(data: bytes) -> int:
    """How deeply the JSON text nests objects and arrays (brackets inside strings aside), found
    without recursion so that no file can exhaust the stack."""
    codes = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    steps = np.zeros(codes.shape, dtype=np.int64)
    steps[(codes == ord("{")) | (codes == ord("["))] = 1
    steps[(codes == ord("}")) | (codes == ord("]"))] = -1
    return int(np.cumsum(steps).max(initial=0))


class CheckpointReader:
    """An open checkpoint file: its validated metadata and checked reads of its arrays.

    Use as a context manager. The file is opened once, so a concurrent save (which renames a
    new file into place) never mixes two checkpoints in one read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file = _open(self.path)
        self._npz: Any = None
        try:
            _sniff(self.path, self._file.read(8))
            self._file.seek(0)
            try:
                self._npz = np.load(self._file, allow_pickle=False)
            except _READ_ERRORS as exc:
                raise CheckpointError(f"{self.path}: truncated or corrupted: cannot read the zip "
                                      f"archive ({exc})") from None
            self.members = set(self._npz.zip.namelist())
            self._file_size = os.fstat(self._file.fileno()).st_size
            self.meta = self._read_meta()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._npz is not None:
            self._npz.close()
        self._file.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _read_meta(self) -> dict:
        if META_MEMBER not in self.members:
            what = _describe_foreign_zip(sorted(self.members))
            raise CheckpointError(f"{self.path}: not a needle checkpoint: {what} without needle's "
                                  f"{META_MEMBER}")
        self._check_members()
        try:
            # zipfile checks the member's CRC-32 as it reads.
            text = self._npz.zip.read(META_MEMBER)
        except _READ_ERRORS as exc:
            raise CheckpointError(f"{self.path}: truncated or corrupted: cannot read "
                                  f"{META_MEMBER} ({exc})") from None
        if _json_depth(text) > _MAX_JSON_DEPTH:
            raise CheckpointError(f"{self.path}: corrupted metadata: nested too deeply (more "
                                  f"than {MAX_DEPTH} levels)")
        try:
            meta = json.loads(text.decode("utf-8"))
        except _READ_ERRORS as exc:
            raise CheckpointError(f"{self.path}: truncated or corrupted: cannot read "
                                  f"{META_MEMBER} ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise CheckpointError(f"{self.path}: not a needle checkpoint: {META_MEMBER} names the "
                                  f"format {found!r}, expected {FORMAT_NAME!r}")
        version = meta.get("version")
        if type(version) is not int or version < 1:
            raise CheckpointError(f"{self.path}: unknown checkpoint format version {version!r}")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{self.path}: checkpoint format version {version} is newer than "
                                  f"this needle reads (up to {FORMAT_VERSION}); upgrade needle")
        items = meta.get("items")
        if not isinstance(items, dict) or items.get("type") != "dict":
            raise CheckpointError(f"{self.path}: corrupted metadata: no 'items' dict")
        return meta

    def _check_members(self) -> None:
        """Refuse compressed members and sizes the file cannot hold, before reading any.

        needle writes every member uncompressed (ZIP_STORED), so a member's size is bounded by
        the file's; a compressed one could expand to any size (a zip bomb), so it is refused.
        """
        for info in self._npz.zip.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(
                    f"{self.path}: refused: member {info.filename} is compressed (zip method "
                    f"{info.compress_type}); needle writes uncompressed members and does not "
                    "expand compressed ones, which could grow without bound")
            if info.file_size != info.compress_size:
                raise CheckpointError(
                    f"{self.path}: corrupted: member {info.filename} is stored uncompressed but "
                    f"declares {info.compress_size} stored and {info.file_size} unpacked bytes")
            if info.file_size > self._file_size:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupted: member {info.filename} declares "
                    f"{info.file_size} bytes, more than the {self._file_size}-byte file holds")

    def read_array(self, node: dict, path: tuple, verify: bool = True) -> np.ndarray:
        """The array a (validated) tree node names, checked against its dtype, shape and hash."""
        where, member = path_name(path), node["member"]
        if member not in self.members:
            raise CheckpointError(f"{self.path}: corrupted: the member {member} of array "
                                  f"'{where}' is missing")
        try:
            with self._npz.zip.open(member) as stream:
                header = _read_npy_header(stream)
                header_bytes = stream.tell()
        except _READ_ERRORS as exc:
            # (zipfile reads ahead, so a damaged value can already fail its CRC check here)
            raise CheckpointError(f"{self.path}: truncated or corrupted: cannot read array "
                                  f"'{where}' ({exc})") from None
        # Check the header before reading: refuses pickle and never allocates a bogus size
        # (the size the header declares must be what the member holds, and the member's size
        # was checked against the file's in _check_members).
        self._check_layout(where, node, header[0], header[2])
        stored = self._npz.zip.getinfo(member).file_size - header_bytes
        if stored != node["nbytes"]:
            raise CheckpointError(f"{self.path}: truncated or corrupted: array '{where}' declares "
                                  f"{node['nbytes']} bytes of data, its member holds {stored}")
        try:
            array = self._npz[member]
        except _READ_ERRORS as exc:
            raise CheckpointError(f"{self.path}: truncated or corrupted: cannot read array "
                                  f"'{where}' ({exc})") from None
        if not isinstance(array, np.ndarray):
            raise CheckpointError(f"{self.path}: corrupted: array '{where}' is not a .npy member")
        self._check_layout(where, node, array.shape, array.dtype)
        if verify:
            digest = array_sha256(array)
            if digest != node["sha256"]:
                raise CheckpointError(f"{self.path}: corrupted: checksum mismatch for array "
                                      f"'{where}' (SHA-256 {digest[:16]}..., expected "
                                      f"{node['sha256'][:16]}...)")
        return array

    def _check_layout(self, where: str, node: dict, shape: tuple, dtype: np.dtype) -> None:
        if dtype.hasobject:
            raise CheckpointError(f"{self.path}: refused: array '{where}' is an object array, "
                                  "which only pickle could load; needle checkpoints never hold "
                                  "pickled data and loading never runs code")
        nbytes = math.prod(int(n) for n in shape) * dtype.itemsize  # exact: no int64 overflow
        if dtype.str != node["dtype"] or list(shape) != node["shape"] or nbytes != node["nbytes"]:
            raise CheckpointError(f"{self.path}: corrupted: array '{where}' is {dtype.str} "
                                  f"{tuple(shape)} ({nbytes} bytes), metadata says "
                                  f"{node['dtype']} {tuple(node['shape'])} "
                                  f"({node['nbytes']} bytes)")

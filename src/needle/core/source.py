"""Where in the user's code: the innermost calling frame outside the needle package.

Graph nodes remember the line that made them, errors name it, and the JIT's fallback and
reports point at it. One helper serves them all, so "outside needle" means the same thing
everywhere (generated op functions, compiled as ``<needle op matmul>``, count as needle).
"""

from __future__ import annotations

import functools
import os
import sys
from types import FrameType

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=4096)
def is_needle_file(filename: str) -> bool:
    """Whether code from ``filename`` is needle's own (a package file or generated code)."""
    return filename.startswith("<needle") or os.path.abspath(filename).startswith(
        PACKAGE_DIR + os.sep)


def user_frame() -> FrameType | None:
    """The innermost frame on the calling stack whose code is not needle's."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and is_needle_file(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def caller_site() -> tuple[str, int] | None:
    """``(file, line)`` of the user code calling into needle, or None."""
    frame = user_frame()
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


def user_source() -> str | None:
    """``file:line`` of the user code calling into needle, or None."""
    site = caller_site()
    return None if site is None else f"{site[0]}:{site[1]}"


__all__ = ["PACKAGE_DIR", "caller_site", "is_needle_file", "user_frame", "user_source"]

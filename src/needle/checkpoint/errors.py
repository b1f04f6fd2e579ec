"""Exceptions raised when a checkpoint file cannot be read or is not trusted."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, of another format or refused.

    The message names the file and what is wrong with it.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also catchable as ``FileNotFoundError``)."""

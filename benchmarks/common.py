"""Shared benchmark helpers: pin BLAS threads, time callables, print markdown tables."""

from __future__ import annotations

import os

# Pin BLAS/OpenMP threads before NumPy or torch load, so runs are comparable (2-core machines).
THREADS = os.environ.get("NEEDLE_BENCH_THREADS", "2")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, THREADS)

import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import needle.backend  # noqa: E402

# what `python -m needle` does too: freed training arrays stay mapped (backend/allocator.py);
# revisions before tune_malloc existed tuned malloc on import (ab_compare.py runs them too)
getattr(needle.backend, "tune_malloc", lambda: None)()


def best_time(fn: Callable[[], object], repeat: int = 5, number: int = 1) -> float:
    """The best wall time of ``repeat`` rounds of ``number`` calls, in seconds per call.

    The minimum is the least noisy estimate on a shared machine.
    """
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def best_times_in_rounds(fns: dict[str, Callable[[], object]], rounds: int = 3,
                         repeat: int = 3, pause: float = 2.0) -> dict[str, float]:
    """The best time of each callable over ``rounds`` rounds; a round runs every callable in
    turn: an idle ``pause``, one untimed call, then ``repeat`` timed calls.

    NOTE: these VMs have slow phases (everything, PyTorch included, 30-50% slower for a
    while), so one block per library can land one of them in a slow phase; rounds spread
    each library's samples over the run. Within a round each library runs in one block:
    alternating call by call is unfair, because OpenBLAS and OpenMP threads spin after
    their work and slowed the other library's next call by up to 40%. The untimed call
    absorbs that.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(pause)
            fn()
            best[name] = min(best[name], best_time(fn, repeat=repeat))
    return best


def torch_threads() -> None:
    """Give torch the same thread count as NumPy's BLAS."""
    import torch

    torch.set_num_threads(int(THREADS))


def machine() -> str:
    """One line describing where a benchmark ran."""
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, " \
           f"{THREADS} BLAS threads"


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys as a markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)

"""needle's numba disk cache (backend/numba_cache.py): a cached loop that calls a loop of
another of the kernels' numba modules is recompiled when that module changes (numba alone
keys the cache on the caller's file and would keep running the old callee)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from needle.backend import numba_cache
    root = Path(sys.argv[1])
    numba_cache._PACKAGE = root  # a stand-in for needle's package directory
    sys.path.insert(0, str(root))
    from kernels import numba_caller
    print(numba_caller.twice_callee(3))
""")

_CALLEE = """
from needle.backend.numba_support import njit_cached


@njit_cached
def callee(x):
    return x + {add}
"""

_CALLER = """
from needle.backend.numba_support import njit_cached

from . import numba_callee


@njit_cached
def twice_callee(x):
    return 2 * numba_callee.callee(x)
"""


def _run(root) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR="")  # the cache beside the sources (in tmp)
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", _RUN, str(root)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_an_edited_callee_module_recompiles_its_cached_callers(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "__init__.py").write_text("")
    (kernels / "numba_caller.py").write_text(_CALLER)
    (kernels / "numba_callee.py").write_text(_CALLEE.format(add=1))
    assert _run(tmp_path) == "8"
    assert any(p.suffix == ".nbi" and "numba_caller" in p.name
               for p in (kernels / "__pycache__").iterdir())  # the caller was cached
    (kernels / "numba_callee.py").write_text(_CALLEE.format(add=10))
    assert _run(tmp_path) == "26"

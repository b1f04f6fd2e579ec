"""needle.backend.allocator: freed arrays stay mapped between steps (glibc), with an opt-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from needle.backend import allocator

# A step's pattern: three 20 MB arrays live at once, then all freed; five steps. Prints the
# page faults of the last four steps and what the allocator module applied.
_SCRIPT = """
import json, resource
import numpy as np
import needle.backend.allocator as allocator
import needle
if TUNE:
    needle.backend.tune_malloc()  # the explicit opt-in (a no-op with NEEDLE_MALLOC_TUNING=0)

def step():
    arrays = [np.ones(5_000_000, dtype=np.float32) for _ in range(3)]
    return sum(float(a[0]) for a in arrays)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "applied": allocator.applied}))
"""


def _run(tune: bool = True, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "NEEDLE_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT.replace("TUNE", str(tune))],
                         env={**clean, **env}, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not allocator._glibc(), reason="the tuning applies to glibc malloc only")
def test_freed_arrays_stay_mapped_and_the_opt_out_works():
    tuned, untuned = _run(), _run(NEEDLE_MALLOC_TUNING="0")
    assert tuned["applied"] == {"mmap_threshold": 32 * 2**20, "trim_threshold": 64 * 2**20}
    assert untuned["applied"] == "disabled by NEEDLE_MALLOC_TUNING=0"
    # 60 MB per step: untuned, glibc trims it and every step faults it back in
    assert untuned["faults"] > 100
    assert tuned["faults"] < untuned["faults"] / 10


def test_glibc_environment_variables_take_precedence():
    result = _run(MALLOC_TRIM_THRESHOLD_="1000000")
    expected = ("glibc's MALLOC_*_ environment variables are set; they are left to decide"
                if allocator._glibc() else "not glibc malloc")
    assert result["applied"] == expected


def test_import_needle_leaves_malloc_alone():
    # a library must not change its host process on import: tuning is an explicit call
    assert _run(tune=False)["applied"] == "not called"

#!/usr/bin/env bash
# The device check for a lent GPU machine, as one short run (device tool: `run` this from the
# repo root): is CuPy seen, do the CuPy tests pass, and how fast is a training step there.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -c "import needle as ndl, cupy; print('cupy', cupy.__version__, 'cuda enabled:', ndl.cuda().enabled())"
python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py 2>&1 | tail -20
python3 benchmarks/gpu_step.py

"""Run every benchmark script and rewrite BENCHMARKS.md with their tables.

Each benchmark module exposes ``main() -> list[dict]`` (needle and PyTorch side by side, with
ratios). Run: python benchmarks/run_all.py [--no-compile]; ``--only NAME ...`` prints a partial run
without writing.
Machines here are noisy: run on a quiet machine, and read ratios rather than absolute times.
"""

from __future__ import annotations

# isort: off
import common

# isort: on
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "..", "BENCHMARKS.md")

#: (module, title, what it measures) in the order they appear in BENCHMARKS.md
SCRIPTS = [
    ("op_overhead", "Per-op overhead and a large matmul",
     "a chain of 100 small elementwise ops on a (1, 64) tensor, and a 512x1024 @ 1024x1024 "
     "matmul, forward and backward"),
    ("train_mlp_resnet", "MLP-ResNet training epoch (eager)",
     "one epoch over the 10,000 MNIST test images, batch 100, Adam"),
    ("large_mlp_step", "Large MLP training step (GEMM-bound)",
     "MLP 1024-4096-4096-10, batch 512, SGD: needle eager and ndl.jit against NumPy by hand, "
     "jax.jit and PyTorch; the floor is the faster of NumPy by hand and jax.jit"),
    ("cnn_step", "CNN training step (eager)",
     "3 conv layers with BatchNorm2d, batch 64 of 32x32x3"),
    ("cnn_step:jit_rows", "CNN training steps under ndl.jit vs torch.compile",
     "the three CNN steps of the table above (strides 1,1,1; 1,2,2; ResidualCNN 32x32x3) as "
     "jitted steps, hot (past region fusion's warm-up), beside torch.compile and PyTorch eager"),
    ("lm_step", "Language-model training steps (eager, ndl.jit, PyTorch eager)",
     "an LSTM LM (bptt 35, batch 32, SGD) and a causal Transformer LM (batch 16, seq 64, "
     "Adam), embeddings and vocabulary 10,000, medians over rounds"),
    ("dataloader", "DataLoader throughput", "one shuffled epoch, and with crop + flip"),
    ("static_vs_eager", "Declarative Session vs eager", "the MLP-ResNet training step"),
    ("caffe_vs_eager", "Caffe-style Net vs eager", "the MLP-ResNet training step"),
    ("jit", "JIT vs eager, PyTorch, torch.compile and hand-written NumPy",
     "the MLP-ResNet epoch and the 100-op chain"),
    ("fusion_choice", "How compiled plans run elementwise chains",
     "one 6-op chain as NumPy ufuncs in place, numexpr and numba (where installed)"),
    ("fusion_ab", "Region fusion: NEEDLE_FUSION=0 vs 1",
     "the jitted 100-op chain and MLP-ResNet steps with region fusion off and on, hot plans, "
     "alternating rounds in one process"),
    ("export", "Export: loaded program vs onnxruntime",
     "inference of the MLP-ResNet and the CNN (28x28x1, eval mode), batch 1 and 256: "
     "ndl.load_program's program eagerly and under ndl.jit, and onnxruntime on the ONNX "
     "export; ratios are needle / onnxruntime"),
]


def _run_isolated(entry: str, compile_torch: bool) -> list[dict]:
    """``module.main()`` (or ``module.fn()`` for an entry "module:fn") in a fresh Python
    process (earlier benchmarks' memory and threads would otherwise skew later ones), its
    rows passed back as JSON."""
    module_name, _, function = entry.partition(":")
    function = function or "main"
    args = f"compile_torch={compile_torch}" if entry in ("jit", "cnn_step:jit_rows") else ""
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import {module_name} as m; "
            f"rows = m.{function}({args}); print('ROWS=' + json.dumps(rows))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=HERE, check=False)
    sys.stderr.write(result.stderr[-2000:])
    for line in result.stdout.splitlines():
        if line.startswith("ROWS="):
            return json.loads(line[len("ROWS="):])
    raise RuntimeError(f"benchmarks/{module_name}.py printed no rows (exit {result.returncode})")


def run(only: list[str] | None, compile_torch: bool, pause: float) -> str:
    sections = []
    for index, (entry, title, what) in enumerate(SCRIPTS):
        module_name = entry.partition(":")[0]
        if only and entry not in only and module_name not in only:
            continue
        if not os.path.exists(os.path.join(HERE, f"{module_name}.py")):
            sections.append(f"## {title}\n\n_not measured: benchmarks/{module_name}.py is "
                            "missing_\n")
            continue
        if index and pause:
            # these VMs have slow phases; an idle pause gives each script the same start
            time.sleep(pause)
        print(f"running {entry} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows = _run_isolated(entry, compile_torch)
        took = time.perf_counter() - start
        sections.append(f"## {title}\n\n{what} (`benchmarks/{module_name}.py`, {took:.0f} s)\n\n"
                        f"{common.markdown_table(rows)}\n")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"# Benchmarks\n\nLatest run: {stamp} on {common.machine()}.\n"
            "Times are the best of several repeats; `ratio` is needle / PyTorch (lower is "
            "better for needle) unless a column says otherwise. Regenerate with "
            "`python benchmarks/run_all.py`.\n\n"
            "The machines here have slow phases (tens of seconds in which work runs 20-50% "
            "slower, memory-bound and small-op work unequally, so needle and PyTorch are not "
            "slowed alike). Each script starts after an idle pause and times the libraries "
            "in rounds; compare ratios within a table, and rerun a script whose ratio looks "
            "off.\n\n"
            + "\n".join(sections) + _kept_records())


#: hand-written records kept at the end of BENCHMARKS.md on every run, in this order
KEPT_RECORDS = ["goals_record.md", "before_after.md", "performance_notes.md",
                "distributed_record.md", "remote_record.md"]


def _kept_records() -> str:
    """The records no script regenerates: before/after checks and the performance notes."""
    parts = []
    for name in KEPT_RECORDS:
        path = os.path.join(HERE, name)
        if os.path.exists(path):
            with open(path) as f:
                parts.append("\n" + f.read())
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="benchmark module names to run")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--pause", type=float, default=30.0,
                        help="idle seconds before each script (default 30)")
    args = parser.parse_args()
    text = run(args.only, not args.no_compile, args.pause)
    if args.only:  # a partial run is printed, never written over the full table
        print(text)
        return
    with open(OUTPUT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

"""Activation memory of a reversible stack does not grow with depth.

Runs `benchmarks/reversible_memory.py` small (JAX backend in a subprocess:
XLA's buffer assignment, `compiled.memory_analysis()`), LSH attention and
chunked feed-forward blocks: the reversible stack's temporary memory at 3
blocks stays within 10% of 1 block, and so does a whole causal LM's
training step, while a plain residual stack's more than doubles.
"""

import json
import os
import subprocess
import sys

from tests.processes import fast_compile_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reversible_memory_is_flat_in_depth():
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks",
                                      "reversible_memory.py"),
         "--length", "1024", "--hidden", "64", "--chunk", "32",
         "--depths", "1,3", "--plot", ""],
        # LLVM's optimization level changes no buffer: the same plan, sooner.
        env=dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                 XLA_FLAGS=fast_compile_xla_flags()),
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()
             if line.startswith("{")]
    memory = {(m["depth"], m["kind"]): m["temp_mib"] for m in lines}
    assert memory[(3, "reversible")] <= 1.1 * memory[(1, "reversible")], memory
    assert memory[(3, "causal_lm")] <= 1.1 * memory[(1, "causal_lm")], memory
    assert memory[(3, "plain")] > 2 * memory[(1, "plain")], memory

"""benchmarks/gpu_suite.sh --smoke: the GPU run's every part at tiny sizes on
the CPU, without TensorFlow (as on the GPU machine)."""

import json
import math
import os
import subprocess
import sys

from tests.processes import fast_compile_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_measures_every_part_and_ours_equals_exact_attention():
    environment = dict(
        os.environ, PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([
            os.path.join(ROOT, "tests", "without_tensorflow"), ROOT]),
        XLA_FLAGS=fast_compile_xla_flags())
    run = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke"],
                         cwd=ROOT, env=environment, capture_output=True,
                         text=True, timeout=900)
    lines = [json.loads(line) for line in run.stdout.splitlines()
             if line.startswith("{")]
    parts = {line["part"]: line for line in lines if "part" in line}
    assert run.returncode == 0, run.stderr[-2000:]
    assert {name: part.get("exit") for name, part in parts.items()} == {
        "layers": 0, "long_layers": 0, "lm_steps": 0, "duplication": 0}, (
        run.stdout[-3000:])

    check, = [line for line in lines if "check" in line]
    assert check["max_abs_output"] > 0.1
    assert check["max_abs_difference"] < 1e-4 * check["max_abs_output"]

    timed = {(line["implementation"], line["length"]): line for line in lines
             if line.get("benchmark") == "attention_gpu"
             and "implementation" in line}
    assert set(timed) == {("lsh", 128), ("flash", 128), ("huggingface", 128),
                          ("lsh_by_run", 256), ("flash", 256)}
    for line in timed.values():
        assert "error" not in line, line
        assert line["ms"] > 0
    for name in ("lsh", "lsh_by_run", "flash"):  # XLA's plan on a CPU
        assert timed[name, 256 if name == "lsh_by_run" else 128][
            "peak_mib"] > 0

    steps = {(line["configuration"], line["implementation"]): line
             for line in lines if line.get("benchmark") == "lm_step"
             and "implementation" in line}
    assert set(steps) == {("crime_and_punishment", "ours_jax"),
                          ("crime_and_punishment", "huggingface")}
    for line in steps.values():
        assert "error" not in line, line
        # A few steps on one batch from random weights: finite, and no worse
        # than a uniform guess over the 320 tokens by much.
        assert 0 < line["loss"] < math.log(320) + 1.0, line
        assert line["step_s"] > 0 and line["peak_mib"] >= 0

    results = [line for line in lines if line.get("task") == "duplication"]
    assert results and all(line["trained_steps"] == 4 for line in results)
    assert all(0 <= line["accuracy"] <= 1 for line in results)

"""What the benchmarks share: medians after warm-up, one process per
measurement (so that peak memory belongs to that measurement alone)."""

import json
import os
import subprocess
import sys
import time

import numpy as np


def median_seconds(function, repeats):
    """Median wall time of `repeats` calls of `function` after one untimed
    (compiling, warming up) call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_single(script, spec, arguments, backend=None):
    """Runs `script --single spec *arguments` in a fresh process.

    Returns:
        The dict the process printed as JSON on its last line, or
        `{"error": ...}` with the end of its stderr if it failed.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if backend:
        env["KERAS_BACKEND"] = backend
    run = subprocess.run(
        [sys.executable, script, "--single", spec, *map(str, arguments)],
        capture_output=True, text=True, env=env)
    if run.returncode:
        return {"error": run.stderr.strip()[-400:]}
    return json.loads(run.stdout.strip().splitlines()[-1])

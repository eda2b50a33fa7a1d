"""benchmarks/isolated.py's measurements: the peak resident set with and
without what the first call alone allocated. Each check runs in a fresh
process, as the benchmarks' measurements do (a peak's growth is measured
from the process's earlier peak)."""

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks")

CHILD = r"""
import json
import sys

import numpy as np

sys.path.insert(0, sys.argv[1])
import isolated

repeats = int(sys.argv[2])
kept = []


def touched(mib):
    array = np.empty(mib * 2**20, np.uint8)
    array[::4096] = 1  # every page resident
    return array


def step():
    if not kept:  # the first call: a large transient, like compiling
        touched(600)
        kept.append(touched(40))
    touched(120)
    kept.append(None)


memory = isolated.ResidentMemory()
seconds, cpu_seconds = isolated.timed_calls(step, repeats,
                                            memory.restart_peak)
print(json.dumps({"calls": len(kept), "seconds": seconds,
                  "peak": memory.peak_mib(),
                  "steady": memory.steady_mib()}))
"""


def measured(repeats):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, BENCHMARKS, str(repeats)],
        capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="the high-water mark is Linux's")
def test_steady_peak_leaves_out_the_first_calls_transient_memory():
    result = measured(2)
    assert result["calls"] == 4 and result["seconds"] > 0
    # Everything since creation: the first call's 600 MiB transient.
    assert result["peak"] >= 590
    # While stepping: the 40 MiB kept plus one 120 MiB transient at a time,
    # not the first call's 600.
    assert 150 <= result["steady"] < 400


def test_steady_peak_is_unknown_without_a_warm_up_call():
    result = measured(0)
    assert result["calls"] == 2
    assert result["steady"] is None
    assert result["peak"] >= 590

"""benchmarks/isolated.py's measurements: the peak resident set with and
without what the first call alone allocated."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import isolated  # noqa: E402

MIB = 2**20


def touched(mib):
    """A new array of `mib` MiB with every page written (resident)."""
    array = np.empty(mib * MIB, np.uint8)
    array[::4096] = 1
    return array


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="the high-water mark is Linux's")
def test_steady_peak_leaves_out_the_first_calls_transient_memory():
    kept = []

    def step():
        if not kept:  # the first call: a large transient, like compiling
            touched(600)
            kept.append(touched(40))
        touched(120)
        kept.append(None)

    memory = isolated.ResidentMemory()
    seconds, cpu_seconds = isolated.timed_calls(step, 2,
                                                memory.restart_peak)
    assert len(kept) == 4 and seconds > 0 and cpu_seconds > 0
    # Everything since creation: the 600 MiB transient.
    assert memory.peak_mib() >= 590
    # While stepping: the 40 MiB kept plus one 120 MiB transient at a time,
    # not the first call's 600.
    assert 150 <= memory.steady_mib() < 400


def test_steady_peak_is_unknown_without_a_warm_up_call():
    memory = isolated.ResidentMemory()
    isolated.timed_calls(lambda: touched(8), 0, memory.restart_peak)
    assert memory.steady_mib() is None
    assert memory.peak_mib() >= 0

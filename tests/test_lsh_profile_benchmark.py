"""benchmarks/lsh_profile.py's and xla_profile.py's counts on a tiny LSH
layer step (this process's backend): matrix products against the
configuration's own count, loops included, and the profile's operations
inside loops."""

import os
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import layer_steps  # noqa: E402
import lsh_profile  # noqa: E402
import xla_profile  # noqa: E402

LENGTH, HEADS = 256, 2
STEP = {"tensorflow": "lsh_tf", "jax": "lsh_jax"}


@pytest.fixture(scope="module")
def looped():
    """The layer step one head at a time in two runs of chunks, and its
    parsed HLO."""
    step = layer_steps.STEPS[STEP[keras.backend.backend()]](
        LENGTH, HEADS, parallel_heads=1, segments=2)
    return step, xla_profile.parse_hlo(step.optimized_hlo())


def test_products_in_loops_count_once_per_trip(looped):
    head_dim, rounds, window = 64, 4, 128
    # The backward pass of the loop over heads recomputes each head's
    # query-key and value projections and its attention scores (not the
    # weighted values: the forward's outputs and log-sum-exps are kept).
    projection = 2 * LENGTH * (HEADS * head_dim) * head_dim * HEADS
    scores = 2 * LENGTH * window * head_dim * rounds * HEADS
    recomputed = 2 * projection + scores
    # TensorFlow's XLA also keeps the softmax's and the rounds' row sums in
    # the backward pass as matrix-vector products.
    row_sums = 2 * 2 * LENGTH * head_dim * rounds * HEADS
    needed = lsh_profile.layer_flops(LENGTH, HEADS)
    executed, unknown_trip_counts = xla_profile.dot_flops(*looped[1])
    assert unknown_trip_counts == []
    assert needed <= executed - recomputed <= needed + row_sums


def test_profile_records_each_trip_of_the_loops(looped):
    step, (computations, entry) = looped
    step()
    counts, _ = xla_profile.run_counts(computations, entry)
    loop_bodies = xla_profile.loop_computations(computations)
    _, events = xla_profile.trace_operations(step, keras.backend.backend())
    recorded = {}
    for computation in loop_bodies:
        for name, opcode, _, _ in computations.get(computation, ()):
            if name in events and counts[computation] > 1:
                recorded[name] = (events[name][1], counts[computation])
    assert len(recorded) > 10, recorded
    assert all(seen == runs for seen, runs in recorded.values()), recorded

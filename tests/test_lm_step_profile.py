"""benchmarks/lm_step.py --profile's counts on a tiny language model's
gradient step (this process's backend): the matrix products counted from
XLA's optimised program against a count from the model's shapes, and the
profiled product operations against that count."""

import os
import sys

import keras
import pytest

from keras_reformer.layers import hashing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import lm_step  # noqa: E402
import xla_profile  # noqa: E402

LENGTH, LAYERS = 256, 2  # a local and an LSH attention layer


@pytest.fixture(scope="module")
def gradient_step():
    """The crime-and-punishment configuration's first two layers, its
    gradient step and the step's parsed HLO."""
    config = lm_step.reformer_config("crime_and_punishment", LENGTH, LAYERS)
    # Feed-forward chunks of 64: a loop of several steps, whose backward
    # pass recomputes each chunk (one chunk would be no loop at all).
    config.chunk_size_feed_forward = 64
    step = lm_step.gradient_step(config, LENGTH, {})
    return config, step, xla_profile.parse_hlo(step.optimized_hlo())


def step_flops(config, length):
    """The matrix-product FLOPs of the gradient step, from the model's
    shapes (every attention layer all chunks at once at this length)."""
    hidden = config.hidden_size
    width = config.num_attention_heads * config.attention_head_size
    projection = 2 * length * hidden * width
    feed_forward = 2 * length * hidden * config.feed_forward_size
    lm_head = 2 * length * 2 * hidden * config.vocab_size
    window = {
        "local": config.local_attn_chunk_length * (
            1 + config.local_num_chunks_before),
        "lsh": config.lsh_attn_chunk_length * (
            1 + config.lsh_num_chunks_before)}
    rotations = 2 * length * width * config.num_hashes * (
        hashing.rotation_columns(tuple(config.num_buckets)))
    # The LM head: forward, and the gradients of its input and kernel. The
    # backward pass recomputes the reversible stack's forward, except the
    # bottom block's attention output: it only recovers the stack's input.
    total = 3 * lm_head - projection
    for kind in config.attn_layers:
        # Each projection (query, key, value, output; LSH shares the query
        # and key): forward, recomputed, and two gradients.
        total += 4 * (4 if kind == "local" else 3) * projection
        # Both products, forward, recomputed and two gradients each, and
        # the first recomputed once more in the chunked loop's backward
        # pass (the second's result is not needed there).
        total += 9 * feed_forward
        # The scores and the weighted values, forward and recomputed, and
        # the gradients of the queries, keys, values and weights.
        attention = 2 * length * window[kind] * width
        total += 8 * attention * config.num_hashes
        if kind == "lsh":
            total += 2 * rotations  # forward and recomputed, no gradient
    return total


def test_executed_products_match_the_model_shapes(gradient_step):
    config, _, parsed = gradient_step
    executed, unknown_trip_counts = xla_profile.dot_flops(*parsed)
    expected = step_flops(config, LENGTH)
    # TensorFlow's XLA may keep each attention layer's row sums of the
    # softmax's gradient as matrix-vector products.
    width = config.num_attention_heads * config.attention_head_size
    row_sums = LAYERS * 2 * LENGTH * width
    assert unknown_trip_counts == []
    assert expected <= executed <= expected + row_sums, (executed, expected)


def test_profiled_products_carry_every_executed_product(gradient_step):
    _, step, (computations, entry) = gradient_step
    hlo_text = step.optimized_hlo()
    step()
    executed, _ = xla_profile.dot_flops(computations, entry)
    _, operations = xla_profile.recorded_operations(
        step, hlo_text, keras.backend.backend())
    assert sum(flops for _, flops in operations.values()) == executed
    profile = xla_profile.profile_by_kind(
        step, hlo_text, keras.backend.backend(), lm_step.CONTAINERS)
    assert profile["products"]["gflop"] == round(executed / 1e9, 2)
    groups = [group["source"] for group in profile["product_groups"]]
    assert len(groups) == 8, groups
    # The same operation of both layers falls in one group.
    assert not any(container in group for group in groups
                   for container in lm_step.CONTAINERS + ("_0", "_1")), (
        groups)
    assert any(group.startswith("feed_forward") for group in groups), groups

"""BitsPerByte against a numpy computation."""

import math

import keras
import numpy as np

from keras_reformer.metrics import BitsPerByte


def numpy_bits(labels, logits):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    return -picked / math.log(2.0)


def test_bits_per_byte_matches_numpy_over_batches():
    rng = np.random.RandomState(0)
    metric = BitsPerByte()
    all_bits = []
    for _ in range(3):
        logits = rng.normal(0, 3, (4, 10, 256)).astype("float32")
        labels = rng.randint(0, 256, (4, 10)).astype("int32")
        metric.update_state(labels, logits)
        all_bits.append(numpy_bits(labels, logits))
    expected = np.concatenate(all_bits).mean()
    assert abs(float(metric.result()) - expected) < 1e-4
    assert metric.name == "bits_per_byte"
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_uniform_logits_score_eight_bits_and_sure_ones_zero():
    metric = BitsPerByte()
    metric.update_state(np.array([[3, 200]]), np.zeros((1, 2, 256)))
    assert abs(float(metric.result()) - 8.0) < 1e-5
    metric.reset_state()
    logits = np.full((1, 2, 256), -50.0, "float32")
    logits[0, 0, 3] = logits[0, 1, 200] = 50.0
    metric.update_state(np.array([[3, 200]]), logits)
    assert float(metric.result()) < 1e-6


def test_sample_weight_and_compiled_use():
    rng = np.random.RandomState(1)
    logits = rng.normal(0, 2, (2, 5, 256)).astype("float32")
    labels = rng.randint(0, 256, (2, 5)).astype("int32")
    weights = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]], "float32")
    metric = BitsPerByte()
    metric.update_state(labels, logits, sample_weight=weights)
    bits = numpy_bits(labels, logits)
    assert abs(float(metric.result())
               - (bits * weights).sum() / weights.sum()) < 1e-4

    # In `compile`, the metric is the loss (nats) divided by ln 2.
    model = keras.Sequential([keras.Input((5,)), keras.layers.Embedding(
        256, 256)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=[BitsPerByte()])
    results = model.evaluate(labels, labels, verbose=0, return_dict=True)
    assert abs(results["bits_per_byte"] - results["loss"] / math.log(2)) < 1e-4


def test_config_round_trip():
    metric = BitsPerByte(name="bpb")
    restored = BitsPerByte.from_config(metric.get_config())
    assert restored.name == "bpb"
    restored.update_state([[0]], np.zeros((1, 1, 256)))
    assert abs(float(restored.result()) - 8.0) < 1e-5

"""Mixed precision: every layer trains and matches float32 within bounds."""

import keras
import numpy as np
import pytest

from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM
from tests.helpers import to_numpy

PATTERN = np.tile(np.arange(1, 17, dtype="int32"), 100)
# 192 windows: whole batches of 16, so the compiled step has one shape.
WINDOWS = np.stack([PATTERN[i:i + 65] for i in range(0, 576, 3)])
INPUTS = {"token_ids": WINDOWS[:, :-1],
          "padding_mask": np.ones_like(WINDOWS[:, :-1])}


def language_model(policy, chunk_length=16):
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(1)
        return ReformerCausalLM(ReformerBackbone(
            50, hidden_dim=32, num_heads=2, head_dim=8, intermediate_dim=48,
            attention_types=["lsh", "local", "full"], axial_shape=(8, 8),
            seed=1, attention_options={
                "lsh": {"chunk_length": chunk_length, "num_hashes": 2},
                "local": {"chunk_length": 16}}))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


# Measured: at most 0.050 (bfloat16) and 0.0078 (float16) on logits up to 3.7.
@pytest.mark.parametrize("policy,tolerance", [
    ("mixed_bfloat16", 0.1), ("mixed_float16", 0.02)])
def test_outputs_match_float32(policy, tolerance):
    # One LSH chunk spans the sequence: with several, a half-precision
    # projection may move a token to another bucket near a tie, which
    # changes what it attends to rather than how precisely.
    reference = language_model("float32", chunk_length=64)
    mixed = language_model(policy, chunk_length=64)
    mixed.set_weights(reference.get_weights())
    subset = {k: v[:4] for k, v in INPUTS.items()}
    expected = to_numpy(reference(subset))
    actual = to_numpy(mixed(subset)).astype("float32")
    assert np.all(np.isfinite(actual))
    assert np.abs(actual - expected).max() < tolerance


# bfloat16 under XLA (as on TPUs); float16 without (XLA's compile of the
# three attention types is most of the test's time).
@pytest.mark.parametrize("policy,jit_compile", [
    ("mixed_bfloat16", True), ("mixed_float16", False)])
def test_training_converges(policy, jit_compile):
    model = language_model(policy)
    optimizer = keras.optimizers.Adam(1e-2)
    if policy == "mixed_float16":
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), jit_compile=jit_compile)
    losses = model.fit(INPUTS, WINDOWS[:, 1:], epochs=3, batch_size=16,
                       verbose=0).history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.05 * losses[0]


def test_reversible_backward_under_bfloat16_adds_little_error():
    """bfloat16 gradients of a reversible stack (inputs reconstructed from
    outputs in bfloat16) against float32, next to plain bfloat16 autodiff
    through the same blocks: reconstruction adds little to bfloat16's own
    error (measured at depth 12: median 4.3% vs 4.0%, max 11.2% vs 10.8%;
    at this depth over six weight draws the reversible median is 1.1 to
    1.5 times the plain one, the maximum 0.95 to 1.5 times)."""
    from keras import ops

    from keras_reformer.layers.seeds import seed_tensor
    from tests import test_reversible
    from tests.helpers import value_and_grads

    x, weights, mask = test_reversible.data()
    seed = seed_tensor(3)

    def stack(policy):
        keras.mixed_precision.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            return test_reversible.make_stack(num_blocks=6, dropout=0.0,
                                              attention="full")
        finally:
            keras.mixed_precision.set_dtype_policy("float32")

    def gradients(layer, reversible):
        def loss(x):
            x = ops.cast(x, layer.compute_dtype)
            out = (layer(x, padding_mask=mask, training=True, seed=seed)
                   if reversible else
                   test_reversible.plain_residual(layer, x, mask, seed))
            return ops.sum(ops.cast(out, "float32") * weights)

        _, x_grad, weight_grads = value_and_grads(
            loss, x, layer.trainable_variables)
        return [x_grad] + weight_grads

    reference_stack = stack("float32")
    reference = gradients(reference_stack, reversible=False)
    errors = {}
    for reversible in (True, False):
        half = stack("mixed_bfloat16")
        half.set_weights(reference_stack.get_weights())
        errors[reversible] = np.array([
            np.linalg.norm(a.astype("float32") - b) / np.linalg.norm(b)
            for a, b in zip(gradients(half, reversible), reference)])
    assert np.median(errors[False]) < 0.1  # bfloat16 itself
    assert np.median(errors[True]) < 1.7 * np.median(errors[False])
    assert errors[True].max() < 1.7 * errors[False].max()


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_cached_generation_matches_the_whole_prefix(policy):
    # ["lsh", "local", "full"]: the LSH layer is not the top one, so the
    # comparison uses one chunk spanning the prefix (no chunk boundaries
    # to move); the cached path must autocast like the ordinary call.
    lm = language_model(policy, chunk_length=64)
    ids = INPUTS["token_ids"][:2, :20]
    _, cache = lm.build_cache(ids, 4)
    for t in range(4, 20):
        logits, _, cache = lm.call_with_cache(ids[:, t:t + 1], cache, t)
        assert keras.backend.standardize_dtype(logits.dtype) == policy[6:]
        whole = to_numpy(lm({"token_ids": ids[:, :t + 1],
                             "padding_mask": np.ones((2, t + 1), "int32")}))
        # The two paths round differently; bfloat16 keeps 8 significant
        # bits, so logits near 2.4 lie 0.016 apart: allow six such steps
        # (measured up to 0.0625 on an AMD EPYC host; earlier hosts stayed
        # within 0.05).
        np.testing.assert_allclose(
            to_numpy(logits)[:, 0].astype("float32"),
            whole[:, -1].astype("float32"),
            atol=0.1 if policy == "mixed_bfloat16" else 0.05)

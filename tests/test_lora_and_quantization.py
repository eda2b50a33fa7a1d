"""LoRA (keras-hub's `enable_lora`) and int8 (`quantize`) on the projections."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_reformer.layers import ChunkedFeedForward
from keras_reformer.layers import LocalSelfAttention
from keras_reformer.layers import LSHSelfAttention
from keras_reformer.layers import PreNormBranch
from keras_reformer.layers import ReversibleBlock
from keras_reformer.layers import ReversibleStack
from keras_reformer.layers.seeds import seed_tensor
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM
from tests.helpers import assert_close
from tests.helpers import padded_inputs
from tests.helpers import to_numpy
from tests.helpers import value_and_grads

RANK = 2
IDS = np.random.RandomState(0).randint(1, 20, (4, 30)).astype("int32")
INPUTS = {"token_ids": IDS[:, :-1], "padding_mask": np.ones_like(IDS[:, :-1])}


def language_model(lsh_chunk_length=8):
    """LSH (shared QK, head groups) then local (separate QK, runs of
    chunks) attention: the memory-lean paths."""
    keras.utils.set_random_seed(1)
    return ReformerCausalLM(ReformerBackbone(
        vocabulary_size=20, hidden_dim=16, num_heads=2, head_dim=4,
        intermediate_dim=24, attention_types=["lsh", "local"],
        axial_shape=(4, 8), seed=1, feed_forward_chunk_length=8,
        attention_options={
            "lsh": {"chunk_length": lsh_chunk_length, "num_hashes": 2,
                    "parallel_heads": 1, "segments": 2},
            "local": {"chunk_length": 8, "segments": 2}}))


def adapted_layers(model):
    return [layer for layer in model.backbone._flatten_layers()
            if getattr(layer, "lora_enabled", False)]


@pytest.fixture(scope="module")
def trained_with_lora():
    """A model trained a few steps after `enable_lora`, and its weights
    before training (by path)."""
    lm = language_model()
    lm.backbone.enable_lora(RANK)
    lm.lm_head.trainable = False  # enable_lora freezes the backbone only
    lm.compile(optimizer=keras.optimizers.Adam(1e-2),
               loss=keras.losses.SparseCategoricalCrossentropy(
                   from_logits=True))
    before = {v.path: to_numpy(v) for v in lm.weights}
    lm.fit(INPUTS, IDS[:, 1:], epochs=3, batch_size=2, verbose=0)
    return lm, before


def test_lora_adapts_query_and_value_and_training_changes_only_adapters(
        trained_with_lora):
    lm, before = trained_with_lora
    adapted = sorted(layer.path for layer in adapted_layers(lm))
    prefix = "reversible_stack/reversible_block_{0}/attention_branch_{0}/"
    assert adapted == sorted(
        [prefix.format(0) + f"attention_0/{name}"
         for name in ("query_key", "value")]
        + [prefix.format(1) + f"attention_1/{name}"
           for name in ("query", "value")])
    trainable = {v.path for v in lm.trainable_variables}
    assert trainable == {f"{path}/lora_kernel_{ab}"
                         for path in adapted for ab in "ab"}
    for variable in lm.weights:
        value = to_numpy(variable)
        if variable.path in trainable:
            # Both factors move (the second starts at zero).
            assert np.abs(value - before[variable.path]).max() > 1e-4
        else:
            np.testing.assert_array_equal(value, before[variable.path])


def test_merged_kernels_give_the_adapted_model_logits(trained_with_lora):
    lm, _ = trained_with_lora
    merged = language_model()
    values = {v.path: to_numpy(v) for v in lm.weights}
    deltas = {layer.path + "/kernel": layer.lora_alpha / layer.lora_rank
              * np.matmul(to_numpy(layer.lora_kernel_a),
                          to_numpy(layer.lora_kernel_b))
              for layer in adapted_layers(lm)}
    assert len(deltas) == 4
    for variable in merged.weights:
        variable.assign(values[variable.path]
                        + deltas.get(variable.path, 0.0))
    assert_close(merged(INPUTS), lm(INPUTS), atol=1e-5)


def test_lora_weights_save_and_load(trained_with_lora, tmp_path):
    lm, _ = trained_with_lora
    path = str(tmp_path / "adapters.lora.h5")
    lm.backbone.save_lora_weights(path)
    fresh = language_model()
    fresh.backbone.set_weights(
        [w for w, v in zip(lm.backbone.get_weights(), lm.backbone.weights)
         if "lora_kernel" not in v.path])
    fresh.backbone.load_lora_weights(path)
    assert_close(fresh(INPUTS), lm(INPUTS), atol=0)


def reversible_lsh_stack():
    keras.utils.set_random_seed(2)
    stack = ReversibleStack([ReversibleBlock(
        PreNormBranch(LSHSelfAttention(
            2, 4, chunk_length=8, num_hashes=2, num_buckets=4, causal=True,
            parallel_heads=1, dropout=0.2, seed=i)),
        PreNormBranch(ChunkedFeedForward(24, chunk_length=8)))
        for i in range(1)], seed=5)
    stack.build((2, 29, 48))
    return stack


def test_reversible_adapter_gradients_equal_plain_autodiff():
    """Adapter gradients through the reversible stack's recomputing
    backward (with LSH head groups inside) equal plain
    autodiff through the same blocks (residuals stored, each projection
    applied by `ops` with kernel + alpha/rank * A @ B)."""
    from tests.test_reversible import plain_residual

    stack = reversible_lsh_stack()
    stack.trainable = False
    rng = np.random.RandomState(3)
    adapters = []
    for layer in stack._flatten_layers():
        if layer.name in ("query_key", "value"):
            layer.trainable = True
            layer.enable_lora(RANK)
            # The second factor starts at zero: give both factors values.
            for factor in (layer.lora_kernel_a, layer.lora_kernel_b):
                factor.assign(rng.randn(*factor.shape).astype("float32"))
                adapters.append(factor)
    assert len(adapters) == 4
    x = np.concatenate([padded_inputs()[0]] * 2, axis=-1)
    mask = padded_inputs()[1]
    weights = rng.randn(*x.shape).astype("float32")
    seed = seed_tensor(4)

    def loss(reversible):
        def fn(x):
            out = (stack(x, padding_mask=mask, training=True, seed=seed)
                   if reversible else plain_residual(stack, x, mask, seed))
            return ops.sum(out * weights)
        return fn

    actual = value_and_grads(loss(True), x, adapters)
    expected = value_and_grads(loss(False), x, adapters)
    assert_close(actual[0], expected[0], atol=1e-3)
    for a, b in zip(actual[2], expected[2]):
        assert np.abs(b).max() > 0
        assert_close(a, b, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("kind", ["lsh", "local"])
def test_adapter_gradients_of_head_groups_and_runs_equal_the_whole_path(
        kind):
    """The recomputed loops (LSH head groups, local runs of chunks) pass
    the adapters' gradients on through the effective kernels: the same as
    the layer computed at once, by plain autodiff."""
    if kind == "lsh":
        def make(**kwargs):
            return LSHSelfAttention(2, 4, chunk_length=8, num_hashes=2,
                                    num_buckets=4, seed=1, **kwargs)
        lean_kwargs = {"parallel_heads": 1}
    else:
        def make(**kwargs):
            return LocalSelfAttention(2, 4, chunk_length=8, **kwargs)
        lean_kwargs = {"segments": 2}
    x, mask = padded_inputs()
    rng = np.random.RandomState(5)
    lean, whole = make(**lean_kwargs), make()
    lean.build(x.shape)
    whole.build(x.shape)
    whole.set_weights(lean.get_weights())
    values, results = None, []
    for layer in (lean, whole):
        # The query (or query-key) and value projections, as enable_lora.
        for dense in (layer.projections[0], layer.value_dense):
            dense.enable_lora(RANK)
        adapters = [v for v in layer.trainable_variables if "lora" in v.path]
        values = values or [rng.randn(*v.shape).astype("float32")
                            for v in adapters]
        for variable, value in zip(adapters, values):
            variable.assign(value)
        results.append(value_and_grads(
            lambda x: ops.sum(layer(x, padding_mask=mask) ** 2), x,
            adapters))
    assert len(results[0][2]) == 4
    for a, b in zip(results[0][2], results[1][2]):
        assert np.abs(b).max() > 0
        assert_close(a, b, atol=1e-5 * max(1.0, np.abs(b).max()))


def test_int8_quantizes_every_projection_and_stays_close_to_float32(
        tmp_path):
    """Per-channel int8 rounds each weight by at most half a step, 1/254 of
    its channel's largest weight: uniform rounding errors of standard
    deviation 1 / (254 sqrt(3)) of that weight, about 0.2% of a
    projection's output for Glorot-uniform kernels (largest weight sqrt(3)
    standard deviations). Eleven projections, the token embedding and the
    task's Dense head (which also quantizes its inputs per token) add up
    to 1.4% of the largest logit here (measured); the bound is 3%.

    One LSH chunk spans the sequence: with several, any perturbation (int8
    rounding as much as half precision) may move a token near a bucket
    boundary to another bucket, which changes what it attends to rather
    than how precisely."""
    lm = language_model(lsh_chunk_length=32)
    expected = to_numpy(lm(INPUTS))
    lm.quantize("int8")
    projections = [dense for layer in lm.backbone.attention_layers
                   for dense in layer.projections] + [
        dense for block in lm.backbone.reversible_stack.blocks
        for dense in (block.g.layer.intermediate_dense,
                      block.g.layer.output_dense)]
    assert len(projections) == 11
    assert all(d.quantization_mode == "int8"
               for d in projections + [lm.lm_head])
    actual = to_numpy(lm(INPUTS))
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max() / scale
    assert 0 < error < 0.03

    path = str(tmp_path / "int8.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert all(dense.quantization_mode == "int8"
               for layer in loaded.backbone.attention_layers
               for dense in layer.projections + [loaded.lm_head])
    assert_close(loaded(INPUTS), actual, atol=0)

    # LoRA on the int8 projections (QLoRA): the adapters start at zero and
    # take gradients.
    loaded.backbone.enable_lora(RANK)
    assert_close(loaded(INPUTS), actual, atol=0)
    adapters = loaded.backbone.trainable_variables
    assert len(adapters) == 8
    _, _, grads = value_and_grads(
        lambda x: ops.sum(loaded(INPUTS) ** 2) + ops.sum(x),
        np.zeros(1, "float32"), adapters)
    assert all(np.abs(g).max() > 0 for g in grads[1::2])

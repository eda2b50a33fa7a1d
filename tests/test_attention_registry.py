"""Attention types as plug-ins: the contract, the registry, a user's own type
inside a backbone, and the backbone's dtype reaching every layer."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_reformer.layers import AttentionLayer
from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import attention_type
from keras_reformer.layers import attention_type_names
from keras_reformer.layers import register_attention
from keras_reformer.layers.masks import padding_mask_or_ones
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM
from tests.helpers import assert_close
from tests.helpers import to_numpy


@register_attention("test_causal_mean")
@keras.saving.register_keras_serializable(package="tests")
class CausalMeanAttention(AttentionLayer):
    """A user's attention type: each real token's output is a projection of
    the mean of the real tokens up to it (uniform causal attention), scaled
    by `scale` (an option from `attention_options`)."""

    def __init__(self, num_heads, head_dim, causal=True, dropout=0.0,
                 seed=None, scale=1.0, **kwargs):
        super().__init__(causal=causal, **kwargs)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dropout, self.seed, self.scale = dropout, seed, scale

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], input_shape[-1]),
            initializer="glorot_uniform")

    def call(self, inputs, padding_mask=None, training=None, seed=None,
             mask=None):
        valid = ops.cast(padding_mask_or_ones(padding_mask, inputs, mask),
                         inputs.dtype)[..., None]
        inputs = ops.where(valid > 0, inputs, 0.0)
        means = ops.cumsum(inputs, axis=1) / ops.maximum(
            ops.cumsum(valid, axis=1), 1.0)
        return self.scale * ops.matmul(means, self.kernel) * valid

    def get_config(self):
        config = super().get_config()
        config.update({"num_heads": self.num_heads, "head_dim": self.head_dim,
                       "dropout": self.dropout, "seed": self.seed,
                       "scale": self.scale})
        return config


def mean_backbone(**kwargs):
    return ReformerBackbone(
        vocabulary_size=20, hidden_dim=8, num_heads=2, head_dim=4,
        intermediate_dim=16, attention_types=["test_causal_mean", "local"],
        attention_options={"test_causal_mean": {"scale": 0.5},
                           "local": {"chunk_length": 4}},
        axial_shape=(4, 4), seed=1, **kwargs)


def test_the_built_in_types_are_registered():
    assert {"lsh", "local", "full", "full_shared_qk", "linformer"} <= set(
        attention_type_names())
    assert attention_type("full_shared_qk") == (FullSelfAttention,
                                                {"shared_qk": True})


def test_a_registered_type_computes_what_it_says_inside_a_backbone():
    backbone = mean_backbone()
    layer = backbone.attention_layers[0]
    assert isinstance(layer, CausalMeanAttention) and layer.scale == 0.5
    x = np.random.RandomState(0).randn(2, 6, 8).astype("float32")
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    kernel = to_numpy(layer.kernel)
    expected = np.zeros_like(x)
    for b in range(2):
        for t in range(6):
            if mask[b, t]:
                real = x[b, :t + 1][mask[b, :t + 1] == 1]
                expected[b, t] = 0.5 * real.mean(0) @ kernel
    poisoned = np.where(mask[..., None] == 1, x, np.nan)
    assert_close(layer(poisoned, padding_mask=mask), expected, atol=1e-5)


def test_a_registered_type_trains_and_round_trips(tmp_path):
    lm = ReformerCausalLM(mean_backbone())
    ids = np.random.RandomState(0).randint(1, 20, (8, 13)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((8, 12), "int32")}
    lm.compile(optimizer=keras.optimizers.Adam(0.05),
               loss=keras.losses.SparseCategoricalCrossentropy(
                   from_logits=True))
    kernel = lm.backbone.attention_layers[0].kernel
    before = to_numpy(kernel).copy()
    losses = lm.fit(x, ids[:, 1:], epochs=8, batch_size=8,
                    verbose=0).history["loss"]
    assert losses[-1] < losses[0] - 0.1
    assert np.abs(to_numpy(kernel) - before).max() > 1e-3
    path = str(tmp_path / "mean.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.backbone.get_config()["attention_options"] == {
        "test_causal_mean": {"scale": 0.5}, "local": {"chunk_length": 4}}
    assert_close(loaded.predict(x, verbose=0), lm.predict(x, verbose=0),
                 atol=0)


def test_a_type_without_cached_decoding_says_so():
    lm = ReformerCausalLM(mean_backbone())
    with pytest.raises(NotImplementedError,
                       match="CausalMeanAttention does not decode with a "
                             "cache: it implements no prefill"):
        lm.backbone.call_with_cache(np.ones((1, 8), "int32"), None, 2)


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError,
                       match="'lsh' is already registered for "
                             "LSHSelfAttention"):
        register_attention("lsh")(CausalMeanAttention)
    with pytest.raises(TypeError, match="subclass of .*AttentionLayer"):
        register_attention("dense")(keras.layers.Dense)
    with pytest.raises(ValueError, match="non-empty string"):
        register_attention("")
    with pytest.raises(ValueError, match="Unknown attention type 'lhs' in "
                                         "attention_types; registered"):
        mean_backbone().__class__(
            vocabulary_size=20, hidden_dim=8, attention_types=["lhs"])


def test_the_dtype_policy_reaches_every_layer_and_the_config():
    backbone = mean_backbone(dtype="mixed_bfloat16")
    policies = {layer.name: layer.dtype_policy.name
                for layer in backbone._flatten_layers()
                if not isinstance(layer, keras.layers.InputLayer)}
    assert len(policies) >= 19  # every block, branch, norm and projection
    assert set(policies.values()) == {"mixed_bfloat16"}, policies
    ids = np.random.RandomState(0).randint(1, 20, (2, 12)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    features = backbone(x)
    assert keras.backend.standardize_dtype(features.dtype) == "bfloat16"
    reference = mean_backbone()
    reference.set_weights(backbone.get_weights())
    # bfloat16 keeps 8 bits of mantissa: features of size ~1 agree to ~2%.
    assert_close(ops.cast(features, "float32"), reference(x), atol=0.1)
    loaded = ReformerBackbone.from_config(backbone.get_config())
    assert loaded.dtype_policy.name == "mixed_bfloat16"
    assert loaded.attention_layers[1].dtype_policy.name == "mixed_bfloat16"

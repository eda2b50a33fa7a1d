"""Linformer self-attention: keys and values projected along the sequence."""

import keras
from keras import ops

from keras_reformer.layers.attention_registry import register_attention
from keras_reformer.layers.chunked_attention import attend
from keras_reformer.layers.self_attention_base import SelfAttentionBase
from keras_reformer.layers.seeds import draw_seed
from keras_reformer.layers.validation import check_positive_int

SHARING_MODES = ("none", "headwise", "key_value", "layerwise")


@register_attention("linformer")
@keras.saving.register_keras_serializable(package="keras_reformer")
class LinformerSelfAttention(SelfAttentionBase):
    """Low-rank self-attention (Wang et al. 2020), linear in the length.

    Keys and values are projected along the sequence axis to
    `projected_length` rows by learned matrices `E` and `F` of shape
    `(projected_length, max_length)`:
    `head_i = softmax(Q_i (E K_i)^T / sqrt(d)) F V_i`. Inputs shorter than
    `max_length` use the first columns of `E` and `F`; padded keys and
    values are zeroed before projecting, so padding changes nothing. The
    projection mixes every position, so there is no causal mode.

    Sharing (the paper's modes): "none", one `E` and `F` per head;
    "headwise", one `E` and one `F` for all heads; "key_value", one matrix
    for keys and values of all heads; "layerwise", that one matrix shared by
    several layers: pass the same `LinformerProjection` as
    `shared_projection` to each (`ReformerBackbone` does this with
    `attention_options={"linformer": {"sharing": "layerwise"}}`; without
    one the layer owns its matrix).

    Args:
        num_heads: int, number of attention heads.
        head_dim: int, size of each head.
        max_length: int, the longest input.
        projected_length: int, `k`, rows of the projections.
        sharing: one of "none", "headwise", "key_value", "layerwise".
        shared_projection: with "layerwise", a `LinformerProjection` shared
            with other layers (not part of the config: the model that shares
            it rebuilds the sharing).
        causal: must be False (accepted so that every attention layer takes
            the same arguments; True raises).
        dropout: float, dropout on attention weights while training.
        seed: int or None, seeds dropout.

    Example:
    >>> layer = LinformerSelfAttention(num_heads=2, head_dim=16,
    ...                                max_length=128, projected_length=32)
    >>> layer(keras.random.normal((1, 100, 24))).shape
    (1, 100, 24)
    """

    supports_causal = False

    def __init__(self, num_heads, head_dim, max_length, projected_length,
                 sharing="none", causal=False, dropout=0.0, seed=None,
                 shared_projection=None,
                 kernel_initializer="glorot_uniform",
                 projection_initializer="glorot_uniform", **kwargs):
        super().__init__(num_heads, head_dim, shared_qk=False, causal=causal,
                         dropout=dropout,
                         kernel_initializer=kernel_initializer, seed=seed,
                         **kwargs)
        check_positive_int("max_length", max_length)
        check_positive_int("projected_length", projected_length)
        if sharing not in SHARING_MODES:
            raise ValueError(
                f"sharing must be one of {SHARING_MODES}; received "
                f"sharing={sharing!r}.")
        if causal:
            raise ValueError(
                "LinformerSelfAttention cannot be causal: its projection "
                "mixes every position, the future included; received "
                "causal=True. Use 'lsh', 'local' or 'full' attention for a "
                "causal model.")
        if shared_projection is not None and sharing != "layerwise":
            raise ValueError(
                "shared_projection is only used with sharing='layerwise'; "
                f"received sharing={sharing!r}.")
        if shared_projection is not None and (
                shared_projection.projected_length,
                shared_projection.max_length) != (projected_length, max_length):
            raise ValueError(
                "shared_projection maps max_length="
                f"{shared_projection.max_length} to projected_length="
                f"{shared_projection.projected_length}; this layer has "
                f"max_length={max_length}, projected_length="
                f"{projected_length}.")
        self.max_length = max_length
        self.projected_length = projected_length
        self.sharing = sharing
        self.projection_initializer = keras.initializers.get(
            projection_initializer)
        # With sharing "key_value" or "layerwise" keys and values use
        # key_projection (shared with other layers when given).
        self.key_projection = shared_projection
        self.value_projection = None

    @classmethod
    def from_backbone(cls, *, max_length, shared, projected_length=None,
                      sharing="none", **kwargs):
        """`AttentionLayer.from_backbone`: `max_length` is the backbone's,
        `projected_length=None` is `min(256, max_length)`, and with
        `sharing="layerwise"` every such layer of the backbone shares one
        projection."""
        if projected_length is None:
            projected_length = min(256, max_length)
        if sharing == "layerwise" and "linformer_projection" not in shared:
            check_positive_int("projected_length", projected_length)
            shared["linformer_projection"] = LinformerProjection(
                projected_length, max_length, dtype=kwargs.get("dtype"),
                name="linformer_projection")
        return cls(max_length=max_length, projected_length=projected_length,
                   sharing=sharing,
                   shared_projection=shared.get("linformer_projection"),
                   **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        self._check_length(input_shape[1])
        heads = self.num_heads if self.sharing == "none" else None
        if self.key_projection is None:
            self.key_projection = LinformerProjection(
                self.projected_length, self.max_length, heads,
                self.projection_initializer, dtype=self.dtype_policy,
                name="key_projection")
        if self.sharing in ("none", "headwise"):
            self.value_projection = LinformerProjection(
                self.projected_length, self.max_length, heads,
                self.projection_initializer, dtype=self.dtype_policy,
                name="value_projection")
        for projection in (self.key_projection, self.value_projection):
            if projection is not None and not projection.built:
                projection.build(None)

    def _check_length(self, length):
        if isinstance(length, int) and length > self.max_length:
            raise ValueError(
                f"LinformerSelfAttention got a sequence of length {length}, "
                f"longer than max_length={self.max_length}.")

    def call(self, inputs, padding_mask=None, training=None, seed=None,
             mask=None):
        length = ops.shape(inputs)[1]
        self._check_length(length)
        # Padded inputs are zeros, and so are their keys and values.
        inputs, valid = self.real_inputs(inputs, padding_mask, mask)
        query_kernel, key_kernel, value_kernel, output_kernel = self.kernels(
            inputs.dtype)
        queries = self.project(inputs, query_kernel)
        keys = self.project(inputs, key_kernel)
        values = self.project(inputs, value_kernel)
        keys = self.key_projection(keys)
        values = (self.value_projection or self.key_projection)(values)
        if training:
            seed = draw_seed(seed, self.seed_generator)
        outputs, _ = attend(queries, keys / (self.head_dim**0.5), values,
                            lambda scores: scores,
                            self.dropout_fn(training, seed))
        return self.merge_heads(outputs, valid, output_kernel)

    def get_config(self):
        config = super().get_config()
        config.update({
            "max_length": self.max_length,
            "projected_length": self.projected_length,
            "sharing": self.sharing,
            "projection_initializer": keras.initializers.serialize(
                self.projection_initializer),
        })
        return config


@keras.saving.register_keras_serializable(package="keras_reformer")
class LinformerProjection(keras.layers.Layer):
    """Projects `(batch, heads, length, d)` along the length to `k` rows.

    Holds `E` of shape `(projected_length, max_length)` (per head when
    `num_heads` is given); inputs shorter than `max_length` use its first
    columns.

    Args:
        projected_length: int, `k`.
        max_length: int, the longest input.
        num_heads: None (one matrix for all heads) or int.
        initializer: initializer of `E`.

    Example:
    >>> projection = LinformerProjection(8, 32)
    >>> projection(keras.ops.ones((1, 2, 20, 4))).shape
    (1, 2, 8, 4)
    """

    def __init__(self, projected_length, max_length, num_heads=None,
                 initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.projected_length = projected_length
        self.max_length = max_length
        self.num_heads = num_heads
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        shape = (self.projected_length, self.max_length)
        if self.num_heads is not None:
            shape = (self.num_heads,) + shape
        self.kernel = self.add_weight(name="kernel", shape=shape,
                                      initializer=self.initializer)

    def call(self, inputs):
        length = ops.shape(inputs)[2]
        kernel = ops.cast(self.kernel[..., :length], inputs.dtype)
        if self.num_heads is None:
            return ops.einsum("kl,bhld->bhkd", kernel, inputs)
        return ops.einsum("hkl,bhld->bhkd", kernel, inputs)

    def compute_output_shape(self, input_shape):
        return input_shape[:2] + (self.projected_length,) + input_shape[3:]

    def get_config(self):
        config = super().get_config()
        config.update({
            "projected_length": self.projected_length,
            "max_length": self.max_length,
            "num_heads": self.num_heads,
            "initializer": keras.initializers.serialize(self.initializer),
        })
        return config

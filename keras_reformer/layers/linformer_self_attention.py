"""Linformer self-attention: keys and values projected along the sequence."""

import keras
from keras import ops

from keras_reformer.layers.chunked_attention import attend
from keras_reformer.layers.self_attention_base import SelfAttentionBase
from keras_reformer.layers.self_attention_base import padding_mask_or_ones
from keras_reformer.layers.seeds import draw_seed
from keras_reformer.layers.validation import check_positive_int

SHARING_MODES = ("none", "headwise", "key_value")


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
    for keys and values of all heads.

    Args:
        num_heads: int, number of attention heads.
        head_dim: int, size of each head.
        max_length: int, the longest input.
        projected_length: int, `k`, rows of the projections.
        sharing: one of "none", "headwise", "key_value".
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

    def __init__(self, num_heads, head_dim, max_length, projected_length,
                 sharing="none", causal=False, dropout=0.0, seed=None,
                 kernel_initializer="glorot_uniform",
                 projection_initializer="glorot_uniform", **kwargs):
        super().__init__(num_heads, head_dim, shared_qk=False, dropout=dropout,
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
        self.max_length = max_length
        self.projected_length = projected_length
        self.sharing = sharing
        self.causal = causal
        self.projection_initializer = keras.initializers.get(
            projection_initializer)

    def build(self, input_shape):
        super().build(input_shape)
        self._check_length(input_shape[1])
        shape = (self.projected_length, self.max_length)
        if self.sharing == "none":
            shape = (self.num_heads,) + shape
        self.key_projection = self.add_weight(
            name="key_projection", shape=shape,
            initializer=self.projection_initializer)
        if self.sharing != "key_value":
            self.value_projection = self.add_weight(
                name="value_projection", shape=shape,
                initializer=self.projection_initializer)

    def _check_length(self, length):
        if isinstance(length, int) and length > self.max_length:
            raise ValueError(
                f"LinformerSelfAttention got a sequence of length {length}, "
                f"longer than max_length={self.max_length}.")

    def _project(self, x, projection, length):
        """`(batch, heads, length, d)` -> `(batch, heads, k, d)`."""
        projection = ops.cast(projection[..., :length], x.dtype)
        if self.sharing == "none":
            return ops.einsum("hkl,bhld->bhkd", projection, x)
        return ops.einsum("kl,bhld->bhkd", projection, x)

    def call(self, inputs, padding_mask=None, training=None, seed=None):
        length = ops.shape(inputs)[1]
        self._check_length(length)
        valid = ops.cast(padding_mask_or_ones(padding_mask, inputs),
                         inputs.dtype)[:, None, :, None]
        queries = self.project(inputs, self.query_kernel)
        keys = self.project(inputs, self.key_kernel) * valid
        values = self.project(inputs, self.value_kernel) * valid
        keys = self._project(keys, self.key_projection, length)
        values = self._project(
            values, self.key_projection if self.sharing == "key_value"
            else self.value_projection, length)
        if training:
            seed = draw_seed(seed, self.seed_generator)
        outputs, _ = attend(queries, keys / (self.head_dim**0.5), values,
                            lambda scores: scores,
                            self.dropout_fn(training, seed))
        return self.merge_heads(outputs)

    def get_config(self):
        config = super().get_config()
        config.update({
            "max_length": self.max_length,
            "projected_length": self.projected_length,
            "sharing": self.sharing,
            "causal": self.causal,
            "projection_initializer": keras.initializers.serialize(
                self.projection_initializer),
        })
        return config

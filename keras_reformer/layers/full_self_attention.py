"""Ordinary softmax self-attention over the whole sequence."""

import keras
from keras import ops

from keras_reformer.layers.attention_registry import register_attention
from keras_reformer.layers.chunked_attention import attend
from keras_reformer.layers.chunked_attention import masked_scores
from keras_reformer.layers.key_value_attention import KeyValueAttention


@register_attention("full_shared_qk", shared_qk=True)
@register_attention("full")
@keras.saving.register_keras_serializable(package="keras_reformer")
class FullSelfAttention(KeyValueAttention):
    """Exact multi-head self-attention, quadratic in the length.

    The reference the efficient attentions are compared with. With
    `shared_qk=True` it computes what `LSHSelfAttention` approximates: one
    projection for queries and keys, keys divided by their norm, and a token
    attending to itself only when nothing else is allowed. Otherwise it is
    standard scaled dot-product attention.

    Args:
        num_heads: int, number of attention heads.
        head_dim: int, size of each head.
        causal: bool, a token never attends to later tokens.
        shared_qk: bool, share the query and key projection.
        dropout: float, dropout on attention weights while training.
        seed: int or None, seeds dropout.

    Example:
    >>> layer = FullSelfAttention(num_heads=2, head_dim=16, causal=True)
    >>> layer(keras.random.normal((1, 10, 24))).shape
    (1, 10, 24)
    """

    def __init__(self, num_heads, head_dim, causal=False, shared_qk=False,
                 dropout=0.0, seed=None, kernel_initializer="glorot_uniform",
                 **kwargs):
        super().__init__(num_heads, head_dim, shared_qk=shared_qk,
                         causal=causal, dropout=dropout,
                         kernel_initializer=kernel_initializer, seed=seed,
                         **kwargs)

    def _decode_positions(self, index, capacity):
        """Every cached position (later ones are masked)."""
        return ops.arange(capacity, dtype="int32")

    def _attend(self, inputs, valid, seed):
        """Outputs `(batch, length, hidden)` and the inputs attended."""
        kernels = self.kernels(inputs.dtype)
        projections = self.project_all(inputs, kernels)
        positions = ops.arange(ops.shape(inputs)[1], dtype="int32")

        def mask_fn(scores):
            return masked_scores(scores, positions, positions,
                                 valid[:, None, :], self.causal,
                                 mask_self=self.shared_qk)

        outputs, _ = attend(*projections, mask_fn,
                            self.dropout_fn(seed is not None, seed))
        return self.merge_heads(outputs, valid, kernels[-1]), inputs

    def get_config(self):
        config = super().get_config()
        config.update({"shared_qk": self.shared_qk})
        return config

"""Ordinary softmax self-attention over the whole sequence."""

import keras
from keras import ops

from keras_reformer.layers.chunked_attention import attend
from keras_reformer.layers.chunked_attention import masked_scores
from keras_reformer.layers.self_attention_base import SelfAttentionBase
from keras_reformer.layers.self_attention_base import padding_mask_or_ones
from keras_reformer.layers.self_attention_base import shared_qk_keys
from keras_reformer.layers.seeds import draw_seed


@keras.saving.register_keras_serializable(package="keras_reformer")
class FullSelfAttention(SelfAttentionBase):
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
                         dropout=dropout, kernel_initializer=kernel_initializer,
                         seed=seed, **kwargs)
        self.causal = causal

    def call(self, inputs, padding_mask=None, training=None, seed=None):
        batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        if self.shared_qk:
            queries = self.project(inputs, self.query_key_kernel)
            keys = shared_qk_keys(queries)
        else:
            queries = self.project(inputs, self.query_kernel)
            keys = self.project(inputs, self.key_kernel) / (self.head_dim**0.5)
        values = self.project(inputs, self.value_kernel)
        positions = ops.arange(length, dtype="int32")
        valid = padding_mask_or_ones(padding_mask, inputs)
        key_valid = valid[:, None, :]

        def mask_fn(scores):
            return masked_scores(scores, positions, positions, key_valid,
                                 self.causal, mask_self=self.shared_qk)

        if training:
            seed = draw_seed(seed, self.seed_generator)
        outputs, _ = attend(queries, keys, values, mask_fn,
                            self.dropout_fn(training, seed))
        return self.merge_heads(outputs, valid)

    def get_config(self):
        config = super().get_config()
        config.update({"causal": self.causal, "shared_qk": self.shared_qk})
        return config

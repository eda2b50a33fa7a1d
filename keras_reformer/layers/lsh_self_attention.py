"""LSH self-attention (Reformer): attend only within hash buckets."""

import keras
from keras import ops

from keras_reformer.layers import hashing
from keras_reformer.layers.chunked_attention import chunked_attention
from keras_reformer.layers.self_attention_base import SelfAttentionBase
from keras_reformer.layers.self_attention_base import pad_to_multiple
from keras_reformer.layers.self_attention_base import padding_mask_or_ones
from keras_reformer.layers.self_attention_base import shared_qk_keys
from keras_reformer.layers.seeds import draw_seed
from keras_reformer.layers.seeds import fold_seed
from keras_reformer.layers.seeds import random_normal
from keras_reformer.layers.validation import check_chunk_window
from keras_reformer.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_reformer")
class LSHSelfAttention(SelfAttentionBase):
    """Locality-sensitive-hashing self-attention with shared queries and keys.

    Tokens are hashed into buckets by random rotations of their shared
    query/key vectors, sorted by (hash round, bucket, position), cut into
    chunks of `chunk_length`, and each chunk attends to itself and its
    `num_chunks_before` / `num_chunks_after` neighbours. The `num_hashes`
    rounds are combined with weights from their logsumexps. Keys are the
    query/key vectors divided by their norm; queries are unscaled (the trax
    and Hugging Face convention). A token attends to itself only when no
    other key is allowed. Inputs of any length are padded internally to a
    multiple of `chunk_length`.

    Hashing is random while training (fresh rotations each call, drawn from
    `seed` or the layer's seed generator) and fixed at inference (the
    non-trainable weight `rotations`, which may be set to port weights).

    Args:
        num_heads: int, number of attention heads.
        head_dim: int, size of each head.
        chunk_length: int, tokens per chunk of the sorted sequence.
        num_hashes: int, hash rounds.
        num_buckets: None (about `2 * length / chunk_length`, from the input
            length known at build time), an even int, or a pair of even ints
            (factorised buckets).
        causal: bool, a token never attends to later tokens.
        num_chunks_before: int, preceding chunks each chunk attends to.
        num_chunks_after: int, following chunks each chunk attends to.
        dropout: float, dropout on attention weights while training.
        seed: int or None, seeds rotations and dropout.

    Example:
    >>> layer = LSHSelfAttention(num_heads=2, head_dim=16, chunk_length=8,
    ...                          num_buckets=4)
    >>> layer(keras.random.normal((1, 32, 24))).shape
    (1, 32, 24)
    """

    def __init__(self, num_heads, head_dim, chunk_length=64, num_hashes=4,
                 num_buckets=None, causal=False, num_chunks_before=1,
                 num_chunks_after=0, dropout=0.0, seed=None,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(num_heads, head_dim, shared_qk=True, dropout=dropout,
                         kernel_initializer=kernel_initializer, seed=seed,
                         **kwargs)
        check_positive_int("chunk_length", chunk_length)
        check_positive_int("num_hashes", num_hashes)
        check_chunk_window(causal, num_chunks_before, num_chunks_after)
        num_buckets = _check_num_buckets(num_buckets)
        self.chunk_length = chunk_length
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        self.causal = causal
        self.num_chunks_before = num_chunks_before
        self.num_chunks_after = num_chunks_after

    def build(self, input_shape):
        super().build(input_shape)
        self.resolved_num_buckets = self.num_buckets
        if self.resolved_num_buckets is None:
            length = input_shape[1]
            if length is None:
                raise ValueError(
                    "LSHSelfAttention with num_buckets=None takes its bucket "
                    "count from the sequence length, which is unknown at "
                    f"build time (input shape {input_shape}). Pass "
                    "num_buckets (for example "
                    "keras_reformer.layers.hashing.auto_num_buckets("
                    "max_length, chunk_length))."
                )
            padded = -(-length // self.chunk_length) * self.chunk_length
            self.resolved_num_buckets = hashing.auto_num_buckets(
                padded, self.chunk_length)
        self.rotations = self.add_weight(
            name="rotations",
            shape=self._rotations_shape(),
            initializer=keras.initializers.RandomNormal(seed=self.seed),
            trainable=False,
        )

    def _rotations_shape(self):
        return (self.num_heads, self.head_dim, self.num_hashes,
                hashing.rotation_columns(self.resolved_num_buckets))

    def call(self, inputs, padding_mask=None, training=None, seed=None):
        length = ops.shape(inputs)[1]
        valid = padding_mask_or_ones(padding_mask, inputs)
        inputs, valid = pad_to_multiple(inputs, valid, self.chunk_length)
        query_key = self.project(inputs, self.query_key_kernel)
        values = self.project(inputs, self.value_kernel)
        if training:
            seed = draw_seed(seed, self.seed_generator)
            rotations = random_normal(
                self._rotations_shape(), fold_seed(seed, 0))
        else:
            rotations = self.rotations
        outputs = self._attend_by_buckets(
            query_key, values, valid, rotations,
            self.dropout_fn(training, fold_seed(seed, 1) if training else None),
        )
        return self.merge_heads(outputs, valid)[:, :length]

    def _attend_by_buckets(self, query_key, values, valid, rotations,
                           dropout_fn):
        batch, heads, length, head_dim = ops.shape(query_key)
        num_hashes = self.num_hashes
        # Bucket ids per round; padding gets a bucket of its own (the last).
        buckets = hashing.hash_vectors(
            query_key, rotations, self.resolved_num_buckets)
        pad_bucket = hashing.total_buckets(self.resolved_num_buckets)
        valid = ops.broadcast_to(valid[:, None, :], (batch, heads, length))
        buckets = ops.where(valid[:, :, None, :], buckets, pad_bucket)
        # One sort per round by the unique key (bucket, position).
        positions = ops.arange(length, dtype="int32")
        sort_keys = buckets * length + positions
        sorted_positions = ops.cast(ops.argsort(sort_keys, axis=-1), "int32")
        flat_positions = ops.reshape(
            sorted_positions, (batch, heads, num_hashes * length))

        def gather(x):
            return ops.take_along_axis(x, flat_positions[..., None], axis=2)

        sorted_query_key = gather(query_key)
        outputs, logsumexp = chunked_attention(
            sorted_query_key,
            shared_qk_keys(sorted_query_key),
            gather(values),
            flat_positions,
            ops.take_along_axis(valid, flat_positions, axis=2),
            self.chunk_length,
            self.num_chunks_before,
            self.num_chunks_after,
            self.causal,
            mask_self=True,
            dropout_fn=dropout_fn,
        )
        # Back to the original order, then combine the rounds.
        undo = ops.argsort(sorted_positions, axis=-1)
        outputs = ops.take_along_axis(
            ops.reshape(outputs, (batch, heads, num_hashes, length, head_dim)),
            undo[..., None], axis=3,
        )
        if num_hashes == 1:
            return outputs[:, :, 0]
        logsumexp = ops.take_along_axis(
            ops.reshape(logsumexp, (batch, heads, num_hashes, length)),
            undo, axis=3,
        )
        # softmax subtracts the maximum first: exact even when every round's
        # logsumexp is near the -1e5 self-mask score.
        round_weights = ops.softmax(logsumexp, axis=2)
        return ops.sum(
            outputs * ops.cast(round_weights, outputs.dtype)[..., None], axis=2)

    def get_config(self):
        config = super().get_config()
        config.update({
            "chunk_length": self.chunk_length,
            "num_hashes": self.num_hashes,
            "num_buckets": self.num_buckets,
            "causal": self.causal,
            "num_chunks_before": self.num_chunks_before,
            "num_chunks_after": self.num_chunks_after,
        })
        return config


def _check_num_buckets(num_buckets):
    if num_buckets is None:
        return None
    factors = num_buckets if isinstance(num_buckets, (list, tuple)) else (
        num_buckets,)
    valid = 1 <= len(factors) <= 2 and all(
        isinstance(f, int) and not isinstance(f, bool) and f >= 2 and f % 2 == 0
        for f in factors)
    if not valid:
        raise ValueError(
            "num_buckets must be None, an even integer >= 2, or a pair of "
            f"such integers (factorised buckets); received "
            f"num_buckets={num_buckets!r}."
        )
    return num_buckets if isinstance(num_buckets, int) else tuple(factors)

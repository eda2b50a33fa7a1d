"""The Reformer backbone: token ids to contextual features (functional)."""

import keras

from keras_reformer.layers import hashing
from keras_reformer.layers.axial_position_embedding import AxialPositionEmbedding
from keras_reformer.layers.chunked_feed_forward import ChunkedFeedForward
from keras_reformer.layers.full_self_attention import FullSelfAttention
from keras_reformer.layers.layer_norm import LeanLayerNormalization
from keras_reformer.layers.linformer_self_attention import SHARING_MODES
from keras_reformer.layers.linformer_self_attention import LinformerProjection
from keras_reformer.layers.linformer_self_attention import LinformerSelfAttention
from keras_reformer.layers.local_self_attention import LocalSelfAttention
from keras_reformer.layers.lsh_self_attention import LSHSelfAttention
from keras_reformer.layers.pre_norm_branch import PreNormBranch
from keras_reformer.layers.reversible import ReversibleBlock
from keras_reformer.layers.reversible import ReversibleStack
from keras_reformer.layers.token_id_check import TokenIdCheck
from keras_reformer.layers.validation import check_positive_int
from keras_reformer.layers.validation import check_positive_int_pair
from keras_reformer.models.token_inputs import TokenInputsMixin

ATTENTION_TYPES = ("lsh", "local", "full", "full_shared_qk", "linformer")


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerBackbone(TokenInputsMixin, keras.Model):
    """Reformer encoder/decoder stack as a functional Keras model.

    token ids -> embedding + axial positions -> `[x, x]` -> reversible stack
    of (norm + attention, norm + chunked feed-forward) blocks -> layer norm
    over the concatenated halves. Inputs are a dict of `token_ids` and
    `padding_mask` (1 for real tokens), both `(batch, length)` int32 with
    any batch and length up to `prod(axial_shape)`; the output is
    `(batch, length, 2 * hidden_dim)`.

    Args:
        vocabulary_size: int, number of token ids.
        hidden_dim: int, model width (`sum(axial_dims)`).
        num_heads: int, attention heads per layer.
        head_dim: int, size of each head.
        intermediate_dim: int, feed-forward width.
        attention_types: list of "lsh", "local", "full", "full_shared_qk"
            or "linformer", one per layer (Linformer only when not causal).
            "full_shared_qk" is exact attention with LSH's shared query/key
            projection and self mask (the same weights as "lsh": a model
            trained with one can be evaluated with the other).
        axial_shape: pair, axial position grid; its product is the maximum
            length.
        axial_dims: pair summing to `hidden_dim`; default half and half.
        causal: bool, decoder (True) or bidirectional encoder (False).
        chunk_length: int, LSH chunk length.
        local_chunk_length: int, local attention chunk length; None: the
            same as `chunk_length`.
        num_hashes: int, LSH hash rounds.
        num_buckets: LSH buckets; None: the default for the maximum length.
        lsh_parallel_heads: None, or LSH heads hashed and attended at a
            time, recomputed in the backward pass (see `LSHSelfAttention`'s
            `parallel_heads`: less memory for very long sequences).
        lsh_segments: None, or the runs of chunks each LSH layer attends
            one after another, recomputed in the backward pass (see
            `LSHSelfAttention`'s `segments`).
        local_segments: None, or the runs of chunks each local attention
            layer attends one after another, recomputed in the backward
            pass (see `LocalSelfAttention`'s `segments`).
        num_chunks_before: int, chunks attended before (LSH and local).
        num_chunks_after: int, chunks attended after (0 when causal).
        projected_length: int, Linformer's `k`; None: `min(256, max length)`.
        linformer_sharing: Linformer projection sharing ("none", "headwise",
            "key_value", or "layerwise": one matrix for every layer).
        feed_forward_chunk_length: int, positions per feed-forward chunk.
        activation: feed-forward activation.
        dropout: float, dropout in attention, feed-forward and embeddings.
        layer_norm_epsilon: float.
        seed: int or None, seeds hashing, dropout and initialisers.

    Example:
    >>> backbone = ReformerBackbone(vocabulary_size=256, hidden_dim=32,
    ...     num_heads=2, head_dim=16, intermediate_dim=64,
    ...     attention_types=["lsh", "full"], axial_shape=(8, 16),
    ...     chunk_length=16)
    >>> ids = keras.ops.ones((2, 100), "int32")
    >>> backbone({"token_ids": ids, "padding_mask": ids}).shape
    (2, 100, 64)
    """

    def __init__(self, vocabulary_size, hidden_dim=256, num_heads=4,
                 head_dim=64, intermediate_dim=512,
                 attention_types=("lsh", "full"), axial_shape=(64, 64),
                 axial_dims=None, causal=True, chunk_length=64,
                 local_chunk_length=None, num_hashes=4, num_buckets=None,
                 lsh_parallel_heads=None, lsh_segments=None,
                 local_segments=None,
                 num_chunks_before=1, num_chunks_after=0,
                 projected_length=None, linformer_sharing="none",
                 feed_forward_chunk_length=64, activation="relu", dropout=0.0,
                 layer_norm_epsilon=1e-12, seed=None, **kwargs):
        check_positive_int("vocabulary_size", vocabulary_size)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int_pair("axial_shape", axial_shape)
        check_positive_int("chunk_length", chunk_length)
        if local_chunk_length is not None:
            check_positive_int("local_chunk_length", local_chunk_length)
        if not (isinstance(layer_norm_epsilon, (int, float))
                and layer_norm_epsilon >= 0):
            raise ValueError(
                f"layer_norm_epsilon must be a non-negative number; received "
                f"layer_norm_epsilon={layer_norm_epsilon!r}.")
        attention_types = list(attention_types)
        if not attention_types or any(
                t not in ATTENTION_TYPES for t in attention_types):
            raise ValueError(
                f"attention_types must be a non-empty list of "
                f"{ATTENTION_TYPES}; received attention_types="
                f"{attention_types!r}.")
        if linformer_sharing not in SHARING_MODES:
            raise ValueError(
                f"linformer_sharing must be one of {SHARING_MODES}; received "
                f"linformer_sharing={linformer_sharing!r}.")
        if axial_dims is None:
            if hidden_dim < 2:
                raise ValueError(
                    "hidden_dim must be at least 2: the axial position "
                    "embedding splits it over its two axes; received "
                    f"hidden_dim={hidden_dim}.")
            axial_dims = (hidden_dim // 2, hidden_dim - hidden_dim // 2)
        if sum(axial_dims) != hidden_dim:
            raise ValueError(
                f"axial_dims must sum to hidden_dim={hidden_dim}; received "
                f"axial_dims={tuple(axial_dims)!r}.")
        max_length = axial_shape[0] * axial_shape[1]
        resolved_buckets = num_buckets if num_buckets is not None else (
            hashing.auto_num_buckets(
                -(-max_length // chunk_length) * chunk_length, chunk_length))

        projected_length_or_default = (
            min(256, max_length) if projected_length is None
            else projected_length)
        shared_projection = None
        if linformer_sharing == "layerwise":
            shared_projection = LinformerProjection(
                projected_length_or_default, max_length,
                name="linformer_projection")

        def seed_for(i):
            return None if seed is None else seed + i

        def attention(i, kind):
            name = f"attention_{i}"
            common = {"causal": causal, "dropout": dropout,
                      "seed": seed_for(i), "name": name}
            if kind == "lsh":
                return LSHSelfAttention(
                    num_heads, head_dim, chunk_length=chunk_length,
                    num_hashes=num_hashes, num_buckets=resolved_buckets,
                    parallel_heads=lsh_parallel_heads,
                    segments=lsh_segments,
                    num_chunks_before=num_chunks_before,
                    num_chunks_after=num_chunks_after, **common)
            if kind == "local":
                return LocalSelfAttention(
                    num_heads, head_dim,
                    chunk_length=(chunk_length if local_chunk_length is None
                                  else local_chunk_length),
                    segments=local_segments,
                    num_chunks_before=num_chunks_before,
                    num_chunks_after=num_chunks_after, **common)
            if kind == "linformer":
                return LinformerSelfAttention(
                    num_heads, head_dim, max_length=max_length,
                    projected_length=projected_length_or_default,
                    sharing=linformer_sharing,
                    shared_projection=shared_projection, **common)
            return FullSelfAttention(
                num_heads, head_dim, shared_qk=kind == "full_shared_qk",
                **common)

        blocks = [
            ReversibleBlock(
                PreNormBranch(attention(i, kind), layer_norm_epsilon,
                              name=f"attention_branch_{i}"),
                PreNormBranch(ChunkedFeedForward(
                    intermediate_dim, feed_forward_chunk_length, activation,
                    dropout, seed=seed_for(i), name=f"feed_forward_{i}"),
                    layer_norm_epsilon, name=f"feed_forward_branch_{i}"),
                name=f"reversible_block_{i}")
            for i, kind in enumerate(attention_types)
        ]

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32",
                                   name="padding_mask")
        checked_ids, id_factor = TokenIdCheck(
            vocabulary_size, name="token_id_check")(token_ids)
        x = keras.layers.Embedding(vocabulary_size, hidden_dim,
                                   name="token_embedding")(checked_ids)
        x = keras.layers.Multiply(name="poison_bad_ids")([x, id_factor])
        x = keras.layers.Add(name="add_positions")([
            x, AxialPositionEmbedding(axial_shape, axial_dims,
                                      name="position_embedding")(x)])
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
        x = keras.layers.Concatenate(name="duplicate")([x, x])
        x = ReversibleStack(blocks, seed=seed, name="reversible_stack")(
            x, padding_mask=padding_mask)
        x = LeanLayerNormalization(epsilon=layer_norm_epsilon,
                                   name="final_norm")(x)
        x = keras.layers.Dropout(dropout, name="final_dropout")(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=x, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.attention_types = attention_types
        self.axial_shape = tuple(axial_shape)
        self.axial_dims = tuple(axial_dims)
        self.causal = causal
        self.chunk_length = chunk_length
        self.local_chunk_length = local_chunk_length
        self.num_hashes = num_hashes
        self.lsh_parallel_heads = lsh_parallel_heads
        self.lsh_segments = lsh_segments
        self.local_segments = local_segments
        self.num_buckets = num_buckets
        self.num_chunks_before = num_chunks_before
        self.num_chunks_after = num_chunks_after
        self.projected_length = projected_length
        self.linformer_sharing = linformer_sharing
        self.feed_forward_chunk_length = feed_forward_chunk_length
        self.activation = activation
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed

    def call_with_cache(self, token_ids, cache, index):
        """Features for cached generation (causal backbones).

        With `cache=None` (prefill), `token_ids` is the `(batch, capacity)`
        buffer whose positions before `index` are the prefix; otherwise the
        `(batch, 1)` token at position `index`, the next after the cached
        ones. Token ids are checked as in `call`.

        Args:
            token_ids: int tensor, see above.
            cache: None or the list of per-block caches.
            index: int scalar, the prefix length or the new position.

        Returns:
            `(features, cache)`, features `(batch, length, 2 * hidden_dim)`.

        Example:
        >>> backbone = ReformerBackbone(vocabulary_size=256, hidden_dim=32,
        ...     num_heads=2, head_dim=16, intermediate_dim=64,
        ...     attention_types=["lsh", "local"], axial_shape=(4, 4),
        ...     chunk_length=4)
        >>> ids = keras.ops.ones((1, 16), "int32")
        >>> _, cache = backbone.call_with_cache(ids, None, 4)  # prefix 0..3
        >>> x, cache = backbone.call_with_cache(ids[:, 4:5], cache, 4)
        >>> x.shape  # position 4's features
        (1, 1, 64)
        """
        checked_ids, id_factor = self.get_layer("token_id_check")(token_ids)
        x = self.get_layer("token_embedding")(checked_ids) * id_factor
        first_position = 0 if cache is None else index
        x = x + self.get_layer("position_embedding")(
            x, start_index=first_position)
        x = keras.ops.concatenate([x, x], axis=-1)
        x, cache = self.get_layer("reversible_stack").call_with_cache(
            x, cache, index)
        return self.get_layer("final_norm")(x), cache

    @property
    def max_length(self):
        """The longest input the position embedding covers."""
        return self.axial_shape[0] * self.axial_shape[1]

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "vocabulary_size": self.vocabulary_size,
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "intermediate_dim": self.intermediate_dim,
            "attention_types": self.attention_types,
            "axial_shape": self.axial_shape,
            "axial_dims": self.axial_dims,
            "causal": self.causal,
            "chunk_length": self.chunk_length,
            "local_chunk_length": self.local_chunk_length,
            "num_hashes": self.num_hashes,
            "num_buckets": self.num_buckets,
            "lsh_parallel_heads": self.lsh_parallel_heads,
            "lsh_segments": self.lsh_segments,
            "local_segments": self.local_segments,
            "num_chunks_before": self.num_chunks_before,
            "num_chunks_after": self.num_chunks_after,
            "projected_length": self.projected_length,
            "linformer_sharing": self.linformer_sharing,
            "feed_forward_chunk_length": self.feed_forward_chunk_length,
            "activation": self.activation,
            "dropout": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

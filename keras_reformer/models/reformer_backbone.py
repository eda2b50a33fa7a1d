"""The Reformer backbone: token ids to contextual features (functional)."""

import keras
import keras_hub

from keras_reformer.layers.attention_registry import attention_type
from keras_reformer.layers.axial_position_embedding import AxialPositionEmbedding
from keras_reformer.layers.chunked_feed_forward import DEFAULT_CHUNK_LENGTH
from keras_reformer.layers.chunked_feed_forward import ChunkedFeedForward
from keras_reformer.layers.layer_norm import LeanLayerNormalization
from keras_reformer.layers.philox_dropout import PhiloxDropout
from keras_reformer.layers.pre_norm_branch import PreNormBranch
from keras_reformer.layers.reversible import ReversibleBlock
from keras_reformer.layers.reversible import ReversibleStack
from keras_reformer.layers.token_id_check import TokenIdCheck
from keras_reformer.layers.validation import check_positive_int
from keras_reformer.layers.validation import check_positive_int_pair
from keras_reformer.models.token_inputs import TokenInputsMixin
from keras_reformer.models.transformers_presets import TransformersPresets


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerBackbone(TransformersPresets, TokenInputsMixin,
                       keras_hub.models.Backbone):
    """Reformer encoder/decoder stack as a keras-hub backbone.

    token ids -> embedding + axial positions -> `[x, x]` -> reversible stack
    of (norm + attention, norm + chunked feed-forward) blocks -> layer norm
    over the concatenated halves. Inputs are a dict of `token_ids` and
    `padding_mask` (1 for real tokens), both `(batch, length)` int32 with
    any batch and length up to `prod(axial_shape)`; the output is
    `(batch, length, 2 * hidden_dim)`.

    Each layer's attention is a registered attention type (see
    `keras_reformer.layers.register_attention`): "lsh", "local", "full",
    "full_shared_qk" (exact attention with LSH's shared query/key
    projection and self mask, the same weights as "lsh": a model trained
    with one can be evaluated with the other), "linformer" (not causal), or
    one of your own. A type's settings beyond the backbone's own go in
    `attention_options[type]`, the arguments of its layer class: for
    example `{"lsh": {"chunk_length": 64, "num_hashes": 8, "segments": 16},
    "local": {"chunk_length": 128}}`.

    Args:
        vocabulary_size: int, number of token ids.
        hidden_dim: int, model width (`sum(axial_dims)`).
        num_heads: int, attention heads per layer.
        head_dim: int, size of each head.
        intermediate_dim: int, feed-forward width.
        attention_types: list of registered attention type names, one per
            layer.
        attention_options: None or a dict from type names to dicts of
            their layer class's arguments (see above).
        axial_shape: pair, axial position grid; its product is the maximum
            length.
        axial_dims: pair summing to `hidden_dim`; default half and half.
        causal: bool, decoder (True) or bidirectional encoder (False).
        feed_forward_chunk_length: int, positions per feed-forward chunk
            (its intermediate activations exist one chunk at a time).
        activation: feed-forward activation.
        dropout: float, dropout in attention, feed-forward and embeddings.
        layer_norm_epsilon: float.
        seed: int or None, seeds hashing, dropout and initialisers.
        dtype: None or a dtype policy (such as "mixed_bfloat16") for every
            layer.

    The attention and feed-forward projections are `EinsumDense` layers
    (see `SelfAttentionBase` and `ChunkedFeedForward`): `enable_lora(rank)`
    adapts the query (or query-key) and value projections and freezes the
    rest; `quantize("int8")` (of the backbone or a task) stores every
    projection, the token embedding and task heads in int8.

    Example:
    >>> backbone = ReformerBackbone(vocabulary_size=256, hidden_dim=32,
    ...     num_heads=2, head_dim=16, intermediate_dim=64,
    ...     attention_types=["lsh", "full"], axial_shape=(8, 16),
    ...     attention_options={"lsh": {"chunk_length": 16}})
    >>> ids = keras.ops.ones((2, 100), "int32")
    >>> backbone({"token_ids": ids, "padding_mask": ids}).shape
    (2, 100, 64)
    """

    def __init__(self, vocabulary_size, hidden_dim=256, num_heads=4,
                 head_dim=64, intermediate_dim=512,
                 attention_types=("lsh", "full"), attention_options=None,
                 axial_shape=(64, 64), axial_dims=None, causal=True,
                 feed_forward_chunk_length=DEFAULT_CHUNK_LENGTH,
                 activation="relu", dropout=0.0,
                 layer_norm_epsilon=1e-12, seed=None, dtype=None, **kwargs):
        check_positive_int("vocabulary_size", vocabulary_size)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int_pair("axial_shape", axial_shape)
        axial_dims = _checked_axial_dims(axial_dims, hidden_dim)
        _check_epsilon(layer_norm_epsilon)
        attention_types = list(attention_types)
        attention_options = _checked_attention_options(
            attention_options, attention_types)

        # === Layers ===
        self.token_id_check = TokenIdCheck(
            vocabulary_size, dtype=dtype, name="token_id_check")
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, dtype=dtype, name="token_embedding")
        self.position_embedding = AxialPositionEmbedding(
            axial_shape, axial_dims, dtype=dtype, name="position_embedding")
        self.embedding_dropout = PhiloxDropout(
            dropout, dtype=dtype, name="embedding_dropout")
        shared = {}  # weights that several attention layers share
        self.reversible_stack = ReversibleStack([
            ReversibleBlock(
                PreNormBranch(
                    _attention_layer(
                        kind, attention_options.get(kind, {}),
                        num_heads=num_heads, head_dim=head_dim, causal=causal,
                        dropout=dropout, seed=_layer_seed(seed, i),
                        max_length=axial_shape[0] * axial_shape[1],
                        shared=shared, dtype=dtype, name=f"attention_{i}"),
                    layer_norm_epsilon, dtype=dtype,
                    name=f"attention_branch_{i}"),
                PreNormBranch(
                    ChunkedFeedForward(
                        intermediate_dim, feed_forward_chunk_length,
                        activation, dropout, seed=_layer_seed(seed, i),
                        dtype=dtype, name=f"feed_forward_{i}"),
                    layer_norm_epsilon, dtype=dtype,
                    name=f"feed_forward_branch_{i}"),
                dtype=dtype, name=f"reversible_block_{i}")
            for i, kind in enumerate(attention_types)
        ], seed=seed, dtype=dtype, name="reversible_stack")
        self.final_norm = LeanLayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_norm")
        self.final_dropout = PhiloxDropout(
            dropout, dtype=dtype, name="final_dropout")

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32",
                                   name="padding_mask")
        x = self.reversible_stack(self.embed(token_ids),
                                  padding_mask=padding_mask)
        x = self.final_dropout(self.final_norm(x))
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=x, dtype=dtype, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.attention_types = attention_types
        self.attention_options = attention_options
        self.axial_shape = tuple(axial_shape)
        self.axial_dims = tuple(axial_dims)
        self.causal = causal
        self.feed_forward_chunk_length = feed_forward_chunk_length
        self.activation = activation
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed

    def embed(self, token_ids, start_index=0):
        """Token and position embeddings, duplicated into the two halves
        the reversible stack takes: `(batch, length, 2 * hidden_dim)`.

        Token ids are checked (see `TokenIdCheck`); `start_index` is the
        position of the first id (cached decoding embeds one at a time).
        """
        checked_ids, id_factor = self.token_id_check(token_ids)
        x = self.token_embedding(checked_ids) * id_factor
        x = x + self.position_embedding(x, start_index=start_index)
        x = self.embedding_dropout(x)
        return keras.ops.concatenate([x, x], axis=-1)

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
        ...     attention_options={"lsh": {"chunk_length": 4},
        ...                        "local": {"chunk_length": 4}})
        >>> ids = keras.ops.ones((1, 16), "int32")
        >>> _, cache = backbone.call_with_cache(ids, None, 4)  # prefix 0..3
        >>> x, cache = backbone.call_with_cache(ids[:, 4:5], cache, 4)
        >>> x.shape  # position 4's features
        (1, 1, 64)
        """
        x = self.embed(token_ids, 0 if cache is None else index)
        x, cache = self.reversible_stack.call_with_cache(x, cache, index)
        return self.final_norm(x), cache

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model"):
        """A `keras.distribution.LayoutMap` sharding heads and feed-forward
        width over the mesh's model axis.

        Every attention layer's query/key/value projections
        `(hidden, heads, head_dim)` and output projection
        `(heads, head_dim, hidden)` are split by head, and every
        feed-forward's first layer (kernel and bias) by output unit and its
        second layer by input unit, so each device holds
        `1 / model-axis size` of them; all other weights (embeddings, norms,
        LSH rotations, Linformer projections) are replicated. `num_heads`
        and `intermediate_dim` must be multiples of the model axis's size.
        Use it with `keras.distribution.ModelParallel`, whose batch axis
        splits the data.

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: str, the mesh axis that splits the
                weights.

        Returns:
            A `keras.distribution.LayoutMap`.

        Example:
        >>> mesh = keras.distribution.DeviceMesh(
        ...     (1, 2), ("batch", "model"), ["cpu:0", "cpu:1"])
        >>> layout_map = ReformerBackbone.get_layout_map(mesh)
        >>> layout_map["reversible_stack/reversible_block_0/"
        ...     "attention_branch_0/attention_0/value_kernel"].axes
        (None, 'model', None)
        """
        if not isinstance(device_mesh, keras.distribution.DeviceMesh):
            raise ValueError(f"device_mesh must be a keras.distribution."
                             f"DeviceMesh; received device_mesh="
                             f"{device_mesh!r}.")
        if model_parallel_dim_name not in device_mesh.axis_names:
            raise ValueError(
                f"model_parallel_dim_name must name an axis of device_mesh "
                f"({list(device_mesh.axis_names)}); received "
                f"model_parallel_dim_name={model_parallel_dim_name!r}.")
        model = model_parallel_dim_name
        layout_map = keras.distribution.LayoutMap(device_mesh)
        # Raw kernels (`value_kernel`) or Dense sublayers (`value/kernel`).
        attention = r".*/attention_\d+/"
        feed_forward = r".*/feed_forward_\d+/"
        layout_map[attention + r"(query_key|query|key|value)[_/]kernel"] = (
            None, model, None)
        layout_map[attention + r"output[_/]kernel"] = (model, None, None)
        layout_map[feed_forward + r"intermediate[_/]kernel"] = (None, model)
        layout_map[feed_forward + r"intermediate[_/]bias"] = (model,)
        layout_map[feed_forward + r"output[_/]kernel"] = (model, None)
        return layout_map

    @property
    def max_length(self):
        """The longest input the position embedding covers."""
        return self.axial_shape[0] * self.axial_shape[1]

    def default_lora_layer_names(self):
        """The projections `enable_lora` adapts by default (keras-hub's
        query/value convention): the shared query-key projections of LSH
        and shared-QK attention, the query projections of the others, and
        every value projection."""
        return ["query_key", "query", "value"]

    @property
    def attention_layers(self):
        """The attention layer of each block, first to last."""
        return [block.f.layer for block in self.reversible_stack.blocks]

    def get_config(self):
        config = super().get_config()
        config.update({
            "vocabulary_size": self.vocabulary_size,
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "intermediate_dim": self.intermediate_dim,
            "attention_types": self.attention_types,
            "attention_options": self.attention_options,
            "axial_shape": self.axial_shape,
            "axial_dims": self.axial_dims,
            "causal": self.causal,
            "feed_forward_chunk_length": self.feed_forward_chunk_length,
            "activation": self.activation,
            "dropout": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "seed": self.seed,
        })
        return config


def _layer_seed(seed, i):
    return None if seed is None else seed + i


def _attention_layer(kind, options, **settings):
    """Layer `settings["name"]` of the registered type `kind`."""
    cls, defaults = attention_type(kind)
    try:
        return cls.from_backbone(**{**defaults, **options, **settings})
    except (TypeError, ValueError) as error:  # unknown or bad arguments
        raise ValueError(
            f"attention_options[{kind!r}]={options!r} does not fit "
            f"{cls.__name__}: {error}") from error


def _checked_attention_options(attention_options, attention_types):
    """The options as a dict of dicts, after checking the types' names."""
    if not attention_types:
        raise ValueError(
            "attention_types must be a non-empty list of attention type "
            f"names; received attention_types={attention_types!r}.")
    for kind in attention_types:
        attention_type(kind, "attention_types")
    attention_options = dict(attention_options or {})
    reserved = ("num_heads", "head_dim", "causal", "dropout", "seed", "name",
                "dtype", "max_length", "shared")
    for kind, options in attention_options.items():
        # Options of types the stack does not use are allowed (one set of
        # options for several stacks), unknown names are not.
        attention_type(kind, "attention_options")
        if not isinstance(options, dict):
            raise ValueError(
                f"attention_options[{kind!r}] must be a dict of arguments; "
                f"received {options!r}.")
        clashes = sorted(set(options) & set(reserved))
        if clashes:
            raise ValueError(
                f"attention_options[{kind!r}] sets {clashes}, which the "
                "backbone sets for every layer (pass them to "
                "ReformerBackbone itself).")
    return {kind: dict(options) for kind, options in attention_options.items()}


def _checked_axial_dims(axial_dims, hidden_dim):
    if axial_dims is None:
        if hidden_dim < 2:
            raise ValueError(
                "hidden_dim must be at least 2: the axial position "
                "embedding splits it over its two axes; received "
                f"hidden_dim={hidden_dim}.")
        return (hidden_dim // 2, hidden_dim - hidden_dim // 2)
    if sum(axial_dims) != hidden_dim:
        raise ValueError(
            f"axial_dims must sum to hidden_dim={hidden_dim}; received "
            f"axial_dims={tuple(axial_dims)!r}.")
    return tuple(axial_dims)


def _check_epsilon(layer_norm_epsilon):
    if not (isinstance(layer_norm_epsilon, (int, float))
            and layer_norm_epsilon >= 0):
        raise ValueError(
            f"layer_norm_epsilon must be a non-negative number; received "
            f"layer_norm_epsilon={layer_norm_epsilon!r}.")

"""Projections and head handling shared by every self-attention layer."""

import keras
from keras import ops

from keras_reformer.layers.seeds import TensorSeed
from keras_reformer.layers.token_id_check import checked_mask
from keras_reformer.layers.validation import check_positive_int
from keras_reformer.layers.validation import check_rate


class SelfAttentionBase(keras.layers.Layer):
    """Multi-head self-attention: project, attend (subclass), merge heads.

    Subclasses implement `attend_heads(query_key_or_queries, ...)`; this class
    owns the weights, bias-free as in trax and Hugging Face: with `shared_qk`
    one projection serves as queries and keys, otherwise separate ones.

    Every attention layer is called the same way:
    `layer(x, padding_mask=None, training=None, seed=None)` on
    `(batch, length, hidden)`, returning the same shape; `padding_mask` is
    `(batch, length)`, true (non-zero) for real tokens; `seed` an optional
    `(2,)` integer tensor fixing the layer's randomness (used by reversible
    recomputation). The layers also take Keras's own masks: after
    `Embedding(mask_zero=True)`, say, the padding needs no `padding_mask`,
    and the mask passes on to the next layer.

    Args:
        num_heads: int, number of heads.
        head_dim: int, size of each head.
        shared_qk: bool, one projection for queries and keys.
        dropout: float in [0, 1), dropout on attention weights.
        kernel_initializer: initializer of the projections.
        seed: int or None, seeds the layer's random numbers.
    """

    def __init__(self, num_heads, head_dim, shared_qk, dropout=0.0,
                 kernel_initializer="glorot_uniform", seed=None, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("num_heads", num_heads)
        check_positive_int("head_dim", head_dim)
        check_rate("dropout", dropout)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.shared_qk = shared_qk
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True  # padded positions output zeros

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if len(input_shape) != 3 or hidden_dim is None:
            raise ValueError(
                f"{type(self).__name__} takes inputs of shape (batch, "
                f"length, hidden) with a known hidden size; received input "
                f"shape {tuple(input_shape)}."
            )
        # Keras then reports calls of another rank or hidden size clearly.
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: hidden_dim})
        names = ["query_key", "value"] if self.shared_qk else [
            "query", "key", "value"]
        for name in names:
            setattr(self, f"{name}_kernel", self.add_weight(
                name=f"{name}_kernel",
                shape=(hidden_dim, self.num_heads, self.head_dim),
                initializer=self.kernel_initializer,
            ))
        self.output_kernel = self.add_weight(
            name="output_kernel",
            shape=(self.num_heads, self.head_dim, hidden_dim),
            initializer=self.kernel_initializer,
        )

    def project(self, inputs, kernel):
        """`(batch, length, hidden)` -> `(batch, heads, length, head_dim)`.

        The kernel is cast to the inputs' dtype: cached decoding calls the
        layer's methods directly, outside Keras's mixed-precision autocast.
        """
        return ops.einsum("blh,hnd->bnld", inputs,
                          ops.cast(kernel, inputs.dtype))

    def merge_heads(self, outputs, valid):
        """`(batch, heads, length, head_dim)` -> `(batch, length, hidden)`.

        Padded positions (`valid` False) output zeros: a padded query may
        have no allowed key at all, and its output must not carry anything
        from any position (a later one, say) into the residual stream.
        """
        return zero_padding(ops.einsum(
            "bnld,ndh->blh", outputs,
            ops.cast(self.output_kernel, outputs.dtype)), valid)

    def call_with_cache(self, inputs, cache, index):
        """Causal attention for generation, one new position at a time.

        With `cache=None` (prefill), `inputs` is `(batch, capacity, hidden)`
        whose positions before `index` are the prefix: returns the prefix's
        outputs (what `self(inputs[:, :index])` gives; zeros after it) and a
        cache with room for `capacity` positions. With a cache, `inputs` is
        the `(batch, 1, hidden)` input at position `index` (the next after
        those already cached): returns its output, the same as the last
        position of `self(all inputs up to index)`, and the updated cache.
        Shapes stay static, so the decoding loop compiles.

        Args:
            inputs: see above.
            cache: None, or the dict of tensors (batch first) returned by the
                previous call.
            index: int scalar (tensor).

        Returns:
            `(outputs, cache)`.

        Example:
        >>> from keras_reformer.layers import LocalSelfAttention
        >>> layer = LocalSelfAttention(2, 8, chunk_length=4, causal=True)
        >>> x = keras.random.normal((1, 12, 16))
        >>> _, cache = layer.call_with_cache(x, None, 5)
        >>> out, cache = layer.call_with_cache(x[:, 5:6], cache, 5)
        >>> out.shape
        (1, 1, 16)
        """
        if not getattr(self, "causal", False):
            raise ValueError(
                f"{type(self).__name__} {self.name!r} decodes with a cache "
                "only when causal=True; it has causal=False.")
        if not self.built:  # called before the layer ever ran
            self.build(tuple(inputs.shape))
        if cache is None:
            return self.prefill(inputs, index)
        return self.decode_step(inputs, cache, index)

    def dropout_fn(self, training, seed):
        """Dropout on attention weights, or None when inactive."""
        if not training or self.dropout == 0.0:
            return None
        return lambda weights: keras.random.dropout(
            weights, self.dropout, seed=TensorSeed(seed)
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer),
            "seed": self.seed,
        })
        return config


def zero_padding(outputs, valid):
    """`outputs` `(batch, length, hidden)` with zeros where `valid`
    `(batch, length)` is False."""
    return outputs * ops.cast(valid, outputs.dtype)[..., None]


def padding_mask_or_ones(padding_mask, inputs, keras_mask=None):
    """A bool `(batch, length)` mask, all True when `padding_mask` is None.

    `keras_mask` is the mask Keras hands a layer from an earlier one (such
    as `Embedding(mask_zero=True)`); a token is real only where both masks
    say so.

    Masks hold 0 and 1 (or bools); other values raise (see
    `checked_mask`).

    Raises:
        ValueError: the mask's static shape is not the inputs' first two
            axes.
    """
    if keras_mask is not None:
        keras_mask = _checked_mask(keras_mask, inputs, "mask")
        if padding_mask is None:
            return keras_mask
        return ops.logical_and(keras_mask, padding_mask_or_ones(
            padding_mask, inputs))
    if padding_mask is None:
        return ops.ones(ops.shape(inputs)[:2], dtype="bool")
    return _checked_mask(padding_mask, inputs, "padding_mask")


def _checked_mask(padding_mask, inputs, name):
    mask_shape = tuple(padding_mask.shape)
    expected = tuple(inputs.shape[:2])
    if len(mask_shape) != 2 or any(
            a is not None and b is not None and a != b
            for a, b in zip(mask_shape, expected)):
        raise ValueError(
            f"{name} must have shape (batch, length) = {expected}, "
            f"matching the inputs; received shape {mask_shape}.")
    return checked_mask(padding_mask, name)


def prefix_mask(inputs, prefix_length):
    """`(batch, length)` bool, True at positions before `prefix_length`."""
    positions = ops.arange(ops.shape(inputs)[1], dtype="int32")
    return ops.broadcast_to(positions[None] < prefix_length,
                            ops.shape(inputs)[:2])


def pad_to_multiple(inputs, valid, multiple):
    """Pads the length axis of `inputs` and `valid` to a multiple.

    Args:
        inputs: `(batch, length, hidden)`.
        valid: `(batch, length)` bool.
        multiple: int.

    Returns:
        `(inputs, valid)` padded with zeros / False at the end.
    """
    batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
    extra = (-length) % multiple
    inputs = ops.concatenate(
        [inputs, ops.zeros((batch, extra, ops.shape(inputs)[2]), inputs.dtype)],
        axis=1,
    )
    valid = ops.concatenate(
        [valid, ops.zeros((batch, extra), "bool")], axis=1
    )
    return inputs, valid


def shared_qk_keys(query_key):
    """Keys of shared-QK attention: the vectors divided by their norm.

    Written as Hugging Face does (`x * rsqrt(mean(x^2) + 1e-6) / sqrt(d)`,
    which is `x / |x|` up to the epsilon), so ported weights give the same
    scores.
    """
    head_dim = ops.shape(query_key)[-1]
    mean_square = ops.mean(ops.square(query_key), axis=-1, keepdims=True)
    return query_key * ops.rsqrt(mean_square + 1e-6) / (head_dim**0.5)

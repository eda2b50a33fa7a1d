"""The contract every attention layer of a `ReformerBackbone` fulfils."""

import keras


class AttentionLayer(keras.layers.Layer):
    """Base of the attention layers: names what a subclass implements.

    A subclass implements:

    * `call(inputs, padding_mask=None, training=None, seed=None, mask=None)`
      on `(batch, length, hidden)`, returning the same shape. `padding_mask`
      is `(batch, length)`, non-zero for real tokens; `mask` is a Keras mask
      from an earlier layer (as `Embedding(mask_zero=True)` gives) with the
      same meaning; `seed`, an optional `(2,)` integer tensor, fixes the
      layer's randomness (the reversible stack recomputes a layer with the
      seed of its forward pass). Padded positions must not change real
      outputs, whatever they hold.
    * For cached generation (causal layers): `prefill(inputs, prefix_length)`
      and `decode_step(inputs, cache, index)`, reached through
      `call_with_cache`.

    It sets the class attribute `supports_causal` to False if it cannot be
    causal (and then rejects `causal=True`), and may override
    `from_backbone`, which builds the layer from a
    backbone's settings and the layer's entry of `attention_options`.
    Register a subclass under a name with
    `keras_reformer.layers.register_attention` to use it in
    `ReformerBackbone(attention_types=[...])`.

    Args:
        causal: bool, a token never attends to later tokens.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).
    """

    supports_causal = True

    def __init__(self, causal=False, **kwargs):
        super().__init__(**kwargs)
        self.causal = causal
        self.supports_masking = True  # padded positions output zeros

    @classmethod
    def from_backbone(cls, *, max_length, shared, **options):
        """The layer for one position of a backbone's stack.

        Args:
            max_length: int, the longest input the backbone takes.
            shared: dict shared by all the backbone's attention layers (for
                weights that several layers share).
            **options: the backbone's `num_heads`, `head_dim`, `causal`,
                `dropout`, `seed` (the layer's), `name` and `dtype`, and the
                type's defaults and `attention_options` entry.

        Returns:
            The layer: by default `cls(**options)`.
        """
        del max_length, shared  # for layers whose settings depend on them
        return cls(**options)

    def call(self, inputs, padding_mask=None, training=None, seed=None,
             mask=None):
        raise NotImplementedError(
            f"{type(self).__name__} must implement call().")

    def prefill(self, inputs, prefix_length):
        """See `call_with_cache`: the prefix's outputs and a new cache."""
        raise NotImplementedError(
            f"{type(self).__name__} does not decode with a cache: it "
            "implements no prefill().")

    def decode_step(self, inputs, cache, index):
        """See `call_with_cache`: one position's output and the cache."""
        raise NotImplementedError(
            f"{type(self).__name__} does not decode with a cache: it "
            "implements no decode_step().")

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
            cache: None, or the nested structure of tensors (batch first)
                returned by the previous call.
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
        if not self.causal:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} decodes with a cache "
                "only when causal=True; it has causal=False.")
        if not self.built:  # called before the layer ever ran
            self.build(tuple(inputs.shape))
        if cache is None:
            return self.prefill(inputs, index)
        return self.decode_step(inputs, cache, index)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"causal": self.causal})
        return config

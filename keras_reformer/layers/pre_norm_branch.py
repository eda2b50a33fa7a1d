"""Layer normalisation followed by a sub-layer: a residual branch."""

import inspect

import keras

from keras_reformer.layers.layer_norm import LeanLayerNormalization


@keras.saving.register_keras_serializable(package="keras_reformer")
class PreNormBranch(keras.layers.Layer):
    """`layer(LayerNorm(x))`, the `f` or `g` of a reversible block.

    Forwards `padding_mask`, `training` and `seed` to the wrapped layer
    (`padding_mask` only where its `call` takes one), and a Keras mask from
    an earlier layer where the wrapped layer takes masks.

    Args:
        layer: an attention or feed-forward layer.
        epsilon: layer-normalisation epsilon (1e-12 in Hugging Face's
            Reformer).

    Example:
    >>> from keras_reformer.layers import ChunkedFeedForward
    >>> branch = PreNormBranch(ChunkedFeedForward(64, chunk_length=16))
    >>> branch(keras.random.normal((2, 20, 32))).shape
    (2, 20, 32)
    """

    def __init__(self, layer, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer
        self.epsilon = epsilon
        self.norm = LeanLayerNormalization(
            epsilon=epsilon, dtype=self.dtype_policy, name="norm")
        parameters = inspect.signature(layer.call).parameters
        self._takes_padding_mask = "padding_mask" in parameters
        self._takes_mask = "mask" in parameters
        self.supports_masking = True

    def build(self, input_shape):
        for layer in (self.norm, self.layer):
            if not layer.built:  # deserialisation may have built it already
                layer.build(input_shape)

    def call(self, inputs, padding_mask=None, training=None, seed=None,
             mask=None):
        kwargs = {"training": training, "seed": seed}
        if self._takes_padding_mask:
            kwargs["padding_mask"] = padding_mask
        if self._takes_mask:
            kwargs["mask"] = mask
        return self.layer(self.norm(inputs), **kwargs)

    def call_with_cache(self, inputs, cache, index):
        """`layer.call_with_cache(LayerNorm(inputs), cache, index)`: cached
        generation (see `SelfAttentionBase.call_with_cache`)."""
        if not hasattr(self.layer, "call_with_cache"):
            raise ValueError(
                f"{type(self.layer).__name__} {self.layer.name!r} does not "
                "support cached decoding (causal LSH, local and full "
                "attention and the feed-forward do).")
        return self.layer.call_with_cache(self.norm(inputs), cache, index)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"layer": keras.layers.serialize(self.layer),
                       "epsilon": self.epsilon})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.layers.deserialize(config["layer"])
        return cls(**config)

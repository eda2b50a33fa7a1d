"""Keras's dropout layer with masks that XLA generates quickly on TensorFlow.

`keras.layers.Dropout` draws its masks with TensorFlow's default random
algorithm, which XLA's CPU compiler generates tens of times slower than a
named Philox (850 ms against 23 ms for a `(1, 16384, 256)` activation under
`jit_compile=True`); the model's embedding and final dropout are such
activations.
"""

import keras

from keras_reformer.layers.seeds import dropout


@keras.saving.register_keras_serializable(package="keras_reformer")
class PhiloxDropout(keras.layers.Dropout):
    """`keras.layers.Dropout` whose masks come from `seeds.dropout`.

    Same arguments, state (one seed generator, advanced once per training
    call) and statistics as Keras's layer; on TensorFlow the kept entries
    are drawn from raw Philox bits (other masks than Keras's, the same with
    or without XLA), on other backends by `keras.random.dropout`. With a
    `noise_shape` or `rate=1` it is Keras's layer.

    Example:
    >>> layer = PhiloxDropout(0.5, seed=1)
    >>> kept = layer(keras.ops.ones((4, 256)), training=True)
    >>> sorted(set(keras.ops.convert_to_numpy(kept).ravel().tolist()))
    [0.0, 2.0]
    """

    def call(self, inputs, training=False):
        if (not training or not 0 < self.rate < 1
                or self.noise_shape is not None):
            return super().call(inputs, training=training)
        return dropout(inputs, self.rate, self.seed_generator.next())

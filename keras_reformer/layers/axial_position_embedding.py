"""Axial (factorised) position embeddings for very long sequences."""

import keras
from keras import ops

from keras_reformer.layers.token_id_check import checked_indices
from keras_reformer.layers.validation import check_positive_int_pair


@keras.saving.register_keras_serializable(package="keras_reformer")
class AxialPositionEmbedding(keras.layers.Layer):
    """Position embeddings factorised over a 2-D grid of positions.

    Position `t` of a sequence covering up to `n1 * n2` positions gets
    `concat(E1[t // n2], E2[t % n2])` with `E1` of shape `(n1, d1)` and `E2`
    of shape `(n2, d2)`: `n1 * d1 + n2 * d2` weights instead of
    `n1 * n2 * (d1 + d2)`.

    Called on `(batch, length, d1 + d2)` inputs, returns the position
    embeddings of the first `length` positions broadcast to that shape.

    Args:
        axial_shape: pair `(n1, n2)`.
        axial_dims: pair `(d1, d2)`, summing to the hidden size.
        initializer: initializer of `E1` and `E2`.

    Example:
    >>> layer = AxialPositionEmbedding(axial_shape=(4, 8), axial_dims=(6, 10))
    >>> layer(keras.ops.zeros((2, 20, 16))).shape
    (2, 20, 16)
    """

    def __init__(self, axial_shape, axial_dims, initializer="random_normal",
                 **kwargs):
        super().__init__(**kwargs)
        check_positive_int_pair("axial_shape", axial_shape)
        check_positive_int_pair("axial_dims", axial_dims)
        self.axial_shape = tuple(axial_shape)
        self.axial_dims = tuple(axial_dims)
        self.initializer = keras.initializers.get(initializer)

    @property
    def max_length(self):
        """The longest sequence covered: `n1 * n2`."""
        return self.axial_shape[0] * self.axial_shape[1]

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim is not None and hidden_dim != sum(self.axial_dims):
            raise ValueError(
                f"axial_dims={self.axial_dims} must sum to the hidden size "
                f"{hidden_dim} of the inputs (shape {tuple(input_shape)}).")
        self.check_length(input_shape[1])
        self.row_embeddings = self.add_weight(
            name="row_embeddings",
            shape=(self.axial_shape[0], self.axial_dims[0]),
            initializer=self.initializer)
        self.column_embeddings = self.add_weight(
            name="column_embeddings",
            shape=(self.axial_shape[1], self.axial_dims[1]),
            initializer=self.initializer)

    def check_length(self, length):
        """Raises ValueError if the int `length` exceeds the positions."""
        if isinstance(length, int) and length > self.max_length:
            raise ValueError(
                f"Sequence length {length} exceeds the {self.max_length} "
                f"positions of axial_shape={self.axial_shape}; use an "
                "axial_shape whose product covers the length.")

    def call(self, inputs, start_index=0):
        """Embeddings of positions `start_index ... start_index + length - 1`
        (a later start serves cached generation), broadcast to `inputs`."""
        length = ops.shape(inputs)[1]
        self.check_length(length)
        positions = start_index + ops.arange(length, dtype="int32")
        known = isinstance(length, int) and isinstance(start_index, int)
        if not known:  # a lookup past the table would read garbage
            positions, factor = checked_indices(
                positions, self.max_length,
                f"positions must be below the {self.max_length} positions "
                f"of axial_shape={self.axial_shape} (a sequence longer than "
                "the model's positions)", self.compute_dtype)
        columns = self.axial_shape[1]
        embeddings = ops.concatenate([
            ops.take(self.row_embeddings, positions // columns, axis=0),
            ops.take(self.column_embeddings, positions % columns, axis=0),
        ], axis=-1)
        embeddings = ops.cast(embeddings, self.compute_dtype)
        if not known:
            embeddings = embeddings * factor
        return ops.broadcast_to(embeddings[None], ops.shape(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "axial_shape": self.axial_shape,
            "axial_dims": self.axial_dims,
            "initializer": keras.initializers.serialize(self.initializer),
        })
        return config

"""Position-wise feed-forward computed one chunk of the sequence at a time."""

import keras
from keras import ops

from keras_reformer.layers.custom_gradient import tensor_values
from keras_reformer.layers.products import matmul
from keras_reformer.layers.projection import effective_kernel
from keras_reformer.layers.projection import projection
from keras_reformer.layers.recomputed_loop import recomputed_loop
from keras_reformer.layers.seeds import dropout
from keras_reformer.layers.seeds import draw_seed
from keras_reformer.layers.seeds import fold_seed
from keras_reformer.layers.seeds import offset_seed
from keras_reformer.layers.validation import check_positive_int
from keras_reformer.layers.validation import check_rate

# Positions per chunk by default, measured (benchmarks/feed_forward_chunks.py:
# forward+backward of the feed-forward alone, 4K and 16K tokens, widths
# 256 -> 512 and 1024 -> 4096, TensorFlow and JAX under XLA on a CPU):
# chunks of 256 took 0.70-0.83x the time of chunks of 64; they were the
# fastest of 64, 256, 1024, 4096 and the whole sequence on JAX, and within
# 2-21% of the fastest (the whole sequence) on TensorFlow, while holding
# only one chunk's 256 x intermediate_dim activations at a time.
DEFAULT_CHUNK_LENGTH = 256


@keras.saving.register_keras_serializable(package="keras_reformer")
class ChunkedFeedForward(keras.layers.Layer):
    """`dense(activation(dense(x)))`, one chunk of positions at a time.

    A loop over chunks of `chunk_length` positions, forward and backward
    (the gradient recomputes each chunk's intermediate activations), so only
    one chunk's `(batch, chunk_length, intermediate_dim)` activations exist
    at a time. A sequence that fits in one chunk is computed without the
    loop (its gradient then keeps its activations instead of recomputing
    them: the loop would hold as much and run its products slower under
    XLA). The result equals the unchunked feed-forward.

    The two dense layers are `keras.layers.EinsumDense` sublayers with
    biases, `intermediate_dense` (layer name "intermediate") and
    `output_dense` ("output"), so Keras's `quantize("int8")` and LoRA apply
    to them.

    Args:
        intermediate_dim: int, width of the hidden layer.
        chunk_length: int, positions per chunk.
        activation: activation of the hidden layer.
        dropout: float, dropout after the activation and after the output.
        kernel_initializer: initializer of both kernels.
        seed: int or None, seeds dropout.

    Example:
    >>> ff = ChunkedFeedForward(intermediate_dim=64, chunk_length=16)
    >>> ff(keras.random.normal((2, 100, 32))).shape
    (2, 100, 32)
    """

    def __init__(self, intermediate_dim, chunk_length=DEFAULT_CHUNK_LENGTH,
                 activation="relu",
                 dropout=0.0, kernel_initializer="glorot_uniform", seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        check_positive_int("intermediate_dim", intermediate_dim)
        check_positive_int("chunk_length", chunk_length)
        check_rate("dropout", dropout)
        self.intermediate_dim = intermediate_dim
        self.chunk_length = chunk_length
        self.activation = keras.activations.get(activation)
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True  # position-wise: a mask passes on

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        # === Layers ===
        self.intermediate_dense = projection(
            "btm,mi->bti", (None, self.intermediate_dim),
            self.kernel_initializer, 0, "intermediate", self.dtype_policy,
            bias_axes="i")
        self.intermediate_dense.build((None, None, hidden_dim))
        self.output_dense = projection(
            "bti,im->btm", (None, hidden_dim), self.kernel_initializer, 1,
            "output", self.dtype_policy, bias_axes="m")
        self.output_dense.build((None, None, self.intermediate_dim))

    def weight_values(self, dtype):
        """`[kernel_1, bias_1, kernel_2, bias_2]` as tensors of `dtype`, the
        kernels effective ones (see `effective_kernel`: LoRA and int8
        included)."""
        values = []
        for dense in (self.intermediate_dense, self.output_dense):
            (bias,) = tensor_values([dense.bias])
            values += [effective_kernel(dense, dtype), ops.cast(bias, dtype)]
        return values

    def feed_forward(self, x, weights, training=False, seed=None):
        """The unchunked feed-forward of `x` with explicit `weights`."""
        kernel_1, bias_1, kernel_2, bias_2 = weights
        hidden = self.activation(matmul(x, kernel_1) + bias_1)
        if training and self.dropout:
            hidden = dropout(hidden, self.dropout, fold_seed(seed, 0))
        outputs = matmul(hidden, kernel_2) + bias_2
        if training and self.dropout:
            outputs = dropout(outputs, self.dropout, fold_seed(seed, 1))
        return outputs

    def call(self, inputs, training=None, seed=None):
        training = bool(training)
        seed = draw_seed(seed, self.seed_generator) if training else (
            ops.zeros((2,), "int32"))
        weights = self.weight_values(inputs.dtype)
        batch, length, hidden_dim = ops.shape(inputs)
        num_chunks = -(-length // self.chunk_length)
        if isinstance(num_chunks, int) and num_chunks == 1:
            # Dropout seeded as the loop's first chunk.
            return self.feed_forward(inputs, weights, training,
                                     offset_seed(seed, [0, 0]))
        padded_length = num_chunks * self.chunk_length
        padded = ops.concatenate([inputs, ops.zeros(
            (batch, padded_length - length, hidden_dim), inputs.dtype)], axis=1)

        def chunk_output(i, views, layout, seed):
            chunk, *weights = views
            return (self.feed_forward(chunk, weights, training,
                                      offset_seed(seed, [0, i])),)

        (outputs,) = recomputed_loop(
            chunk_output, [padded, *weights], num_chunks, self.chunk_length,
            slicing=[(1, 0)] + [None] * len(weights), result_axes=(1,),
            seed=seed)
        return outputs[:, :length]

    def call_with_cache(self, inputs, cache, index):
        """Generation's interface (see `SelfAttentionBase.call_with_cache`).

        Position-wise, so nothing is cached: returns `(outputs, cache)`,
        `{}` for the cache of a prefill.
        """
        return self(inputs), {} if cache is None else cache

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "intermediate_dim": self.intermediate_dim,
            "chunk_length": self.chunk_length,
            "activation": keras.activations.serialize(self.activation),
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer),
            "seed": self.seed,
        })
        return config

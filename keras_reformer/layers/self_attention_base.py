"""Projections and head handling shared by every self-attention layer."""

import keras
from keras import ops

from keras_reformer.layers.attention_layer import AttentionLayer
from keras_reformer.layers.masks import padding_mask_or_ones
from keras_reformer.layers.masks import zero_padding
from keras_reformer.layers.products import matmul
from keras_reformer.layers.projection import effective_kernel
from keras_reformer.layers.projection import projection
from keras_reformer.layers.seeds import dropout
from keras_reformer.layers.validation import check_positive_int
from keras_reformer.layers.validation import check_rate


class SelfAttentionBase(AttentionLayer):
    """Multi-head self-attention with the package's projections.

    Holds the projections as bias-free `keras.layers.EinsumDense`
    sublayers (as trax and Hugging Face, no biases): with `shared_qk` one
    projection `query_key_dense` (layer name "query_key") serves as queries
    and keys, otherwise `query_dense` ("query") and `key_dense` ("key");
    then `value_dense` ("value"), each with a `(hidden, heads, head_dim)`
    kernel, and `output_dense` ("output"), `(heads, head_dim, hidden)`. So
    keras-hub's `enable_lora` and Keras's `quantize("int8")` apply to them.
    Subclasses compute with `kernels` (the effective kernels as tensors)
    and implement `AttentionLayer`'s contract with `project`,
    `merge_heads` (or `project_out`) and `real_inputs`.

    Args:
        num_heads: int, number of heads.
        head_dim: int, size of each head.
        shared_qk: bool, one projection for queries and keys.
        causal: bool, a token never attends to later tokens.
        dropout: float in [0, 1), dropout on attention weights.
        kernel_initializer: initializer of the projections.
        seed: int or None, seeds the layer's random numbers.
    """

    def __init__(self, num_heads, head_dim, shared_qk, causal=False,
                 dropout=0.0, kernel_initializer="glorot_uniform", seed=None,
                 **kwargs):
        super().__init__(causal=causal, **kwargs)
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
        # === Layers ===
        # A variance-scaling initializer draws the kernels at the scale of
        # plain 3-D weights of their shapes (`fan_in = shape[0] * shape[1]`,
        # `fan_out = shape[0] * shape[2]`, Keras's rule for such weights).
        fan_axes = ((0, 1), (0, 2))
        names = self._input_projection_names()
        for index, name in enumerate(names):
            dense = projection(
                "btm,mnh->btnh", (None, self.num_heads, self.head_dim),
                self.kernel_initializer, index, name, self.dtype_policy,
                fan_axes=fan_axes)
            dense.build((None, None, hidden_dim))
            setattr(self, f"{name}_dense", dense)
        self.output_dense = projection(
            "btnh,nhm->btm", (None, hidden_dim), self.kernel_initializer,
            len(names), "output", self.dtype_policy, fan_axes=fan_axes)
        self.output_dense.build((None, None, self.num_heads, self.head_dim))

    def _input_projection_names(self):
        return ["query_key", "value"] if self.shared_qk else [
            "query", "key", "value"]

    @property
    def projections(self):
        """The projection sublayers: query-key (or query and key), value,
        output."""
        return [getattr(self, f"{name}_dense")
                for name in self._input_projection_names()] + [
                    self.output_dense]

    def kernels(self, dtype):
        """The projections' effective kernels (see `effective_kernel`:
        LoRA and int8 included) as tensors of `dtype`, in the order of
        `projections`: query-key (or query and key), value, output."""
        return [effective_kernel(dense, dtype) for dense in self.projections]

    def real_inputs(self, inputs, padding_mask, keras_mask):
        """The inputs with padded positions zeroed, and the validity mask.

        Padded positions may hold anything (NaN and inf included); zeroed
        here, they reach no real output through a product with a zero
        attention weight, and no gradient either.

        Returns:
            `(inputs, valid)`, `valid` a bool `(batch, length)` mask (see
            `padding_mask_or_ones`).
        """
        valid = padding_mask_or_ones(padding_mask, inputs, keras_mask)
        return zero_padding(inputs, valid), valid

    def project(self, inputs, kernel):
        """`(batch, length, hidden)` -> `(batch, heads, length, head_dim)`.

        The kernel (from `kernels`) is cast to the inputs' dtype: cached
        decoding calls the layer's methods directly, outside Keras's
        mixed-precision autocast.

        On JAX, one matrix product whose rows are positions, its heads
        split off afterwards: from the einsum `blh,hnd->bnld`, XLA's CPU
        compiler computes the transposed product (positions last), and the
        row gathers into the sorted order then read each row of 64
        features with a stride of the whole length. TensorFlow's einsum
        already computes rows of positions; under bfloat16 its rows too
        are one product, on the CPU's bfloat16 kernels (see `products`).
        """
        kernel = ops.cast(kernel, inputs.dtype)
        if keras.backend.backend() != "jax" and (
                keras.backend.standardize_dtype(inputs.dtype) != "bfloat16"):
            return ops.einsum("blh,hnd->bnld", inputs, kernel)
        batch, length, hidden = ops.shape(inputs)
        heads, head_dim = kernel.shape[1], kernel.shape[2]
        rows = matmul(ops.reshape(inputs, (-1, hidden)),
                      ops.reshape(kernel, (hidden, heads * head_dim)))
        return ops.transpose(ops.reshape(
            rows, (batch, length, heads, head_dim)), (0, 2, 1, 3))

    def merge_heads(self, outputs, valid, kernel):
        """`(batch, heads, length, head_dim)` -> `(batch, length, hidden)`
        by the output projection's `kernel` (from `kernels`).

        Padded positions (`valid` False) output zeros: a padded query may
        have no allowed key at all, and its output must not carry anything
        from any position (a later one, say) into the residual stream.
        """
        return zero_padding(self.project_out(outputs, kernel), valid)

    def project_out(self, outputs, kernel):
        """`(batch, heads, length, head_dim)` -> `(batch, length, hidden)`
        by `kernel`, the output kernel (from `kernels`) or its slice of
        `heads` heads.

        One matrix product over the heads' features, whose gradient with
        respect to the kernel (`outputs^T @ output_grad`) reads the output
        gradient `(batch * length, hidden)` as it lies. TensorFlow
        differentiates the einsum `bnld,ndh->blh` into a product that XLA
        feeds with a transposed copy of the whole output gradient.
        """
        batch, heads, length, head_dim = ops.shape(outputs)
        features = heads * head_dim
        rows = ops.reshape(ops.transpose(outputs, (0, 2, 1, 3)),
                           (-1, features))
        hidden = ops.shape(kernel)[-1]
        kernel = ops.reshape(ops.cast(kernel, outputs.dtype),
                             (features, hidden))
        return ops.reshape(matmul(rows, kernel), (batch, length, hidden))

    def dropout_fn(self, training, seed):
        """Dropout on attention weights, or None when inactive."""
        if not training or self.dropout == 0.0:
            return None
        return lambda weights: dropout(weights, self.dropout, seed)

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


def shared_qk_keys(query_key):
    """Keys of shared-QK attention: the vectors divided by their norm.

    Written as Hugging Face does (`x * rsqrt(mean(x^2) + 1e-6) / sqrt(d)`,
    which is `x / |x|` up to the epsilon), so ported weights give the same
    scores.
    """
    head_dim = ops.shape(query_key)[-1]
    mean_square = ops.mean(ops.square(query_key), axis=-1, keepdims=True)
    return query_key * ops.rsqrt(mean_square + 1e-6) / (head_dim**0.5)

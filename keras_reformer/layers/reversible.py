"""Reversible residual layers (RevNet) that store no per-layer activations.

A block maps `(x1, x2)` to `(y1, y2) = (x1 + f(x2), x2 + g(y1))`; its inputs
are recomputed from its outputs (`x2 = y2 - g(y1)`, `x1 = y1 - f(x2)`), so
the backward pass walks the blocks in reverse and needs only the stack's
output. `f` and `g` are Keras layers called as
`branch(x, padding_mask=..., training=..., seed=...)`; the per-block seeds
make random rotations and dropout recompute identically.
"""

import keras
from keras import ops

from keras_reformer.layers.custom_gradient import after
from keras_reformer.layers.custom_gradient import tensor_values
from keras_reformer.layers.custom_gradient import value_and_vjp
from keras_reformer.layers.custom_gradient import with_custom_gradient
from keras_reformer.layers.seeds import draw_seed
from keras_reformer.layers.seeds import fold_seed
from keras_reformer.layers.masks import padding_mask_or_ones


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReversibleBlock(keras.layers.Layer):
    """One reversible residual block: `y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`.

    Called on `(batch, length, 2 * hidden)`: the two halves of the last axis
    are `x1` and `x2`. While training the gradient is recomputed from the
    outputs instead of stored activations (see `ReversibleStack`, of which
    this is the one-block case).

    Args:
        f: layer on `(batch, length, hidden)`, e.g. norm + attention.
        g: layer on `(batch, length, hidden)`, e.g. norm + feed-forward.

    Example:
    >>> from keras_reformer.layers import (
    ...     ChunkedFeedForward, FullSelfAttention, PreNormBranch)
    >>> block = ReversibleBlock(PreNormBranch(FullSelfAttention(2, 8)),
    ...                         PreNormBranch(ChunkedFeedForward(32, 4)))
    >>> block(keras.random.normal((1, 8, 32))).shape
    (1, 8, 32)
    """

    def __init__(self, f, g, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.f = f
        self.g = g
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True  # a Keras mask is the padding mask

    def build(self, input_shape):
        _check_even(input_shape)
        half_shape = tuple(input_shape[:-1]) + (input_shape[-1] // 2,)
        for branch in (self.f, self.g):
            if not branch.built:
                branch.build(half_shape)

    def call(self, inputs, padding_mask=None, training=None, seed=None,
             mask=None):
        return reversible_call([self], inputs, padding_mask, training,
                               draw_seed(seed, self.seed_generator)
                               if training else None, mask)

    def forward(self, x1, x2, padding_mask, training, seed, f_call=None,
                g_call=None):
        """`(y1, y2)` from `(x1, x2)`; `f_call`/`g_call` replace the branches."""
        f_call = f_call or self.f
        g_call = g_call or self.g
        y1 = x1 + f_call(x2, padding_mask=padding_mask, training=training,
                         seed=_branch_seed(seed, 0))
        y2 = x2 + g_call(y1, padding_mask=padding_mask, training=training,
                         seed=_branch_seed(seed, 1))
        return y1, y2

    def call_with_cache(self, inputs, cache, index):
        """The block for cached generation, with the branches'
        `call_with_cache` (see `SelfAttentionBase.call_with_cache`).

        Args:
            inputs: `(batch, length, 2 * hidden)`.
            cache: None (prefill) or `{"f": ..., "g": ...}`.
            index: int scalar, the prefix length or the new position.

        Returns:
            `(outputs, cache)`.
        """
        x1, x2 = ops.split(inputs, 2, axis=-1)
        cache = cache or {"f": None, "g": None}
        f_out, f_cache = self.f.call_with_cache(x2, cache["f"], index)
        y1 = x1 + f_out
        g_out, g_cache = self.g.call_with_cache(y1, cache["g"], index)
        outputs = ops.concatenate([y1, x2 + g_out], axis=-1)
        return outputs, {"f": f_cache, "g": g_cache}

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "f": keras.layers.serialize(self.f),
            "g": keras.layers.serialize(self.g),
            "seed": self.seed,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["f"] = keras.layers.deserialize(config["f"])
        config["g"] = keras.layers.deserialize(config["g"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReversibleStack(keras.layers.Layer):
    """A sequence of `ReversibleBlock`s with memory independent of depth.

    While training, the whole stack is one custom-gradient function: only
    its output is kept, and the backward pass reconstructs each block's
    inputs from its outputs and recomputes `f` and `g` (with the same seeds)
    to get the gradients of the inputs and of every weight. At inference it
    is an ordinary forward pass.

    Args:
        blocks: list of `ReversibleBlock`.
        seed: int or None, seeds the per-step seeds of the blocks.

    Example:
    >>> from keras_reformer.layers import (
    ...     ChunkedFeedForward, FullSelfAttention, PreNormBranch)
    >>> stack = ReversibleStack([
    ...     ReversibleBlock(PreNormBranch(FullSelfAttention(2, 8)),
    ...                     PreNormBranch(ChunkedFeedForward(32, 4)))
    ...     for _ in range(3)])
    >>> stack(keras.random.normal((1, 8, 32))).shape
    (1, 8, 32)
    """

    def __init__(self, blocks, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.blocks = list(blocks)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True  # a Keras mask is the padding mask

    def build(self, input_shape):
        _check_even(input_shape)
        for block in self.blocks:
            if not block.built:
                block.build(input_shape)

    def call(self, inputs, padding_mask=None, training=None, seed=None,
             mask=None):
        return reversible_call(self.blocks, inputs, padding_mask, training,
                               draw_seed(seed, self.seed_generator)
                               if training else None, mask)

    def call_with_cache(self, inputs, cache, index):
        """Every block's `call_with_cache` in turn; `cache` is None
        (prefill) or the list of the blocks' caches."""
        caches = cache or [None] * len(self.blocks)
        new_caches = []
        for block, block_cache in zip(self.blocks, caches):
            inputs, block_cache = block.call_with_cache(
                inputs, block_cache, index)
            new_caches.append(block_cache)
        return inputs, new_caches

    def block_seeds(self, seed):
        """The seed each block receives for a stack call with `seed`."""
        return [fold_seed(seed, i) for i in range(len(self.blocks))]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "blocks": [keras.layers.serialize(b) for b in self.blocks],
            "seed": self.seed,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["blocks"] = [keras.layers.deserialize(b)
                            for b in config["blocks"]]
        return cls(**config)


def reversible_call(blocks, inputs, padding_mask, training, seed,
                    keras_mask=None):
    """Runs `blocks` on `inputs` (`x1` and `x2` concatenated on the last axis).

    Inference is a plain forward pass; training goes through the recomputing
    custom gradient with block `i` seeded by `fold_seed(seed, i)`. A token is
    real where both `padding_mask` and `keras_mask` (a mask Keras hands the
    layer) allow it.
    """
    x1, x2 = ops.split(inputs, 2, axis=-1)
    padding_mask = padding_mask_or_ones(padding_mask, inputs, keras_mask)
    if not training:
        for block in blocks:
            x1, x2 = block.forward(x1, x2, padding_mask, False, None)
        return ops.concatenate([x1, x2], axis=-1)

    branches = [branch for block in blocks for branch in (block.f, block.g)]
    splits = [_WeightSplit(b) for b in branches]
    trainable = [tensor_values(split.trainable) for split in splits]
    fixed = [tensor_values(split.fixed) for split in splits]
    sizes = [len(t) for t in trainable] + [len(f) for f in fixed]

    def stateless(index, trainable_values, fixed_values):
        def call(x, **kwargs):
            return splits[index].stateless_call(
                trainable_values, fixed_values, x, **kwargs)
        return call

    def unflatten(weights):
        groups, start = [], 0
        for size in sizes:
            groups.append(list(weights[start:start + size]))
            start += size
        half = len(branches)
        return groups[:half], groups[half:]

    def forward(x1, x2, padding_mask, seed, *weights):
        trainable, fixed = unflatten(weights)
        for i, block in enumerate(blocks):
            trainable[2 * i] = after(x2, trainable[2 * i])
            trainable[2 * i + 1] = after(x2, trainable[2 * i + 1])
            x1, x2 = block.forward(
                x1, x2, padding_mask, True, fold_seed(seed, i),
                stateless(2 * i, trainable[2 * i], fixed[2 * i]),
                stateless(2 * i + 1, trainable[2 * i + 1], fixed[2 * i + 1]),
            )
        return (x1, x2), (x1, x2, padding_mask, seed, weights)

    def backward(residuals, output_grads):
        y1, y2, padding_mask, seed, weights = residuals
        dy1, dy2 = output_grads
        # Recomputing the top block needs only y1, y2 and the weights; tie
        # it to the output gradients so that it waits for the layers above
        # to finish their backward pass (and free what they kept).
        y1, y2 = after(dy1, after(dy2, [y1, y2]))
        trainable, fixed = unflatten(weights)
        weight_grads = [None] * len(branches)
        for i in reversed(range(len(blocks))):
            block_seed = fold_seed(seed, i)
            g_index, f_index = 2 * i + 1, 2 * i
            trainable[f_index] = after(y1, trainable[f_index])
            trainable[g_index] = after(y1, trainable[g_index])
            # y2 = x2 + g(y1): recompute g, recover x2, pull dy2 back.
            g_out, g_grads = _branch_vjp(
                splits[g_index], trainable[g_index], fixed[g_index], y1,
                padding_mask, _branch_seed(block_seed, 1), dy2)
            x2 = y2 - g_out
            dy1 = dy1 + g_grads[0]
            weight_grads[g_index] = g_grads[1:]
            # y1 = x1 + f(x2): recompute f, recover x1, pull dy1 back.
            f_out, f_grads = _branch_vjp(
                splits[f_index], trainable[f_index], fixed[f_index], x2,
                padding_mask, _branch_seed(block_seed, 0), dy1)
            x1 = y1 - f_out
            dy2 = dy2 + f_grads[0]
            weight_grads[f_index] = f_grads[1:]
            y1, y2 = x1, x2
        flat_grads = [g for group in weight_grads for g in group]
        num_fixed = sum(len(f) for f in fixed)
        return (dy1, dy2, None, None, *flat_grads, *([None] * num_fixed))

    weights = [w for group in trainable + fixed for w in group]
    run = with_custom_gradient(forward, backward)
    y1, y2 = run(x1, x2, padding_mask, seed, *weights)
    return ops.concatenate([y1, y2], axis=-1)


class _WeightSplit:
    """A branch's variables: those that take gradients and the others.

    The ones that take gradients are those whose variable is trainable:
    after keras-hub's `enable_lora`, the LoRA adapters, which sit inside
    layers that are frozen (whose `trainable_variables` are empty).

    Args:
        branch: a layer.
    """

    def __init__(self, branch):
        self.branch = branch
        variables = branch.trainable_variables + (
            branch.non_trainable_variables)
        self.num_call_trainable = len(branch.trainable_variables)
        self.order = sorted(range(len(variables)),
                            key=lambda i: not variables[i].trainable)
        self.trainable = [v for v in variables if v.trainable]
        self.fixed = [v for v in variables if not v.trainable]

    def stateless_call(self, trainable_values, fixed_values, x, **kwargs):
        """`branch(x, **kwargs)` with the values of `trainable` and
        `fixed`."""
        values = [None] * len(self.order)
        for i, value in zip(self.order,
                            list(trainable_values) + list(fixed_values)):
            values[i] = value
        return self.branch.stateless_call(
            values[:self.num_call_trainable],
            values[self.num_call_trainable:], x, **kwargs)[0]


def _branch_vjp(split, trainable_values, fixed_values, x, padding_mask, seed,
                output_grad):
    """Recomputes the branch of `split` (a `_WeightSplit`) on `x`; returns
    it and grads wrt `x` and its trainable weights."""

    def apply(x, *trainable_values):
        return (split.stateless_call(
            trainable_values, fixed_values, x, padding_mask=padding_mask,
            training=True, seed=seed),)

    (out,), grads = value_and_vjp(
        apply, [x, *trainable_values], (output_grad,))
    return out, grads


def _branch_seed(seed, index):
    return None if seed is None else fold_seed(seed, index)


def _check_even(input_shape):
    if input_shape[-1] is None or input_shape[-1] % 2:
        raise ValueError(
            "A reversible layer splits its input's last axis into two equal "
            f"halves; received input shape {tuple(input_shape)} (the last "
            "axis must be even)."
        )

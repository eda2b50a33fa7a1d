"""The reversible stack against a plain residual stack under autodiff."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_reformer.layers import ChunkedFeedForward
from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import LSHSelfAttention
from keras_reformer.layers import PreNormBranch
from keras_reformer.layers import ReversibleBlock
from keras_reformer.layers import ReversibleStack
from keras_reformer.layers.seeds import fold_seed
from keras_reformer.layers.seeds import seed_tensor
from tests.helpers import assert_close
from tests.helpers import to_numpy
from tests.helpers import value_and_grads

BATCH, LENGTH, HALF = 2, 40, 16


def make_stack(num_blocks=3, dropout=0.1, attention="lsh"):
    def attention_layer(i):
        if attention == "lsh":
            return LSHSelfAttention(2, 8, chunk_length=8, num_hashes=2,
                                    num_buckets=4, causal=True,
                                    dropout=dropout, seed=i)
        return FullSelfAttention(2, 8, causal=True, dropout=dropout, seed=i)

    stack = ReversibleStack([
        ReversibleBlock(
            PreNormBranch(attention_layer(i)),
            PreNormBranch(ChunkedFeedForward(24, chunk_length=16,
                                             dropout=dropout, seed=i)))
        for i in range(num_blocks)], seed=5)
    stack.build((BATCH, LENGTH, 2 * HALF))
    return stack


def plain_residual(stack, x, padding_mask, seed):
    """y1 = x1 + f(x2), y2 = x2 + g(y1) block after block, plain autodiff."""
    x1, x2 = ops.split(x, 2, axis=-1)
    for block, block_seed in zip(stack.blocks, stack.block_seeds(seed)):
        y1 = x1 + block.f(x2, padding_mask=padding_mask, training=True,
                          seed=fold_seed(block_seed, 0))
        y2 = x2 + block.g(y1, training=True, seed=fold_seed(block_seed, 1))
        x1, x2 = y1, y2
    return ops.concatenate([x1, x2], axis=-1)


def data():
    rng = np.random.RandomState(0)
    x = rng.randn(BATCH, LENGTH, 2 * HALF).astype("float32")
    weights = rng.randn(BATCH, LENGTH, 2 * HALF).astype("float32")
    mask = np.ones((BATCH, LENGTH), "int32")
    mask[0, :3] = 0
    return x, weights, mask


@pytest.mark.parametrize("attention", ["lsh", "full"])
def test_outputs_and_gradients_equal_plain_residual_stack(attention):
    # Two blocks: the second's backward reconstructs the first's outputs.
    stack = make_stack(num_blocks=2, attention=attention)
    x, weights, mask = data()
    seed = seed_tensor(3)

    def reversible_loss(x):
        return ops.sum(stack(x, padding_mask=mask, training=True, seed=seed)
                       * weights)

    def plain_loss(x):
        return ops.sum(plain_residual(stack, x, mask, seed) * weights)

    variables = stack.trainable_variables
    actual = value_and_grads(reversible_loss, x, variables)
    expected = value_and_grads(plain_loss, x, variables)
    attention_weights = 3 if attention == "lsh" else 4
    assert len(variables) == 2 * (2 + attention_weights + 2 + 4)
    assert_close(actual[0], expected[0], atol=1e-3, rtol=1e-5)
    assert_close(actual[1], expected[1], atol=1e-5)
    for got, want in zip(actual[2], expected[2]):
        scale = max(1.0, np.abs(want).max())
        assert_close(got / scale, want / scale, atol=1e-5)
        assert np.abs(want).max() > 0


def test_forward_matches_plain_residual_and_inference_path():
    stack = make_stack(dropout=0.0)
    x, _, mask = data()
    seed = seed_tensor(4)
    assert_close(stack(x, padding_mask=mask, training=True, seed=seed),
                 plain_residual(stack, x, mask, seed), atol=1e-5)
    # Inference runs the blocks directly with the fixed rotations.
    x1, x2 = ops.split(x, 2, axis=-1)
    for block in stack.blocks:
        x1 = x1 + block.f(x2, padding_mask=mask)
        x2 = x2 + block.g(x1)
    assert_close(stack(x, padding_mask=mask),
                 ops.concatenate([x1, x2], -1), atol=1e-5)


def test_inputs_are_reconstructed_from_outputs():
    stack = make_stack(num_blocks=1)
    block = stack.blocks[0]
    x, _, mask = data()
    seed = seed_tensor(7)
    y = block(x, padding_mask=mask, training=True, seed=seed)
    y1, y2 = ops.split(y, 2, axis=-1)
    block_seed = fold_seed(seed, 0)  # a block runs as a stack of one
    x2 = y2 - block.g(y1, training=True, seed=fold_seed(block_seed, 1))
    x1 = y1 - block.f(x2, padding_mask=mask, training=True,
                      seed=fold_seed(block_seed, 0))
    assert_close(ops.concatenate([x1, x2], -1), x, atol=1e-5)


def test_train_step_gradients_equal_plain_autodiff():
    """One `model.fit` step with SGD(lr=1) moves each weight by its gradient;
    compare with plain autodiff through the residual formula."""
    stack = make_stack(num_blocks=2, dropout=0.0)
    x, weights, mask = data()
    inputs = keras.Input((LENGTH, 2 * HALF))
    model = keras.Model(inputs, stack(inputs, padding_mask=mask))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0),
                  loss=lambda y, out: ops.sum(out * weights))
    variables = stack.trainable_variables
    before = [to_numpy(v) for v in variables]
    seed = ops.copy(stack.seed_generator.state.value)
    _, _, expected = value_and_grads(
        lambda x: ops.sum(plain_residual(stack, x, mask, seed) * weights),
        x, variables)
    model.fit(x, np.zeros((BATCH,)), batch_size=BATCH, epochs=1, verbose=0,
              shuffle=False)
    for old, var, grad in zip(before, variables, expected):
        scale = max(1.0, np.abs(grad).max())
        assert_close((old - to_numpy(var)) / scale, grad / scale, atol=1e-5)


def test_odd_width_raises():
    with pytest.raises(ValueError, match="even"):
        make_stack().build((1, 8, 31))


def test_config_round_trip_keeps_structure():
    stack = make_stack(num_blocks=2)
    clone = ReversibleStack.from_config(stack.get_config())
    assert len(clone.blocks) == 2
    assert isinstance(clone.blocks[1].f.layer, LSHSelfAttention)
    assert clone.get_config() == stack.get_config()


def test_every_block_branch_and_layer_stream_gets_its_own_seed():
    # A stack folds the step's seed by block, then branch (attention 0,
    # feed-forward 1), then the layer's own streams (rotations 0, dropout 1).
    # Folded by addition, block i's dropout stream was block i + 1's
    # rotation stream.
    seed = seed_tensor(5)
    seeds = [tuple(to_numpy(fold_seed(fold_seed(fold_seed(seed, block),
                                                branch), stream)))
             for block in range(8) for branch in range(2)
             for stream in range(2)]
    assert len(set(seeds)) == len(seeds)

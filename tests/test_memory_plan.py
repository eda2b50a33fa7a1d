"""The automatic choice of heads and runs of chunks attended at a time."""

import keras
import pytest

from keras_reformer.layers import LocalSelfAttention
from keras_reformer.layers import LSHSelfAttention
from keras_reformer.layers import memory_plan
from tests.helpers import assert_same_as_whole


def _issue_layer(layer_class):
    """Issue #21's layer: 8 heads of 64, causal, chunks of 64 with one
    chunk of look-back (and 4 hash rounds for LSH)."""
    kwargs = {"num_hashes": 4} if layer_class is LSHSelfAttention else {}
    return layer_class(8, 64, chunk_length=64, causal=True, **kwargs)


# Runs per length on TensorFlow and on JAX (smaller runs there).
ON_JAX = keras.backend.backend() == "jax"


@pytest.mark.parametrize("length,expected,on_jax", [
    (1024, (None, None), (1, 2)), (4096, (None, None), (1, 8)),
    (16384, (1, None), (1, 32)), (65536, (1, 2), (1, 128)),
    (1048576, (1, 32), (1, 2048))])
def test_lsh_auto_plan_follows_the_length_as_documented(length, expected,
                                                        on_jax):
    layer = _issue_layer(LSHSelfAttention)
    assert layer.memory_plan(length) == (on_jax if ON_JAX and on_jax
                                         else expected)


@pytest.mark.parametrize("length,expected,on_jax", [
    (4096, None, None), (16384, None, None), (65536, 4, 256),
    (1048576, 64, 4096)])
def test_local_auto_plan_follows_the_length_as_documented(length, expected,
                                                          on_jax):
    assert _issue_layer(LocalSelfAttention).memory_plan(length) == (
        on_jax if ON_JAX else expected)


def test_explicit_options_and_unknown_lengths():
    layer = LSHSelfAttention(8, 64, parallel_heads=4, segments="auto")
    # Four heads' scores at 16K are 2**25: two runs (128 on JAX).
    assert layer.memory_plan(16384) == (4, 128 if ON_JAX else 2)
    layer = LSHSelfAttention(8, 64, parallel_heads="auto", segments=8)
    # Eight runs leave room for all heads' scores at 16K (not on JAX).
    assert layer.memory_plan(16384) == ((1, 8) if ON_JAX else (None, 8))
    assert LSHSelfAttention(8, 64, parallel_heads=None,
                            segments=None).memory_plan(1 << 20) == (
        None, None)
    # A length unknown while tracing (a tensor): all at once.
    assert memory_plan.plan("auto", "auto", 8, object(), object()) == (
        None, None)


@pytest.mark.parametrize("budget,expected", [(1024, (1, None)),
                                             (256, (1, 2))])
def test_lsh_auto_plan_equals_all_at_once(monkeypatch, budget, expected):
    # 29 tokens padded to 32, chunks of 4, 2 rounds: 512 scores per head.
    monkeypatch.setattr(memory_plan, "STEP_SCORES", budget)
    kwargs = dict(num_heads=4, head_dim=8, chunk_length=4, num_hashes=2,
                  num_buckets=4, causal=True, seed=1)
    auto = LSHSelfAttention(**kwargs)
    whole = LSHSelfAttention(parallel_heads=None, segments=None, **kwargs)
    for layer in (auto, whole):
        layer.build((2, 29, 24))
    whole.set_weights(auto.get_weights())
    assert auto.memory_plan(32) == expected
    assert_same_as_whole(auto, whole)


def test_local_auto_plan_equals_all_at_once(monkeypatch):
    # 32 padded tokens, chunks of 4, 2 heads: 512 scores; 2 runs of 4 chunks.
    monkeypatch.setattr(memory_plan, "STEP_SCORES", 256)
    kwargs = dict(num_heads=2, head_dim=8, chunk_length=4, causal=True)
    auto = LocalSelfAttention(**kwargs)
    whole = LocalSelfAttention(segments=None, **kwargs)
    for layer in (auto, whole):
        layer.build((2, 29, 24))
    whole.set_weights(auto.get_weights())
    assert auto.memory_plan(32) == 2
    assert_same_as_whole(auto, whole)


@pytest.mark.parametrize("layer_class,kwargs,message", [
    (LSHSelfAttention, {"parallel_heads": "fast"},
     "parallel_heads must be 'auto', None or a positive integer; received "
     "parallel_heads='fast'"),
    (LSHSelfAttention, {"segments": 0}, "segments=0"),
    (LSHSelfAttention, {"parallel_heads": 3}, "parallel_heads=3 with "
     "num_heads=2"),
    (LocalSelfAttention, {"segments": "Auto"}, "segments='Auto'"),
])
def test_bad_options_raise(layer_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer_class(2, 8, **kwargs)


@pytest.mark.parametrize("layer_class", [LSHSelfAttention,
                                         LocalSelfAttention])
def test_auto_survives_the_config(layer_class):
    config = layer_class(2, 8).get_config()
    assert config["segments"] == "auto"
    clone = layer_class.from_config(config)
    assert clone.get_config() == config

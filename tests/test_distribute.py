"""Data parallelism with tf.distribute on two logical CPUs must match one
device on the same global batch (losses and trained weights), reversible
custom gradients, LSH and local attention included; a TPU-style compiled
step under a strategy's scope. (Keras's distribution API on JAX is tested
in tests/test_jax_distribution.py.)

Each run is a subprocess: the device count is fixed when TensorFlow starts.
"""

import json
import subprocess
import sys
import textwrap

import keras
import pytest

from tests.helpers import TINY_LM_SOURCE

# A model factory, one batch, and the comparison
# (`parallel_model()` builds the model under the data-parallel setting).
COMMON = textwrap.dedent("""
    import json
    import keras
    import numpy as np
    from keras_reformer.models import ReformerBackbone, ReformerCausalLM
""") + TINY_LM_SOURCE + textwrap.dedent("""
    def make():
        model = ReformerCausalLM(tiny_backbone())
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        return model

    def compare(parallel_model):
        single = make()
        initial = single.get_weights()
        fit = dict(batch_size=8, epochs=3, shuffle=False, verbose=0)
        single_losses = single.fit(x, y, **fit).history["loss"]
        parallel = parallel_model()
        parallel.set_weights(initial)
        parallel_losses = parallel.fit(x, y, **fit).history["loss"]
        difference = max(float(np.abs(a - b).max()) for a, b in
                         zip(single.get_weights(), parallel.get_weights()))
        print("RESULT" + json.dumps(
            [single_losses, parallel_losses, difference]))
""")

TENSORFLOW_SCRIPT = textwrap.dedent("""
    import os
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
""") + COMMON + textwrap.dedent("""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2

    def mirrored():
        with strategy.scope():
            return make()

    compare(mirrored)
""")

def run_and_compare(script):
    result = subprocess.run([sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    single, parallel, weight_difference = json.loads(line[0][len("RESULT"):])
    assert single[-1] < single[0]
    for a, b in zip(single, parallel):
        assert abs(a - b) < 1e-5
    assert weight_difference < 1e-5


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tf.distribute is TensorFlow's")
def test_mirrored_strategy_matches_one_device():
    run_and_compare(TENSORFLOW_SCRIPT)



@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tf.distribute is TensorFlow's")
def test_tpu_style_compiled_steps_under_a_strategy_scope():
    """What a TPU needs, as far as a CPU can show it: the model and
    optimizer built in a strategy's scope, static shapes, the whole train
    step compiled by XLA (an op XLA cannot compile would fail here) and
    several steps per compiled call."""
    import numpy as np
    import tensorflow as tf

    from keras_reformer.models import ReformerBackbone
    from keras_reformer.models import ReformerCausalLM

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = ReformerCausalLM(ReformerBackbone(
            50, hidden_dim=16, num_heads=2, head_dim=8, intermediate_dim=32,
            attention_types=["lsh", "local"], axial_shape=(8, 8), seed=1,
            attention_options={"lsh": {"chunk_length": 16, "num_hashes": 2},
                               "local": {"chunk_length": 16}}))
        model.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True),
                      jit_compile=True, steps_per_execution=3)
    ids = np.random.RandomState(0).randint(1, 50, (24, 65)).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((
        {"token_ids": ids[:, :-1], "padding_mask": np.ones((24, 64), "int32")},
        ids[:, 1:])).batch(4, drop_remainder=True)
    assert dataset.element_spec[1].shape.is_fully_defined()
    history = model.fit(dataset, epochs=2, verbose=0)
    assert model.optimizer.iterations.numpy() == 12
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][1] < history.history["loss"][0]

"""Data parallelism: tf.distribute on two logical CPUs, Keras distribution on
JAX with two host devices; both must match one device."""

import json
import subprocess
import sys
import textwrap

import keras
import pytest

SCRIPT = textwrap.dedent("""
    import os
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from keras_reformer.models import ReformerBackbone, ReformerLM

    def make():
        keras.utils.set_random_seed(1)
        backbone = ReformerBackbone(
            50, hidden_dim=32, num_heads=2, head_dim=8, intermediate_dim=48,
            attention_types=["lsh", "local"], axial_shape=(8, 8),
            chunk_length=16, num_hashes=2, seed=1)
        model = ReformerLM(backbone)
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        return model

    ids = np.random.RandomState(0).randint(1, 50, (8, 65)).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((
        {"token_ids": ids[:, :-1], "padding_mask": np.ones((8, 64), "int32")},
        ids[:, 1:])).batch(8)
    single = make()
    initial = single.get_weights()
    single_losses = single.fit(dataset, epochs=3, verbose=0).history["loss"]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        mirrored = make()
    mirrored.set_weights(initial)
    mirrored_losses = mirrored.fit(dataset, epochs=3,
                                   verbose=0).history["loss"]
    weight_difference = max(
        float(np.abs(a - b).max())
        for a, b in zip(single.get_weights(), mirrored.get_weights()))
    import json
    print("RESULT" + json.dumps([single_losses, mirrored_losses,
                                 weight_difference]))
""")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tf.distribute is TensorFlow's")
def test_mirrored_strategy_matches_one_device():
    """Same global batch on one device and split over two replicas: the
    losses and the trained weights agree (reversible custom gradient, LSH
    and local attention included)."""
    result = subprocess.run([sys.executable, "-c", SCRIPT],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    single, mirrored, weight_difference = json.loads(line[0][len("RESULT"):])
    assert single[-1] < single[0]
    for a, b in zip(single, mirrored):
        assert abs(a - b) < 1e-5
    assert weight_difference < 1e-5


JAX_SCRIPT = textwrap.dedent("""
    import os
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import json
    import jax
    import keras
    import numpy as np
    from keras_reformer.models import ReformerBackbone, ReformerLM

    assert len(jax.devices()) == 2, jax.devices()

    def make():
        keras.utils.set_random_seed(1)
        backbone = ReformerBackbone(
            50, hidden_dim=32, num_heads=2, head_dim=8, intermediate_dim=48,
            attention_types=["lsh", "local"], axial_shape=(8, 8),
            chunk_length=16, num_hashes=2, seed=1)
        model = ReformerLM(backbone)
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        return model

    ids = np.random.RandomState(0).randint(1, 50, (8, 65)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((8, 64), "int32")}
    y = ids[:, 1:]
    single = make()
    initial = single.get_weights()
    single_losses = single.fit(x, y, batch_size=8, epochs=3, shuffle=False,
                               verbose=0).history["loss"]
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()))
    parallel = make()
    parallel.set_weights(initial)
    parallel_losses = parallel.fit(x, y, batch_size=8, epochs=3,
                                   shuffle=False, verbose=0).history["loss"]
    difference = max(float(np.abs(a - b).max()) for a, b in
                     zip(single.get_weights(), parallel.get_weights()))
    print("RESULT" + json.dumps([single_losses, parallel_losses, difference]))
""")


def test_jax_data_parallel_matches_one_device():
    """keras.distribution.DataParallel over two host devices (JAX backend):
    same losses and weights as one device on the same global batch."""
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    single, parallel, weight_difference = json.loads(line[0][len("RESULT"):])
    assert single[-1] < single[0]
    for a, b in zip(single, parallel):
        assert abs(a - b) < 1e-5
    assert weight_difference < 1e-5

"""MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1.

`keras_reformer.multi_worker_training.StrategyTrainer` trains a small
ReformerCausalLM (LSH and local attention, reversible stack) for a few SGD
steps on one fixed global batch, split over two workers (TF_CONFIG); both
workers must end with the same weights, and losses and weights must match a
single process training the whole batch with a plain GradientTape.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tests.helpers import TINY_LM_SOURCE

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="tf.distribute is TensorFlow's")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

# argv: mode ("worker" or "reference"), output .npz, output directory,
# steps, "jit" or "nojit".
SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import numpy as np
    import tensorflow as tf
    from keras_reformer import multi_worker_training as mwt
    from keras_reformer.models import ReformerBackbone, ReformerCausalLM

    mode, output, directory = sys.argv[1:4]
    STEPS = int(sys.argv[4])
    JIT = sys.argv[5] == "jit"
    strategy = (tf.distribute.MultiWorkerMirroredStrategy()
                if mode == "worker" else tf.distribute.get_strategy())

""") + TINY_LM_SOURCE + textwrap.dedent("""
    def make():
        return ReformerCausalLM(tiny_backbone()), keras.optimizers.SGD(0.1)

    held = np.random.RandomState(1).randint(1, 50, (16, 65)).astype("int32")
    held_x = {"token_ids": held[:, :-1],
              "padding_mask": np.ones((16, 64), "int32")}
    held_y = held[:, 1:]

    with strategy.scope():
        model, optimizer = make()
    result = {}
    if mode == "worker":
        assert strategy.num_replicas_in_sync == 2
        trainer = mwt.StrategyTrainer(model, optimizer, strategy,
                                      jit_compile=JIT)
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
        iterator = iter(trainer.distribute(train))
        batches = [next(iterator) for _ in range(STEPS)]
        # Which rows of the global batch this worker's replica holds.
        local = strategy.experimental_local_results(batches[0])[0]
        result["rows"] = [ids[:, :-1].tolist().index(row) for row in
                          local[0]["token_ids"].numpy().tolist()]
        losses = [trainer.train_step(batch) for batch in batches]
        held_out = tf.data.Dataset.from_tensor_slices(
            (held_x, held_y)).batch(8, drop_remainder=True)
        evaluation = trainer.evaluate(held_out)
        chief = mwt.is_chief(strategy)
        with mwt.chief_path(os.path.join(directory, "lm.weights.h5"),
                            strategy) as path:
            model.save_weights(path)
            written = os.path.exists(path)
        result.update(chief=chief, written=written, path=path,
                      left_behind=os.path.exists(os.path.dirname(path))
                      if not chief else False)
    else:
        losses = []
        for _ in range(STEPS):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    y, logits, from_logits=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            losses.append(float(loss))
        logits = model(held_x, training=False)
        evaluation = {"loss": float(tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                held_y, logits, from_logits=True)))}
    result.update(losses=losses, eval_loss=evaluation["loss"])
    weights = model.get_weights()
    np.savez(output, *weights)
    print("RESULT" + json.dumps(result), flush=True)
""")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(commands, timeout):
    """Starts one process per `(argv, env)` and waits for all of them; kills
    every one that is still running on a timeout or failure."""
    processes = [subprocess.Popen(argv, cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
                 for argv, env in commands]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [(p.returncode, out) for p, out in zip(processes, outputs)]


def cluster_env(ports, index, **extra):
    config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
              "task": {"type": "worker", "index": index}}
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                TF_CONFIG=json.dumps(config), **extra)


def result_of(output):
    line = [l for l in output.splitlines() if l.startswith("RESULT")]
    assert line, output[-3000:]
    return json.loads(line[-1][len("RESULT"):])


@pytest.mark.parametrize("jit", ["nojit", "jit"])
def test_two_workers_agree_and_match_one_process(tmp_path, jit):
    """With `jit_compile=True` each worker's forward and backward pass is
    compiled by XLA; the reference never is."""
    ports = free_ports(2)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    runs = run_workers(
        [([sys.executable, "-c", SCRIPT, "worker", str(tmp_path / f"w{i}.npz"),
           str(tmp_path), str(STEPS), jit], cluster_env(ports, i))
         for i in range(2)], timeout=240)
    for code, output in runs:
        assert code == 0, output[-4000:]
    (reference_code, reference_output), = run_workers(
        [([sys.executable, "-c", SCRIPT, "reference",
           str(tmp_path / "single.npz"), str(tmp_path), str(STEPS), "nojit"],
          env)],
        timeout=240)
    assert reference_code == 0, reference_output[-4000:]

    chief, other = (result_of(out) for _, out in runs)
    reference = result_of(reference_output)
    w0, w1, single = (np.load(tmp_path / f"{name}.npz")
                      for name in ("w0", "w1", "single"))
    assert len(w0.files) == len(single.files) > 0

    # Each worker trains on its half of the global batch ...
    assert sorted(chief["rows"] + other["rows"]) == list(range(8))
    # ... the workers agree with each other ...
    assert chief["losses"] == other["losses"]
    for name in w0.files:
        np.testing.assert_allclose(w0[name], w1[name], rtol=0, atol=1e-6)
    # ... and with one process on the whole batch.
    np.testing.assert_allclose(chief["losses"], reference["losses"],
                               rtol=0, atol=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]
    moved = max(float(np.abs(w0[n] - single[n]).max()) for n in w0.files)
    assert moved < 1e-5, moved
    assert chief["eval_loss"] == other["eval_loss"]
    assert abs(chief["eval_loss"] - reference["eval_loss"]) < 1e-5

    # Only the chief's file is kept; the other worker's temporary is gone.
    assert chief["chief"] and not other["chief"]
    assert chief["written"] and other["written"]
    assert chief["path"] == str(tmp_path / "lm.weights.h5")
    assert (tmp_path / "lm.weights.h5").is_file()
    assert other["path"] != chief["path"] and not other["left_behind"]


def test_bad_arguments_are_rejected_by_name():
    from keras_reformer import multi_worker_training as mwt

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="optimizer must be"):
        mwt.StrategyTrainer(model, "sgd")
    with pytest.raises(ValueError, match="model must be"):
        mwt.StrategyTrainer("model", keras.optimizers.SGD())
    trainer = mwt.StrategyTrainer(model, keras.optimizers.SGD())
    with pytest.raises(ValueError, match="epochs must be a positive"):
        trainer.fit(None, epochs=0, steps_per_epoch=1)
    with pytest.raises(ValueError, match="dataset must be a tf.data"):
        trainer.distribute([1, 2])
    with pytest.raises(ValueError, match="verbose must be"):
        trainer.fit(None, epochs=1, steps_per_epoch=1, verbose=3)
    assert mwt.is_chief()
    with mwt.chief_path("somewhere/lm") as path:
        assert path == "somewhere/lm"

"""MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1.

`keras_reformer.multi_worker_training.StrategyTrainer` trains a small
ReformerCausalLM (LSH and local attention, reversible stack) for a few SGD
steps on one fixed global batch, split over two workers (TF_CONFIG); both
workers must end with the same weights, and losses and weights must match a
single process training the whole batch with a plain GradientTape.

`StrategyTrainer.fit(backup_dir=...)`: two workers killed with SIGKILL after
an epoch's backup and started again resume at the next epoch and end with
the weights and history of an uninterrupted two-worker run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

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
    for bad, message in [
            (dict(backup_dir=""), "backup_dir must be None or a non-empty"),
            (dict(backup_dir=__file__), "backup_dir must be a directory"),
            (dict(weights_path="lm.h5"), "weights_path must end in "
                                         r"\.weights\.h5"),
            (dict(weights_path="{step}.weights.h5"),
             "weights_path may only use the format fields epoch, loss"),
            (dict(weights_path=7), "weights_path must be None or")]:
        with pytest.raises(ValueError, match=message):
            trainer.fit(None, epochs=1, steps_per_epoch=1, **bad)
    assert mwt.is_chief()
    with mwt.chief_path("somewhere/lm") as path:
        assert path == "somewhere/lm"


def test_a_kept_backup_restores_the_finished_run_without_training(tmp_path):
    """`fit(delete_backup=False)` keeps the backup; the same `fit` again
    restores the trained weights and history and trains no more steps."""
    import tensorflow as tf

    from keras_reformer import multi_worker_training as mwt

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    trainer = mwt.StrategyTrainer(model, keras.optimizers.SGD(0.1))
    data = tf.data.Dataset.from_tensors(
        (np.ones((4, 2), "float32"), np.zeros(4, "int32"))).repeat()
    backup = tmp_path / "backup"

    def fit():
        return trainer.fit(data, epochs=2, steps_per_epoch=2, verbose=0,
                           backup_dir=backup, delete_backup=False)

    history = fit()
    assert backup.is_dir()
    trained = model.get_weights()
    model.set_weights([np.zeros_like(w) for w in trained])
    assert fit() == history
    assert int(trainer.optimizer.iterations) == 4
    for weight, expected in zip(model.get_weights(), trained):
        np.testing.assert_array_equal(weight, expected)


# argv: output prefix, backup directory, weights_path, epochs, the epoch
# after which to wait for SIGKILL (0: never). Adam (slots and step count to
# restore), a seeded shuffle over 3 batches with 2 steps per epoch (epochs
# cross passes over the data), the LSH layers' per-step seed draws.
RESUME_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import numpy as np
    import tensorflow as tf
    from keras_reformer import multi_worker_training as mwt
    from keras_reformer.models import ReformerBackbone, ReformerCausalLM

    output, backup_dir, weights_path = sys.argv[1:4]
    EPOCHS, PAUSE_AFTER = int(sys.argv[4]), int(sys.argv[5])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

""") + TINY_LM_SOURCE + textwrap.dedent("""
    rows = np.random.RandomState(2).randint(1, 50, (24, 65)).astype("int32")
    inputs = {"token_ids": rows[:, :-1],
              "padding_mask": np.ones((24, 64), "int32")}
    train = tf.data.Dataset.from_tensor_slices((inputs, rows[:, 1:]))
    train = train.shuffle(24, seed=3).repeat().batch(8, drop_remainder=True)
    with strategy.scope():
        model = ReformerCausalLM(tiny_backbone())
        optimizer = keras.optimizers.Adam(1e-2)
    trainer = mwt.StrategyTrainer(model, optimizer, strategy)

    def state():
        return model.get_weights() + [np.array(v) for v in optimizer.variables]

    class Record(keras.callbacks.Callback):
        begun = []

        def on_epoch_begin(self, epoch, logs=None):
            if not self.begun:  # the weights the run starts from
                np.savez(output + ".start.npz", *state())
            self.begun.append(epoch)

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == PAUSE_AFTER:
                np.savez(output + ".paused.npz", *state())
                print("PAUSED", flush=True)
                time.sleep(300)  # until the test kills this worker

    record = Record()
    history = trainer.fit(train, epochs=EPOCHS, steps_per_epoch=2,
                          callbacks=[record], verbose=2,
                          backup_dir=backup_dir, weights_path=weights_path)
    np.savez(output + ".end.npz", *state())
    print("RESULT" + json.dumps({
        "history": history, "begun": record.begun,
        "chief": mwt.is_chief(strategy),
        "backup_left": os.path.exists(backup_dir)}), flush=True)
""")


class Workers:
    """Two worker processes of `RESUME_SCRIPT` whose output is read by
    threads; `kill` ends those still running (used on every exit)."""

    def __init__(self, tmp_path, name, epochs, pause_after, label):
        ports = free_ports(2)
        # Each run's temporary files (the other worker's backup) go here.
        self.temporary = tmp_path / f"{label}.tmp"
        self.temporary.mkdir()
        self.backup = tmp_path / f"{name}.backup"
        self.weights = tmp_path / f"{name}.checkpoints"
        self.outputs = [[], []]
        self.processes = []
        self.readers = []
        try:
            for index in range(2):
                argv = [sys.executable, "-c", RESUME_SCRIPT,
                        str(tmp_path / f"{name}{index}"), str(self.backup),
                        str(self.weights / "epoch_{epoch:02d}.weights.h5"),
                        str(epochs), str(pause_after)]
                process = subprocess.Popen(
                    argv, cwd=ROOT, text=True,
                    env=cluster_env(ports, index, TMPDIR=str(self.temporary)),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                self.processes.append(process)
                reader = threading.Thread(
                    target=self._read, daemon=True,
                    args=(process, self.outputs[index]))
                reader.start()
                self.readers.append(reader)
        except BaseException:
            self.kill()
            raise

    @staticmethod
    def _read(process, lines):
        for line in process.stdout:
            lines.append(line)

    def text(self, index):
        return "".join(self.outputs[index])[-4000:]

    def wait_for(self, marker, timeout):
        """Waits until every worker printed the line `marker`."""
        deadline = time.monotonic() + timeout
        while not all(marker + "\n" in lines for lines in self.outputs):
            for index, process in enumerate(self.processes):
                assert process.poll() is None, self.text(index)
            assert time.monotonic() < deadline, (
                f"no {marker} within {timeout} s:\n" + self.text(0))
            time.sleep(0.1)

    def finish(self, timeout):
        """Waits for both to exit; returns their RESULT dicts."""
        for index, process in enumerate(self.processes):
            process.wait(timeout=timeout)
            self.readers[index].join(timeout=10)  # the last lines
            assert process.returncode == 0, self.text(index)
        return [result_of("".join(lines)) for lines in self.outputs]

    def kill(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def saved(prefix):
    with np.load(f"{prefix}.npz") as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def test_two_workers_killed_after_an_epoch_resume_from_its_backup(tmp_path):
    """SIGKILL both workers after epoch 1 of 3 (while they wait in a
    callback, after the backup is written); started again, they restore
    the backup, train epochs 2 and 3 on the batches an uninterrupted run
    trains them on, and end with its weights, optimizer state and history;
    the backup is then deleted and the chief kept every epoch's weights.
    """
    runs = []
    try:
        # The uninterrupted run and the run to kill, side by side.
        whole = Workers(tmp_path, "whole", epochs=3, pause_after=0,
                        label="whole")
        runs.append(whole)
        killed = Workers(tmp_path, "run", epochs=3, pause_after=1,
                         label="killed")
        runs.append(killed)
        killed.wait_for("PAUSED", timeout=150)
        for process in killed.processes:
            process.send_signal(signal.SIGKILL)  # no clean-up runs
        killed.kill()
        assert [p.returncode for p in killed.processes] == [-9, -9]
        assert (killed.backup / "checkpoint").is_file()
        assert sorted(os.listdir(killed.weights)) == ["epoch_01.weights.h5"]

        resumed = Workers(tmp_path, "run", epochs=3, pause_after=0,
                          label="resumed")
        runs.append(resumed)
        resumed_results = resumed.finish(timeout=150)
        whole_results = whole.finish(timeout=150)
    finally:
        for run in runs:
            run.kill()

    for result in resumed_results:
        # Resumed at epoch 2 (0-based 1), not from scratch ...
        assert result["begun"] == [1, 2], result
    # The chief deletes the backup once training is done. (The other
    # worker may look before the chief has deleted it.)
    [chief] = [result for result in resumed_results if result["chief"]]
    assert not chief["backup_left"]
    assert not killed.backup.exists()
    assert "Restored the backup of epoch 1" in resumed.text(0)
    # ... from exactly the state saved after epoch 1 ...
    for index in range(2):
        paused = saved(tmp_path / f"run{index}.paused")
        start = saved(tmp_path / f"run{index}.start")
        assert len(paused) == len(start) > 0
        for before, after in zip(paused, start):
            np.testing.assert_array_equal(before, after)
    # ... to the end state and history of the uninterrupted run.
    for index in range(2):
        whole_end = saved(tmp_path / f"whole{index}.end")
        resumed_end = saved(tmp_path / f"run{index}.end")
        assert len(whole_end) == len(resumed_end)
        for expected, actual in zip(whole_end, resumed_end):
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    for name, values in whole_results[0]["history"].items():
        assert len(values) == 3
        np.testing.assert_allclose(resumed_results[0]["history"][name],
                                   values, rtol=0, atol=1e-6)
    assert whole_results[0]["begun"] == [0, 1, 2]
    # Both workers' backups are gone (the chief's directory, the other's
    # temporary: only the killed worker 1 left its own behind); only the
    # chief wrote the per-epoch weights.
    assert not killed.backup.exists() and not whole.backup.exists()
    def backups_left(run):  # autograph's files there are not ours
        return [n for n in os.listdir(run.temporary) if n.startswith("worker")]

    assert backups_left(whole) == backups_left(resumed) == []
    left = backups_left(killed)
    assert len(left) == 1 and left[0].startswith("worker1-"), left
    assert whole_results[0]["chief"] and not whole_results[1]["chief"]
    for run in (whole, resumed):
        assert sorted(os.listdir(run.weights)) == [
            f"epoch_{n:02d}.weights.h5" for n in (1, 2, 3)]

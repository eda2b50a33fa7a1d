"""MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1.

`keras_reformer.multi_worker_training.StrategyTrainer` trains a small
ReformerCausalLM (LSH and local attention, reversible stack) for a few SGD
steps on one fixed global batch, split over two workers (TF_CONFIG); both
workers must end with the same weights, and losses and weights must match a
single process training the whole batch with a plain GradientTape. The same
workers then run `fit` with Keras callbacks: `EarlyStopping` and
`TerminateOnNaN` stop both workers alike.

`StrategyTrainer.fit(backup_dir=...)`: two workers killed with SIGKILL after
an epoch's backup and started again resume at the next epoch and end with
the weights and history of an uninterrupted two-worker run.
"""

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import keras
import numpy as np
import pytest

from tests.helpers import TINY_LM_SOURCE
from tests.processes import ROOT
from tests.processes import cluster_env
from tests.processes import free_ports
from tests.processes import result_of
from tests.processes import run_workers
from tests.processes import tensorboard_scalars

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="tf.distribute is TensorFlow's")

STEPS = 3

# argv: mode ("worker" or "reference"), output .npz, output directory,
# steps.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import numpy as np
    import tensorflow as tf
    from keras_reformer import multi_worker_training as mwt
    from keras_reformer.metrics import BitsPerByte
    from keras_reformer.models import ReformerBackbone, ReformerCausalLM

    mode, output, directory = sys.argv[1:4]
    STEPS = int(sys.argv[4])
    strategy = (tf.distribute.MultiWorkerMirroredStrategy()
                if mode == "worker" else tf.distribute.get_strategy())

""") + TINY_LM_SOURCE + textwrap.dedent("""
    def make():
        model = ReformerCausalLM(tiny_backbone())
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True),
                      metrics=[BitsPerByte()], weighted_metrics=None)
        return model, model.optimizer

    held = np.random.RandomState(1).randint(1, 50, (16, 65)).astype("int32")
    held_x = {"token_ids": held[:, :-1],
              "padding_mask": np.ones((16, 64), "int32")}
    held_y = held[:, 1:]

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches, self.log_names, self.losses = [], set(), []

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            self.batches.append([self.epoch, batch])
            self.log_names.update(logs)
            self.losses.append(float(logs["loss"]))

    def callback_runs(trainer, train):
        # fit with EarlyStopping (and TensorBoard on the chief), then with
        # TerminateOnNaN.
        record, stop = Record(), keras.callbacks.EarlyStopping(
            monitor="loss", patience=0, min_delta=100.0)
        callbacks = [record, stop]
        if mwt.is_chief(strategy):
            callbacks.append(keras.callbacks.TensorBoard(
                os.path.join(directory, "logs"), update_freq="batch"))
        history = trainer.fit(train, epochs=4, steps_per_epoch=2, verbose=2,
                              callbacks=callbacks)
        early = {"history": history.history, "params": record.params,
                 "batches": record.batches, "losses": record.losses,
                 "log_names": sorted(record.log_names),
                 "stopped_epoch": stop.stopped_epoch}
        kernel = model.trainable_variables[0]
        kernel.assign(np.full(kernel.shape, np.nan, "float32"))
        steps_before = int(model.optimizer.iterations.numpy())
        record = Record()
        history = trainer.fit(train, epochs=3, steps_per_epoch=3, verbose=0,
                              callbacks=[keras.callbacks.TerminateOnNaN(),
                                         record])
        return {"early": early, "nan": {
            "epochs": len(history.history["loss"]), "batches": record.batches,
            "steps": int(model.optimizer.iterations.numpy()) - steps_before}}

    with strategy.scope():
        model, optimizer = make()
    result = {}
    if mode == "worker":
        assert strategy.num_replicas_in_sync == 2
        trainer = mwt.StrategyTrainer(model, strategy)
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
        iterator = iter(trainer.distribute(train))
        batches = [next(iterator) for _ in range(STEPS)]
        # Which rows of the global batch this worker's replica holds.
        local = strategy.experimental_local_results(batches[0])[0]
        result["rows"] = [ids[:, :-1].tolist().index(row) for row in
                          local[0]["token_ids"].numpy().tolist()]
        logs = []
        for batch in batches:
            model.reset_metrics()
            logs.append(trainer.train_step(batch))
        losses = [step["loss"] for step in logs]
        result["bits_per_byte"] = [step["bits_per_byte"] for step in logs]
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
    if mode == "worker":
        result.update(callback_runs(trainer, train))
    print("RESULT" + json.dumps(result), flush=True)
""")


def test_two_workers_agree_match_one_process_and_keep_fits_callbacks(
        tmp_path):
    ports = free_ports(2)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    runs = run_workers(
        [([sys.executable, "-c", SCRIPT, "worker", str(tmp_path / f"w{i}.npz"),
           str(tmp_path), str(STEPS)], cluster_env(ports, i))
         for i in range(2)], timeout=240)
    for code, output in runs:
        assert code == 0, output[-4000:]
    (reference_code, reference_output), = run_workers(
        [([sys.executable, "-c", SCRIPT, "reference",
           str(tmp_path / "single.npz"), str(tmp_path), str(STEPS)], env)],
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
    # The compiled metric is reported, over the global batch.
    np.testing.assert_allclose(
        chief["bits_per_byte"],
        [loss / math.log(2.0) for loss in reference["losses"]], atol=1e-5)

    # Only the chief's file is kept; the other worker's temporary is gone.
    assert chief["chief"] and not other["chief"]
    assert chief["written"] and other["written"]
    assert chief["path"] == str(tmp_path / "lm.weights.h5")
    assert (tmp_path / "lm.weights.h5").is_file()
    assert other["path"] != chief["path"] and not other["left_behind"]

    # fit's callback protocol on both workers: parameters, batch hooks with
    # the compiled metrics, EarlyStopping ending the run after epoch 2 of 4
    # (no improvement by 100 nats), TerminateOnNaN after the first step.
    for result in (chief, other):
        early = result["early"]
        assert early["params"] == {"epochs": 4, "steps": 2, "verbose": 2}
        assert early["batches"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
        assert early["log_names"] == ["bits_per_byte", "loss"]
        assert early["stopped_epoch"] == 1
        assert sorted(early["history"]) == ["bits_per_byte", "loss"]
        assert len(early["history"]["loss"]) == 2
        assert result["nan"] == {"epochs": 1, "batches": [[0, 0]],
                                 "steps": 1}
    assert chief["early"]["history"] == other["early"]["history"]
    assert chief["early"]["losses"] == other["early"]["losses"]
    # The chief's TensorBoard logs: the loss after every step and epoch.
    logged = tensorboard_scalars(tmp_path / "logs" / "train")
    assert logged["batch_loss"] == [
        (step + 1, pytest.approx(loss, abs=1e-6))
        for step, loss in enumerate(chief["early"]["losses"])]
    assert logged["epoch_loss"] == [
        (epoch, pytest.approx(loss, abs=1e-6))
        for epoch, loss in enumerate(chief["early"]["history"]["loss"])]
    assert os.listdir(tmp_path / "logs") == ["train"]
    # The progress lines (verbose=2: one per epoch) come from the chief only.
    progress = [re.findall(r"^2/2 .*loss: [0-9.]+", output, re.MULTILINE)
                for _, output in runs]
    assert len(progress[0]) == 2 and progress[1] == [], progress


def dense_classifier():
    """A compiled one-layer model and a repeating dataset for it."""
    import tensorflow as tf

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    data = tf.data.Dataset.from_tensors(
        (np.ones((4, 2), "float32"), np.zeros(4, "int32"))).repeat()
    return model, data


def test_bad_arguments_are_rejected_by_name(tmp_path):
    from keras_reformer import multi_worker_training as mwt

    model, data = dense_classifier()
    with pytest.raises(ValueError, match="model must be compiled"):
        mwt.StrategyTrainer(keras.Sequential([keras.layers.Dense(1)]))
    with pytest.raises(ValueError, match="model must be a keras.Model"):
        mwt.StrategyTrainer("model")
    with pytest.raises(ValueError, match="strategy must be"):
        mwt.StrategyTrainer(model, "mirrored")
    trainer = mwt.StrategyTrainer(model)
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
            (dict(weights_path="{epoch"), "weights_path must be a format"),
            (dict(weights_path=7), "weights_path must be None or")]:
        with pytest.raises(ValueError, match=message):
            trainer.fit(None, epochs=1, steps_per_epoch=1, **bad)
    # A field the logs lack is named at the first save.
    with pytest.raises(ValueError, match="weights_path may only use the "
                                         "format fields epoch, loss"):
        trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0,
                    weights_path=str(tmp_path / "{step}.weights.h5"))
    assert mwt.is_chief()
    with mwt.chief_path("somewhere/lm") as path:
        assert path == "somewhere/lm"


def test_a_kept_backup_restores_the_finished_run_without_training(tmp_path):
    """`fit(delete_backup=False)` keeps the backup; the same `fit` again
    restores the trained weights and history and trains no more steps."""
    from keras_reformer import multi_worker_training as mwt

    model, data = dense_classifier()
    trainer = mwt.StrategyTrainer(model)
    backup = tmp_path / "backup"

    def fit():
        return trainer.fit(data, epochs=2, steps_per_epoch=2, verbose=0,
                           backup_dir=backup, delete_backup=False).history

    history = fit()
    assert backup.is_dir() and len(history["loss"]) == 2
    trained = model.get_weights()
    model.set_weights([np.zeros_like(w) for w in trained])
    assert fit() == history
    assert int(model.optimizer.iterations.numpy()) == 4
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
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        optimizer = model.optimizer
    trainer = mwt.StrategyTrainer(model, strategy)

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
                          backup_dir=backup_dir,
                          weights_path=weights_path).history
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

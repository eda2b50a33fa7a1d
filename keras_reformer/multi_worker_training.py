"""A training loop through `tf.distribute`, for several workers.

Keras 3.15's `Model.fit` fails under
`tf.distribute.MultiWorkerMirroredStrategy` (checked with two workers on
127.0.0.1, even for a one-layer model: its per-replica reduction of the
logs, keras-team/keras#20585). `StrategyTrainer` is the smallest loop that
replaces it: each step runs the model's own `train_step` (its compiled loss,
scaled per replica, the optimizer's all-reduce and update, its compiled
metrics) on every replica through `strategy.run`, on the dataset split by
`strategy.experimental_distribute_dataset`; the metrics are then read in
cross-replica context, where Keras's metric variables sum over replicas and
workers. Callbacks get `fit`'s protocol through `keras.callbacks.
CallbackList`. It works under any strategy (the default one,
`MirroredStrategy`, `MultiWorkerMirroredStrategy`). The steps are not
compiled by XLA, which cannot compile their collective operations (on the
CPU it has no kernel for `CollectiveGatherV2`); for compiled training on
several hosts use the JAX backend's `keras.distribution` with `fit`
(docs/distribution.md).

Every worker runs the same program. Files are written by every worker too
(saving may need collective operations), but only the chief writes to the
real destination: `chief_path` hands the other workers a temporary path and
deletes it afterwards.

`StrategyTrainer.fit(backup_dir=...)` makes a run survive being killed, the
way `keras.callbacks.BackupAndRestore` does for `fit`: after every epoch a
`tf.train.Checkpoint` of the model's and the optimizer's variables, the
number of finished epochs and the history is saved (every worker saves, the
chief into `backup_dir`); the same command started again restores it on
every worker, skips the batches the finished epochs consumed and goes on with
the next epoch; the backup is deleted when training completes.
`fit(weights_path=...)` also keeps the weights of every epoch, like
`keras.callbacks.ModelCheckpoint(save_weights_only=True)`.
"""

import contextlib
import json
import os
import shutil
import string
import tempfile

import keras
import tensorflow as tf

from keras_reformer.layers.validation import check_non_negative_int
from keras_reformer.layers.validation import check_positive_int


class StrategyTrainer:
    """Trains a compiled Keras model with `strategy.run`, where `fit` cannot.

    The model's compiled loss is the mean over each replica's batch scaled
    by the number of replicas, so one worker with the whole batch and
    several workers with slices of it take the same steps; the reported
    metrics are those the model was compiled with, over the global batches.

    Args:
        model: a Keras model created and compiled (loss, optimizer, any
            metrics) in `strategy.scope()`.
        strategy: a `tf.distribute.Strategy`; default: the current one.

    Example (every worker runs the same; here the current strategy stands
    in for `tf.distribute.MultiWorkerMirroredStrategy()`, which reads the
    cluster from `TF_CONFIG`):
    >>> from keras_reformer.metrics import BitsPerByte
    >>> from keras_reformer.models import ReformerBackbone, ReformerCausalLM
    >>> from keras_reformer.text_data import language_model_dataset
    >>> data = language_model_dataset(b"hello world " * 100, 16, 4,
    ...                               repeat=True)
    >>> strategy = tf.distribute.get_strategy()
    >>> with strategy.scope():
    ...     lm = ReformerCausalLM(ReformerBackbone(vocabulary_size=256,
    ...         hidden_dim=32, num_heads=2, head_dim=16, intermediate_dim=64,
    ...         axial_shape=(4, 4),
    ...         attention_options={"lsh": {"chunk_length": 8}}))
    ...     lm.compile(optimizer=keras.optimizers.Adam(1e-3),
    ...                loss=keras.losses.SparseCategoricalCrossentropy(
    ...                    from_logits=True), metrics=[BitsPerByte()])
    >>> trainer = StrategyTrainer(lm, strategy)
    >>> history = trainer.fit(data, epochs=2, steps_per_epoch=3,
    ...                       validation_data=data.take(2), verbose=0,
    ...                       callbacks=[keras.callbacks.TerminateOnNaN()],
    ...                       backup_dir="lm.backup")  # resumes if killed
    >>> len(history.history["val_bits_per_byte"])
    2
    """

    def __init__(self, model, strategy=None):
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model; received "
                             f"model={model!r}.")
        if not model.compiled or model.optimizer is None:
            raise ValueError(f"model must be compiled with an optimizer and "
                             f"a loss (model.compile(...) in "
                             f"strategy.scope()); received model={model!r}, "
                             f"which is not.")
        if strategy is None:
            strategy = tf.distribute.get_strategy()
        if not isinstance(strategy, tf.distribute.Strategy):
            raise ValueError(f"strategy must be a tf.distribute.Strategy; "
                             f"received strategy={strategy!r}.")
        self.model = model
        self.strategy = strategy
        with strategy.scope():
            # Slot variables must be mirrored too: create them in scope.
            model.optimizer.build(model.trainable_variables)
        self._train_step = tf.function(self._distributed_train_step)
        self._test_step = tf.function(self._distributed_test_step)

    def distribute(self, dataset):
        """Splits each global batch of `dataset` over the replicas.

        Every worker builds the same dataset; each keeps its replicas' share
        of every batch (`AutoShardPolicy.DATA`), so batches must be full
        (`drop_remainder=True`) and in the same order on every worker.

        Args:
            dataset: `tf.data.Dataset` of `(inputs, labels)` global batches,
                or an already distributed dataset (returned as is).

        Returns:
            A `tf.distribute.DistributedDataset`.
        """
        if isinstance(dataset, tf.distribute.DistributedDataset):
            return dataset
        if not isinstance(dataset, tf.data.Dataset):
            raise ValueError(f"dataset must be a tf.data.Dataset of "
                             f"(inputs, labels) batches; received "
                             f"dataset={dataset!r}.")
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        return self.strategy.experimental_distribute_dataset(
            dataset.with_options(options))

    def _distributed_train_step(self, batch):
        self.strategy.run(self.model.train_step, args=(batch,))
        # Read in cross-replica context: summed over replicas and workers.
        return self.model.get_metrics_result()

    def _distributed_test_step(self, batch):
        self.strategy.run(self.model.test_step, args=(batch,))
        return self.model.get_metrics_result()

    def train_step(self, batch):
        """One optimizer step on one distributed global batch.

        Args:
            batch: `(inputs, labels)` from an iterator over `distribute(...)`.

        Returns:
            A dict of the model's metrics (`loss` and the compiled ones)
            over the steps since `model.reset_metrics()`, floats, the same
            on every worker.
        """
        return _floats(self._train_step(batch))

    def evaluate(self, dataset, steps=None):
        """The model's metrics over `dataset`, combined across workers.

        Args:
            dataset: `tf.data.Dataset` of `(inputs, labels)` global batches
                (finite unless `steps` is given), or a distributed one.
            steps: int or None, evaluate at most this many batches.

        Returns:
            A dict of floats (`loss` and the compiled metrics), identical on
            every worker.
        """
        if steps is not None:
            check_positive_int("steps", steps)
        self.model.reset_metrics()
        logs = None
        for step, batch in enumerate(self.distribute(dataset)):
            if steps is not None and step >= steps:
                break
            logs = self._test_step(batch)
        if logs is None:
            raise ValueError(f"dataset must yield at least one batch to "
                             f"evaluate; received dataset={dataset!r}, which "
                             "yielded none.")
        return _floats(logs)

    def fit(self, dataset, epochs, steps_per_epoch, validation_data=None,
            callbacks=None, verbose=1, backup_dir=None, weights_path=None,
            delete_backup=True):
        """Trains `epochs` x `steps_per_epoch` steps, like `Model.fit`.

        Callbacks go through a `keras.callbacks.CallbackList` as in `fit`:
        `set_model`, `set_params` (`epochs`, `steps`, `verbose`), the train,
        epoch and batch hooks with `fit`'s logs, a `History` (returned) and,
        on the chief, a progress bar; setting `model.stop_training` (as
        `EarlyStopping` and `TerminateOnNaN` do) ends training after the
        current batch, on every worker alike, since every worker sees the
        same logs.

        With `backup_dir`, a run that is killed and started again with the
        same arguments goes on from its last finished epoch: after every
        epoch (before the callbacks' `on_epoch_end`) every worker saves a
        `tf.train.Checkpoint` of the model's variables (seed generator
        states included), the optimizer's variables (step count and slots),
        the number of finished epochs and the history so far, through a
        `tf.train.CheckpointManager` keeping the last one. Only the chief
        saves into `backup_dir`; the other workers save into a temporary
        directory that is deleted when `fit` ends. At the start, if
        `backup_dir` holds a checkpoint, every worker restores it from
        there, so all workers must be able to read the chief's
        `backup_dir` (all workers on one machine, or a file system they
        share). Training then continues at the next unfinished
        epoch: callbacks get the true epoch numbers, the returned history
        holds every epoch, and `dataset` is skipped past the
        `finished_epochs * steps_per_epoch` batches already consumed (a
        `tf.data.Dataset` by `Dataset.skip`, a distributed one by drawing
        and dropping them). The run then takes exactly the steps of an
        uninterrupted one when `dataset` yields the same batches each time
        it is iterated afresh (a fixed-seed shuffle, like
        `text_data.language_model_dataset` with a seed); otherwise it
        continues with other batches. When training completes, the chief
        deletes `backup_dir` (unless `delete_backup=False`).

        Args:
            dataset: `tf.data.Dataset` of `(inputs, labels)` global batches,
                repeating (at least `epochs * steps_per_epoch` batches).
            epochs: int, epochs to run in all (a resumed run counts the
                restored ones).
            steps_per_epoch: int, optimizer steps per epoch; a resumed run
                must use the backed-up run's value.
            validation_data: optional finite `tf.data.Dataset`, evaluated
                after each epoch (`val_` + each metric's name).
            callbacks: optional list of `keras.callbacks.Callback`. Each
                runs on every worker: give callbacks that write files
                (`TensorBoard`, say) to the chief only (`is_chief`).
            verbose: 0 silent, 1 a progress bar on the chief, 2 one line
                per epoch on the chief.
            backup_dir: optional str or path-like, the directory of the
                backup described above; `None` (default) keeps none.
            weights_path: optional str ending in `.weights.h5`, where the
                chief saves the model's weights after every epoch (the
                other workers save to a deleted temporary file); formatted
                like `keras.callbacks.ModelCheckpoint`'s `filepath` with
                `epoch` (1-based) and the epoch's logs, e.g.
                `"lm.checkpoints/epoch_{epoch:02d}.weights.h5"`. Missing
                directories are created.
            delete_backup: bool, delete `backup_dir` when training
                completes (default); `False` keeps it, for a caller with
                more to do after training (like `keras.callbacks.
                BackupAndRestore(delete_checkpoint=False)`): started again,
                `fit` restores it and trains no more epochs.

        Returns:
            A `keras.callbacks.History` whose `history` holds per-epoch
            lists of the logs; after a resume, the restored epochs' values
            come first.

        Example (see the class for a runnable one): a run of

            trainer.fit(
                train, epochs=10, steps_per_epoch=300,
                validation_data=held_out, backup_dir="lm.backup",
                weights_path="lm.checkpoints/epoch_{epoch:02d}.weights.h5")

        killed during epoch 7 and started again restores epoch 6's backup,
        trains epochs 7 to 10 and deletes "lm.backup".
        """
        check_positive_int("epochs", epochs)
        check_positive_int("steps_per_epoch", steps_per_epoch)
        check_non_negative_int("verbose", verbose)
        if verbose > 2:
            raise ValueError(f"verbose must be 0, 1 or 2; received "
                             f"verbose={verbose}.")
        if backup_dir is not None:
            if (not isinstance(backup_dir, (str, os.PathLike)) or
                    not os.fspath(backup_dir)):
                raise ValueError(f"backup_dir must be None or a non-empty "
                                 f"directory path; received "
                                 f"backup_dir={backup_dir!r}.")
            backup_dir = os.fspath(backup_dir)
            if (tf.io.gfile.exists(backup_dir) and
                    not tf.io.gfile.isdir(backup_dir)):
                raise ValueError(f"backup_dir must be a directory (or not "
                                 f"exist yet); received "
                                 f"backup_dir={backup_dir!r}, a file.")
        if weights_path is not None:
            _check_weights_path(weights_path)
        chief = is_chief(self.strategy)
        history = keras.callbacks.History()
        callbacks = keras.callbacks.CallbackList(
            list(callbacks or []) + [history],
            add_progbar=chief and verbose != 0, verbose=verbose,
            epochs=epochs, steps=steps_per_epoch, model=self.model)
        initial_epoch = 0
        logs = {}
        with contextlib.ExitStack() as stack:
            backup = None
            if backup_dir is not None:
                backup = _Backup(self, backup_dir, steps_per_epoch,
                                 stack.enter_context(
                                     chief_path(backup_dir, self.strategy)))
                initial_epoch, history.history = backup.restore()
                if initial_epoch and chief and verbose:
                    print(f"Restored the backup of epoch {initial_epoch} "
                          f"from {backup_dir}; " + (
                              f"resuming at epoch {initial_epoch + 1}/"
                              f"{epochs}." if initial_epoch < epochs else
                              f"all {epochs} epochs were done."), flush=True)
            self.model.stop_training = False
            callbacks.on_train_begin()
            consumed = initial_epoch * steps_per_epoch
            if consumed and isinstance(dataset, tf.data.Dataset):
                dataset = dataset.skip(consumed)
                consumed = 0
            iterator = iter(self.distribute(dataset))
            for _ in range(consumed):  # an already distributed dataset
                next(iterator)
            for epoch in range(initial_epoch, epochs):
                logs = self._fit_epoch(iterator, epoch, steps_per_epoch,
                                       validation_data, callbacks)
                # Saved before the callbacks run: once an epoch is reported,
                # it is backed up.
                if backup is not None:
                    backup.save(epoch + 1, {
                        name: history.history.get(name, []) + [value]
                        for name, value in logs.items()})
                if weights_path is not None:
                    self._save_weights(_format_weights_path(
                        weights_path, epoch + 1, logs))
                callbacks.on_epoch_end(epoch, logs)
                if self.model.stop_training:
                    break
            if backup is not None and chief and delete_backup:
                tf.io.gfile.rmtree(backup_dir)
        callbacks.on_train_end(logs)
        return history

    def _fit_epoch(self, iterator, epoch, steps_per_epoch, validation_data,
                   callbacks):
        """Trains one epoch; returns its logs."""
        self.model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        logs = {}
        for step in range(steps_per_epoch):
            callbacks.on_train_batch_begin(step)
            logs = self.train_step(next(iterator))
            callbacks.on_train_batch_end(step, logs)
            if self.model.stop_training:
                break
        logs = dict(logs)
        if validation_data is not None:
            for name, value in self.evaluate(validation_data).items():
                logs["val_" + name] = value
        return logs

    def _save_weights(self, path):
        """Every worker saves; only the chief's file is kept."""
        with chief_path(path, self.strategy) as target:
            directory = os.path.dirname(target)
            if directory:
                tf.io.gfile.makedirs(directory)
            self.model.save_weights(target)


def _floats(logs):
    return {name: float(value) for name, value in logs.items()}


class _History(tf.train.experimental.PythonState):
    """The history so far and `steps_per_epoch`, as JSON in a checkpoint."""

    def __init__(self):
        self.value = {}

    def serialize(self):
        return json.dumps(self.value)

    def deserialize(self, string_value):
        self.value = json.loads(string_value)


class _Backup:
    """`StrategyTrainer.fit`'s backup: restores from the chief's directory,
    saves into this worker's (`write_dir`)."""

    def __init__(self, trainer, backup_dir, steps_per_epoch, write_dir):
        self.backup_dir = backup_dir
        self.steps_per_epoch = steps_per_epoch
        with trainer.strategy.scope():
            self.finished_epochs = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="finished_epochs")
        self.state = _History()
        self.checkpoint = tf.train.Checkpoint(
            model_variables=list(trainer.model.variables),
            optimizer_variables=list(trainer.model.optimizer.variables),
            finished_epochs=self.finished_epochs,
            state=self.state)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, write_dir, max_to_keep=1)

    def restore(self):
        """`(finished epochs, history)` from `backup_dir`, else `(0, {})`."""
        latest = tf.train.latest_checkpoint(self.backup_dir)
        if latest is None:
            return 0, {}
        try:
            self.checkpoint.restore(latest).assert_consumed()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ValueError(
                f"backup_dir={self.backup_dir!r} holds a checkpoint "
                f"({latest}) that does not fit this model and optimizer "
                f"({type(error).__name__}: {str(error)[:300]}); delete it or "
                "give another backup_dir.") from error
        saved_steps = self.state.value["steps_per_epoch"]
        if saved_steps != self.steps_per_epoch:
            raise ValueError(
                f"steps_per_epoch must be the backed-up run's "
                f"({saved_steps}, in backup_dir={self.backup_dir!r}) to "
                f"resume it; received steps_per_epoch="
                f"{self.steps_per_epoch}. Pass {saved_steps}, or delete the "
                "backup to start afresh.")
        history = {name: list(values) for name, values in
                   self.state.value["history"].items()}
        return int(self.finished_epochs.numpy()), history

    def save(self, finished_epochs, history):
        self.finished_epochs.assign(finished_epochs)
        self.state.value = {"steps_per_epoch": self.steps_per_epoch,
                            "history": history}
        self.manager.save(checkpoint_number=finished_epochs)


def _check_weights_path(weights_path):
    """Raises ValueError unless `weights_path` is a format string of a
    `.weights.h5` file name."""
    if not isinstance(weights_path, str) or not weights_path:
        raise ValueError(f"weights_path must be None or a non-empty str "
                         f"ending in .weights.h5; received "
                         f"weights_path={weights_path!r}.")
    try:
        fields = [field for _, field, _, _ in
                  string.Formatter().parse(weights_path) if field]
    except ValueError as error:
        raise ValueError(f"weights_path must be a format string like "
                         f"epoch_{{epoch:02d}}.weights.h5; received "
                         f"weights_path={weights_path!r} ({error})."
                         ) from None
    if not weights_path.endswith(".weights.h5") or any(
            "{" in field for field in fields):
        raise ValueError(f"weights_path must end in .weights.h5 (Keras's "
                         f"save_weights format); received "
                         f"weights_path={weights_path!r}.")


def _format_weights_path(weights_path, epoch, logs):
    """`weights_path` formatted with `epoch` and the epoch's `logs`."""
    try:
        return weights_path.format(epoch=epoch, **logs)
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        allowed = ", ".join(["epoch"] + list(logs))
        raise ValueError(f"weights_path may only use the format fields "
                         f"{allowed} (e.g. epoch_{{epoch:02d}}); received "
                         f"weights_path={weights_path!r} ({error!r})."
                         ) from None


def is_chief(strategy=None):
    """Whether this process is the chief, the one that writes real files.

    The chief is the task of type "chief", else worker 0 when the cluster
    has no chief; a single process (no cluster) is its own chief.

    Args:
        strategy: a `tf.distribute.Strategy`; default: the current one.

    Returns:
        bool.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return (resolver.task_type == "worker" and resolver.task_id == 0 and
            "chief" not in cluster)


@contextlib.contextmanager
def chief_path(path, strategy=None):
    """Where this worker writes `path`: the path itself on the chief, a
    temporary one elsewhere, deleted when the block ends.

    Every worker should save (saving may take part in collective
    operations), but only the chief's files are kept.

    Args:
        path: str, the destination on the chief (file or directory name).
        strategy: a `tf.distribute.Strategy`; default: the current one.

    Yields:
        str, the path to write.

    Example:
    >>> with chief_path("saved_models/lm") as path:  # then save to path
    ...     print(path)  # one process, or the chief: the path itself
    saved_models/lm
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path must be a non-empty path; received "
                         f"path={path!r}.")
    path = os.fspath(path)
    if is_chief(strategy):
        yield path
        return
    resolver = (strategy or tf.distribute.get_strategy()).cluster_resolver
    temporary = tempfile.mkdtemp(
        prefix=f"{resolver.task_type}{resolver.task_id}-")
    try:
        yield os.path.join(temporary, os.path.basename(path.rstrip(os.sep)))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


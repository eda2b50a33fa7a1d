"""A custom training loop through `tf.distribute`, for several workers.

Keras 3.15's `Model.fit` fails under
`tf.distribute.MultiWorkerMirroredStrategy` (checked with two workers on
127.0.0.1, even for a one-layer model: "Attempt to convert a value
(PerReplica ...) to a Tensor", keras-team/keras#20585). `StrategyTrainer`
trains through the strategy's own engine instead, the loop the TensorFlow
multi-worker guide describes: the model and optimizer live in
`strategy.scope()`, the dataset is split over the replicas by
`strategy.experimental_distribute_dataset`, each replica's loss is scaled by
the global batch (`tf.nn.compute_average_loss`), the Keras optimizer sums
the replicas' gradients and applies them inside `strategy.run`, and losses
are combined with `strategy.reduce`. It works under any strategy (the
default one, `MirroredStrategy`, `MultiWorkerMirroredStrategy`).

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
import math
import os
import shutil
import tempfile
import time

import keras
import tensorflow as tf

from keras_reformer.layers.validation import check_non_negative_int
from keras_reformer.layers.validation import check_positive_int


def token_cross_entropy(y_true, logits):
    """Per-token cross-entropy in nats of integer labels and logits.

    Args:
        y_true: int tensor of token ids, shape `(batch, ...)`.
        logits: float tensor, shape `(batch, ..., vocabulary)`.

    Returns:
        float32 tensor shaped like `y_true`.
    """
    return tf.cast(keras.losses.sparse_categorical_crossentropy(
        y_true, logits, from_logits=True), tf.float32)


class StrategyTrainer:
    """Trains a Keras model with `strategy.run`, where `fit` cannot.

    The loss is the mean per-token cross-entropy over the global batch (the
    mean `fit` computes with `SparseCategoricalCrossentropy`), so one worker
    with the whole batch and several workers with slices of it take the same
    steps. `model.losses` (regularisers) are added, scaled per replica.

    Args:
        model: a Keras model built in `strategy.scope()`, taking the
            dataset's inputs and returning logits.
        optimizer: a Keras 3 optimizer created in `strategy.scope()`.
        strategy: a `tf.distribute.Strategy`; default: the current one.
        loss_fn: `loss_fn(y_true, y_pred)` returning per-token losses
            shaped like `y_true`; default `token_cross_entropy`.
        jit_compile: bool, compile each replica's forward and backward pass
            with XLA (the gradient all-reduce and the update run outside).

    Example (every worker runs the same; here the current strategy stands
    in for `tf.distribute.MultiWorkerMirroredStrategy()`, which reads the
    cluster from `TF_CONFIG`):
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
    ...     trainer = StrategyTrainer(lm, keras.optimizers.Adam(1e-3),
    ...                               strategy)
    >>> history = trainer.fit(data, epochs=2, steps_per_epoch=3,
    ...                       validation_data=data.take(2), verbose=0,
    ...                       backup_dir="lm.backup")  # resumes if killed
    >>> len(history["val_bits_per_byte"])
    2
    """

    def __init__(self, model, optimizer, strategy=None, loss_fn=None,
                 jit_compile=False):
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model; received "
                             f"model={model!r}.")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"optimizer must be a Keras 3 optimizer "
                             f"(keras.optimizers.Optimizer); received "
                             f"optimizer={optimizer!r}.")
        if strategy is None:
            strategy = tf.distribute.get_strategy()
        if not isinstance(strategy, tf.distribute.Strategy):
            raise ValueError(f"strategy must be a tf.distribute.Strategy; "
                             f"received strategy={strategy!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable; received "
                             f"loss_fn={loss_fn!r}.")
        if not isinstance(jit_compile, bool):
            raise ValueError(f"jit_compile must be True or False; received "
                             f"jit_compile={jit_compile!r}.")
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.loss_fn = loss_fn or token_cross_entropy
        self.jit_compile = jit_compile
        self._gradients = (tf.function(self._loss_and_gradients,
                                       jit_compile=True)
                           if jit_compile else self._loss_and_gradients)
        with strategy.scope():
            # Slot variables must be mirrored too: create them in scope.
            optimizer.build(model.trainable_variables)
        self._train_step = tf.function(self._distributed_train_step)
        self._eval_step = tf.function(self._distributed_eval_step)

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

    def _loss_and_gradients(self, inputs, labels, global_batch):
        with tf.GradientTape() as tape:
            logits = self.model(inputs, training=True)
            per_token = self.loss_fn(labels, logits)
            per_example = tf.reduce_mean(
                tf.reshape(per_token, (tf.shape(per_token)[0], -1)), axis=1)
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=global_batch)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.add_n(self.model.losses))
        return loss, tape.gradient(loss, self.model.trainable_variables)

    def _replica_train_step(self, inputs, labels):
        global_batch = (tf.shape(labels)[0] *
                        self.strategy.num_replicas_in_sync)
        loss, gradients = self._gradients(inputs, labels, global_batch)
        variables = self.model.trainable_variables
        # Sums the replicas' gradients (an all-reduce across workers) and
        # updates the mirrored variables alike everywhere.
        self.optimizer.apply(gradients, variables)
        return loss

    def _distributed_train_step(self, batch):
        inputs, labels = batch
        losses = self.strategy.run(self._replica_train_step,
                                   args=(inputs, labels))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, losses,
                                    axis=None)

    def _replica_eval_step(self, inputs, labels):
        per_token = self.loss_fn(labels, self.model(inputs, training=False))
        return (tf.reduce_sum(per_token),
                tf.cast(tf.size(per_token), tf.float32))

    def _distributed_eval_step(self, batch):
        inputs, labels = batch
        total, count = self.strategy.run(self._replica_eval_step,
                                         args=(inputs, labels))
        reduce = tf.distribute.ReduceOp.SUM
        return (self.strategy.reduce(reduce, total, axis=None),
                self.strategy.reduce(reduce, count, axis=None))

    def train_step(self, batch):
        """One optimizer step on one distributed global batch.

        Args:
            batch: `(inputs, labels)` from an iterator over `distribute(...)`.

        Returns:
            The global batch's mean loss, a float (the same on every worker).
        """
        return float(self._train_step(batch))

    def evaluate(self, dataset, steps=None):
        """Mean per-token loss over `dataset`, combined across workers.

        Args:
            dataset: `tf.data.Dataset` of `(inputs, labels)` global batches
                (finite unless `steps` is given), or a distributed one.
            steps: int or None, evaluate at most this many batches.

        Returns:
            `{"loss": mean nats per token, "bits_per_byte": loss / ln 2}`
            (bits per byte for a byte-level model with the default loss),
            identical on every worker.
        """
        if steps is not None:
            check_positive_int("steps", steps)
        total, count = 0.0, 0.0
        for step, batch in enumerate(self.distribute(dataset)):
            if steps is not None and step >= steps:
                break
            batch_total, batch_count = self._eval_step(batch)
            total += float(batch_total)
            count += float(batch_count)
        if not count:
            raise ValueError(f"dataset must yield at least one batch to "
                             f"evaluate; received dataset={dataset!r}, which "
                             "yielded none.")
        loss = total / count
        return {"loss": loss, "bits_per_byte": loss / math.log(2.0)}

    def fit(self, dataset, epochs, steps_per_epoch, validation_data=None,
            callbacks=None, verbose=1, backup_dir=None, weights_path=None,
            delete_backup=True):
        """Trains `epochs` x `steps_per_epoch` steps.

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
                after each epoch (`val_loss`, `val_bits_per_byte`).
            callbacks: optional list of `keras.callbacks.Callback`; only
                their train and epoch hooks are called (`on_train_begin`,
                `on_epoch_begin`, `on_epoch_end(epoch, logs)`,
                `on_train_end`), with the logs `fit` would give.
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
            A dict of per-epoch lists: `loss`, `bits_per_byte` (the mean
            training loss of the epoch's steps) and, with validation data,
            `val_loss`, `val_bits_per_byte`; after a resume, the restored
            epochs' values come first.

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
        log_names = ["loss", "bits_per_byte"]
        if validation_data is not None:
            log_names += ["val_loss", "val_bits_per_byte"]
        if weights_path is not None:
            _check_weights_path(weights_path, log_names)
        callbacks = list(callbacks or [])
        chief = is_chief(self.strategy)
        history = {}
        initial_epoch = 0
        with contextlib.ExitStack() as stack:
            backup = None
            if backup_dir is not None:
                backup = _Backup(self, backup_dir, steps_per_epoch,
                                 stack.enter_context(
                                     chief_path(backup_dir, self.strategy)))
                initial_epoch, history = backup.restore()
                if initial_epoch and chief and verbose:
                    print(f"Restored the backup of epoch {initial_epoch} "
                          f"from {backup_dir}; " + (
                              f"resuming at epoch {initial_epoch + 1}/"
                              f"{epochs}." if initial_epoch < epochs else
                              f"all {epochs} epochs were done."), flush=True)
            for callback in callbacks:
                callback.set_model(self.model)
                callback.on_train_begin()
            consumed = initial_epoch * steps_per_epoch
            if consumed and isinstance(dataset, tf.data.Dataset):
                dataset = dataset.skip(consumed)
                consumed = 0
            iterator = iter(self.distribute(dataset))
            for _ in range(consumed):  # an already distributed dataset
                next(iterator)
            for epoch in range(initial_epoch, epochs):
                logs = self._fit_epoch(iterator, epoch, epochs,
                                       steps_per_epoch, validation_data,
                                       callbacks, chief, verbose)
                for name, value in logs.items():
                    history.setdefault(name, []).append(value)
                # Saved before the callbacks run: once an epoch is reported,
                # it is backed up.
                if backup is not None:
                    backup.save(epoch + 1, history)
                if weights_path is not None:
                    self._save_weights(weights_path.format(epoch=epoch + 1,
                                                           **logs))
                for callback in callbacks:
                    callback.on_epoch_end(epoch, logs)
            if backup is not None and chief and delete_backup:
                tf.io.gfile.rmtree(backup_dir)
        for callback in callbacks:
            callback.on_train_end()
        return history

    def _fit_epoch(self, iterator, epoch, epochs, steps_per_epoch,
                   validation_data, callbacks, chief, verbose):
        """Trains one epoch; returns its logs."""
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        start = time.time()
        progress = None
        if chief and verbose == 1:
            print(f"Epoch {epoch + 1}/{epochs}", flush=True)
            progress = keras.utils.Progbar(steps_per_epoch,
                                           stateful_metrics=["loss"])
        total = 0.0
        for step in range(steps_per_epoch):
            total += self.train_step(next(iterator))
            if progress is not None:
                progress.update(step + 1, [("loss", total / (step + 1))])
        logs = {"loss": total / steps_per_epoch}
        logs["bits_per_byte"] = logs["loss"] / math.log(2.0)
        if validation_data is not None:
            for name, value in self.evaluate(validation_data).items():
                logs["val_" + name] = value
        if chief and verbose:
            print(f"epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{name} {value:.4f}" for name, value in logs.items())
                + f" ({time.time() - start:.0f} s)", flush=True)
        return logs

    def _save_weights(self, path):
        """Every worker saves; only the chief's file is kept."""
        with chief_path(path, self.strategy) as target:
            directory = os.path.dirname(target)
            if directory:
                tf.io.gfile.makedirs(directory)
            self.model.save_weights(target)


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
            optimizer_variables=list(trainer.optimizer.variables),
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


def _check_weights_path(weights_path, log_names):
    """Raises ValueError unless `weights_path` formats to a `.weights.h5`
    file name with `epoch` and the names in `log_names`."""
    allowed = ", ".join(["epoch"] + list(log_names))
    if not isinstance(weights_path, str) or not weights_path:
        raise ValueError(f"weights_path must be None or a non-empty str "
                         f"ending in .weights.h5; received "
                         f"weights_path={weights_path!r}.")
    try:
        example = weights_path.format(
            epoch=1, **{name: 0.0 for name in log_names})
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise ValueError(f"weights_path may only use the format fields "
                         f"{allowed} (e.g. epoch_{{epoch:02d}}); received "
                         f"weights_path={weights_path!r} ({error!r})."
                         ) from None
    if not example.endswith(".weights.h5"):
        raise ValueError(f"weights_path must end in .weights.h5 (Keras's "
                         f"save_weights format); received "
                         f"weights_path={weights_path!r}.")


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


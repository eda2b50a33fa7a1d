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
"""

import contextlib
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

    Example:
    >>> strategy = tf.distribute.MultiWorkerMirroredStrategy()  # TF_CONFIG
    >>> with strategy.scope():
    ...     lm = ReformerCausalLM(backbone)
    ...     trainer = StrategyTrainer(lm, keras.optimizers.Adam(1e-3),
    ...                               strategy)
    >>> history = trainer.fit(train, epochs=2, steps_per_epoch=100,
    ...                       validation_data=held_out)
    >>> history["val_bits_per_byte"]
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
            callbacks=None, verbose=1):
        """Trains `epochs` x `steps_per_epoch` steps.

        Args:
            dataset: `tf.data.Dataset` of `(inputs, labels)` global batches,
                repeating (at least `epochs * steps_per_epoch` batches).
            epochs: int, epochs to run.
            steps_per_epoch: int, optimizer steps per epoch.
            validation_data: optional finite `tf.data.Dataset`, evaluated
                after each epoch (`val_loss`, `val_bits_per_byte`).
            callbacks: optional list of `keras.callbacks.Callback`; only
                their train and epoch hooks are called (`on_train_begin`,
                `on_epoch_begin`, `on_epoch_end(epoch, logs)`,
                `on_train_end`), with the logs `fit` would give.
            verbose: 0 silent, 1 a progress bar on the chief, 2 one line
                per epoch on the chief.

        Returns:
            A dict of per-epoch lists: `loss`, `bits_per_byte` (the mean
            training loss of the epoch's steps) and, with validation data,
            `val_loss`, `val_bits_per_byte`.
        """
        check_positive_int("epochs", epochs)
        check_positive_int("steps_per_epoch", steps_per_epoch)
        check_non_negative_int("verbose", verbose)
        if verbose > 2:
            raise ValueError(f"verbose must be 0, 1 or 2; received "
                             f"verbose={verbose}.")
        callbacks = list(callbacks or [])
        for callback in callbacks:
            callback.set_model(self.model)
            callback.on_train_begin()
        chief = is_chief(self.strategy)
        iterator = iter(self.distribute(dataset))
        history = {}
        for epoch in range(epochs):
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
                    progress.update(step + 1,
                                    [("loss", total / (step + 1))])
            logs = {"loss": total / steps_per_epoch}
            logs["bits_per_byte"] = logs["loss"] / math.log(2.0)
            if validation_data is not None:
                for name, value in self.evaluate(validation_data).items():
                    logs["val_" + name] = value
            for name, value in logs.items():
                history.setdefault(name, []).append(value)
            if chief and verbose:
                print(f"epoch {epoch + 1}/{epochs}: " + ", ".join(
                    f"{name} {value:.4f}" for name, value in logs.items())
                    + f" ({time.time() - start:.0f} s)", flush=True)
            for callback in callbacks:
                callback.on_epoch_end(epoch, logs)
        for callback in callbacks:
            callback.on_train_end()
        return history


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
    >>> with chief_path("saved_models/lm", strategy) as path:
    ...     export_for_serving(lm, path)
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


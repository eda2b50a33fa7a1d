"""Train a small causal Reformer LM on bytes, evaluate, sample, export.

By default it trains on the Python standard library's own source code
(already on the machine, nothing is downloaded), one token per byte. After
every epoch it reports the bits per byte on held-out text (the last 5% of the
corpus; a uniform guess scores 8.0). Then it samples a continuation of a
held-out prompt, saves `<export-dir>.keras` and the keras-hub preset
`<export-dir>_preset/` (with its byte tokenizer), exports a TF SavedModel
for serving to `<export-dir>` and checks that the reloaded SavedModel's logits
equal the Python model's.

A killed run started again with the same command resumes from the backup
in `--backup-dir` (kept until the export is done): at its last finished
epoch, with the batches and random numbers an uninterrupted run would use
next, or at sampling and export once all epochs are done. The backup
records the flags that decide what is trained; a run with other values
refuses it.

    python examples/train_lm.py
    python examples/train_lm.py --attention lsh,full --sequence-length 1024
    python examples/train_lm.py --text-files my.txt --epochs 5
    python examples/train_lm.py --tfds-dataset tiny_shakespeare  # prepared

Several devices or hosts (docs/distribution.md): `--strategy` for
TensorFlow's engines, `--distribution` with `KERAS_BACKEND=jax` for Keras's
distribution API; with several processes, process 0 (the chief) writes
every file.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import keras_reformer  # noqa: F401  (first: sets KERAS_BACKEND=tensorflow)
import keras
import keras_hub
import numpy as np
import tensorflow as tf

from keras_reformer import multi_worker_training
from keras_reformer import text_data
from keras_reformer.export import export_for_serving
from keras_reformer.export import save_keras_model
from keras_reformer.export import save_preset
from keras_reformer.layers import attention_type
from keras_reformer.layers import attention_type_names
from keras_reformer.layers import hashing
from keras_reformer.metrics import BitsPerByte
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM

from flag_checks import MAX_NUM_HASHES
from flag_checks import MAX_SEED
from flag_checks import check_flag_range
from flag_checks import check_positive_flags
from flag_checks import check_positive_number_flags

CAUSAL_ATTENTION_TYPES = tuple(
    name for name in attention_type_names()
    if attention_type(name)[0].supports_causal)
PROMPT_LENGTH = 64
# The flags that decide what a run trains: a backup resumes only a run with
# the same values.
RUN_FLAGS = ("text_files", "tfds_dataset", "tfds_split", "tfds_feature",
             "max_corpus_bytes", "sequence_length", "attention", "num_layers",
             "hidden_dim", "num_heads", "chunk_length", "num_hashes",
             "epochs", "steps_per_epoch", "batch_size", "learning_rate",
             "seed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_corpus_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--sequence-length", type=int, default=256)
    model.add_argument("--attention", "--layers", dest="attention",
                       default="lsh",
                       help="one attention type for every layer, or a comma "
                            "list with one type per layer; types: "
                            f"{', '.join(CAUSAL_ATTENTION_TYPES)}")
    model.add_argument("--num-layers", type=int, default=None,
                       help="number of layers (default 2 when --attention "
                            "names one type, else the list's length)")
    model.add_argument("--hidden-dim", type=int, default=128)
    model.add_argument("--num-heads", type=int, default=2)
    model.add_argument("--chunk-length", type=int, default=32)
    model.add_argument("--num-hashes", type=int, default=2)
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=4)
    training.add_argument("--steps-per-epoch", type=int, default=300)
    training.add_argument("--batch-size", type=int, default=16)
    training.add_argument("--learning-rate", type=float, default=3e-3,
                          help="peak learning rate (warm-up, cosine decay)")
    training.add_argument("--jit-compile",
                          action=argparse.BooleanOptionalAction, default=True,
                          help="compile the train step with XLA")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument(
        "--strategy", default="none",
        choices=["none", "mirrored", "multi_worker_mirrored", "tpu"],
        help="tf.distribute strategy: mirrored (the GPUs of this machine), "
             "tpu (with --tpu), multi_worker_mirrored (one process per "
             "worker, cluster from TF_CONFIG; trains with a strategy.run "
             "loop, as Keras 3's fit cannot; resumes from --backup-dir, "
             "which every worker must be able to read; only the chief "
             "keeps its files); --batch-size is the global batch")
    training.add_argument("--tpu", default=None,
                          help="TPU name or grpc:// address for --strategy "
                               "tpu (default: the TPU VM's own)")
    training.add_argument("--steps-per-execution", type=int, default=1,
                          help="train steps per compiled call (raise it on "
                               "TPUs to avoid host round trips)")
    training.add_argument(
        "--distribution", default="none",
        choices=["none", "data_parallel", "model_parallel"],
        help="keras.distribution (KERAS_BACKEND=jax): data_parallel "
             "splits each global batch over every process's devices; "
             "model_parallel splits heads and feed-forward width over every "
             "process's devices (ReformerBackbone.get_layout_map)")
    training.add_argument("--coordinator-address", metavar="HOST:PORT",
                          help="process 0's address (several processes)")
    training.add_argument("--num-processes", type=int, default=1,
                          help="JAX processes in the run (one per host)")
    training.add_argument("--process-id", type=int, default=0,
                          help="this process's index, 0 to "
                               "--num-processes - 1; process 0 writes "
                               "every file")
    training.add_argument("--backup-dir", default=None,
                          help="backup directory (BackupAndRestore, or the "
                               "strategy.run loop's own backup): a killed "
                               "run started again resumes from its last "
                               "epoch; deleted once the model is exported "
                               "(default: <export-dir>.backup)")
    output = parser.add_argument_group("output")
    output.add_argument("--sample-length", type=int, default=120,
                        help="bytes to generate after the prompt")
    output.add_argument("--export-dir", default="saved_models/reformer_lm")
    output.add_argument("--tensorboard-dir", default=None,
                        help="write TensorBoard logs here (the chief): the "
                             "training metrics after every step, training "
                             "and held-out metrics after every epoch")
    args = parser.parse_args(argv)

    check_positive_flags(parser, args, (
        "sequence_length", "hidden_dim", "num_heads", "chunk_length",
        "epochs", "steps_per_epoch", "batch_size", "sample_length",
        "steps_per_execution"))
    check_flag_range(parser, args, "num_hashes", 1, MAX_NUM_HASHES)
    check_flag_range(parser, args, "seed", 0, MAX_SEED)
    check_positive_number_flags(parser, args, ("learning_rate",))
    if args.sequence_length < 2:
        parser.error(f"--sequence-length must be at least 2; received "
                     f"{args.sequence_length}.")
    if args.sample_length >= args.sequence_length:
        parser.error(f"--sample-length must be smaller than --sequence-length "
                     f"({args.sequence_length}), the longest input the model "
                     f"takes; received {args.sample_length}.")
    if args.hidden_dim % args.num_heads:
        parser.error(f"--hidden-dim must be a multiple of --num-heads "
                     f"({args.num_heads}); received {args.hidden_dim}.")
    if args.tpu and args.strategy != "tpu":
        parser.error(f"--tpu needs --strategy tpu; received --strategy "
                     f"{args.strategy}.")
    check_distribution_flags(parser, args)
    if args.backup_dir is None:
        args.backup_dir = args.export_dir + ".backup"
    check_corpus_arguments(parser, args)
    args.attention_types = attention_types(parser, args.attention,
                                           args.num_layers)
    return args


def check_distribution_flags(parser, args):
    """Exits through `parser.error` unless the `--distribution` and process
    flags fit together and the backend."""
    check_positive_flags(parser, args, ("num_processes",))
    check_flag_range(parser, args, "process_id", 0, args.num_processes - 1)
    if args.distribution != "none":
        if keras.backend.backend() != "jax":
            parser.error(f"--distribution {args.distribution} needs the JAX "
                         f"backend (KERAS_BACKEND=jax); this run uses "
                         f"{keras.backend.backend()}.")
        if args.strategy != "none":
            parser.error(f"give --strategy (tf.distribute) or --distribution "
                         f"(JAX), not both; received --strategy "
                         f"{args.strategy} and --distribution "
                         f"{args.distribution}.")
    if args.num_processes > 1 and (args.distribution == "none" or
                                   not args.coordinator_address):
        parser.error(f"--num-processes {args.num_processes} needs "
                     f"--distribution data_parallel or model_parallel and "
                     f"--coordinator-address host:port of process 0; "
                     f"received --distribution {args.distribution} and "
                     f"--coordinator-address {args.coordinator_address}.")


def add_corpus_arguments(parser):
    """The `--text-files`/`--tfds-*` flags that `load_corpus` reads."""
    data = parser.add_argument_group("data (default: the Python stdlib)")
    data.add_argument("--text-files", nargs="+", metavar="PATH",
                      help="use these text files instead")
    data.add_argument("--tfds-dataset", metavar="NAME",
                      help="use a tensorflow-datasets text dataset that is "
                           "already prepared here, e.g. tiny_shakespeare")
    data.add_argument("--tfds-split", default="train")
    data.add_argument("--tfds-feature", default="text")
    data.add_argument("--tfds-download", action="store_true",
                      help="let tensorflow-datasets download and prepare "
                           "--tfds-dataset if it is not prepared (needs "
                           "network access; without this flag a missing "
                           "dataset fails at once)")
    data.add_argument("--max-corpus-bytes", type=int,
                      default=text_data.DEFAULT_MAX_CORPUS_BYTES)


def check_corpus_arguments(parser, args):
    check_positive_flags(parser, args, ("max_corpus_bytes",))
    if args.text_files and args.tfds_dataset:
        parser.error("give at most one of --text-files and --tfds-dataset.")


def attention_types(parser, attention, num_layers):
    """The per-layer list from `--attention` and `--num-layers`."""
    types = [t.strip() for t in attention.split(",") if t.strip()]
    if not types or any(t not in CAUSAL_ATTENTION_TYPES for t in types):
        parser.error(f"--attention takes types from "
                     f"{', '.join(CAUSAL_ATTENTION_TYPES)} (linformer mixes "
                     f"future positions, so no causal LM); received "
                     f"{attention!r}.")
    if num_layers is not None and num_layers < 1:
        parser.error(f"--num-layers must be a positive integer; received "
                     f"{num_layers}.")
    if len(types) == 1:
        return types * (num_layers or 2)
    if num_layers is not None and num_layers != len(types):
        parser.error(f"--attention {attention!r} names {len(types)} layers "
                     f"but --num-layers is {num_layers}; give one type or "
                     "matching counts.")
    return types


def load_corpus(args):
    """`(train_bytes, held_out_bytes)` from the source `add_corpus_arguments`
    names: the held-out part is the corpus's last 5%. A source that cannot
    be read ends the program with its error message (no traceback)."""
    start = time.time()
    try:
        if args.text_files:
            source = f"the text files {args.text_files}"
            data = text_data.read_text_files(args.text_files,
                                             args.max_corpus_bytes)
        elif args.tfds_dataset:
            source = f"tensorflow-datasets {args.tfds_dataset!r}"
            data = text_data.tfds_text(
                args.tfds_dataset, split=args.tfds_split,
                feature=args.tfds_feature, max_bytes=args.max_corpus_bytes,
                download=args.tfds_download)
        else:
            source = "the Python standard library's .py sources"
            data = text_data.stdlib_corpus(args.max_corpus_bytes)
        train, held_out = text_data.split_corpus(data)
    except (OSError, RuntimeError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"Corpus: {len(data):,} bytes from {source} "
          f"({time.time() - start:.1f} s); training on {len(train):,}, "
          f"holding out the last {len(held_out):,}.", flush=True)
    return train, held_out


def axial_shape_for(length):
    """A near-square `(n1, n2)` with `n1 * n2 == length`, e.g. 256 -> (16, 16).
    """
    rows = math.isqrt(length)
    while length % rows:
        rows -= 1
    return (rows, length // rows)


def build_model(args):
    """A causal `ReformerCausalLM` compiled with Adam and bits per byte.

    The learning rate warms up linearly, then decays along a cosine to a
    tenth of `--learning-rate` at the last step.
    """
    length = args.sequence_length
    chunk = min(args.chunk_length, length)
    padded_length = -(-length // chunk) * chunk
    backbone = ReformerBackbone(
        vocabulary_size=text_data.VOCABULARY_SIZE,
        hidden_dim=args.hidden_dim,
        num_heads=args.num_heads,
        head_dim=args.hidden_dim // args.num_heads,
        intermediate_dim=2 * args.hidden_dim,
        attention_types=args.attention_types,
        attention_options={
            "lsh": {"chunk_length": chunk, "num_hashes": args.num_hashes,
                    "num_buckets": hashing.auto_num_buckets(padded_length,
                                                            chunk)},
            "local": {"chunk_length": chunk}},
        axial_shape=axial_shape_for(length),
        causal=True,
        seed=args.seed)
    model = ReformerCausalLM(backbone)
    total_steps = args.epochs * args.steps_per_epoch
    warmup_steps = max(1, min(100, total_steps // 10))
    learning_rate = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup_steps), alpha=0.1,
        warmup_target=args.learning_rate, warmup_steps=warmup_steps)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerByte()], weighted_metrics=None,
        jit_compile=args.jit_compile or args.strategy == "tpu",
        steps_per_execution=args.steps_per_execution,
        sampler=keras_hub.samplers.TopKSampler(k=10, seed=args.seed))
    return model


def make_strategy(args):
    """The `tf.distribute` strategy named by `--strategy`.

    The model and optimizer are built in its scope; the tf.data pipeline is
    distributed over the replicas (`--batch-size` is the global batch).
    """
    if args.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if args.strategy == "multi_worker_mirrored":
        # The cluster and this worker's place in it come from TF_CONFIG.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if args.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=args.tpu or "local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def make_distribution(args):
    """The `keras.distribution` named by `--distribution` (JAX), after
    joining the other processes when there are several (once per program).

    `data_parallel` splits each global batch over every device of every
    process; `model_parallel` splits the weights over every device of every
    process, the model axis of a `(1, devices)` mesh (each process feeds
    the whole global batch).
    """
    import jax

    if args.num_processes > 1 and not jax.distributed.is_initialized():
        # CPU devices need an implementation of collectives across
        # processes; accelerators bring their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize(
            args.coordinator_address, args.num_processes, args.process_id)
    devices = sorted(jax.devices(),
                     key=lambda device: (device.process_index, device.id))
    if args.distribution == "data_parallel":
        return keras.distribution.DataParallel(devices=devices,
                                               auto_shard_dataset=True)
    mesh = keras.distribution.DeviceMesh((1, len(devices)),
                                         ("batch", "model"), devices)
    return keras.distribution.ModelParallel(
        layout_map=ReformerBackbone.get_layout_map(mesh),
        batch_dim_name="batch", auto_shard_dataset=True)


@contextlib.contextmanager
def no_distribution():
    """Runs the block with no `keras.distribution` set.

    Under a distribution of several JAX processes, creating a variable is a
    collective operation, and Keras's saving creates some (a reference
    optimizer): process 0 saving alone must not be under it.
    """
    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


@contextlib.contextmanager
def whole_weights(model):
    """Runs the block with every variable of `model` held whole here.

    Under `model_parallel` across processes, each process holds only its
    devices' parts of a split weight (and of its optimizer slots), which no
    process can read alone to save. Entering gathers every such variable
    from all processes (a collective operation: every process enters, in
    the same order) and gives it the gathered value, on this process's
    device, for the block (which may read and save it, not assign it);
    leaving gives it back its split value. Elsewhere this does nothing.

    Args:
        model: a compiled Keras model.

    Example:

        with whole_weights(model):  # in every process
            if process_id == 0:
                model.save_weights("lm.weights.h5")
    """
    if keras.backend.backend() != "jax":
        yield
        return
    import jax
    from jax.experimental import multihost_utils

    variables = model.variables + model.metrics_variables
    if model.optimizer is not None:
        variables += model.optimizer.variables
    split = [variable for variable in {id(v): v for v in variables}.values()
             if isinstance(variable.value, jax.Array) and
             not variable.value.is_fully_addressable and
             not variable.value.is_fully_replicated]
    if not split:
        yield
        return
    values = [variable.value for variable in split]
    gathered = multihost_utils.process_allgather(values, tiled=True)
    try:
        # The value itself, not `assign`, which would split it again by
        # the variable's layout.
        for variable, value in zip(split, gathered):
            variable._value = jax.numpy.asarray(value)
        yield
    finally:
        for variable, value in zip(split, values):
            variable._value = value


class ChiefSaves:
    """For callbacks that save once an epoch (mixed in before the callback
    class): every process runs them, the weights split across processes
    are gathered with all of them (`whole_weights`), and process 0 alone
    saves, with no distribution set.

    Args:
        write: bool, whether this process saves (process 0); the others
            only take part in gathering (and a `BackupAndRestore` restores
            in every process: loading weights under a distribution is a
            collective operation).
    """

    def __init__(self, *args, write, **kwargs):
        super().__init__(*args, **kwargs)
        if self.save_freq != "epoch":
            raise ValueError(f"{type(self).__name__} saves once an epoch: "
                             f"save_freq must be 'epoch'; received "
                             f"{self.save_freq!r}.")
        self.write = write

    def on_epoch_end(self, epoch, logs=None):
        with whole_weights(self.model):
            if self.write:
                with no_distribution():
                    super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self.write:
            super().on_train_end(logs)


class ChiefBackupAndRestore(ChiefSaves, keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` in every process, saved by the chief, keeping the
    model's random-number states too (`random_states`, which Keras's
    backup leaves out): a resumed run draws the LSH rotations and dropout
    masks an uninterrupted run would."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        path = os.path.join(self.backup_dir, "random_states.json")
        if os.path.exists(path):
            with open(path) as f:
                states = json.load(f)
            variables = random_states(self.model)
            if len(states) != len(variables):
                sys.exit(f"error: the backup {self.backup_dir} holds "
                         f"{len(states)} random-number states; this model "
                         f"has {len(variables)}.")
            for variable, state in zip(variables, states):
                variable.assign(np.asarray(state, variable.dtype))

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.write:
            path = os.path.join(self.backup_dir, "random_states.json")
            with open(path + ".tmp", "w") as f:
                json.dump([np.asarray(v.value).tolist()
                           for v in random_states(self.model)], f)
            os.replace(path + ".tmp", path)


def random_states(model):
    """The states of `model`'s `keras.random.SeedGenerator`s: its variables
    that are not weights, in the model's order."""
    weights = {id(variable) for variable in model.weights}
    return [variable for variable in model.variables
            if id(variable) not in weights]


class ChiefModelCheckpoint(ChiefSaves, keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` in every process, saved by the chief."""


def backed_up_epochs(backup_dir):
    """How many epochs the `BackupAndRestore` backup in `backup_dir` holds
    (0 without one), from the metadata it keeps beside the weights."""
    try:
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            return int(json.load(f)["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


class HeldOutReport(keras.callbacks.Callback):
    """Prints the held-out bits per byte after each epoch, on its own line."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        print(f"==> epoch {epoch + 1}: held-out bits per byte "
              f"{logs['val_bits_per_byte']:.3f} (training "
              f"{logs['bits_per_byte']:.3f}; uniform 8.000), "
              f"{time.time() - self.start:.0f} s", flush=True)


class RunRecord(keras.callbacks.Callback):
    """The run's `RUN_FLAGS` and held-out bits per byte by epoch, kept in
    `run.json` in `--backup-dir` beside the backup; says when a run resumes.

    A backup that records other flags (or none) ends the program when the
    record is made, before anything is trained: it belongs to another run.

    Args:
        args: the parsed flags.
        write: bool, whether this process writes the record (the chief).
    """

    def __init__(self, args, write=True):
        super().__init__()
        self.backup_dir = args.backup_dir
        self.path = os.path.join(args.backup_dir, "run.json")
        self.epochs = args.epochs
        self.write = write
        # As JSON gives them back (lists, not tuples).
        self.flags = json.loads(json.dumps(
            {name: getattr(args, name) for name in RUN_FLAGS}))
        self.history = []
        if os.path.exists(self.backup_dir):
            self.history = self._restore()

    def _restore(self):
        """The recorded history, if the backup records these flags."""
        try:
            with open(self.path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
        saved = record.get("flags")
        if saved == self.flags:
            return record["held_out_bits_per_byte"]
        if saved is None:
            which = f"it holds no readable {self.path}"
        else:
            which = "; ".join(
                f"--{name.replace('_', '-')} {saved.get(name)!r} there, "
                f"{value!r} here" for name, value in self.flags.items()
                if saved.get(name) != value)
        sys.exit(f"error: the backup {self.backup_dir} belongs to another "
                 f"configuration ({which}). Delete it to start afresh, or "
                 "give another --export-dir or --backup-dir.")

    def on_train_begin(self, logs=None):
        self.trained = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self.trained and epoch:
            print(f"The backup {self.backup_dir} holds epochs 1-{epoch}: "
                  f"resuming from epoch {epoch + 1} of {self.epochs}.",
                  flush=True)
        self.trained = True
        del self.history[epoch:]

    def on_epoch_end(self, epoch, logs=None):
        self.history.append(logs["val_bits_per_byte"])
        if self.write:
            os.makedirs(self.backup_dir, exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump({"flags": self.flags,
                           "held_out_bits_per_byte": self.history}, f)
            os.replace(self.path + ".tmp", self.path)

    def on_train_end(self, logs=None):
        if not self.trained:
            print(f"The backup {self.backup_dir} holds all {self.epochs} "
                  "epochs: nothing left to train.", flush=True)


def check_writable(paths):
    """Exits unless files can be created beside each of `paths`, a dict
    `{flag: path to be written}`."""
    for flag, path in paths.items():
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()
        except OSError as error:
            sys.exit(f"error: {flag} {path} cannot be written: its "
                     f"directory {directory} cannot be created or written "
                     f"to ({error.strerror}). Give a writable path.")


def check_corpus_size(args, train_text, held_out_text):
    """Exits unless both parts of the corpus hold a batch of windows."""
    needed = args.batch_size * args.sequence_length + 1
    if len(held_out_text) < needed:
        corpus = len(train_text) + len(held_out_text)
        sys.exit(f"error: a corpus of {corpus:,} bytes is too small: its "
                 f"held-out last 5% ({len(held_out_text):,} bytes) must "
                 f"hold a batch of --batch-size {args.batch_size} windows "
                 f"of --sequence-length {args.sequence_length} + 1 bytes, "
                 f"{needed:,} bytes (a corpus of about {20 * needed:,} "
                 "bytes). Give more text, or smaller --batch-size or "
                 "--sequence-length.")


def generate(model, prompt, length):
    """Samples `length` bytes after `prompt` with cached decoding.

    `ReformerCausalLM.generate` runs keras-hub's top-10 sampler (set in
    `build_model`); every layer keeps a cache, so each new byte costs one
    position's work.

    Args:
        model: a `ReformerCausalLM`.
        prompt: `bytes`.
        length: int, bytes to generate.

    Returns:
        The generated text (`str`, without the prompt).
    """
    token_ids = np.array([list(prompt)], "int32")
    output = model.generate(
        {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)},
        max_length=len(prompt) + length, strip_prompt=True)
    generated = output["token_ids"][0][output["padding_mask"][0]]
    return text_data.detokenize(generated)


def held_out_prompt(held_out, length):
    """`length` bytes of held-out text, starting at a line if one starts soon.
    """
    newline = held_out.find(b"\n", 0, 200)
    start = newline + 1 if 0 <= newline < len(held_out) - length else 0
    return held_out[start:start + length]


def export_and_check(model, path, inputs):
    """Exports the SavedModel to `path`, reloads it and compares its logits
    with the Python model's on `inputs`; exits if they differ by 1e-3."""
    path = export_for_serving(model, path)
    print(f"Exported the SavedModel {path} (signatures serving_default: "
          "int32 token_ids and padding_mask (batch, length) -> logits; "
          "generate: prompts and sampling settings -> token ids)",
          flush=True)
    served = tf.saved_model.load(path).signatures["serving_default"]
    logits = served(
        token_ids=tf.constant(inputs["token_ids"]),
        padding_mask=tf.constant(inputs["padding_mask"]))["logits"]
    expected = model(inputs, training=False)
    difference = float(np.max(np.abs(logits.numpy() - np.asarray(expected))))
    print(f"Reloaded SavedModel vs Python model logits on "
          f"{tuple(inputs['token_ids'].shape)} token ids: max difference "
          f"{difference:.2e}", flush=True)
    if not difference < 1e-3:
        sys.exit(f"The exported model's logits differ from the Python "
                 f"model's by {difference:.2e} (more than 1e-3).")
    return path


def main(argv=None, callbacks=()):
    """Runs the job the flags describe; returns the trained model.

    Args:
        argv: list of flags (default: the command line's).
        callbacks: more Keras callbacks for training, run in every process
            after the example's own (the record, backup, checkpoints and
            TensorBoard logs) and before the epoch's report.
    """
    args = parse_args(argv)
    # First: MultiWorkerMirroredStrategy must configure TensorFlow's
    # collective ops, and JAX processes must join, before any other work.
    strategy = make_strategy(args)
    if args.distribution != "none":
        keras.distribution.set_distribution(make_distribution(args))
    # One process writes every file: the tf.distribute chief, or JAX's
    # process 0.
    chief = (multi_worker_training.is_chief(strategy) and
             args.process_id == 0)
    if chief:
        check_writable({"--export-dir": args.export_dir,
                        "--backup-dir": args.backup_dir})
    record = RunRecord(args, write=chief)
    keras.utils.set_random_seed(args.seed)
    train_text, held_out_text = load_corpus(args)
    check_corpus_size(args, train_text, held_out_text)
    train = text_data.language_model_dataset(
        train_text, args.sequence_length, args.batch_size, shuffle=True,
        seed=args.seed, repeat=True)
    if args.strategy != "multi_worker_mirrored":
        # A resumed run goes on with the batches an uninterrupted run would
        # see next (the strategy.run loop keeps its own place).
        train = train.skip(backed_up_epochs(args.backup_dir) *
                           args.steps_per_epoch)
    held_out = text_data.language_model_dataset(
        held_out_text, args.sequence_length, args.batch_size)
    with strategy.scope():
        model = build_model(args)
    if args.distribution != "none":
        print(f"Distribution: {args.distribution} over "
              f"{len(keras.distribution.list_devices())} device(s) of "
              f"{args.num_processes} process(es); this is process "
              f"{args.process_id}.", flush=True)
    else:
        print(f"Strategy: {args.strategy} ({strategy.num_replicas_in_sync} "
              "replica(s)).", flush=True)
    print(f"Model: causal ReformerCausalLM, {len(args.attention_types)} layer(s) "
          f"{args.attention_types}, hidden {args.hidden_dim}, sequence "
          f"length {args.sequence_length}, {model.count_params():,} "
          f"parameters; jit_compile={args.jit_compile}.", flush=True)

    print(f"Training {args.epochs} epochs x {args.steps_per_epoch} steps of "
          f"{args.batch_size} x {args.sequence_length} bytes "
          "(the first step compiles)...", flush=True)
    start = time.time()
    # The record comes first, the report last: once an epoch is reported,
    # it is recorded, backed up and checkpointed.
    extra_callbacks, callbacks = list(callbacks), [record]
    if args.tensorboard_dir and chief:
        extra_callbacks.insert(0, keras.callbacks.TensorBoard(
            args.tensorboard_dir, update_freq="batch"))
    # One progress bar: the chief's.
    verbose = (1 if sys.stdout.isatty() else 2) if chief else 0
    if args.strategy == "multi_worker_mirrored":
        # Keras 3.15's fit fails under this strategy (keras-team/keras#20585):
        # a strategy.run loop with the same callbacks, and its own backup
        # and per-epoch weights (the backup is saved before the callbacks
        # run, and restored by every worker from the chief's --backup-dir).
        print("multi_worker_mirrored: training through strategy.run "
              "(without XLA).", flush=True)
        trainer = multi_worker_training.StrategyTrainer(model, strategy)
        history = trainer.fit(
            train, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
            validation_data=held_out,
            callbacks=callbacks + extra_callbacks + [HeldOutReport()],
            verbose=verbose, backup_dir=args.backup_dir, delete_backup=False,
            weights_path=args.export_dir + ".checkpoints/"
            "epoch_{epoch:02d}.weights.h5").history["val_bits_per_byte"]
        # (The trainer's history: the record is written after the backup,
        # so it may miss the last backed-up epoch.)
    else:
        callbacks += [
            ChiefBackupAndRestore(args.backup_dir, delete_checkpoint=False,
                                  write=chief),
            ChiefModelCheckpoint(
                args.export_dir + ".checkpoints/epoch_{epoch:02d}.weights.h5",
                save_weights_only=True, write=chief)]
        model.fit(train, epochs=args.epochs,
                  steps_per_epoch=args.steps_per_epoch,
                  shuffle=False,  # the dataset shuffles itself
                  validation_data=held_out,
                  callbacks=callbacks + extra_callbacks + [HeldOutReport()],
                  verbose=verbose)
        history = record.history
    print(f"Trained in {time.time() - start:.0f} s. Held-out bits per byte "
          "by epoch: " + ", ".join(f"{v:.3f}" for v in history), flush=True)

    prompt = held_out_prompt(
        held_out_text, min(PROMPT_LENGTH, args.sequence_length -
                           args.sample_length))
    print(f"Sampling {args.sample_length} bytes (top-10 sampling, cached "
          "decoding)...",
          flush=True)
    sample = generate(model, prompt, args.sample_length)
    print("----- prompt (held-out) -----\n" + text_data.detokenize(prompt))
    print("----- sample -----\n" + sample + "\n-----", flush=True)

    with whole_weights(model):  # every JAX process gathers, one saves
        if args.process_id:
            print(f"Process {args.process_id} saves nothing: process 0 "
                  "writes every file.", flush=True)
            return model
        # Every tf.distribute worker saves; only the chief's files are kept
        # (the others write to a temporary directory that is deleted). One
        # process is the chief.
        with multi_worker_training.chief_path(args.export_dir,
                                              strategy) as export_dir:
            with no_distribution():
                save_model(args, model, export_dir, held_out)
    if chief:  # all done: a run killed before this resumes at the export
        shutil.rmtree(args.backup_dir)
    return model


def save_model(args, model, export_dir, held_out):
    """Saves the `.keras` file and the preset, and the SavedModel on the
    TensorFlow backend (elsewhere, says how to export it)."""
    keras_path = save_keras_model(model, export_dir + ".keras")
    print(f"Saved {keras_path} (evaluate or sample it later: python "
          f"examples/saved_lm.py evaluate|generate {keras_path})",
          flush=True)
    model.preprocessor = text_data.byte_preprocessor(args.sequence_length)
    preset = save_preset(model, export_dir + "_preset")
    print(f"Saved the preset {preset} (with its tokenizer: "
          "keras_hub.models.CausalLM.from_preset(path) after import "
          "keras_reformer)", flush=True)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        inputs, _ = next(iter(held_out))
        export_and_check(model, export_dir, inputs)
    else:
        print(f"Not exported: a SavedModel is written from the "
              f"TensorFlow backend (this run: {backend}). Export the "
              "saved model with: KERAS_BACKEND=tensorflow python "
              f"examples/saved_lm.py export {keras_path} {export_dir}",
              flush=True)


if __name__ == "__main__":
    main()

"""The Reformer paper's duplication task: copy a random sequence, 0w0w.

Each example is `0 w 0 w` with `w` random symbols from `1..vocabulary-1`; a
one-layer causal Reformer LM (the paper's width 256 and 4 heads; a learned
embedding per position) learns to predict the second copy of `w`, which
needs attention from each position to its twin half a sequence back. After
training with `--train-hashes` rounds it reports next-token accuracy on the
second half with each of `--eval-hashes` rounds (the paper's table: trained
and evaluated with 4 rounds, LSH attention copies almost perfectly), and
with exact shared-QK attention. `--attention full_shared_qk` trains the
paper's "full attention" row instead, evaluated the same ways.

    python examples/duplication_task.py   # CPU-sized: length 64, ~7 min
    python examples/duplication_task.py --length 1024 --steps 20000  # paper

Long runs can be cut into pieces: with `--checkpoint-dir DIR` the weights
and optimizer state are saved every `--checkpoint-every` steps, and the same
command run again resumes from the last save with the batches that come
next (a finished run's command, run again, only evaluates; delete DIR to
start over). The LSH rotations drawn after a resume are fresh draws, not
those an uninterrupted run would have drawn (Keras does not save random
generators' state). For example, in calls of at most ten minutes each:

    timeout 590 python examples/duplication_task.py --length 1024 \
        --steps 20000 --checkpoint-dir saved_models/duplication_1024
"""

import argparse
import json
import math
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_reformer.models import ReformerBackbone  # noqa: E402
from keras_reformer.models import ReformerCausalLM  # noqa: E402
from keras_reformer.optional_tensorflow import TENSORFLOW_INSTALLED  # noqa
from keras_reformer.optional_tensorflow import tf  # noqa: E402
from flag_checks import MAX_NUM_HASHES  # noqa: E402
from flag_checks import MAX_SEED  # noqa: E402
from flag_checks import check_flag_range  # noqa: E402
from flag_checks import check_positive_flags  # noqa: E402
from flag_checks import check_positive_number_flags  # noqa: E402


def duplication_batch(rng, batch_size, length, vocabulary_size):
    """Inputs, targets and weights (1 on the second copy of `w`)."""
    half = length // 2
    words = rng.randint(1, vocabulary_size, (batch_size, half - 1))
    zeros = np.zeros((batch_size, 1), "int64")
    sequences = np.concatenate([zeros, words, zeros, words], axis=1)
    inputs, targets = sequences[:, :-1], sequences[:, 1:]
    weights = np.zeros(targets.shape, "float32")
    weights[:, half:] = 1.0  # targets w[1..] of the second copy, then the end
    return ({"token_ids": inputs.astype("int32"),
             "padding_mask": np.ones(inputs.shape, "int32")},
            targets.astype("int32"), weights)


def build_model(args, attention, num_hashes):
    rows = -(-args.length // args.axial_columns)
    backbone = ReformerBackbone(
        vocabulary_size=args.vocabulary_size, hidden_dim=args.hidden_dim,
        num_heads=args.num_heads, head_dim=args.hidden_dim // args.num_heads,
        intermediate_dim=2 * args.hidden_dim,
        attention_types=[attention],
        axial_shape=(rows, args.axial_columns),
        causal=True, seed=args.seed, attention_options={
            "lsh": {"chunk_length": args.chunk_length,
                    "num_hashes": num_hashes,
                    "num_buckets": args.num_buckets},
            "local": {"chunk_length": args.chunk_length}})
    model = ReformerCausalLM(backbone)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
            name="accuracy")],
        jit_compile=args.jit_compile)
    return model


def second_half_accuracy(model, batches):
    correct = total = 0.0
    for inputs, targets, weights in batches:
        predicted = np.asarray(model.predict_on_batch(inputs)).argmax(-1)
        correct += float(((predicted == targets) * weights).sum())
        total += float(weights.sum())
    return correct / total


def training_batches(args, first_step=0):
    """The endless training stream from batch `first_step` on (a resumed
    run skips the batches it has already trained on), as a `tf.data`
    dataset (keras-hub tasks take datasets, not Python generators), or
    without TensorFlow as the generator itself (see `fit`)."""

    def batches():
        rng = np.random.RandomState(args.seed)
        for _ in range(first_step):
            duplication_batch(rng, args.batch_size, args.length,
                              args.vocabulary_size)
        while True:
            yield duplication_batch(rng, args.batch_size, args.length,
                                    args.vocabulary_size)

    if not TENSORFLOW_INSTALLED:
        return batches()
    ids = tf.TensorSpec((args.batch_size, args.length - 1), tf.int32)
    return tf.data.Dataset.from_generator(batches, output_signature=(
        {"token_ids": ids, "padding_mask": ids}, ids,
        tf.TensorSpec(ids.shape, tf.float32)))


def fit(model, data, **kwargs):
    """`model.fit`; without TensorFlow (JAX-only machines) Keras's own fit,
    which reads Python generators: keras-hub's needs tf.data or grain for
    its preprocessing, and this model has no preprocessor."""
    if TENSORFLOW_INSTALLED:
        return model.fit(data, **kwargs)
    return keras.Model.fit(model, data, **kwargs)


def run(args):
    keras.utils.set_random_seed(args.seed)
    model = build_model(args, args.attention, args.train_hashes)
    # An "epoch" of the endless stream per checkpoint, else up to ten: a
    # progress line each.
    epoch_steps = args.checkpoint_every if args.checkpoint_dir else (
        args.steps // math.gcd(args.steps, 10))
    callbacks = []
    if args.checkpoint_dir:
        checkpoint = os.path.join(args.checkpoint_dir, "latest.weights.h5")
        if os.path.exists(checkpoint):
            model.optimizer.build(model.trainable_variables)
            model.load_weights(checkpoint)
        callbacks.append(keras.callbacks.ModelCheckpoint(
            checkpoint, save_weights_only=True))
    first_step = int(model.optimizer.iterations)
    start = time.time()
    fit(model, training_batches(args, first_step),
        steps_per_epoch=epoch_steps, epochs=args.steps // epoch_steps,
        initial_epoch=first_step // epoch_steps, shuffle=False,
        callbacks=callbacks, verbose=args.verbose)
    train_seconds = time.time() - start
    eval_rng = np.random.RandomState(args.seed + 1)
    eval_batches = [duplication_batch(eval_rng, args.batch_size, args.length,
                                      args.vocabulary_size)
                    for _ in range(args.eval_batches)]
    # The paper's table: a shared-QK model (LSH or full) is evaluated with
    # full attention and with LSH at each number of rounds.
    evaluations = [(args.attention, None)]
    if args.attention in ("lsh", "full_shared_qk"):
        evaluations = [("full_shared_qk", None)] + [
            ("lsh", n) for n in args.eval_hashes]
    results = []
    for attention, num_hashes in evaluations:
        evaluated = model
        if attention != args.attention or (
                num_hashes not in (None, args.train_hashes)):
            evaluated = build_model(args, attention,
                                    num_hashes or args.train_hashes)
            copy_weights(model, evaluated)
        result = {
            "task": "duplication", "attention": args.attention,
            "length": args.length, "train_hashes": args.train_hashes,
            "eval_attention": attention, "eval_hashes": num_hashes,
            "steps": args.steps,
            "resumed_from_step": first_step,
            "trained_steps": int(model.optimizer.iterations),
            "accuracy": round(second_half_accuracy(evaluated, eval_batches),
                              4),
            "chance": round(1.0 / (args.vocabulary_size - 1), 4),
            "train_seconds": round(train_seconds, 1)}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def copy_weights(source, target):
    """`source`'s trained weights into `target` by path; LSH rotations (one
    set per round) stay `target`'s own, freshly drawn."""
    trained = {w.path: w for w in source.weights}
    for weight in target.weights:
        if "rotations" not in weight.path:
            # A copy: on JAX, sharing the array would let one model's
            # `predict` donate (delete) the other's weights.
            weight.assign(keras.ops.convert_to_numpy(trained[weight.path]))


def hash_list(text):
    """`"1,2,4"` -> `[1, 2, 4]` (argparse type of `--eval-hashes`)."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,2,4,8; received "
            f"{text!r}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--vocabulary-size", type=int, default=64)
    parser.add_argument(
        "--attention", choices=["lsh", "full_shared_qk", "full", "local"],
        default="lsh")
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument(
        "--axial-columns", type=int, default=1,
        help="columns of the axial position grid; 1 (default) gives each "
        "position its own learned embedding (unfactorised); more "
        "columns factorise positions into rows x columns, which a one-layer "
        "shared-QK model cannot shift by half a sequence (BENCHMARKS.md)")
    parser.add_argument("--chunk-length", type=int, default=16)
    parser.add_argument("--num-buckets", type=int, default=None)
    parser.add_argument("--train-hashes", type=int, default=4)
    parser.add_argument("--eval-hashes", default="1,2,4,8", type=hash_list,
                        help="comma-separated hash rounds to evaluate with")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument(
        "--checkpoint-dir", default=None,
        help="save the model and optimizer here every --checkpoint-every "
        "steps, and resume from the last save when run again")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    args = parser.parse_args(argv)
    check_positive_flags(parser, args, (
        "hidden_dim", "num_heads", "chunk_length", "steps", "batch_size",
        "eval_batches"))
    # Words are drawn from 1..vocabulary-1: at least one symbol.
    check_flag_range(parser, args, "vocabulary_size", 2)
    check_flag_range(parser, args, "train_hashes", 1, MAX_NUM_HASHES)
    check_flag_range(parser, args, "seed", 0, MAX_SEED - 1)  # eval: seed + 1
    check_positive_number_flags(parser, args, ("learning_rate",))
    if args.num_buckets is not None and (args.num_buckets < 2
                                         or args.num_buckets % 2):
        parser.error(f"--num-buckets must be an even number of at least 2; "
                     f"received {args.num_buckets}.")
    if not args.eval_hashes or not all(
            1 <= n <= MAX_NUM_HASHES for n in args.eval_hashes):
        parser.error(f"--eval-hashes must list integers between 1 and "
                     f"{MAX_NUM_HASHES}; received {args.eval_hashes}.")
    if args.hidden_dim % args.num_heads:
        parser.error(f"--hidden-dim must be a multiple of --num-heads "
                     f"({args.num_heads}); received {args.hidden_dim}.")
    if args.length % 2 or args.length < 8:
        parser.error(f"--length must be even and at least 8; received "
                     f"{args.length}.")
    if args.checkpoint_dir and (args.checkpoint_every < 1
                                or args.steps % args.checkpoint_every):
        parser.error(f"--checkpoint-every must be a positive divisor of "
                     f"--steps ({args.steps}); received "
                     f"{args.checkpoint_every}.")
    if not 1 <= args.axial_columns <= args.length:
        parser.error(f"--axial-columns must be between 1 and --length "
                     f"({args.length}); received {args.axial_columns}.")
    return args


if __name__ == "__main__":
    run(parse_args())

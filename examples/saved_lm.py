"""Evaluate or sample from a saved causal Reformer LM (a `.keras` file).

`evaluate` reports bits per byte (8.0 is a uniform guess) on the held-out
end of a corpus: by default the one `examples/train_lm.py` trains on, split
the same way; `--text-files` or `--tfds-dataset` evaluate other text, and
`--whole-corpus` scores all of it. It scores every window, where the
training run's report leaves out the last incomplete batch: the two agree
exactly when the batch size divides the windows, and to a few thousandths
otherwise. `generate` continues a prompt with one of keras-hub's samplers
and cached decoding. `export` writes the TF SavedModel for serving (on the
TensorFlow backend: the way to export a model trained on JAX).

    python examples/saved_lm.py evaluate saved_models/reformer_lm.keras
    python examples/saved_lm.py evaluate saved_models/reformer_lm.keras \\
        --text-files my.txt --whole-corpus
    python examples/saved_lm.py generate saved_models/reformer_lm.keras \\
        --prompt "def main(" --length 200
    python examples/saved_lm.py generate saved_models/reformer_lm.keras \\
        --prompt "import " --sampler greedy
    python examples/saved_lm.py export saved_models/reformer_lm.keras \\
        saved_models/reformer_lm
"""

import argparse
import os
import sys
import time
import zipfile

import keras_reformer  # noqa: F401  (first: sets KERAS_BACKEND=tensorflow)
import keras
import keras_hub
import numpy as np

from keras_reformer import text_data
from keras_reformer.metrics import BitsPerByte
from keras_reformer.models import ReformerCausalLM
from train_lm import add_corpus_arguments
from train_lm import MAX_SEED
from train_lm import check_corpus_arguments
from train_lm import check_flag_range
from train_lm import check_positive_flags
from train_lm import check_positive_number_flags
from train_lm import export_and_check
from train_lm import generate
from train_lm import load_corpus

SAMPLERS = ("greedy", "top_k", "top_p", "random", "beam")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser(
        "evaluate", help="bits per byte on held-out text",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("model", help="path of a saved .keras model")
    add_corpus_arguments(evaluate)
    evaluate.add_argument("--whole-corpus", action="store_true",
                          help="score the whole corpus, not its last 5%%")
    evaluate.add_argument("--sequence-length", type=int, default=None,
                          help="tokens per window (default: the model's "
                               "maximum length)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--jit-compile",
                          action=argparse.BooleanOptionalAction, default=True,
                          help="compile the evaluation step with XLA")

    sample = commands.add_parser(
        "generate", help="continue a prompt",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sample.add_argument("model", help="path of a saved .keras model")
    sample.add_argument("--prompt", required=True,
                        help="text to continue (UTF-8 bytes are the tokens)")
    sample.add_argument("--length", type=int, default=120,
                        help="bytes to generate after the prompt")
    sample.add_argument("--sampler", choices=SAMPLERS, default="top_k")
    sample.add_argument("--top-k", type=int, default=10,
                        help="top_k: sample among the k likeliest bytes")
    sample.add_argument("--top-p", type=float, default=0.9,
                        help="top_p: sample within this probability mass")
    sample.add_argument("--num-beams", type=int, default=4,
                        help="beam: beams kept")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)

    export = commands.add_parser(
        "export", help="write the TF SavedModel for serving",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    export.add_argument("model", help="path of a saved .keras model")
    export.add_argument("directory", help="the SavedModel's directory")

    args = parser.parse_args(argv)
    if not os.path.isfile(args.model) or not args.model.endswith(".keras"):
        parser.error(f"model must be a saved .keras file; received "
                     f"{args.model!r}, which "
                     + ("is not a .keras file." if os.path.isfile(args.model)
                        else "does not exist."))
    if args.command == "evaluate":
        check_corpus_arguments(parser, args)
        check_positive_flags(parser, args, ("sequence_length", "batch_size"))
    elif args.command == "generate":
        if not args.prompt:
            parser.error("--prompt must hold at least one character.")
        check_positive_flags(parser, args, ("length", "num_beams"))
        check_flag_range(parser, args, "top_k", 1, text_data.VOCABULARY_SIZE)
        check_flag_range(parser, args, "seed", 0, MAX_SEED)
        if not 0.0 < args.top_p <= 1.0:
            parser.error(f"--top-p must be in (0, 1]; received {args.top_p}.")
        check_positive_number_flags(parser, args, ("temperature",))
    return parser, args


def load_lm(parser, path):
    """The `ReformerCausalLM` saved at `path`."""
    if not zipfile.is_zipfile(path):  # Keras would say "File not found"
        parser.error(f"{path} is not a complete .keras file (a zip "
                     "archive): it is truncated or damaged. Save the model "
                     "again.")
    model = keras.saving.load_model(path, compile=False)
    if not isinstance(model, ReformerCausalLM):
        parser.error(f"{path} holds a {type(model).__name__}, not a "
                     "ReformerCausalLM.")
    if model.backbone.vocabulary_size != text_data.VOCABULARY_SIZE:
        parser.error(
            f"{path} has a vocabulary of {model.backbone.vocabulary_size} "
            f"tokens; this script reads bytes ({text_data.VOCABULARY_SIZE} "
            "tokens).")
    return model


def make_sampler(args):
    """The keras-hub sampler named by `--sampler` and its flags."""
    settings = {"temperature": args.temperature}
    if args.sampler in ("top_k", "top_p", "random"):
        settings["seed"] = args.seed
    if args.sampler == "top_k":
        settings["k"] = args.top_k
    elif args.sampler == "top_p":
        settings["p"] = args.top_p
    elif args.sampler == "beam":
        settings["num_beams"] = args.num_beams
    return keras_hub.samplers.get({"class_name": args.sampler,
                                   "config": settings})


def evaluate(parser, args, model):
    """Bits per byte of `model` on the chosen text; returns the number."""
    length = args.sequence_length or model.backbone.max_length
    if length > model.backbone.max_length:
        parser.error(f"--sequence-length must be at most the model's "
                     f"{model.backbone.max_length} positions; received "
                     f"{length}.")
    train_text, held_out_text = load_corpus(args)
    text = train_text + held_out_text if args.whole_corpus else held_out_text
    windows = text_data.num_windows(text, length)
    if windows < 1:
        parser.error(f"{len(text):,} bytes of text are too few for one "
                     f"window of {length} + 1 bytes; give more text or a "
                     "smaller --sequence-length.")
    dataset = text_data.language_model_dataset(
        text, length, args.batch_size, drop_remainder=False)
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerByte()], jit_compile=args.jit_compile)
    print(f"Scoring {windows * length:,} bytes in {windows} windows of "
          f"{length} bytes...", flush=True)
    start = time.time()
    results = model.evaluate(dataset, return_dict=True,
                             verbose=1 if sys.stdout.isatty() else 2)
    bits = results["bits_per_byte"]
    print(f"==> bits per byte {bits:.3f} (uniform 8.000) on "
          f"{'the whole corpus' if args.whole_corpus else 'held-out text'}"
          f", {time.time() - start:.0f} s", flush=True)
    return bits


def main(argv=None):
    parser, args = parse_args(argv)
    model = load_lm(parser, args.model)
    if args.command == "evaluate":
        evaluate(parser, args, model)
        return
    if args.command == "export":
        ids = np.random.RandomState(0).randint(
            0, text_data.VOCABULARY_SIZE,
            (2, min(128, model.backbone.max_length))).astype("int32")
        try:  # another backend, or a directory holding something else
            export_and_check(model, args.directory, {
                "token_ids": ids, "padding_mask": np.ones_like(ids)})
        except ValueError as error:
            parser.error(str(error))
        return
    prompt = args.prompt.encode("utf-8")
    capacity = model.backbone.max_length
    if len(prompt) + args.length > capacity:
        parser.error(f"the prompt ({len(prompt)} bytes) and --length "
                     f"({args.length}) must fit the model's {capacity} "
                     "positions.")
    model.compile(sampler=make_sampler(args))
    sample = generate(model, prompt, args.length)
    print("----- prompt -----\n" + args.prompt)
    print("----- sample -----\n" + sample + "\n-----", flush=True)


if __name__ == "__main__":
    main()

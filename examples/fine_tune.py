"""Fine-tune a Hugging Face Reformer checkpoint with LoRA on the corpus.

Loads a directory written by transformers' `save_pretrained` (for example
google/reformer-enwik8, downloaded elsewhere) through
`ReformerCausalLM.from_preset`: config, weights and tokenizer. Without
`--checkpoint` it first saves a small random byte-level Hugging Face model
(enwik8's tokenization: bytes shifted by 2) to `--work-dir`, since nothing
can be downloaded here; that needs torch and transformers (the `convert`
extra).

It reports the held-out bits per byte, enables LoRA on the attention
projections (`backbone.enable_lora(rank)`: everything else is frozen),
trains the adapters on the Python standard library's source code (already
on the machine) with a progress bar, reports the bits per byte again, saves
a keras-hub preset, and checks that the reloaded preset scores the same.

    python examples/fine_tune.py
    python examples/fine_tune.py --checkpoint path/to/reformer-enwik8 \\
        --sequence-length 4096 --batch-size 1
"""

import argparse
import math
import os
import sys
import time

import keras_reformer  # noqa: F401  (first: sets KERAS_BACKEND=tensorflow)
import keras
import numpy as np
import tensorflow as tf

from keras_reformer import text_data
from keras_reformer.export import save_preset
from keras_reformer.metrics import BitsPerByte
from keras_reformer.models import ReformerCausalLM
from keras_reformer.models import ReformerCausalLMPreprocessor
from keras_reformer.models import ReformerTokenizer

# The random stand-in: google/reformer-enwik8's layer pattern and byte
# vocabulary at a width that trains on a CPU in minutes.
RANDOM_CHECKPOINT = dict(
    vocab_size=258, hidden_size=128, num_attention_heads=2,
    attention_head_size=64, feed_forward_size=256,
    attn_layers=["local", "lsh", "local", "lsh"], axial_pos_embds_dim=[64, 64],
    lsh_attn_chunk_length=64, local_attn_chunk_length=64, num_hashes=2,
    num_buckets=8, is_decoder=True, hash_seed=0, hidden_dropout_prob=0.0,
    lsh_attention_probs_dropout_prob=0.0,
    local_attention_probs_dropout_prob=0.0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--checkpoint", help="a Hugging Face Reformer directory "
        "(save_pretrained); default: a random one made in --work-dir")
    parser.add_argument("--work-dir", default="saved_models/random_hf_reformer",
                        help="where the random checkpoint is saved")
    parser.add_argument("--preset-dir",
                        default="saved_models/fine_tuned_reformer_preset",
                        help="where the fine-tuned keras-hub preset goes")
    parser.add_argument("--sequence-length", type=int, default=512,
                        help="bytes per training window")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300,
                        help="training steps of the adapters")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--held-out-windows", type=int, default=16,
                        help="held-out windows scored before and after")
    parser.add_argument("--max-corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("sequence_length", "batch_size", "steps", "rank",
                 "held_out_windows", "max_corpus_bytes"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive "
                         f"integer; received {value}.")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        parser.error("--learning-rate must be a finite number > 0; received "
                     f"{args.learning_rate}.")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r} is not a directory.")
    return args


def save_random_checkpoint(path, sequence_length, seed):
    """Saves a random byte-level Hugging Face Reformer LM to `path`.

    Its axial position grid is the smallest power-of-two square-ish one
    that holds `sequence_length` (at least 4,096, the grid of rows x 64)."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise SystemExit(
            "Making the random checkpoint needs torch and transformers "
            "(pip install -e '.[convert]'); or pass --checkpoint DIR.\n"
            f"({error})")
    max_length = max(4096, 2 ** math.ceil(math.log2(sequence_length)))
    config = transformers.ReformerConfig(
        axial_pos_shape=[max_length // 64, 64],
        max_position_embeddings=max_length, **RANDOM_CHECKPOINT)
    torch.manual_seed(seed)
    transformers.ReformerModelWithLMHead(config).save_pretrained(path)
    print(f"==> saved a random Hugging Face Reformer ({max_length} positions) "
          f"to {path}", flush=True)


def text_windows(data, length, count=None):
    """`data` cut into consecutive windows of `length + 1` bytes (inputs
    and the next byte after each), at most `count` of them."""
    starts = range(0, len(data) - length, length)
    if count is not None:
        starts = starts[:count]
    return [data[start:start + length + 1] for start in starts]


def bits_per_byte(lm, windows, batch_size):
    """Held-out bits per byte: the summed cross-entropy of every predicted
    token, in bits, over the bytes those tokens stand for (a window's first
    token is not predicted). For a byte-level tokenizer that is the mean of
    `-log2 p(byte)`. `lm` must be compiled with `compile_for_bits`."""
    predicted_tokens, predicted_bytes = 0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        x, _, weights = lm.preprocessor(tf.constant(batch))
        predicted_tokens += int(np.sum(keras.ops.convert_to_numpy(weights)))
        first_ids = keras.ops.convert_to_numpy(x["token_ids"])[:, 0]
        predicted_bytes += sum(
            len(window) - token_bytes(lm.preprocessor.tokenizer, first_id)
            for window, first_id in zip(batch, first_ids))
    bits_per_token = lm.evaluate(
        tf.data.Dataset.from_tensor_slices(windows).batch(batch_size),
        verbose=0, return_dict=True)["bits_per_token"]
    return bits_per_token * predicted_tokens / predicted_bytes


def compile_for_bits(lm, learning_rate):
    """Adam on the cross-entropy, with the bits per predicted token."""
    lm.compile(optimizer=keras.optimizers.Adam(learning_rate),
               loss=keras.losses.SparseCategoricalCrossentropy(
                   from_logits=True),
               weighted_metrics=[BitsPerByte(name="bits_per_token")])


def enable_lora(lm, rank):
    """LoRA on the backbone's attention projections, and the task's own
    layers (the LM head) frozen: only the adapters train."""
    lm.backbone.enable_lora(rank)
    for layer in lm.layers:
        if layer is not lm.backbone:
            layer.trainable = False


def token_bytes(tokenizer, token_id):
    """How many bytes of text the token `token_id` stands for."""
    if isinstance(tokenizer, ReformerTokenizer):
        return 1
    piece = tokenizer.id_to_token(int(token_id))
    if piece.startswith("<0x") and piece.endswith(">"):  # a byte fallback
        return 1
    return len(piece.replace("\u2581", " ").encode("utf-8"))


def training_dataset(windows, batch_size, seed):
    return (tf.data.Dataset.from_tensor_slices(windows)
            .shuffle(len(windows), seed=seed).repeat()
            .batch(batch_size, drop_remainder=True))


def trainable_summary(lm):
    trainable = sum(int(np.prod(w.shape)) for w in lm.trainable_weights)
    return (f"{trainable:,} trainable of {lm.count_params():,} parameters "
            f"({100.0 * trainable / lm.count_params():.2f}%)")


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.work_dir
        if not os.path.exists(os.path.join(checkpoint, "config.json")):
            save_random_checkpoint(checkpoint, args.sequence_length,
                                   args.seed)
    # The preprocessor's windows: sequence_length inputs, one more target.
    preprocessor = ReformerCausalLMPreprocessor.from_preset(
        checkpoint, sequence_length=args.sequence_length)
    lm = ReformerCausalLM.from_preset(checkpoint, preprocessor=preprocessor)
    if args.sequence_length > lm.backbone.max_length:
        raise SystemExit(
            f"--sequence-length {args.sequence_length} exceeds the "
            f"checkpoint's {lm.backbone.max_length} positions.")

    train, held_out = text_data.split_corpus(
        text_data.stdlib_corpus(max_bytes=args.max_corpus_bytes))
    held_out_windows = text_windows(held_out, args.sequence_length,
                                    args.held_out_windows)
    if not held_out_windows:
        raise SystemExit("The held-out text is shorter than one window; "
                         "raise --max-corpus-bytes.")
    compile_for_bits(lm, args.learning_rate)
    before = bits_per_byte(lm, held_out_windows, args.batch_size)
    print(f"==> held-out bits per byte before fine-tuning: {before:.4f}",
          flush=True)

    enable_lora(lm, args.rank)
    compile_for_bits(lm, args.learning_rate)  # after changing what trains
    print(f"==> LoRA rank {args.rank}: {trainable_summary(lm)}", flush=True)
    start = time.time()
    lm.fit(training_dataset(text_windows(train, args.sequence_length),
                            args.batch_size, args.seed),
           steps_per_epoch=args.steps, epochs=1, verbose=1)
    print(f"==> {args.steps} steps in {time.time() - start:.0f} s",
          flush=True)
    after = bits_per_byte(lm, held_out_windows, args.batch_size)
    print(f"==> held-out bits per byte after fine-tuning: {after:.4f} "
          f"(before {before:.4f})", flush=True)

    path = save_preset(lm, args.preset_dir)
    reloaded_lm = ReformerCausalLM.from_preset(path)
    compile_for_bits(reloaded_lm, args.learning_rate)
    reloaded = bits_per_byte(reloaded_lm, held_out_windows, args.batch_size)
    if not math.isclose(reloaded, after, rel_tol=1e-5):
        raise SystemExit(f"The reloaded preset scores {reloaded:.6f} bits per "
                         f"byte, not {after:.6f}.")
    print(f"==> saved the fine-tuned preset to {path} (reloaded: "
          f"{reloaded:.4f} bits per byte)", flush=True)
    return {"bits_per_byte_before": before, "bits_per_byte_after": after,
            "preset": path}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

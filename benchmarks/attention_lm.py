"""Attention types side by side on the embedded corpus: quality and speed.

Trains the example causal LM (`examples/train_lm.py`'s model) once per
attention type, same data order, seed and steps, and prints one JSON line
each: held-out bits per byte after training and the median time of a train
step (XLA, after warm-up). Linformer cannot be a causal LM (its projection
mixes future positions), so it is not among the choices.

    python benchmarks/attention_lm.py --attentions lsh,local,full
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import train_lm  # noqa: E402
from keras_reformer import text_data  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    """Wall time of every train step."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def measure(attention, args, train, held_out):
    example_args = train_lm.parse_args([
        "--attention", attention, "--num-layers", str(args.num_layers),
        "--sequence-length", str(args.sequence_length),
        "--chunk-length", str(args.chunk_length),
        "--epochs", "1", "--steps-per-epoch", str(args.steps),
        "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        "--sample-length", "1"])
    keras.utils.set_random_seed(args.seed)
    model = train_lm.build_model(example_args)
    dataset = text_data.language_model_dataset(
        train, args.sequence_length, args.batch_size, shuffle=True,
        seed=args.seed, repeat=True)
    timer = StepTimer()
    model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0,
              callbacks=[timer])
    held_out_data = text_data.language_model_dataset(
        held_out, args.sequence_length, args.batch_size)
    _, bits_per_byte = model.evaluate(held_out_data, verbose=0)
    return {"benchmark": "attention_lm", "attention": attention,
            "layers": args.num_layers, "sequence_length": args.sequence_length,
            "steps": args.steps, "held_out_bits_per_byte":
                round(float(bits_per_byte), 3),
            "median_step_s": round(float(np.median(timer.times[10:])), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attentions", default="lsh,local,full")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--chunk-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, held_out = text_data.split_corpus(text_data.stdlib_corpus())
    for attention in args.attentions.split(","):
        print(json.dumps(measure(attention, args, train, held_out)),
              flush=True)


if __name__ == "__main__":
    main()

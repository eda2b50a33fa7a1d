"""mixed_bfloat16 against float32 on the CPU: train-step time and bits per
byte after the same steps.

The example's causal LM (`examples/train_lm.py`'s model and schedule, its
default sizes unless given) trained on the embedded corpus for `--steps`
steps with the same seed and data order, once per (dtype policy, compiler)
variant, each in its own process: the median train-step time (after the
first, compiling step), the process's CPU time per step, and the held-out
bits per byte on the first `--eval-batches` held-out batches. The same run
measures this CPU's matrix-product throughput in float32 and bfloat16
(TensorFlow under XLA, and TensorFlow's own oneDNN kernels), which says
whether a bfloat16 product is faster here at all.

    python benchmarks/mixed_precision.py --steps 200
"""

import argparse
import json
import os
import sys
import time

from isolated import matmul_gflops
from isolated import run_single
from isolated import step_timer

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                        "examples")
# (dtype policy, XLA) per variant.
VARIANTS = {
    "float32_xla": ("float32", True),
    "bfloat16_xla": ("mixed_bfloat16", True),
    "float32_graph": ("float32", False),
    "bfloat16_graph": ("mixed_bfloat16", False),
}


def train(variant, args):
    import keras
    import numpy as np

    sys.path.insert(0, EXAMPLES)
    import train_lm
    from keras_reformer import text_data

    policy, jit_compile = VARIANTS[variant]

    keras.config.set_dtype_policy(policy)
    example_args = train_lm.parse_args(
        ["--epochs", "1", "--steps-per-epoch", str(args.steps),
         "--sequence-length", str(args.sequence_length),
         "--hidden-dim", str(args.hidden_dim),
         "--batch-size", str(args.batch_size), "--seed", "0",
         "--sample-length", "1",
         "--jit-compile" if jit_compile else "--no-jit-compile"])
    keras.utils.set_random_seed(0)
    model = train_lm.build_model(example_args)
    train_data, held_out = text_data.split_corpus(text_data.stdlib_corpus())
    dataset = text_data.language_model_dataset(
        train_data, args.sequence_length, args.batch_size, shuffle=True,
        seed=0, repeat=True)
    timer = step_timer()
    cpu_start = time.process_time()
    model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0,
              callbacks=[timer])
    cpu_per_step = (time.process_time() - cpu_start) / args.steps
    evaluation = text_data.language_model_dataset(
        held_out, args.sequence_length, args.batch_size).take(
            args.eval_batches)
    _, bits_per_byte = model.evaluate(evaluation, verbose=0)
    return {"median_step_s": float(np.median(timer.times[1:])),
            "cpu_s_per_step": cpu_per_step,
            "held_out_bits_per_byte": float(bits_per_byte)}


def matmul_table():
    """GFLOP/s of a 2048^3 product per (dtype, compiler)."""
    import tensorflow  # noqa: F401

    return {f"{dtype}_{'xla' if jit else 'onednn'}": round(
        matmul_gflops("tensorflow", dtype, jit_compile=jit), 1)
        for dtype in ("float32", "bfloat16") for jit in (True, False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    flags = ["--steps", args.steps, "--sequence-length",
             args.sequence_length, "--hidden-dim", args.hidden_dim,
             "--batch-size", args.batch_size, "--eval-batches",
             args.eval_batches]
    if args.single == "matmul":
        print(json.dumps(matmul_table()))
        return
    if args.single:
        print(json.dumps(train(args.single, args)))
        return
    matmul = run_single(__file__, "matmul", flags, backend="tensorflow")
    print(json.dumps({"benchmark": "mixed_precision", "matmul_gflops":
                      matmul}), flush=True)
    results = {}
    for variant in args.variants.split(","):
        result = run_single(__file__, variant, flags, backend="tensorflow")
        results[variant] = result
        print(json.dumps({"benchmark": "mixed_precision", "variant": variant,
                          "policy": VARIANTS[variant][0],
                          "xla": VARIANTS[variant][1],
                          "hidden_dim": args.hidden_dim,
                          "steps": args.steps, **{
                              key: round(value, 4) if isinstance(
                                  value, float) else value
                              for key, value in result.items()}}),
              flush=True)
    for compiler in ("xla", "graph"):
        full, half = (results.get(f"float32_{compiler}"),
                      results.get(f"bfloat16_{compiler}"))
        if full and half and "error" not in full and "error" not in half:
            print(json.dumps({
                "benchmark": "mixed_precision", "compiler": compiler,
                "float32_over_bfloat16_step_time": round(
                    full["median_step_s"] / half["median_step_s"], 2),
                "float32_over_bfloat16_cpu_time": round(
                    full["cpu_s_per_step"] / half["cpu_s_per_step"], 2),
                "bits_per_byte_change": round(
                    half["held_out_bits_per_byte"]
                    / full["held_out_bits_per_byte"] - 1, 4)}), flush=True)


if __name__ == "__main__":
    main()

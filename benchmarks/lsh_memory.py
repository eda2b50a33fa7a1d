"""LSH attention's memory at very long lengths: all heads, one at a time, in runs.

XLA's own plan (JAX backend, `compiled.memory_analysis()`) for one
forward+backward of `LSHSelfAttention` (batch 1, `--heads` heads of 64, 4
hash rounds, chunk 64, causal, default buckets), compiled but not run, so
lengths far beyond this machine's memory can be planned: all heads at once,
one head at a time (`parallel_heads=1`), and one head at a time in 16 runs
of chunks (`segments=16`). Prints one JSON line per (length, variant):
temporary bytes, and arguments plus outputs (the input, weights and their
gradients), and writes a PNG plot of the temporary memory against length.
On a GPU the measured peak is in `attention_gpu.py`.

    KERAS_BACKEND=jax python benchmarks/lsh_memory.py \\
        --lengths 16384,65536,1048576
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402

from keras_reformer.layers import LSHSelfAttention  # noqa: E402
from keras_reformer.layers.seeds import seed_tensor  # noqa: E402
from plots import write_plot  # noqa: E402


PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots",
                    "lsh_memory.png")
# (parallel_heads, segments) per variant.
VARIANTS = {"all heads": (None, None), "one head at a time": (1, None),
            "one head, 16 runs": (1, 16)}


def planned_gib(length, heads, parallel_heads, segments):
    """`(temporary, arguments + outputs)` GiB of the compiled step."""
    layer = LSHSelfAttention(heads, 64, chunk_length=64, num_hashes=4,
                             causal=True, parallel_heads=parallel_heads,
                             segments=segments)
    layer.build((1, length, heads * 64))
    variables = layer.trainable_variables

    def loss(weights, x):
        with keras.StatelessScope(state_mapping=list(zip(variables,
                                                         weights))):
            outputs = layer(x, training=True, seed=seed_tensor(1))
        return jax.numpy.sum(jax.numpy.square(outputs))

    x = jax.ShapeDtypeStruct((1, length, heads * 64), "float32")
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        [v.value for v in variables], x).compile()
    analysis = compiled.memory_analysis()
    return (analysis.temp_size_in_bytes / 2**30,
            (analysis.argument_size_in_bytes
             + analysis.output_size_in_bytes) / 2**30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,65536,1048576")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--plot", default=PLOT, help="PNG file to write")
    args = parser.parse_args()
    lines = []
    for length in [int(n) for n in args.lengths.split(",")]:
        for variant, (parallel_heads, segments) in VARIANTS.items():
            temporary, arguments = planned_gib(length, args.heads,
                                               parallel_heads, segments)
            line = {
                "benchmark": "lsh_memory", "platform": jax.devices()[0].platform,
                "length": length, "heads": args.heads, "variant": variant,
                "parallel_heads": parallel_heads or "all",
                "segments": segments or 1,
                "temporary_gib": round(temporary, 3),
                "arguments_and_outputs_gib": round(arguments, 3)}
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.plot:
        write_plot(args.plot, lines, "length", ["temporary_gib"], "variant",
                   f"one LSH layer, XLA's plan, {args.heads} heads")


if __name__ == "__main__":
    main()

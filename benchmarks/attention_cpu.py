"""LSH against full attention on the CPU: forward+backward time and memory.

TensorFlow backend, `tf.function(jit_compile=True)`; batch 1, causal,
`--heads` heads of 64, 4 hash rounds, chunk 64. Each (attention, length)
runs in its own process so that the peak resident memory (ru_maxrss, minus
the process's resident memory before the first call) belongs to it alone.
Prints one JSON line per measurement; the ratio line compares the two
attentions measured in the same run.

    python benchmarks/attention_cpu.py --lengths 1024,4096,16384

`--lsh-options` passes more arguments to the LSH layer (its memory-lean
paths), e.g. `--lsh-options '{"parallel_heads": 1, "segments": 4}'`.
"""

import argparse
import json

from isolated import median_seconds
from isolated import run_single


def measure(attention, length, heads, repeats, lsh_options):
    import resource

    import numpy as np
    import tensorflow as tf

    from keras_reformer.layers import FullSelfAttention
    from keras_reformer.layers import LSHSelfAttention

    hidden = heads * 64
    if attention == "lsh":
        layer = LSHSelfAttention(heads, 64, chunk_length=64, num_hashes=4,
                                 causal=True, **json.loads(lsh_options))
    else:
        layer = FullSelfAttention(heads, 64, causal=True)
    layer.build((1, length, hidden))
    x = tf.constant(np.random.RandomState(0).randn(1, length, hidden),
                    tf.float32)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        return tape.gradient(loss, [x] + layer.trainable_variables)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = median_seconds(lambda: [g.numpy() for g in step(x)], repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"median_s": round(seconds, 4),
            "peak_rss_mib": round(peak / 1024, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lsh-options", default="{}")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        attention, length = args.single.split(":")
        print(json.dumps(measure(attention, int(length), args.heads,
                                 args.repeats, args.lsh_options)))
        return
    for length in [int(n) for n in args.lengths.split(",")]:
        results = {}
        for attention in ("lsh", "full"):
            results[attention] = run_single(
                __file__, f"{attention}:{length}",
                ["--heads", args.heads, "--repeats", args.repeats,
                 "--lsh-options", args.lsh_options])
            print(json.dumps({"benchmark": "attention_cpu", "attention": attention,
                              "length": length, "heads": args.heads,
                              **results[attention]}), flush=True)
        if all("median_s" in r for r in results.values()):
            print(json.dumps({
                "benchmark": "attention_cpu", "length": length,
                "full_over_lsh_time": round(results["full"]["median_s"]
                                            / results["lsh"]["median_s"], 2),
                "full_over_lsh_memory": round(
                    results["full"]["peak_rss_mib"]
                    / max(results["lsh"]["peak_rss_mib"], 1.0), 2)}),
                flush=True)


if __name__ == "__main__":
    main()

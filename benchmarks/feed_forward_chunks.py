"""The chunked feed-forward's time against its chunk length (CPU).

Forward+backward of one `ChunkedFeedForward` (batch 1, float32, under XLA:
`tf.function(jit_compile=True)` or `jax.jit`, this process's Keras
backend) for each chunk length, the lengths interleaved call by call;
prints one JSON line per shape: the median milliseconds per chunk length
and their ratios to the first. `DEFAULT_CHUNK_LENGTH` was chosen from it.

    KERAS_BACKEND=tensorflow python benchmarks/feed_forward_chunks.py
    KERAS_BACKEND=jax python benchmarks/feed_forward_chunks.py
"""

import argparse
import json
import time

import numpy as np

import layer_steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="16384:256:512,4096:1024:4096,"
                        "16384:1024:4096",
                        help="comma-separated length:width:intermediate")
    parser.add_argument("--chunks", default="64,256,1024,4096,0",
                        help="chunk lengths (0: the whole sequence)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import keras

    from keras_reformer.layers import ChunkedFeedForward

    for shape in args.shapes.split(","):
        length, width, intermediate = map(int, shape.split(":"))
        inputs = np.random.RandomState(0).randn(
            1, length, width).astype("float32")
        chunks = list(dict.fromkeys(
            int(c) or length for c in args.chunks.split(",")
            if int(c) <= length))
        gradient_step = (layer_steps.jax_gradient_step
                         if keras.backend.backend() == "jax"
                         else layer_steps.tf_gradient_step)
        steps = {c: gradient_step(ChunkedFeedForward(intermediate, c),
                                  inputs) for c in chunks}
        for step in steps.values():
            step()
        times = {c: [] for c in chunks}
        for _ in range(args.repeats):
            for c, step in steps.items():
                start = time.perf_counter()
                step()
                times[c].append(time.perf_counter() - start)
        ms = {c: 1e3 * float(np.median(t)) for c, t in times.items()}
        print(json.dumps({
            "benchmark": "feed_forward_chunks",
            "backend": keras.backend.backend(), "length": length,
            "width": width, "intermediate": intermediate,
            "ms": {c: round(m, 1) for c, m in ms.items()},
            "relative_to": chunks[0],
            "time": {c: round(m / ms[chunks[0]], 2)
                     for c, m in ms.items()}}), flush=True)


if __name__ == "__main__":
    main()

"""Keras's dropout layer against `PhiloxDropout` under XLA (TensorFlow).

Each layer's training call on a `(1, --length, --width)` float32 activation
under `tf.function(jit_compile=True)`: the median wall and mean CPU time of
`--repeats` calls after one untimed call, and the kept fraction of the last
call. Prints one JSON line per layer and one of their time ratio.

    python benchmarks/dropout_xla.py --length 16384 --width 256
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from isolated import timed_calls  # noqa: E402
from keras_reformer.layers import PhiloxDropout  # noqa: E402

LAYERS = {"keras_dropout": keras.layers.Dropout,
          "philox_dropout": PhiloxDropout}


def measure(name, length, width, rate, repeats):
    """One JSON-ready dict for layer `name`."""
    layer = LAYERS[name](rate, seed=1)
    x = tf.constant(np.ones((1, length, width), "float32"))
    step = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    seconds, cpu_seconds = timed_calls(lambda: step(x).numpy(), repeats)
    kept = float(np.mean(step(x).numpy() != 0))
    return {"benchmark": "dropout_xla", "layer": name, "length": length,
            "width": width, "rate": rate, "ms": round(seconds * 1e3, 2),
            "cpu_ms": round(cpu_seconds * 1e3, 2),
            "kept": round(kept, 4)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    lines = [measure(name, args.length, args.width, args.rate, args.repeats)
             for name in LAYERS]
    for line in lines:
        print(json.dumps(line))
    print(json.dumps({"benchmark": "dropout_xla", "relative_to":
                      "philox_dropout", "time": round(
                          lines[0]["ms"] / lines[1]["ms"], 2)}))
    return lines


if __name__ == "__main__":
    main()

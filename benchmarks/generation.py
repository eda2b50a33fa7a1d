"""Tokens per second of cached against uncached generation.

One causal LM (the example's architecture, random weights: speed does not
depend on training), greedy decoding of `--new-tokens` tokens after prompts
of several lengths, batch 1, both ways compiled with XLA, in one run:

* cached: `ReformerCausalLM.generate` (one position per step, each layer
  reading its cache);
* uncached: keras-hub's greedy sampler over the same buffer, each step
  rerunning the whole model on the buffer with the filled positions marked
  real (what the example did before caching).

Prints one JSON line per prompt length; the first call of each compiles and
is not timed; the median of `--repeats` timed calls is reported.

    python benchmarks/generation.py --prompt-lengths 128,512,2048
"""

import argparse
import json

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from isolated import median_seconds
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM


def build(args, max_length):
    keras.utils.set_random_seed(0)
    rows = 2 ** (int(np.log2(max_length)) // 2)
    backbone = ReformerBackbone(
        256, hidden_dim=args.hidden_dim, num_heads=4,
        head_dim=args.hidden_dim // 4, intermediate_dim=2 * args.hidden_dim,
        attention_types=args.attention.split(","),
        axial_shape=(rows, max_length // rows), seed=0,
        attention_options={"lsh": {"chunk_length": 64, "num_hashes": 2},
                           "local": {"chunk_length": 64}})
    lm = ReformerCausalLM(backbone)
    lm.compile(sampler="greedy")
    return lm


def uncached_generate(lm):
    """Greedy decoding that reruns the model on the whole buffer per token."""
    sampler = keras_hub.samplers.GreedySampler()

    @tf.function(jit_compile=True)
    def generate(token_ids, index):
        positions = tf.range(tf.shape(token_ids)[1])[None]

        def next(prompt, cache, index):
            mask = tf.cast(positions < index, tf.int32)
            logits = lm({"token_ids": prompt, "padding_mask": mask},
                        training=False)
            return logits[:, index - 1], None, cache

        return sampler(next, token_ids, index=index)

    return generate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-lengths", default="128,512,2048")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--attention", default="local,lsh,local,lsh",
                        help="comma-separated attention type per layer")
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for prompt_length in [int(n) for n in args.prompt_lengths.split(",")]:
        total = prompt_length + args.new_tokens
        max_length = 2 ** int(np.ceil(np.log2(total)))
        lm = build(args, max_length)
        prompt = np.random.RandomState(0).randint(
            1, 256, (1, total)).astype("int32")
        mask = np.zeros((1, total), "int32")
        mask[:, :prompt_length] = 1
        inputs = {"token_ids": prompt * mask, "padding_mask": mask}
        cached = median_seconds(lambda: lm.generate(inputs), args.repeats)
        uncached_fn = uncached_generate(lm)
        uncached = median_seconds(lambda: uncached_fn(
            tf.constant(prompt * mask), tf.constant(prompt_length)).numpy(),
            args.repeats)
        print(json.dumps({
            "benchmark": "generation", "attention": args.attention,
            "hidden_dim": args.hidden_dim, "prompt_length": prompt_length,
            "new_tokens": args.new_tokens,
            "cached_tokens_per_s": round(args.new_tokens / cached, 1),
            "uncached_tokens_per_s": round(args.new_tokens / uncached, 1),
            "speedup": round(uncached / cached, 2)}), flush=True)


if __name__ == "__main__":
    main()

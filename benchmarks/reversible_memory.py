"""Activation memory of a training step against depth, reversible vs not.

Uses XLA's own buffer assignment (JAX backend, `compiled.memory_analysis()`):
the temporary bytes of a compiled gradient computation, excluding the
arguments (weights, inputs) and outputs (gradients). Deterministic, so the
numbers need no repetition. Prints one JSON line per configuration and
kind: `reversible` (a `ReversibleStack` of LSH and feed-forward blocks),
`plain` (the same blocks under ordinary autodiff) and `causal_lm` (a whole
`ReformerCausalLM` of the same blocks: embeddings, stack, norm, LM head and
loss, called in training mode as `fit` calls it); and writes a PNG plot of
the memory against depth.

    KERAS_BACKEND=jax python benchmarks/reversible_memory.py
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
from keras import ops  # noqa: E402

from isolated import lm_gradient_memory  # noqa: E402
from plots import write_plot  # noqa: E402
from keras_reformer.layers import ChunkedFeedForward  # noqa: E402
from keras_reformer.layers import LSHSelfAttention  # noqa: E402
from keras_reformer.layers import PreNormBranch  # noqa: E402
from keras_reformer.layers import ReversibleBlock  # noqa: E402
from keras_reformer.layers import ReversibleStack  # noqa: E402
from keras_reformer.layers.seeds import fold_seed  # noqa: E402
from keras_reformer.layers.seeds import seed_tensor  # noqa: E402
from keras_reformer.models import ReformerBackbone  # noqa: E402
from keras_reformer.models import ReformerCausalLM  # noqa: E402


PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots",
                    "reversible_memory.png")


def build_stack(depth, args):
    stack = ReversibleStack([
        ReversibleBlock(
            PreNormBranch(LSHSelfAttention(
                args.heads, args.hidden // args.heads,
                chunk_length=args.chunk, num_hashes=args.hashes,
                num_buckets=2 * args.length // args.chunk, causal=True)),
            PreNormBranch(ChunkedFeedForward(4 * args.hidden, args.chunk)))
        for _ in range(depth)])
    stack.build((1, args.length, 2 * args.hidden))
    return stack


def plain_forward(stack, x, seed):
    x1, x2 = ops.split(x, 2, axis=-1)
    for block, block_seed in zip(stack.blocks, stack.block_seeds(seed)):
        x1 = x1 + block.f(x2, training=True, seed=fold_seed(block_seed, 0))
        x2 = x2 + block.g(x1, training=True, seed=fold_seed(block_seed, 1))
    return ops.concatenate([x1, x2], axis=-1)


def temp_bytes(stack, reversible, args):
    variables = stack.trainable_variables
    seed = seed_tensor(0)

    def loss(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            if reversible:
                out = stack(x, training=True, seed=seed)
            else:
                out = plain_forward(stack, x, seed)
            return ops.mean(out**2)

    x = jax.ShapeDtypeStruct((1, args.length, 2 * args.hidden), "float32")
    values = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        values, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def causal_lm_temp_bytes(depth, args):
    backbone = ReformerBackbone(
        vocabulary_size=256, hidden_dim=args.hidden, num_heads=args.heads,
        head_dim=args.hidden // args.heads, intermediate_dim=4 * args.hidden,
        attention_types=["lsh"] * depth,
        axial_shape=(args.chunk, args.length // args.chunk),
        feed_forward_chunk_length=args.chunk, seed=0,
        attention_options={"lsh": {
            "chunk_length": args.chunk, "num_hashes": args.hashes,
            "num_buckets": 2 * args.length // args.chunk}})
    return lm_gradient_memory(ReformerCausalLM(backbone),
                              args.length).temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--hashes", type=int, default=2)
    parser.add_argument("--depths", default="2,6,12,24")
    parser.add_argument("--plot", default=PLOT, help="PNG file to write")
    args = parser.parse_args()
    lines = []
    for depth in [int(d) for d in args.depths.split(",")]:
        stack = build_stack(depth, args)
        sizes = {"reversible": lambda: temp_bytes(stack, True, args),
                 "plain": lambda: temp_bytes(stack, False, args),
                 "causal_lm": lambda: causal_lm_temp_bytes(depth, args)}
        for kind, size in sizes.items():
            line = {"benchmark": "reversible_memory", "depth": depth,
                    "kind": kind, "length": args.length,
                    "hidden": args.hidden,
                    "temp_mib": round(size() / 2**20, 2)}
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.plot:
        write_plot(args.plot, lines, "depth", ["temp_mib"], "kind",
                   f"training-step activation memory, length {args.length}")


if __name__ == "__main__":
    main()

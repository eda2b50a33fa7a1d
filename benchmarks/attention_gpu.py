"""LSH attention against flash attention and Hugging Face's LSH (JAX backend).

Forward+backward of one attention layer (`layer_steps.py`: batch 1,
`--heads` heads of 64, 4 hash rounds, chunk 64, causal), issue #8's table:
our `lsh` (float32, or `--lsh-dtype bfloat16` for the mixed policy:
bfloat16 inputs, float32 softmax), its memory-lean variants `lsh_by_head`
and `lsh_by_run`, local attention (`local`, `local_by_run`), `flash`
(`jax.nn.dot_product_attention` in bfloat16, cuDNN's fused kernel on a
GPU), and the PyTorch layers `huggingface`, `reformer_pytorch` and `sdpa`
(exact attention).

Every (implementation, length) runs in its own process, so the peak device
memory (JAX: `peak_bytes_in_use`; torch: `max_memory_allocated`; on a CPU,
XLA's planned memory instead, none for torch) is its own. Prints one JSON
line per measurement (median of `--repeats` calls after warm-up), per
length the times as multiples of `flash`'s measured in the same run, and
writes a PNG plot of time and memory against length. `--check N` first
prints how far our LSH layer's output is from exact attention computed by
`jax.nn.dot_product_attention` at N tokens, where one chunk spans the
sequence and LSH attention is exact.

    KERAS_BACKEND=jax python benchmarks/attention_gpu.py \\
        --lengths 4096,16384,65536
"""

import argparse
import json
import os

from isolated import median_seconds
from isolated import run_single
from plots import write_plot

IMPLEMENTATIONS = ("lsh", "lsh_by_head", "lsh_by_run", "local",
                   "local_by_run", "flash", "huggingface")
# Our names here for layer_steps' implementations.
STEP_NAMES = {"lsh": "lsh_jax"}
PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots",
                    "attention_gpu.png")


def measure(implementation, length, heads, repeats, lsh_dtype):
    import keras

    import layer_steps

    name = STEP_NAMES.get(implementation, implementation)
    keras.config.set_dtype_policy(
        "mixed_bfloat16" if lsh_dtype == "bfloat16" else "float32")
    step = layer_steps.STEPS[name](length, heads)
    backend = layer_steps.BACKENDS[name]
    step()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, repeats)
    peak = layer_steps.device_peak_mib(backend)
    if peak is None:
        peak = layer_steps.planned_mib(step)
    return seconds, peak


def projection_kernel(layer, name):
    """The kernel of `layer`'s projection `name` (a weight or a sublayer's
    weight named after it)."""
    import keras

    kernel, = [w for w in layer.trainable_weights
               if f"/{name}" in f"/{w.path}" and "kernel" in w.path]
    return keras.ops.convert_to_numpy(kernel)


def lsh_against_exact(length, heads):
    """Largest difference between our LSH layer and exact shared-QK
    attention from `jax.nn.dot_product_attention` on the layer's own
    projections, where one chunk spans the sequence (so LSH attends to
    every earlier key): keys are the queries divided by their norm,
    queries unscaled, and a token attends to itself only when it has
    nothing else to attend to."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from keras_reformer.layers import LSHSelfAttention

    layer = LSHSelfAttention(heads, 64, chunk_length=length, num_hashes=2,
                             causal=True, seed=0)
    x = np.random.RandomState(1).randn(1, length, heads * 64).astype(
        "float32")
    ours = np.asarray(layer(x))
    query_key, value, output = [jnp.asarray(projection_kernel(layer, name))
                                for name in ("query_key", "value", "output")]
    queries = jnp.einsum("blh,hnd->blnd", x, query_key)
    keys = queries / jnp.linalg.norm(queries, axis=-1, keepdims=True)
    values = jnp.einsum("blh,hnd->blnd", x, value)
    self_bias = -1e5 * jnp.eye(length, dtype="float32")[None, None]
    attended = jax.nn.dot_product_attention(
        queries, keys, values, bias=self_bias, scale=1.0, is_causal=True)
    exact = np.asarray(jnp.einsum("blnd,ndh->blh", attended, output))
    return {"max_abs_difference": float(np.abs(ours - exact).max()),
            "max_abs_output": float(np.abs(exact).max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lsh-dtype", default="float32",
                        choices=["float32", "bfloat16"])
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="compare our LSH layer with exact attention "
                        "at N tokens first (0: no)")
    parser.add_argument("--plot", default=PLOT, help="PNG file to write")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        implementation, length = args.single.split(":")
        if implementation == "check":
            print(json.dumps(lsh_against_exact(int(length), args.heads)))
            return
        seconds, peak = measure(implementation, int(length), args.heads,
                                args.repeats, args.lsh_dtype)
        print(json.dumps({"seconds": seconds, "peak_mib": peak}))
        return
    if args.check:
        result = run_single(__file__, f"check:{args.check}",
                            ["--heads", args.heads], backend="jax")
        print(json.dumps({"benchmark": "attention_gpu",
                          "check": "lsh_against_exact", "length": args.check,
                          "heads": args.heads, **result}), flush=True)
    lines = []
    for length in [int(n) for n in args.lengths.split(",")]:
        results = {}
        for implementation in args.implementations.split(","):
            result = run_single(
                __file__, f"{implementation}:{length}",
                ["--heads", args.heads, "--repeats", args.repeats,
                 "--lsh-dtype", args.lsh_dtype], backend="jax")
            line = {"benchmark": "attention_gpu",
                    "implementation": implementation, "length": length,
                    "heads": args.heads}
            if "error" in result:
                line["error"] = result["error"]
            else:
                results[implementation] = result
                peak = result["peak_mib"]
                line.update(ms=round(1e3 * result["seconds"], 2),
                            peak_mib=None if peak is None else round(peak, 1))
            lines.append(line)
            print(json.dumps(line), flush=True)
        if "flash" in results:
            flash = results["flash"]["seconds"]
            print(json.dumps({
                "benchmark": "attention_gpu", "length": length,
                **{f"{name}_time_over_flash": round(r["seconds"] / flash, 3)
                   for name, r in results.items() if name != "flash"}}),
                flush=True)
    if args.plot:
        write_plot(args.plot, lines, "length", ["ms", "peak_mib"],
                   "implementation",
                   f"one attention layer, forward+backward, {args.heads} "
                   "heads of 64 (JAX)")


if __name__ == "__main__":
    main()

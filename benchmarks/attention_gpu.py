"""LSH attention against flash attention and Hugging Face's LSH (JAX backend).

Forward+backward of one attention layer, batch 1, `--heads` heads of 64,
4 hash rounds, chunk 64, causal, as in issue #8's table:

* `lsh`: our `LSHSelfAttention` under `jax.jit` (float32, or `--lsh-dtype
  bfloat16` for the mixed policy: bf16 inputs, float32 softmax);
* `lsh_by_head`: the same with `parallel_heads=1` (one head at a time,
  recomputed in the backward pass: less memory);
* `lsh_by_run`: one head at a time and `segments=16` (each head's sorted
  sequence in 16 runs of chunks, each recomputed: less again);
* `local`, `local_by_run`: `LocalSelfAttention` (chunk 64, one chunk of
  look-back, the Hugging Face configurations' other layer), all chunks at
  once and in 16 recomputed runs;
* `flash`: `jax.nn.dot_product_attention` in bfloat16, cuDNN's fused kernel
  on a GPU (`implementation="cudnn"`; XLA's on a CPU);
* `huggingface`: transformers' PyTorch `LSHSelfAttention` (float32), when
  torch and transformers are installed.

Every (implementation, length) runs in its own process, so the peak device
memory (JAX: `peak_bytes_in_use`; torch: `max_memory_allocated`; on a CPU,
XLA's planned temporary memory instead) is its own. Prints one JSON line per
measurement (median of `--repeats` calls after warm-up) and per length the
ratios against `flash` measured in the same run.

    KERAS_BACKEND=jax python benchmarks/attention_gpu.py \\
        --lengths 4096,16384,65536
"""

import argparse
import json

from isolated import median_seconds
from isolated import run_single

IMPLEMENTATIONS = ("lsh", "lsh_by_head", "lsh_by_run", "local",
                   "local_by_run", "flash", "huggingface")


def jax_peak_mib(compiled):
    import jax

    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    analysis = compiled.memory_analysis()  # CPU: XLA's plan
    return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes) / 2**20


def measure_layer(make_layer, length, heads, repeats, dtype):
    """Forward+backward of the attention layer `make_layer(heads)` (heads of
    64) on one random sequence, under `jax.jit`."""
    import jax
    import keras
    import numpy as np

    from keras_reformer.layers.seeds import seed_tensor

    keras.config.set_dtype_policy(
        "mixed_bfloat16" if dtype == "bfloat16" else "float32")
    hidden = heads * 64
    layer = make_layer(heads)
    layer.build((1, length, hidden))
    x = jax.numpy.asarray(
        np.random.RandomState(0).randn(1, length, hidden), "float32")
    weights = [v.value for v in layer.trainable_variables]

    def loss(weights, x):
        mapping = list(zip(layer.trainable_variables, weights))
        with keras.StatelessScope(state_mapping=mapping):
            out = layer(x, training=True, seed=seed_tensor(1))
        return jax.numpy.sum(jax.numpy.square(out.astype("float32")))

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = step.lower(weights, x).compile()
    seconds = median_seconds(
        lambda: jax.block_until_ready(compiled(weights, x)), repeats)
    return seconds, jax_peak_mib(compiled)


def lsh_layer(parallel_heads=None, segments=None):
    from keras_reformer.layers import LSHSelfAttention

    return lambda heads: LSHSelfAttention(
        heads, 64, chunk_length=64, num_hashes=4, causal=True,
        parallel_heads=parallel_heads, segments=segments)


def local_layer(segments=None):
    from keras_reformer.layers import LocalSelfAttention

    return lambda heads: LocalSelfAttention(
        heads, 64, chunk_length=64, causal=True, segments=segments)


def measure_flash(length, heads, repeats):
    import jax
    import jax.numpy as jnp

    on_gpu = jax.devices()[0].platform == "gpu"
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (1, length, heads, 64)
    q, k, v = [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]

    def loss(q, k, v):
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True,
            implementation="cudnn" if on_gpu else None)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    seconds = median_seconds(
        lambda: jax.block_until_ready(compiled(q, k, v)), repeats)
    return seconds, jax_peak_mib(compiled)


def measure_huggingface(length, heads, repeats):
    import torch
    from transformers import ReformerConfig
    from transformers.models.reformer import modeling_reformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ReformerConfig(
        hidden_size=heads * 64, num_attention_heads=heads,
        attention_head_size=64, num_hashes=4, lsh_attn_chunk_length=64,
        num_buckets=max(2, 2 * length // 64), is_decoder=True,
        lsh_attention_probs_dropout_prob=0.0, attn_layers=["lsh"])
    layer = modeling_reformer.LSHSelfAttention(config).to(device)
    x = torch.randn(1, length, heads * 64, device=device, requires_grad=True)

    def run():
        out = layer(x).hidden_states
        out.square().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(run, repeats)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else None)  # torch keeps no peak for the CPU
    return seconds, peak


def measure(implementation, length, heads, repeats, lsh_dtype):
    if implementation == "flash":
        return measure_flash(length, heads, repeats)
    if implementation == "huggingface":
        return measure_huggingface(length, heads, repeats)
    make_layer = {
        "lsh": lsh_layer(),
        "lsh_by_head": lsh_layer(parallel_heads=1),
        "lsh_by_run": lsh_layer(parallel_heads=1, segments=16),
        "local": local_layer(),
        "local_by_run": local_layer(segments=16),
    }[implementation]
    return measure_layer(make_layer, length, heads, repeats, lsh_dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lsh-dtype", default="float32",
                        choices=["float32", "bfloat16"])
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        implementation, length = args.single.split(":")
        seconds, peak = measure(implementation, int(length), args.heads,
                                args.repeats, args.lsh_dtype)
        print(json.dumps({"seconds": seconds, "peak_mib": peak}))
        return
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
            print(json.dumps(line), flush=True)
        if "flash" in results:
            flash = results["flash"]["seconds"]
            print(json.dumps({
                "benchmark": "attention_gpu", "length": length,
                **{f"{name}_time_over_flash": round(r["seconds"] / flash, 3)
                   for name, r in results.items() if name != "flash"}}),
                flush=True)


if __name__ == "__main__":
    main()

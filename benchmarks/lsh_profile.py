"""How much of the CPU's matrix-product throughput the LSH layer reaches,
and where the rest of its time goes.

One `LSHSelfAttention` layer's forward+backward (`layer_steps.py`: batch 1,
`--heads` heads of 64, causal, 4 hash rounds, chunks of 64, one chunk of
look-back, the default `"auto"` memory plan), each backend (TensorFlow and
JAX, both XLA) in its own process, which:

* measures its matrix-product throughput (a `--matmul-size`^3 float32
  product under XLA, median of 5) and times the layer step (median of
  `--repeats`);
* counts the matrix-product FLOPs the step executes from its optimised XLA
  program (`xla_profile.dot_flops`), recomputation in the backward pass
  included;
* profiles one step (`xla_profile.profile_by_kind`): the time of the
  operations XLA's CPU runtime runs, summed by what they do: matrix
  products, sorting, gathers, scatters, exponentials and logarithms
  (softmax, logsumexp), reductions, random numbers, copies and transposes
  (the loops' step slices included), and other elementwise work.

The layer's necessary products (`layer_flops`: the projections, hash
rotations and chunked attention of the all-at-once plan, counted once)
against the step time give the useful share of the throughput; the
executed products give the share the step keeps the product units busy.

Prints one JSON line per backend (throughput, step time, products, the
shares) and one per backend's profile (milliseconds and share per kind,
the product operations' own throughput, overall and for their costliest
source operations, and the costliest operations with the source operation
XLA recorded).

    python benchmarks/lsh_profile.py --length 16384
"""

import argparse
import json

from isolated import run_single
from xla_profile import profile_step


def layer_flops(length, heads, head_dim=64, chunk_length=64, num_hashes=4,
                chunks_before=1):
    """The matrix-product FLOPs the layer's forward+backward needs (each
    product once, no recomputation), batch 1, `length` a multiple of the
    chunk: the query-key, value and output projections (forward, and the
    input's and kernel's gradients), the hash rotations of the query-keys
    (forward only: hashing takes no gradient) and each chunk's scores and
    weighted values against its window (forward, and two products for each
    in the backward pass). Looping plans execute more: the backward pass
    recomputes each loop's forward products, and one head at a time
    projects the query-keys for hashing apart from those for attention."""
    from keras_reformer.layers import hashing

    width = heads * head_dim
    projection = 2 * length * width * width
    columns = hashing.rotation_columns(
        hashing.auto_num_buckets(length, chunk_length))
    rotations = 2 * length * width * num_hashes * columns
    window = (chunks_before + 1) * chunk_length
    attention = 2 * 2 * length * window * head_dim * num_hashes * heads
    return 9 * projection + rotations + 3 * attention


def measure(backend, length, heads, repeats, matmul_size):
    import layer_steps

    name = {"tensorflow": "lsh_tf", "jax": "lsh_jax"}[backend]
    layer_steps.preload(name)
    return profile_step(lambda: layer_steps.STEPS[name](length, heads),
                        backend, repeats, matmul_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    flags = ["--length", args.length, "--heads", args.heads, "--repeats",
             args.repeats, "--matmul-size", args.matmul_size]
    if args.single:
        print(json.dumps(measure(args.single, args.length, args.heads,
                                 args.repeats, args.matmul_size)))
        return
    needed = layer_flops(args.length, args.heads)
    for backend in ("jax", "tensorflow"):
        result = run_single(__file__, backend, flags, backend=backend)
        line = {"benchmark": "lsh_profile", "backend": backend,
                "length": args.length, "heads": args.heads}
        if "error" in result:
            print(json.dumps({**line, "error": result["error"]}), flush=True)
            continue
        seconds, throughput = result["seconds"], result["matmul_gflops"]
        executed = result["dot_flops"] / seconds / 1e9
        useful = needed / seconds / 1e9
        print(json.dumps({
            **line,
            "matmul_gflops": round(throughput, 1),
            "step_ms": round(1e3 * seconds, 1),
            "cpu_ms": round(1e3 * result["cpu_seconds"], 1),
            "needed_gflop": round(needed / 1e9, 2),
            "executed_gflop": round(result["dot_flops"] / 1e9, 2),
            "unknown_trip_counts": result["unknown_trip_counts"],
            "useful_gflops": round(useful, 2),
            "useful_fraction": round(useful / throughput, 3),
            "executed_fraction": round(executed / throughput, 3)}),
            flush=True)
        print(json.dumps({**line, **result["profile"]}), flush=True)


if __name__ == "__main__":
    main()

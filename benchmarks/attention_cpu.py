"""One attention layer against its peers on the CPU: time and memory.

Forward+backward of one layer (`layer_steps.py`: batch 1, `--heads` heads
of 64, causal, 4 hash rounds, chunks of 64 with one chunk of look-back,
float32): our LSH layer on TensorFlow and on JAX (both XLA), Hugging
Face's and reformer-pytorch's LSH layers, and exact attention with torch's
SDPA. Each (implementation, length) runs in its own process: the median of
`--repeats` calls after one untimed call, and the peak memory as the growth
of the process's peak resident set from before the layer was built
(compilation and the first call included; the frameworks' imports not),
and the steady peak: the highest resident set during the timed calls above
the one before the layer was built (`isolated.ResidentMemory`: weights,
compiled program and buffers, without the compiler's working memory).
The process's CPU time per call (all threads) is reported beside the wall
time: on a machine shared with other work it is the steadier measure.
Prints one JSON line per measurement, per length one line of every time
and memory as a multiple of ours on TensorFlow, and writes a PNG plot of
wall time, CPU time and memory against length.

    python benchmarks/attention_cpu.py --lengths 1024,4096,16384

`--lsh-options` passes more arguments to our LSH layer (its memory-lean
paths), e.g. `--lsh-options '{"parallel_heads": 1, "segments": 4}'`; a JSON
list of such dicts measures each of our LSH implementations once per dict,
side by side (named e.g. `lsh_tf parallel_heads=1 segments=4`).
"""

import argparse
import json
import os

from isolated import ResidentMemory
from isolated import timed_calls
from isolated import run_single
from plots import write_plot

IMPLEMENTATIONS = ("lsh_tf", "lsh_jax", "huggingface", "reformer_pytorch",
                   "sdpa")
PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots",
                    "attention_cpu.png")


def measure(name, length, heads, repeats, lsh_options):
    import layer_steps

    layer_steps.preload(name)
    memory = ResidentMemory()
    options = json.loads(lsh_options) if name.startswith("lsh") else {}
    step = layer_steps.STEPS[name](length, heads, **options)
    seconds, cpu_seconds = timed_calls(step, repeats, memory.restart_peak)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_mib": memory.peak_mib(),
            "steady_mib": memory.steady_mib()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--implementations",
                        default=",".join(IMPLEMENTATIONS),
                        help="comma-separated, from layer_steps.STEPS")
    parser.add_argument("--lsh-options", default="{}",
                        help="JSON dict of more LSHSelfAttention arguments, "
                             "or a list of such dicts")
    parser.add_argument("--plot", default=PLOT, help="PNG file to write")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        name, length = args.single.split(":")
        print(json.dumps(measure(name, int(length), args.heads,
                                 args.repeats, args.lsh_options)))
        return
    import layer_steps

    names = args.implementations.split(",")
    unknown = sorted(set(names) - set(layer_steps.STEPS))
    if unknown:
        parser.error(f"unknown implementations {unknown}; choose from "
                     f"{sorted(layer_steps.STEPS)}")
    variants = _variants(names, json.loads(args.lsh_options))
    lines = []
    for length in [int(n) for n in args.lengths.split(",")]:
        results = {}
        for label, name, options in variants:
            backend = layer_steps.BACKENDS[name]
            result = run_single(
                __file__, f"{name}:{length}",
                ["--heads", args.heads, "--repeats", args.repeats,
                 "--lsh-options", json.dumps(options)],
                backend="jax" if backend == "torch" else backend)
            line = {"benchmark": "attention_cpu", "implementation": label,
                    "length": length, "heads": args.heads}
            if "error" in result:
                line["error"] = result["error"]
            else:
                results[label] = result
                line.update(ms=round(1e3 * result["seconds"], 1),
                            cpu_ms=round(1e3 * result["cpu_seconds"], 1),
                            peak_mib=round(result["peak_mib"], 1),
                            steady_mib=_rounded(result["steady_mib"]))
            lines.append(line)
            print(json.dumps(line), flush=True)
        first = variants[0][0]
        if first in results:
            base = results[first]
            print(json.dumps({
                "benchmark": "attention_cpu", "length": length,
                "relative_to": first,
                "time": {name: round(r["seconds"] / base["seconds"], 2)
                         for name, r in results.items()},
                "cpu_time": {name: round(r["cpu_seconds"]
                                         / base["cpu_seconds"], 2)
                             for name, r in results.items()},
                "memory": {name: round(r["peak_mib"]
                                       / max(base["peak_mib"], 1.0), 2)
                           for name, r in results.items()},
                "steady_memory": {
                    name: round(r["steady_mib"]
                                / max(base["steady_mib"], 1.0), 2)
                    for name, r in results.items()
                    if r["steady_mib"] and base["steady_mib"]}}),
                flush=True)
    if args.plot:
        write_plot(args.plot, lines, "length",
                   ["ms", "cpu_ms", "peak_mib", "steady_mib"],
                   "implementation",
                   f"one attention layer, forward+backward, CPU, "
                   f"{args.heads} heads of 64")


def _rounded(mib):
    return None if mib is None else round(mib, 1)


def _variants(names, lsh_options):
    """`(label, implementation, options)` to measure: each `lsh*`
    implementation once per dict of `lsh_options` (a dict or a list of
    dicts), labelled with its options, the others once."""
    if isinstance(lsh_options, dict):
        lsh_options = [lsh_options]
    variants = []
    for name in names:
        if not name.startswith("lsh"):
            variants.append((name, name, {}))
            continue
        for options in lsh_options:
            label = " ".join([name] + [f"{key}={value}" for key, value
                                       in sorted(options.items())])
            variants.append((label, name, options))
    return variants


if __name__ == "__main__":
    main()

"""How much of the CPU's matrix-product throughput the LSH layer reaches,
and where the rest of its time goes.

One `LSHSelfAttention` layer's forward+backward (`layer_steps.py`: batch 1,
`--heads` heads of 64, causal, 4 hash rounds, chunks of 64), in one run:

* each backend in its own process (TensorFlow and JAX, both XLA) measures
  its matrix-product throughput (a `--matmul-size`^3 float32 product under
  XLA, median of 5) and times the layer step (median of `--repeats`);
* the JAX process counts the step's matrix-product FLOPs from XLA's
  optimised HLO (every `dot`: 2 x output size x contracted size) and
  profiles one step (`jax.profiler`): XLA's CPU runtime records each
  operation of the compiled program (a fusion, a sort, a copy), whose time
  is summed by what the operation does, judged from the instructions it
  fuses: matrix products, sorting, gathers, scatters, exponentials and
  logarithms (softmax, logsumexp), reductions, copies and transposes, and
  other elementwise work.

Prints one JSON line per backend (throughput, step time, the fraction of
the matrix-product throughput the layer's products reach) and one for the
profile (milliseconds and share per kind, and the costliest operations with
the source operation XLA recorded for them).

    python benchmarks/lsh_profile.py --length 16384
"""

import argparse
import glob
import json
import re
import tempfile
from collections import defaultdict

from isolated import matmul_gflops
from isolated import run_single
from isolated import timed_calls

# What an operation does, judged from the instructions it holds, in this
# order of precedence (a fusion of a product and a softmax is a product).
KINDS = (
    ("matrix products", {"dot", "convolution"}),
    ("sorting", {"sort"}),
    ("scatters", {"scatter"}),
    ("gathers", {"gather", "dynamic-slice"}),
    ("exp and log (softmax, logsumexp)", {"exponential", "log",
                                           "exponential-minus-one",
                                           "log-plus-one"}),
    ("reductions", {"reduce", "reduce-window"}),
    ("random numbers", {"rng-bit-generator", "while"}),
    ("copies and transposes", {"copy", "transpose", "concatenate", "pad",
                               "dynamic-update-slice", "slice", "reverse"}),
)
OTHER = "other elementwise"

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_DIMS = re.compile(r"^\w+\[([\d,]*)\]")


def parse_hlo(text):
    """Instructions of an HLO module, by computation.

    Returns:
        `(computations, entry)`: `computations[name]` is a list of
        `(instruction, opcode, dims, rest of line)`, `entry` the entry
        computation's name.
    """
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0].split("(")[0]:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, shape, opcode, rest = match.groups()
            dims = _DIMS.match(shape)
            dims = [int(d) for d in dims.group(1).split(",") if d] if (
                dims) else None
            computations[current].append((name, opcode, dims, rest))
    return computations, entry


def dot_flops(computations):
    """Matrix-product FLOPs of one run of the module: each `dot` counts
    2 x output elements x contracted elements, times the known trip count
    of any while loop around it."""
    shapes = {name: dims for instructions in computations.values()
              for name, _, dims, _ in instructions}
    repeats = defaultdict(lambda: 1)
    for instructions in computations.values():
        for _, opcode, _, rest in instructions:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
            body = re.search(r"body=%([\w.\-]+)", rest)
            if opcode == "while" and trips and body:
                repeats[body.group(1)] = int(trips.group(1))
    total = 0
    for computation, instructions in computations.items():
        for _, opcode, dims, rest in instructions:
            if opcode != "dot":
                continue
            lhs = re.match(r"\s*%([\w.\-]+)", rest).group(1)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}",
                                    rest).group(1)
            contracted = 1
            for axis in contracting.split(","):
                if axis:
                    contracted *= shapes[lhs][int(axis)]
            size = 1
            for d in dims:
                size *= d
            total += 2 * size * contracted * repeats[computation]
    return total


def kind_of(opcode, rest, computations):
    """What an entry-computation operation does (see `KINDS`)."""
    opcodes = {opcode}
    for called in re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", rest):
        opcodes |= {op for _, op, _, _ in computations.get(called, ())}
    for kind, members in KINDS:
        if opcodes & members:
            return kind
    return OTHER


def profile_by_kind(step, compiled, calls=1):
    """Milliseconds per kind of operation over `calls` profiled steps."""
    import jax
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    computations, entry = parse_hlo(compiled.as_text())
    operations = {name: (opcode, rest)
                  for name, opcode, _, rest in computations[entry]}
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        for _ in range(calls):
            step()
        jax.profiler.stop_trace()
        path = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as trace:
            space.ParseFromString(trace.read())
    by_operation = defaultdict(float)
    for plane in space.planes:
        names = {key: value.name for key, value in
                 plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names[event.metadata_id]
                if name in operations:
                    by_operation[name] += event.duration_ps / 1e9 / calls
    by_kind = defaultdict(float)
    for name, ms in by_operation.items():
        by_kind[kind_of(*operations[name], computations)] += ms
    total = sum(by_kind.values())
    top = sorted(by_operation.items(), key=lambda item: -item[1])[:12]
    return {
        "operations_ms": round(total, 1),
        "by_kind": {kind: {"ms": round(ms, 1),
                           "share": round(ms / total, 3)}
                    for kind, ms in sorted(by_kind.items(),
                                           key=lambda item: -item[1])},
        "costliest": [{
            "operation": name, "ms": round(ms, 1),
            "kind": kind_of(*operations[name], computations),
            "source": (re.search(r'op_name="([^"]*)"', operations[name][1])
                       or [None, None])[1]} for name, ms in top],
    }


def measure(backend, length, heads, repeats, matmul_size):
    import layer_steps

    name = {"tensorflow": "lsh_tf", "jax": "lsh_jax"}[backend]
    layer_steps.preload(name)
    gflops = matmul_gflops(backend, "float32", matmul_size)
    step = layer_steps.STEPS[name](length, heads)
    seconds, cpu_seconds = timed_calls(step, repeats)
    result = {"matmul_gflops": gflops, "seconds": seconds,
              "cpu_seconds": cpu_seconds}
    if backend == "jax":
        computations, _ = parse_hlo(step.compiled.as_text())
        result["dot_flops"] = dot_flops(computations)
        result["profile"] = profile_by_kind(step, step.compiled)
    return result


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
    results = {backend: run_single(__file__, backend, flags, backend=backend)
               for backend in ("jax", "tensorflow")}
    flops = results["jax"].get("dot_flops")
    for backend, result in results.items():
        line = {"benchmark": "lsh_profile", "backend": backend,
                "length": args.length, "heads": args.heads}
        if "error" in result:
            line["error"] = result["error"]
        else:
            achieved = flops / result["seconds"] / 1e9 if flops else None
            line.update(
                matmul_gflops=round(result["matmul_gflops"], 1),
                step_ms=round(1e3 * result["seconds"], 1),
                cpu_ms=round(1e3 * result["cpu_seconds"], 1),
                dot_gflop=round(flops / 1e9, 2) if flops else None,
                achieved_gflops=round(achieved, 1) if achieved else None,
                fraction_of_matmul=round(
                    achieved / result["matmul_gflops"], 3)
                if achieved else None)
        print(json.dumps(line), flush=True)
    if "profile" in results["jax"]:
        print(json.dumps({"benchmark": "lsh_profile", "backend": "jax",
                          "length": args.length,
                          **results["jax"]["profile"]}), flush=True)


if __name__ == "__main__":
    main()

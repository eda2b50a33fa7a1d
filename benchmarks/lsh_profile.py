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
  program (every `dot`: 2 x output size x contracted size, times the number
  of times its computation runs: while loops' known trip counts multiplied
  through nested loops and fusions), recomputation in the backward pass
  included;
* profiles one step (`jax.profiler`, TensorFlow's profiler): XLA's CPU
  runtime records each operation it runs (a fusion, a sort, a copy, inside
  loops too), whose time is summed by what the operation does, judged from
  the instructions it holds: matrix products, sorting, gathers, scatters,
  exponentials and logarithms (softmax, logsumexp), reductions, random
  numbers, copies and transposes (the loops' step slices included), and
  other elementwise work.

The layer's necessary products (`layer_flops`: the projections, hash
rotations and chunked attention of the all-at-once plan, counted once)
against the step time give the useful share of the throughput; the
executed products give the share the step keeps the product units busy.

Prints one JSON line per backend (throughput, step time, products, the
shares) and one per backend's profile (milliseconds and share per kind,
and the costliest operations with the source operation XLA recorded).

    python benchmarks/lsh_profile.py --length 16384
"""

import argparse
import glob
import json
import re
import tempfile
import time
from collections import defaultdict

from isolated import matmul_gflops
from isolated import run_single
from isolated import timed_calls

RANDOM = "random numbers"
# What an operation does, judged from the instructions it holds, in this
# order of precedence (a fusion of a product and a softmax is a product).
KINDS = (
    ("matrix products", {"dot", "convolution"}),
    ("sorting", {"sort"}),
    ("scatters", {"scatter"}),
    ("gathers", {"gather"}),
    ("exp and log (softmax, logsumexp)", {"exponential", "log",
                                           "exponential-minus-one",
                                           "log-plus-one"}),
    ("reductions", {"reduce", "reduce-window"}),
    (RANDOM, {"rng-bit-generator"}),
    ("copies and transposes", {"copy", "transpose", "concatenate", "pad",
                               "dynamic-slice", "dynamic-update-slice",
                               "slice", "reverse"}),
)
OTHER = "other elementwise"
# Operations of random-number generation (also in loops of their own), by
# their source operation.
_RANDOM_SOURCE = re.compile(
    r'op_name="[^"]*(threefry|[Rr]andom|jit\(_uniform\)|jit\(_normal\))')
# Operations whose callees the runtime records operation by operation.
CONTROL = {"while", "conditional", "call"}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_SOURCE = re.compile(r'op_name="([^"]*)"')
_DIMS = re.compile(r"^\w+\[([\d,]*)\]")
_CALLEES = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|"
    r"called_computations)=(\{[^}]*\}|%[\w.\-]+)")


def parse_hlo(text):
    """Instructions of an HLO module, by computation.

    Returns:
        `(computations, entry)`: `computations[name]` is a list of
        `(instruction, opcode, dims, rest of line)` in the module's order
        (callees before callers), `entry` the entry computation's name.
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


def callees(opcode, rest):
    """`(computation, runs per run of the instruction)` for each
    computation an instruction calls; a while loop's body runs its known
    trip count of times (its condition once more), None when unknown."""
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
    trips = int(trips.group(1)) if trips else None
    for attribute, names in _CALLEES.findall(rest):
        runs = 1
        if opcode == "while" and attribute in ("body", "condition"):
            runs = None if trips is None else trips + (
                attribute == "condition")
        for name in re.findall(r"%([\w.\-]+)", names):
            yield name, runs


def run_counts(computations, entry):
    """How many times each computation runs in one run of the module.

    Returns:
        `(counts, unknown)`: `counts[name]`, and the while loops whose trip
        count XLA does not know (counted as running once).
    """
    counts, unknown = defaultdict(int), []
    counts[entry] = 1
    # The module lists callees before callers: walk it backwards.
    for computation in reversed(list(computations)):
        for name, opcode, _, rest in computations[computation]:
            for callee, runs in callees(opcode, rest):
                if runs is None:
                    unknown.append(name)
                    runs = 1
                counts[callee] += counts[computation] * runs
    return counts, unknown


def loop_computations(computations):
    """The computations that run inside while loops (bodies, conditions
    and what they call)."""
    looped = set()
    for computation in reversed(list(computations)):
        for _, opcode, _, rest in computations[computation]:
            if opcode == "while" or computation in looped:
                looped.update(callee for callee, _ in callees(opcode, rest))
    return looped


def dot_flops(computations, entry):
    """Matrix-product FLOPs of one run of the module: each `dot` counts
    2 x output elements x contracted elements, times the runs of its
    computation (`run_counts`).

    Returns:
        `(flops, unknown)`, `unknown` as in `run_counts`.
    """
    shapes = {name: dims for instructions in computations.values()
              for name, _, dims, _ in instructions}
    counts, unknown = run_counts(computations, entry)
    total = 0
    for computation, instructions in computations.items():
        for _, opcode, dims, rest in instructions:
            if opcode != "dot" or not counts[computation]:
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
            total += 2 * size * contracted * counts[computation]
    return total, unknown


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


def _operation_kinds(computations):
    """`(where, kind, source)`: `where[instruction]` is its `(computation,
    opcode, rest of line)`, `kind(instruction)` what it does (`KINDS`),
    `source(instruction)` its source operation."""
    where, opcodes = {}, {}
    for computation, instructions in computations.items():
        for name, opcode, _, rest in instructions:
            where[name] = (computation, opcode, rest)

    def held(computation):
        """Opcodes of `computation` and of everything it calls."""
        if computation not in opcodes:
            opcodes[computation] = set()
            for _, opcode, _, rest in computations.get(computation, ()):
                opcodes[computation] |= {opcode} | set().union(
                    *(held(c) for c, _ in callees(opcode, rest)))
        return opcodes[computation]

    def kind(name):
        _, opcode, rest = where[name]
        if _RANDOM_SOURCE.search(rest):
            return RANDOM
        found = {opcode}.union(*(held(c) for c, _ in callees(opcode, rest)))
        for kind_name, members in KINDS:
            if found & members:
                return kind_name
        return OTHER

    def source(name):
        """The source operation XLA recorded for the instruction, else the
        first one recorded inside what it calls."""
        _, opcode, rest = where[name]
        found = _SOURCE.search(rest)
        if found:
            return found.group(1)
        for computation, _ in callees(opcode, rest):
            for _, _, _, inner in computations.get(computation, ()):
                found = _SOURCE.search(inner)
                if found:
                    return found.group(1)
        return None

    return where, kind, source


def trace_operations(step, backend):
    """Profiles one call of `step` (`jax.profiler` or TensorFlow's
    profiler, as `backend` says).

    Returns:
        `(seconds, events)`: the call's wall time, and `events[name]` the
        `[total picoseconds, count]` of the events of that name (XLA's CPU
        runtime names each operation's event after its instruction).
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    if backend == "jax":
        import jax

        start, stop = jax.profiler.start_trace, jax.profiler.stop_trace
    else:
        import tensorflow as tf

        start, stop = (tf.profiler.experimental.start,
                       tf.profiler.experimental.stop)
    with tempfile.TemporaryDirectory() as directory:
        start(directory)
        began = time.perf_counter()
        step()
        seconds = time.perf_counter() - began
        stop()
        path = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as trace:
            space.ParseFromString(trace.read())
    events = defaultdict(lambda: [0, 0])
    for plane in space.planes:
        names = {key: value.name for key, value in
                 plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                entry = events[names[event.metadata_id]]
                entry[0] += event.duration_ps
                entry[1] += 1
    return seconds, events


def profile_by_kind(step, hlo_text, backend):
    """Milliseconds per kind of operation in one profiled call of `step`.

    Every operation the runtime records counts, inside loops too; a loop,
    call or conditional counts only when none of the operations it calls
    were recorded (else they carry its time). The operations of a step
    may overlap in time (the runtime runs independent ones on other
    threads), and the runtime's own work between them is not counted.

    Returns:
        A dict: `step_ms` (the profiled call's wall time), `operations_ms`
        (all counted operations), `in_loops_ms` (those inside while
        loops), `by_kind` (milliseconds and share of `operations_ms`) and
        `costliest` (the 12 costliest operations).
    """
    computations, _ = parse_hlo(hlo_text)
    where, kind, source = _operation_kinds(computations)
    looped = loop_computations(computations)
    seconds, events = trace_operations(step, backend)
    recorded = {where[name][0] for name in events if name in where}
    by_operation = {}
    for name, (picoseconds, _) in events.items():
        if name not in where:
            continue
        _, opcode, rest = where[name]
        if opcode in CONTROL and any(
                c in recorded for c, _ in callees(opcode, rest)):
            continue
        by_operation[name] = picoseconds / 1e9
    by_kind = defaultdict(float)
    for name, ms in by_operation.items():
        by_kind[kind(name)] += ms
    total = sum(by_kind.values())
    in_loops = sum(ms for name, ms in by_operation.items()
                   if where[name][0] in looped)
    top = sorted(by_operation.items(), key=lambda item: -item[1])[:12]
    return {
        "step_ms": round(1e3 * seconds, 1),
        "operations_ms": round(total, 1),
        "in_loops_ms": round(in_loops, 1),
        "by_kind": {name: {"ms": round(ms, 1), "share": round(ms / total, 3)}
                    for name, ms in sorted(by_kind.items(),
                                           key=lambda item: -item[1])},
        "costliest": [{
            "operation": name, "ms": round(ms, 1), "kind": kind(name),
            "source": source(name)} for name, ms in top],
    }


def measure(backend, length, heads, repeats, matmul_size):
    import layer_steps

    name = {"tensorflow": "lsh_tf", "jax": "lsh_jax"}[backend]
    layer_steps.preload(name)
    gflops = matmul_gflops(backend, "float32", matmul_size)
    step = layer_steps.STEPS[name](length, heads)
    seconds, cpu_seconds = timed_calls(step, repeats)
    hlo_text = step.optimized_hlo()
    flops, unknown = dot_flops(*parse_hlo(hlo_text))
    return {"matmul_gflops": gflops, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "dot_flops": flops,
            "unknown_trip_counts": unknown,
            "profile": profile_by_kind(step, hlo_text, backend)}


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

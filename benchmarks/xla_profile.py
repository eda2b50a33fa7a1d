"""What an XLA program executes and where its time goes.

From the optimised HLO text of a compiled step (`parse_hlo`): how many
times each computation runs (`run_counts`: while loops' known trip counts
multiplied through nested loops and fusions), the matrix-product FLOPs it
executes (`dot_flops`: every `dot`, 2 x output size x contracted size,
times its computation's runs), and which computations run inside loops.
From one profiled call (`jax.profiler`, TensorFlow's profiler), in which
XLA's CPU runtime records each operation it runs (a fusion, a sort, a copy,
inside loops too): the time per kind of operation, judged from the
instructions it holds (`profile_by_kind`), and the matrix products' own
throughput, each product operation's FLOPs against its recorded time,
grouped by the source operation XLA recorded.
"""

import glob
import re
import tempfile
import time
from collections import defaultdict

from isolated import matmul_gflops
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


def operation_flops(computations, entry):
    """Matrix-product FLOPs each instruction executes in one run of the
    module: a `dot` counts 2 x output elements x contracted elements, any
    other instruction the products of the computations it calls (each as
    many times as it runs them), all times the runs of the instruction's
    own computation (`run_counts`).

    Returns:
        `(flops, unknown)`: `flops[instruction]` for the instructions that
        execute products, `unknown` as in `run_counts`.
    """
    shapes = {name: dims for instructions in computations.values()
              for name, _, dims, _ in instructions}
    counts, unknown = run_counts(computations, entry)
    per_run, flops = {}, {}
    # The module lists callees before callers.
    for computation, instructions in computations.items():
        per_run[computation] = 0
        for name, opcode, dims, rest in instructions:
            if opcode == "dot":
                executed = _product_flops(dims, rest, shapes)
            else:
                executed = sum((1 if runs is None else runs)
                               * per_run.get(callee, 0)
                               for callee, runs in callees(opcode, rest))
            per_run[computation] += executed
            if executed and counts[computation]:
                flops[name] = executed * counts[computation]
    return flops, unknown


def _product_flops(dims, rest, shapes):
    """2 x output elements x contracted elements of a `dot` whose output
    has `dims` and whose operands and attributes are `rest`."""
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
    return 2 * size * contracted


def dot_flops(computations, entry):
    """Matrix-product FLOPs of one run of the module (`operation_flops` of
    the entry computation's instructions: every `dot` times the runs of
    its computation).

    Returns:
        `(flops, unknown)`, `unknown` as in `run_counts`.
    """
    flops, unknown = operation_flops(computations, entry)
    return sum(flops.get(name, 0)
               for name, _, _, _ in computations[entry]), unknown


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


def recorded_operations(step, hlo_text, backend):
    """The operations of one profiled call of `step` (`trace_operations`)
    that carry its time: every operation the runtime records, inside loops
    too; a loop, call or conditional only when none of the operations it
    calls were recorded (else they carry its time).

    Returns:
        `(seconds, operations)`: the call's wall time, and
        `operations[instruction]` its `(milliseconds, matrix-product FLOPs)`
        over the call (`operation_flops`: all its runs).
    """
    computations, entry = parse_hlo(hlo_text)
    where, _, _ = _operation_kinds(computations)
    flops, _ = operation_flops(computations, entry)
    seconds, events = trace_operations(step, backend)
    recorded = {where[name][0] for name in events if name in where}
    operations = {}
    for name, (picoseconds, _) in events.items():
        if name not in where:
            continue
        _, opcode, rest = where[name]
        if opcode in CONTROL and any(
                c in recorded for c, _ in callees(opcode, rest)):
            continue
        operations[name] = (picoseconds / 1e9, flops.get(name, 0))
    return seconds, operations


def source_group(source, containers=()):
    """`source`, a source operation XLA recorded, without what tells
    repeated layers and model instances apart, so that the same operation
    of every layer falls in one group: JAX's transformations (`jvp(...)`,
    `transpose(...)`) unwrapped and its jitted function's name dropped,
    numeric suffixes dropped (`attention_3_1` is `attention`), and so are
    the path's `containers` (such as the model's and backbone's names)."""
    source = re.sub(r"^jit\(\w+\)/", "", source)
    while True:
        unwrapped = re.sub(r"\w+\(([^()]*)\)", r"\1", source)
        if unwrapped == source:
            break
        source = unwrapped
    parts = [re.sub(r"([._]\d+)+$", "", part) for part in source.split("/")]
    return "/".join(part for part in parts
                    if part and part not in containers)


def profile_by_kind(step, hlo_text, backend, containers=()):
    """Milliseconds per kind of operation in one profiled call of `step`,
    and the matrix products' own throughput.

    The operations are `recorded_operations`'. They may overlap in time
    (the runtime runs independent ones on other threads), and the
    runtime's own work between them is not counted.

    Returns:
        A dict: `step_ms` (the profiled call's wall time), `operations_ms`
        (all counted operations), `in_loops_ms` (those inside while
        loops), `by_kind` (milliseconds and share of `operations_ms`),
        `products` (the milliseconds, GFLOP and GFLOP/s of the operations
        that execute matrix products), `product_groups` (the same for the
        8 costliest groups of them by `source_group`, with `containers`)
        and `costliest` (the 12 costliest operations).
    """
    computations, _ = parse_hlo(hlo_text)
    where, kind, source = _operation_kinds(computations)
    looped = loop_computations(computations)
    seconds, operations = recorded_operations(step, hlo_text, backend)
    by_kind, groups = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for name, (ms, flops) in operations.items():
        by_kind[kind(name)] += ms
        if flops:
            group = groups[source_group(source(name) or name, containers)]
            group[0] += ms
            group[1] += flops
    total = sum(by_kind.values())
    in_loops = sum(ms for name, (ms, _) in operations.items()
                   if where[name][0] in looped)
    top = sorted(operations.items(), key=lambda item: -item[1][0])[:12]
    products_ms = sum(ms for ms, _ in groups.values())
    products_flops = sum(flops for _, flops in groups.values())
    return {
        "step_ms": round(1e3 * seconds, 1),
        "operations_ms": round(total, 1),
        "in_loops_ms": round(in_loops, 1),
        "by_kind": {name: {"ms": round(ms, 1), "share": round(ms / total, 3)}
                    for name, ms in sorted(by_kind.items(),
                                           key=lambda item: -item[1])},
        "products": _throughput(products_ms, products_flops),
        "product_groups": [
            {"source": group, **_throughput(ms, flops)}
            for group, (ms, flops) in sorted(
                groups.items(), key=lambda item: -item[1][0])[:8]],
        "costliest": [{
            "operation": name, "ms": round(ms, 1), "kind": kind(name),
            "source": source(name)} for name, (ms, _) in top],
    }


def _throughput(ms, flops):
    """Milliseconds, GFLOP and GFLOP/s, rounded for printing."""
    return {"ms": round(ms, 1), "gflop": round(flops / 1e9, 2),
            "gflops": round(flops / ms / 1e6, 1) if ms else None}


def profile_step(build_step, backend, repeats, matmul_size=2048,
                 containers=()):
    """Measures a compiled step in this process (`backend`, "jax" or
    "tensorflow"): the matrix-product throughput (`isolated.matmul_gflops`,
    float32, `matmul_size`^3, before the step is built), the step's median
    time (`isolated.timed_calls`), the products it executes and its
    profile.

    Args:
        build_step: returns the step, a function that runs it once, whose
            `optimized_hlo()` is the text of its optimised XLA program.

    Returns:
        A dict: `matmul_gflops`, `seconds`, `cpu_seconds`, `dot_flops`,
        `unknown_trip_counts` (`dot_flops`') and `profile`
        (`profile_by_kind`, with `containers`).
    """
    gflops = matmul_gflops(backend, "float32", matmul_size)
    step = build_step()
    seconds, cpu_seconds = timed_calls(step, repeats)
    hlo_text = step.optimized_hlo()
    flops, unknown = dot_flops(*parse_hlo(hlo_text))
    return {"matmul_gflops": gflops, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "dot_flops": flops,
            "unknown_trip_counts": unknown,
            "profile": profile_by_kind(step, hlo_text, backend,
                                       containers)}

"""What the benchmarks share: medians after warm-up, one process per
measurement (so that peak memory belongs to that measurement alone), and
XLA's memory plan of a language model's training gradient."""

import json
import os
import subprocess
import sys
import time

import numpy as np


def timed_calls(function, repeats, after_warm_up=None):
    """Calls `function` once untimed (compiling, warming up), then `repeats`
    times; with `repeats=0`, the one call is timed (warm-up included: for
    peers without compilation at lengths too slow to repeat).
    `after_warm_up`, if given, is called between the untimed call and the
    timed ones (e.g. `ResidentMemory.restart_peak`).

    Returns:
        `(median wall seconds, mean CPU seconds)` per timed call; the CPU
        time is the process's (all its threads, user and system), which a
        machine shared with other work inflates less than the wall time.
    """
    if repeats == 0:
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        return (time.perf_counter() - start,
                time.process_time() - cpu_start)
    function()
    if after_warm_up is not None:
        after_warm_up()
    times = []
    cpu_start = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu_start) / repeats
    return float(np.median(times)), cpu


def _status_mib(field):
    """A field of /proc/self/status in MiB (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_resident_mib():
    """This process's peak resident set: Linux's high-water mark (the
    process's own; `ru_maxrss` starts a child at its parent's peak), else
    `ru_maxrss`."""
    import resource

    peak = _status_mib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def _return_free_memory():
    """Hands the C heap's free pages back to the system (glibc's
    `malloc_trim`), so the resident set stops counting memory that was
    freed (e.g. by the compiler) but kept by the allocator."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ResidentMemory:
    """This process's resident memory from the moment of creation.

    `peak_mib()` is the growth of the peak resident set since then,
    everything included (compilation too). After `restart_peak()` (called
    once the first call has compiled), `steady_mib()` is the highest
    resident set since, above the resident set at creation: what the
    compiled steps hold while they run (weights, the program, its buffers)
    without the compiler's transient working memory: the restart hands the
    allocator's free pages back to the system and resets Linux's
    high-water mark (`/proc/self/clear_refs`); elsewhere, or before a
    restart, `steady_mib()` is None.

    Example:
    >>> memory = ResidentMemory()
    >>> seconds, cpu = timed_calls(step, 3, memory.restart_peak)
    >>> memory.peak_mib(), memory.steady_mib()
    """

    def __init__(self):
        self._start_peak = _peak_resident_mib()
        self._start_resident = _status_mib("VmRSS")
        self._peak_before_restart = 0.0
        self._restarted = False

    def restart_peak(self):
        self._peak_before_restart = self.peak_mib()
        _return_free_memory()
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._restarted = self._start_resident is not None
        except OSError:
            self._restarted = False

    def peak_mib(self):
        return max(self._peak_before_restart,
                   _peak_resident_mib() - self._start_peak)

    def steady_mib(self):
        if not self._restarted:
            return None
        return _status_mib("VmHWM") - self._start_resident


def median_seconds(function, repeats):
    """Median wall time of `repeats` calls of `function` after one untimed
    (compiling, warming up) call."""
    return timed_calls(function, repeats)[0]


def run_single(script, spec, arguments, backend=None):
    """Runs `script --single spec *arguments` in a fresh process.

    With `BENCHMARKS_IN_PROCESS=1` in the environment it runs in this
    process instead (quicker, for smoke runs; the memory figures then are
    not the measurement's alone), when `backend` is this process's Keras
    backend or not given.

    Returns:
        The dict the process printed as JSON on its last line, or
        `{"error": ...}` with the end of its stderr if it failed.
    """
    if os.environ.get("BENCHMARKS_IN_PROCESS") == "1" and backend in (
            None, os.environ.get("KERAS_BACKEND")):
        return _run_here(script, spec, arguments)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if backend:
        env["KERAS_BACKEND"] = backend
    run = subprocess.run(
        [sys.executable, script, "--single", spec, *map(str, arguments)],
        capture_output=True, text=True, env=env)
    if run.returncode:
        return {"error": run.stderr.strip()[-400:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _run_here(script, spec, arguments):
    """`run_single` in this process: the script's `main` with its argv."""
    import contextlib
    import io
    import runpy
    import traceback

    argv, output = sys.argv, io.StringIO()
    sys.argv = [script, "--single", spec, *map(str, arguments)]
    try:
        with contextlib.redirect_stdout(output):
            runpy.run_path(script, run_name="__main__")
    except Exception:  # reported as a failed process would be
        return {"error": traceback.format_exc()[-400:]}
    finally:
        sys.argv = argv
    return json.loads(output.getvalue().strip().splitlines()[-1])


def lm_loss(lm, token_ids, labels):
    """The mean next-token cross-entropy of `lm`'s logits for `token_ids`
    (all real) against `labels`, the model called with `training=True` as
    `fit` calls it: the loss `train_on_batch` differentiates."""
    import keras

    logits = lm({"token_ids": token_ids,
                 "padding_mask": keras.ops.ones_like(token_ids)},
                training=True)
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))


def jax_lm_gradient(lm):
    """`gradient(values, token_ids, labels)`: the gradient of `lm_loss`
    with respect to `values`, those of `lm.trainable_variables` (JAX
    backend; stateless, for `jax.jit`)."""
    import jax
    import keras

    variables = lm.trainable_variables

    def loss(values, token_ids, labels):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return lm_loss(lm, token_ids, labels)

    return jax.grad(loss)


def lm_gradient_memory(lm, length):
    """XLA's memory analysis of `lm`'s training gradient, compiled and not
    run (JAX backend): `jax_lm_gradient` for one sequence of `length` token
    ids, the ids standing for the labels too (the same computation).

    Returns:
        The compiled computation's `memory_analysis()` (temporary, argument
        and output bytes).
    """
    import jax

    gradient = jax_lm_gradient(lm)
    values = [jax.ShapeDtypeStruct(v.shape, v.dtype)
              for v in lm.trainable_variables]
    token_ids = jax.ShapeDtypeStruct((1, length), "int32")
    return jax.jit(lambda values, ids: gradient(values, ids, ids)).lower(
        values, token_ids).compile().memory_analysis()


def matmul_gflops(framework, dtype, size=2048, repeats=5, jit_compile=True):
    """This CPU's matrix-product throughput in GFLOP/s: the median time of
    a `size`^3 product of `dtype` matrices in `framework` ("jax", or
    "tensorflow" under XLA, or with `jit_compile=False` TensorFlow's own
    kernels, oneDNN on this CPU)."""
    flops = 2 * size**3
    data = np.random.RandomState(0).randn(size, size).astype("float32")
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a = jnp.asarray(data, dtype)
        product = jax.jit(jnp.matmul)
        seconds = median_seconds(
            lambda: product(a, a).block_until_ready(), repeats)
    else:
        import tensorflow as tf

        a = tf.cast(tf.constant(data), dtype)
        product = tf.function(tf.matmul, jit_compile=jit_compile)
        seconds = median_seconds(lambda: product(a, a).numpy(), repeats)
    return flops / seconds / 1e9



def step_timer():
    """A Keras callback whose `times` lists the wall time of every train
    step."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()

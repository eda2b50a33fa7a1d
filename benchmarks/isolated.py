"""What the benchmarks share: medians after warm-up, one process per
measurement (so that peak memory belongs to that measurement alone), and
XLA's memory plan of a language model's training gradient."""

import json
import os
import subprocess
import sys
import time

import numpy as np


def median_seconds(function, repeats):
    """Median wall time of `repeats` calls of `function` after one untimed
    (compiling, warming up) call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_single(script, spec, arguments, backend=None):
    """Runs `script --single spec *arguments` in a fresh process.

    Returns:
        The dict the process printed as JSON on its last line, or
        `{"error": ...}` with the end of its stderr if it failed.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if backend:
        env["KERAS_BACKEND"] = backend
    run = subprocess.run(
        [sys.executable, script, "--single", spec, *map(str, arguments)],
        capture_output=True, text=True, env=env)
    if run.returncode:
        return {"error": run.stderr.strip()[-400:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def lm_gradient_memory(lm, length):
    """XLA's memory analysis of `lm`'s training gradient, compiled and not
    run (JAX backend): next-token cross-entropy of one sequence of `length`
    token ids, the model called with `training=True` as `fit` calls it.

    Returns:
        The compiled computation's `memory_analysis()` (temporary, argument
        and output bytes).
    """
    import jax
    import keras

    variables = lm.trainable_variables

    def loss(values, token_ids):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            logits = lm({"token_ids": token_ids,
                         "padding_mask": keras.ops.ones_like(token_ids)},
                        training=True)
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
            token_ids, logits, from_logits=True))

    values = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]
    token_ids = jax.ShapeDtypeStruct((1, length), "int32")
    return jax.jit(jax.grad(loss)).lower(
        values, token_ids).compile().memory_analysis()

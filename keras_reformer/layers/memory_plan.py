"""How many heads and runs of chunks a chunked attention layer attends at a
time: its `parallel_heads` and `segments` arguments, `"auto"` included."""

import keras

from keras_reformer.layers.validation import check_positive_int

AUTO = "auto"

# The most chunk scores per sequence (all the heads and hash rounds of one
# step, each query times its window of keys) that the automatic plan
# attends at once: 2**24 float32 scores are 64 MiB.
STEP_SCORES = 2**24
# On JAX, one head at a time in runs of chunks as small as this was the
# fastest setting of the LSH layer (XLA:CPU, 1K to 16K tokens; 2**17 and
# 2**19 were slower) and as fast as all at once for local attention; on
# TensorFlow each run costs time, and head groups and runs start above
# STEP_SCORES.
JAX_RUN_SCORES = 2**18


def run_scores():
    """The most scores per step of a head group or run of chunks that the
    automatic plan allows: `JAX_RUN_SCORES` on JAX, else `STEP_SCORES`."""
    if keras.backend.backend() == "jax":
        return min(JAX_RUN_SCORES, STEP_SCORES)
    return STEP_SCORES


def check_plan_option(name, value, num_heads=None):
    """Raises ValueError unless `value` is `"auto"`, None or a positive int
    (dividing `num_heads` when it is given)."""
    if value is None or value == AUTO:
        return
    if isinstance(value, str):
        raise ValueError(
            f"{name} must be 'auto', None or a positive integer; received "
            f"{name}={value!r}.")
    check_positive_int(name, value)
    if num_heads is not None and num_heads % value:
        raise ValueError(
            f"{name} must divide num_heads; received {name}={value} with "
            f"num_heads={num_heads}.")


def plan(parallel_heads, segments, num_heads, scores_per_head, num_chunks):
    """Heads and runs of chunks attended at a time.

    `"auto"` chooses from the sizes: all heads at once while one step's
    scores (`heads * scores_per_head / runs`) stay within `run_scores()`,
    else one head at a time (less memory than any larger group, and as
    fast or faster in the measurements); then all chunks at once when all
    heads fit in `STEP_SCORES`, else the fewest runs dividing
    `num_chunks` that keep each run's scores within `run_scores()`. When
    the length is unknown while tracing (`scores_per_head` a tensor), `"auto"` means all at once.

    Args:
        parallel_heads: `"auto"`, None (all heads) or an int dividing
            `num_heads`.
        segments: `"auto"`, None (all chunks) or an int.
        num_heads: int.
        scores_per_head: int or tensor, one head's scores per sequence when
            all its chunks are attended at once.
        num_chunks: int or tensor, the chunks that runs divide.

    Returns:
        `(group, runs)`: heads at a time (None: all at once) and runs of
        chunks (None: all at once; an int is passed on to
        `attention_in_runs`).
    """
    known = isinstance(scores_per_head, int)
    group, runs = parallel_heads, segments
    if group == AUTO:
        fixed_runs = runs if isinstance(runs, int) else 1
        group = num_heads if not known or (
            num_heads * scores_per_head <= run_scores() * fixed_runs) else 1
    if group is not None and group >= num_heads:
        group = None
    if runs == AUTO:
        runs = None
        if known:
            scores = (group or num_heads) * scores_per_head
            if group is not None or scores > STEP_SCORES:
                runs = min(r for r in range(1, num_chunks + 1)
                           if num_chunks % r == 0 and (
                               scores <= run_scores() * r
                               or r == num_chunks))
                runs = runs if runs > 1 else None
    return group, runs

"""Argument checks that name the argument, the value and what is allowed."""

import numpy as np


def _is_int(value):
    """Whether `value` is a Python or NumPy integer (not a bool)."""
    return (isinstance(value, (int, np.integer))
            and not isinstance(value, bool))


def check_positive_int(name, value):
    """Raises ValueError unless `value` is an int (NumPy's included) >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer; received {name}={value!r}."
        )


def check_positive_int_pair(name, pair):
    """Raises ValueError unless `pair` is a list or tuple of two ints >= 1."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(
            f"{name} must be a pair of positive integers; received "
            f"{name}={pair!r}.")
    for value in pair:
        check_positive_int(name, value)


def check_non_negative_int(name, value):
    """Raises ValueError unless `value` is an int (NumPy's included) >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(
            f"{name} must be a non-negative integer; received {name}={value!r}."
        )


def check_rate(name, value):
    """Raises ValueError unless `0 <= value < 1`."""
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); received {name}={value!r}.")


def check_chunk_window(causal, num_chunks_before, num_chunks_after):
    """Checks the chunk neighbourhood of a chunked attention layer."""
    check_non_negative_int("num_chunks_before", num_chunks_before)
    check_non_negative_int("num_chunks_after", num_chunks_after)
    if causal and num_chunks_after:
        raise ValueError(
            "A causal layer cannot attend to later chunks; received "
            f"causal=True with num_chunks_after={num_chunks_after} "
            "(use num_chunks_after=0).")

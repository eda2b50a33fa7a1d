"""Argument checks that name the argument, the value and what is allowed."""


def check_positive_int(name, value):
    """Raises ValueError unless `value` is an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer; received {name}={value!r}."
        )


def check_non_negative_int(name, value):
    """Raises ValueError unless `value` is an int >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"{name} must be a non-negative integer; received {name}={value!r}."
        )


def check_rate(name, value):
    """Raises ValueError unless `0 <= value < 1`."""
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); received {name}={value!r}.")

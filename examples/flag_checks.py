"""Checks of the examples' command-line flags, each ending in
`parser.error` with the flag, the value and what is allowed (no TensorFlow
needed: the duplication task runs where there is none)."""

import math

# Each hash round adds a full attention pass; the paper uses at most 8.
MAX_NUM_HASHES = 64
MAX_SEED = 2**31 - 1


def check_positive_flags(parser, args, names):
    """Exits through `parser.error` for the first of the integer flags
    `names` (attribute names) that is set and below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive "
                         f"integer; received {value}.")


def check_flag_range(parser, args, name, low, high=math.inf):
    """Exits through `parser.error` if the integer flag `name` (an attribute
    name) is outside `[low, high]`."""
    value = getattr(args, name)
    if not low <= value <= high:
        allowed = (f"at least {low}" if high == math.inf
                   else f"between {low} and {high}")
        parser.error(f"--{name.replace('_', '-')} must be an integer "
                     f"{allowed}; received {value}.")


def check_positive_number_flags(parser, args, names):
    """Exits through `parser.error` for the first of the float flags `names`
    that is not a finite number above 0 (nan, inf, 0 or negative)."""
    for name in names:
        value = getattr(args, name)
        if not 0.0 < value < math.inf:
            parser.error(f"--{name.replace('_', '-')} must be a positive "
                         f"finite number; received {value}.")

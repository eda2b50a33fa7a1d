"""Input checks shared by the models that take token ids."""

import contextlib

import keras
from keras import ops

from keras_reformer.layers.token_id_check import MASK_RULE
from keras_reformer.layers.token_id_check import mask_values_valid
from keras_reformer.layers.token_id_check import raise_unless
from keras_reformer.layers.token_id_check import value_error

# Integer dtypes whose every value survives the cast to int32.
INT32_SAFE = ("int8", "int16", "int32", "uint8", "uint16")


class TokenInputsMixin:
    """Checks `token_ids`, `padding_mask` and `mask_positions` before Keras
    casts them to int32.

    A functional model casts its inputs to the dtype of its `keras.Input`
    (int32), which would silently read a token id 1.5 as 1, an int64 id
    `2**32 + 5` as 5 and a mask value 0.5 as padding. So ids and positions
    must be whole numbers in the int32 range (whole numbers in a float dtype
    pass: Keras's own input pipelines may convert integer arrays to floats,
    for instance under `tf.distribute`) and masks must hold only 0 and 1
    (the package's rule, see `checked_mask`). A bad value raises where the
    backend can (`raise_unless`); under XLA, which drops assertions, a bad
    id or mask value turns its row's token ids into -1 and a bad position
    into -1, which the range checks after the cast make NaN outputs.

    `predict` checks that a dict of arrays has one batch size (Keras's own
    check fails on a dict of them) and fits the model's positions. On JAX,
    `fit`, `evaluate` and `predict` keep the model's weights when they
    raise before a step has run (Keras 3.15 detaches the weights for its
    loop and reattaches the last step's state, which such a loop lacks).

    `training` and `mask` are named in the signature: Keras passes the
    training flag on to the layers inside only to a `call` that names it.
    """

    def call(self, inputs, training=None, mask=None):
        if isinstance(inputs, dict) and "token_ids" in inputs:
            inputs = checked_token_inputs(inputs)
        return super().call(inputs, training=training, mask=mask)

    def fit(self, *args, **kwargs):
        with self._weights_kept_on_failure():
            return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._weights_kept_on_failure():
            return super().evaluate(*args, **kwargs)

    def predict(self, x, *args, **kwargs):
        if isinstance(x, dict):
            self._check_arrays(x)
        with self._weights_kept_on_failure():
            return super().predict(x, *args, **kwargs)

    @contextlib.contextmanager
    def _weights_kept_on_failure(self):
        """On JAX, gives every variable that Keras's loop left detached
        (its value None) the value it had before the loop, if it raises.

        Keras reattaches the state of the loop's last step when it ends,
        also by an error; it must not reattach another loop's state, so the
        stale one is dropped first."""
        if keras.backend.backend() != "jax":
            yield
            return
        variables = list({id(v): v for v in self._loop_variables()}.values())
        values = [variable.value for variable in variables]
        self._jax_state = None
        try:
            yield
        except BaseException:
            for variable, value in zip(variables, values):
                if variable._value is None:
                    variable.assign(value)
            raise

    def _loop_variables(self):
        """The variables Keras's JAX loops may detach."""
        optimizer = getattr(self, "optimizer", None)
        return (self.variables + self.metrics_variables + (
            optimizer.variables if optimizer is not None else []))

    def _check_arrays(self, x):
        """Checks a dict of arrays before Keras's predict loop: one batch
        size, and no more tokens than the model's positions (a traced
        predict step would fail in a gather instead)."""
        shapes = {k: v.shape for k, v in x.items()
                  if getattr(v, "shape", None)}
        batches = {k: shape[0] for k, shape in shapes.items()}
        if len(set(batches.values())) > 1:
            raise ValueError("The inputs must have one batch size; received "
                             f"batch sizes {batches}.")
        if len(shapes.get("token_ids", ())) == 2:
            backbone = getattr(self, "backbone", self)
            backbone.position_embedding.check_length(
                shapes["token_ids"][1])


def checked_token_inputs(inputs):
    """`inputs` with int32 `token_ids`, `padding_mask` and `mask_positions`
    (those present), checked as `TokenInputsMixin` describes.

    Raises:
        ValueError: an input's dtype is not allowed (strings, say).
    """
    inputs = dict(inputs)
    valid_rows = None
    for name, valid, message in _value_checks(inputs):
        values = raise_unless(valid, inputs[name], message, inputs[name])
        if name == "mask_positions":
            inputs[name] = ops.where(valid, ops.cast(values, "int32"), -1)
            continue
        inputs[name] = ops.cast(values, "int32")
        row_valid = ops.all(valid, axis=-1, keepdims=True)
        valid_rows = row_valid if valid_rows is None else ops.logical_and(
            valid_rows, row_valid)
    if valid_rows is not None:
        inputs["token_ids"] = ops.where(valid_rows, inputs["token_ids"], -1)
    return inputs


def check_token_values(inputs):
    """Raises `ValueError` where the numpy `inputs` fail the checks of
    `checked_token_inputs` (what `generate()` runs on its prompts)."""
    for name, valid, message in _value_checks(inputs):
        valid = ops.convert_to_numpy(valid)
        if not valid.all():
            raise value_error(message, inputs[name], valid)


def _value_checks(inputs):
    """`(name, valid, message)` for each input of `inputs` whose dtype
    allows bad values (see `_valid_values`)."""
    for name in ("token_ids", "padding_mask", "mask_positions"):
        if name in inputs:
            valid, message = _valid_values(name, inputs[name])
            if valid is not None:
                yield name, valid, message


def _valid_values(name, values):
    """`(valid, message)`: a bool tensor, True where `values` can be read as
    `name`, and the error for the others; `(None, None)` when its dtype
    allows no bad value."""
    dtype = getattr(values, "dtype", None)
    try:
        dtype = keras.backend.standardize_dtype(dtype)
    except ValueError:
        pass
    is_mask = name == "padding_mask"
    allowed = ("bool", "int", "uint", "float", "bfloat16") if is_mask else (
        "int", "uint", "float", "bfloat16")
    if not (isinstance(dtype, str) and dtype.startswith(allowed)):
        raise ValueError(
            f"{name} must be a tensor of {'bools, ' if is_mask else ''}"
            f"integers or whole numbers in a float dtype; received dtype "
            f"{dtype}.")
    if dtype == "bool" or (dtype in INT32_SAFE and not is_mask):
        return None, None
    if is_mask:
        return mask_values_valid(values), (
            f"{name} {MASK_RULE} (received dtype {dtype})")
    valid = values < 2**31
    if not dtype.startswith("uint"):
        valid = ops.logical_and(valid, values >= -2**31)
    if not dtype.startswith(("int", "uint")):
        valid = ops.logical_and(valid, ops.equal(values, ops.floor(values)))
    return valid, (f"{name} must be whole numbers in the int32 range "
                   f"[-2**31, 2**31) (received dtype {dtype})")

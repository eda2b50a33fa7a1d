"""Input checks shared by the models that take token ids."""

import keras


class TokenInputsMixin:
    """Rejects floating-point `token_ids` before Keras casts them.

    A functional model casts its inputs to the dtype of its `keras.Input`
    (int32), which would silently truncate ids such as 1.5 to 1.
    """

    def call(self, inputs, *args, **kwargs):
        token_ids = inputs["token_ids"] if isinstance(inputs, dict) else None
        dtype = getattr(token_ids, "dtype", None)
        if dtype is not None and "float" in keras.backend.standardize_dtype(
                dtype):
            raise ValueError(
                "token_ids must be integers; received dtype "
                f"{keras.backend.standardize_dtype(dtype)}.")
        return super().call(inputs, *args, **kwargs)

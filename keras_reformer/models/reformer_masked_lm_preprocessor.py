"""Strings to masked-token examples for a Reformer masked LM."""

import keras
import keras_hub
import numpy as np

from keras_reformer.bert_masking import mask_tokens
from keras_reformer.layers.validation import check_positive_int
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_tokenizer import NUM_BYTES
from keras_reformer.models.reformer_tokenizer import ReformerTokenizer
from keras_reformer.optional_tensorflow import tf


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerMaskedLMPreprocessor(keras_hub.models.MaskedLMPreprocessor):
    """keras-hub's `MaskedLMPreprocessor` for Reformer masked LMs.

    Tokenizes strings, pads them with the tokenizer's pad id to
    `sequence_length` (no start or end token) and masks them as
    `text_data.masked_lm_dataset` does (`bert_masking.mask_tokens`): each row
    selects `round(mask_selection_rate * n)` of its `n` tokens (at least
    one, at most `mask_selection_length`), never padding; a selected token
    becomes the tokenizer's mask id with probability `mask_token_rate`, a
    random byte with probability `random_token_rate`, and stays otherwise.
    Returns `(x, y, sample_weight)`: `x` is `{"token_ids", "padding_mask",
    "mask_positions"}`, `y` the original ids at `mask_positions` and
    `sample_weight` 1 for a selection, 0 for an unused slot.

    Args:
        tokenizer: a `ReformerTokenizer` with a `mask_token_id`.
        sequence_length: int, the length of `token_ids`.
        mask_selection_rate: float in (0, 1), the share of tokens selected.
        mask_selection_length: None or int, the slots per row in
            `mask_positions`, `y` and `sample_weight`; None for
            `round(mask_selection_rate * sequence_length)` (no row is cut).
        mask_token_rate: float, the share of selections that become the
            mask id.
        random_token_rate: float, the share of selections that become a
            random byte.

    Example:
    >>> preprocessor = ReformerMaskedLMPreprocessor(
    ...     ReformerTokenizer(mask_token_id=256), sequence_length=8,
    ...     mask_selection_rate=0.5, mask_token_rate=1.0,
    ...     random_token_rate=0.0)
    >>> x, y, sample_weight = preprocessor(["abcd"])
    >>> token_ids = ops.convert_to_numpy(x["token_ids"])
    >>> int((token_ids == 256).sum()), token_ids[0, 4:]
    (2, array([0, 0, 0, 0], dtype=int32))
    >>> ops.convert_to_numpy(sample_weight)
    array([[1., 1., 0., 0.]], dtype=float32)
    """

    backbone_cls = ReformerBackbone
    tokenizer_cls = ReformerTokenizer

    def __init__(self, tokenizer, sequence_length=512,
                 mask_selection_rate=0.15, mask_selection_length=None,
                 mask_token_rate=0.8, random_token_rate=0.1, **kwargs):
        check_positive_int("sequence_length", sequence_length)
        if mask_selection_length is not None:
            check_positive_int("mask_selection_length", mask_selection_length)
        if not 0.0 < mask_selection_rate < 1.0:
            raise ValueError(
                "mask_selection_rate must be in (0, 1); received "
                f"mask_selection_rate={mask_selection_rate!r}.")
        if (min(mask_token_rate, random_token_rate) < 0.0
                or mask_token_rate + random_token_rate > 1.0):
            raise ValueError(
                "mask_token_rate and random_token_rate must be >= 0 with a "
                f"sum <= 1; received mask_token_rate={mask_token_rate!r}, "
                f"random_token_rate={random_token_rate!r}.")
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError(
                "ReformerMaskedLMPreprocessor needs a tokenizer with a mask "
                f"token; received a {type(tokenizer).__name__} with "
                "mask_token_id=None (e.g. pass ReformerTokenizer(mask_token_"
                "id=text_data.MASK_TOKEN_ID)).")
        super().__init__(
            tokenizer, sequence_length=sequence_length,
            mask_selection_rate=mask_selection_rate,
            mask_selection_length=mask_selection_length,
            mask_token_rate=mask_token_rate,
            random_token_rate=random_token_rate, **kwargs)

    def build(self, input_shape):
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length=self.sequence_length,
            pad_value=self.tokenizer.pad_token_id, return_padding_mask=True)
        self.built = True

    def call(self, x, y=None, sample_weight=None):
        token_ids, padding_mask = (
            _as_tf(tensor) for tensor in self.packer(self.tokenizer(x)))
        unbatched = token_ids.shape.rank == 1
        if unbatched:
            token_ids, padding_mask = token_ids[None], padding_mask[None]
        width = min(self.sequence_length, self.mask_selection_length or max(
            1, round(self.mask_selection_rate * self.sequence_length)))
        offset = self.tokenizer.id_offset
        masked_ids, positions, labels, weights = mask_tokens(
            token_ids, padding_mask, self.mask_selection_rate, width,
            tf.random.uniform((2,), maxval=tf.int64.max, dtype=tf.int64),
            self.tokenizer.mask_token_id, (offset, offset + NUM_BYTES),
            self.mask_token_rate, self.random_token_rate)
        outputs = ({"token_ids": masked_ids, "padding_mask": padding_mask,
                    "mask_positions": positions}, labels, weights)
        if unbatched:
            outputs = keras.tree.map_structure(lambda t: t[0], outputs)
        if tf.executing_eagerly():
            outputs = keras.tree.map_structure(
                keras.ops.convert_to_tensor, outputs)
        return outputs


def _as_tf(tensor):
    """A TensorFlow tensor of a packer output (backend tensors eagerly)."""
    if isinstance(tensor, tf.Tensor):
        return tensor
    return tf.constant(keras.ops.convert_to_numpy(tensor))

"""Strings to next-token examples for a Reformer causal LM."""

import keras
import keras_hub

from keras_reformer.layers.validation import check_positive_int
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_tokenizer import ReformerTokenizer
from keras_reformer.models.transformers_presets import TransformersPresets

DEFAULT_SEQUENCE_LENGTH = 1024


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerCausalLMPreprocessor(TransformersPresets,
                                  keras_hub.models.CausalLMPreprocessor):
    """keras-hub's `CausalLMPreprocessor` for Reformer causal LMs.

    Tokenizes strings, pads them with the tokenizer's pad id to
    `sequence_length + 1` and returns `(x, y, sample_weight)`: `x` is
    `{"token_ids", "padding_mask"}` without the last position, `y` the ids
    shifted left by one and `sample_weight` the padding mask of `y`. Unlike
    keras-hub's default, no start or end token is added unless asked, as in
    `text_data.byte_preprocessor`. `generate_preprocess` and
    `generate_postprocess` turn prompts into ids and ids back into text.

    Args:
        tokenizer: a `ReformerTokenizer` or `ReformerSentencePieceTokenizer`.
        sequence_length: int, the length of `x`, `y` and `sample_weight`.
        add_start_token: bool, put the tokenizer's start token first.
        add_end_token: bool, put the tokenizer's end token last.

    Example:
    >>> preprocessor = ReformerCausalLMPreprocessor(
    ...     ReformerTokenizer(id_offset=2), sequence_length=4)
    >>> x, y, sample_weight = preprocessor(["abc"])
    >>> ops.convert_to_numpy(x["token_ids"])
    array([[ 99, 100, 101,   0]], dtype=int32)
    >>> ops.convert_to_numpy(y), ops.convert_to_numpy(sample_weight)
    (array([[100, 101,   0,   0]], dtype=int32), array([[ True,  True, False, False]]))
    >>> preprocessor.generate_postprocess(preprocessor.generate_preprocess(
    ...     ["hi"]))
    ['hi']
    """

    backbone_cls = ReformerBackbone
    tokenizer_cls = ReformerTokenizer

    def __init__(self, tokenizer, sequence_length=DEFAULT_SEQUENCE_LENGTH,
                 add_start_token=False, add_end_token=False, **kwargs):
        check_positive_int("sequence_length", sequence_length)
        for flag, name in ((add_start_token, "start_token"),
                           (add_end_token, "end_token")):
            if flag and getattr(tokenizer, f"{name}_id", None) is None:
                raise ValueError(
                    f"add_{name}=True needs a tokenizer whose {name}_id is "
                    f"set; received a {type(tokenizer).__name__} with "
                    f"{name}_id=None.")
        super().__init__(tokenizer, sequence_length=sequence_length,
                         add_start_token=add_start_token,
                         add_end_token=add_end_token, **kwargs)

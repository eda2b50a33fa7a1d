"""Masked language model on a bidirectional `ReformerBackbone`."""

import keras
import keras_hub
from keras import ops

from keras_reformer.layers.permute import take_rows
from keras_reformer.layers.token_id_check import checked_indices
from keras_reformer.layers.token_id_check import raise_unless
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_masked_lm_preprocessor import (
    ReformerMaskedLMPreprocessor)
from keras_reformer.models.reformer_task import ReformerTask


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerMaskedLM(ReformerTask, keras_hub.models.MaskedLM):
    """Masked language model: features at `mask_positions` -> token logits.

    Takes the backbone's inputs (`token_ids`, with the selected tokens
    replaced, and `padding_mask`) plus `mask_positions`, int
    `(batch, num_masked)`, and returns the logits of the original tokens
    there, `(batch, num_masked, vocabulary_size)`. Only the masked positions
    are projected onto the vocabulary, so a long sequence never holds
    `(length, vocabulary)` logits. `text_data.masked_lm_dataset` makes
    training examples from bytes; the pretrained `backbone` can then be put
    under a `ReformerClassifier`. A keras-hub `MaskedLM`: compiled on
    construction with its defaults, saved as a preset with
    `save_to_preset`.

    Args:
        backbone: a bidirectional (`causal=False`) `ReformerBackbone`.
        preprocessor: None, or a keras-hub masked-LM preprocessor for raw
            inputs.
        head_dtype: None (the backbone's dtype policy) or the head's own
            policy; `get_config` records it once `quantize` has made the
            head int8.

    Example:
    >>> from keras_reformer.models import ReformerBackbone
    >>> mlm = ReformerMaskedLM(ReformerBackbone(
    ...     vocabulary_size=257, hidden_dim=32, num_heads=2, head_dim=16,
    ...     intermediate_dim=64, axial_shape=(8, 16), causal=False,
    ...     attention_options={"lsh": {"chunk_length": 16,
    ...                                "num_chunks_after": 1}}))
    >>> logits = mlm({"token_ids": keras.ops.ones((2, 128), "int32"),
    ...               "padding_mask": keras.ops.ones((2, 128), "int32"),
    ...               "mask_positions": keras.ops.array([[0, 5], [7, 127]])})
    >>> tuple(logits.shape)
    (2, 2, 257)
    """

    backbone_cls = ReformerBackbone
    head_attribute = "mlm_head"
    preprocessor_cls = ReformerMaskedLMPreprocessor
    serving_inputs = ("token_ids", "padding_mask", "mask_positions")

    def __init__(self, backbone, preprocessor=None, head_dtype=None,
                 **kwargs):
        if backbone.causal:
            raise ValueError(
                "ReformerMaskedLM needs a bidirectional backbone; received "
                "a backbone with causal=True.")
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.gather_masked = GatherPositions(dtype=backbone.dtype_policy,
                                             name="gather_masked")
        self.mlm_head = keras.layers.Dense(
            backbone.vocabulary_size,
            dtype=self.head_policy(backbone, head_dtype),
            name="mlm_head")

        # === Functional Model ===
        inputs = dict(backbone.input)
        inputs["mask_positions"] = keras.Input(
            (None,), dtype="int32", name="mask_positions")
        features = backbone({"token_ids": inputs["token_ids"],
                             "padding_mask": inputs["padding_mask"]})
        logits = self.mlm_head(self.gather_masked(features,
                                                  inputs["mask_positions"]))
        super().__init__(inputs=inputs, outputs=logits, **kwargs)


@keras.saving.register_keras_serializable(package="keras_reformer")
class GatherPositions(keras.layers.Layer):
    """`features[b, positions[b, i]]`: `(batch, n, hidden)`.

    Positions outside `[0, length)` raise where the backend can and make
    their rows NaN under XLA (as `TokenIdCheck` does for token ids), never
    a silently clamped row. `positions` must have the batch size of
    `features` (it is not broadcast).
    """

    def call(self, features, positions):
        batches = (ops.shape(positions)[0], ops.shape(features)[0])
        message = "mask_positions must have the batch size of token_ids"
        if all(isinstance(batch, int) for batch in batches):
            if batches[0] != batches[1]:
                raise ValueError(
                    f"{message}; received a mask_positions batch of "
                    f"{batches[0]} and a token_ids batch of {batches[1]}.")
        else:
            positions = raise_unless(ops.equal(*batches), batches[0],
                                     message, positions)
        length = ops.shape(features)[1]
        positions, factor = checked_indices(
            positions, length,
            "mask_positions must be in [0, sequence length)",
            features.dtype)
        safe = ops.clip(positions, 0, length - 1)
        gathered = take_rows(features[:, None], safe[:, None])[:, 0]
        return gathered * factor

    def compute_output_shape(self, features_shape, positions_shape):
        return tuple(positions_shape) + (features_shape[-1],)

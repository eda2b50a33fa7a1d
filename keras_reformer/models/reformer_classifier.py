"""Sequence classifier on a bidirectional `ReformerBackbone`."""

import keras
from keras import ops

from keras_reformer.models.reformer_task import ReformerTask


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerClassifier(ReformerTask):
    """Sequence classifier: mean of the valid tokens' features -> logits.

    Args:
        backbone: a bidirectional (`causal=False`) `ReformerBackbone`.
        num_classes: int, number of classes.
        dropout: float, dropout before the classification layer.

    Example:
    >>> from keras_reformer.models import ReformerBackbone
    >>> classifier = ReformerClassifier(ReformerBackbone(
    ...     vocabulary_size=256, hidden_dim=32, num_heads=2, head_dim=16,
    ...     intermediate_dim=64, axial_shape=(8, 16), causal=False,
    ...     attention_options={"lsh": {"chunk_length": 16,
    ...                                "num_chunks_after": 1}}), num_classes=3)
    """

    def __init__(self, backbone, num_classes, dropout=0.0, **kwargs):
        if backbone.causal:
            raise ValueError(
                "ReformerClassifier needs a bidirectional backbone; received "
                "a backbone with causal=True.")
        inputs = backbone.input
        features = backbone(inputs)
        pooled = MaskedMeanPooling(name="pooling")(
            features, inputs["padding_mask"])
        pooled = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
        logits = keras.layers.Dense(num_classes, name="logits")(pooled)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout = dropout

    def get_config(self):
        return {**self.task_config(), "num_classes": self.num_classes,
                "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="keras_reformer")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean over the length axis of the positions where the mask is 1."""

    def call(self, inputs, padding_mask):
        weights = ops.cast(padding_mask, inputs.dtype)[..., None]
        total = ops.sum(inputs * weights, axis=1)
        return total / ops.maximum(ops.sum(weights, axis=1), 1.0)

    def compute_output_shape(self, inputs_shape, padding_mask_shape):
        return (inputs_shape[0], inputs_shape[-1])

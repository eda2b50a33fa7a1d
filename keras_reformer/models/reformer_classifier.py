"""Sequence classifier on a bidirectional `ReformerBackbone`."""

import keras
import keras_hub
from keras import ops

from keras_reformer.layers.philox_dropout import PhiloxDropout
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_task import ReformerTask


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerClassifier(ReformerTask, keras_hub.models.TextClassifier):
    """Sequence classifier: mean of the valid tokens' features -> logits.

    A keras-hub `TextClassifier`: compiled on construction with its
    defaults (Adam, sparse categorical cross-entropy, accuracy), saved as a
    preset with `save_to_preset`.

    Args:
        backbone: a bidirectional (`causal=False`) `ReformerBackbone`.
        num_classes: int, number of classes.
        preprocessor: None, or a keras-hub preprocessor for raw inputs.
        activation: None (logits) or an activation of the outputs, such as
            "softmax".
        dropout: float, dropout before the classification layer.
        head_dtype: None (the backbone's dtype policy) or the head's own
            policy; `get_config` records it once `quantize` has made the
            head int8.

    Example:
    >>> from keras_reformer.models import ReformerBackbone
    >>> classifier = ReformerClassifier(ReformerBackbone(
    ...     vocabulary_size=256, hidden_dim=32, num_heads=2, head_dim=16,
    ...     intermediate_dim=64, axial_shape=(8, 16), causal=False,
    ...     attention_options={"lsh": {"chunk_length": 16,
    ...                                "num_chunks_after": 1}}), num_classes=3)
    >>> ids = keras.ops.ones((2, 20), "int32")
    >>> classifier({"token_ids": ids, "padding_mask": ids}).shape
    TensorShape([2, 3])
    """

    backbone_cls = ReformerBackbone
    head_attribute = "output_dense"

    def __init__(self, backbone, num_classes, preprocessor=None,
                 activation=None, dropout=0.0, head_dtype=None,
                 **kwargs):
        if backbone.causal:
            raise ValueError(
                "ReformerClassifier needs a bidirectional backbone; received "
                "a backbone with causal=True.")
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.pooling = MaskedMeanPooling(dtype=backbone.dtype_policy,
                                         name="pooling")
        self.output_dropout = PhiloxDropout(
            dropout, dtype=backbone.dtype_policy, name="output_dropout")
        self.output_dense = keras.layers.Dense(
            num_classes, activation=activation,
            dtype=self.head_policy(backbone, head_dtype),
            name="logits")

        # === Functional Model ===
        inputs = backbone.input
        pooled = self.pooling(backbone(inputs), inputs["padding_mask"])
        outputs = self.output_dense(self.output_dropout(pooled))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.activation = keras.activations.get(activation)
        self.dropout = dropout

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_classes": self.num_classes,
            "activation": keras.activations.serialize(self.activation),
            "dropout": self.dropout,
        })
        return config


@keras.saving.register_keras_serializable(package="keras_reformer")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean over the length axis of the positions where the mask is 1."""

    def call(self, inputs, padding_mask):
        weights = ops.cast(padding_mask, inputs.dtype)[..., None]
        total = ops.sum(inputs * weights, axis=1)
        return total / ops.maximum(ops.sum(weights, axis=1), 1.0)

    def compute_output_shape(self, inputs_shape, padding_mask_shape):
        return (inputs_shape[0], inputs_shape[-1])

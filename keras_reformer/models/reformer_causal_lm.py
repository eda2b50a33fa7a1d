"""Causal language model on a `ReformerBackbone`."""

import keras

from keras_reformer.models.reformer_task import ReformerTask


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerCausalLM(ReformerTask):
    """Causal language model: backbone features -> next-token logits.

    Takes the backbone's inputs (`token_ids`, `padding_mask`) and returns
    logits `(batch, length, vocabulary_size)`.

    Args:
        backbone: a causal `ReformerBackbone`.

    Example:
    >>> lm = ReformerCausalLM(ReformerBackbone(vocabulary_size=256,
    ...     hidden_dim=32,
    ...     num_heads=2, head_dim=16, intermediate_dim=64,
    ...     axial_shape=(8, 16), chunk_length=16))
    >>> lm.compile(optimizer="adam", loss=keras.losses.
    ...     SparseCategoricalCrossentropy(from_logits=True))
    """

    def __init__(self, backbone, **kwargs):
        if not backbone.causal:
            raise ValueError(
                "ReformerCausalLM needs a causal backbone; received a backbone with "
                "causal=False.")
        inputs = backbone.input
        logits = keras.layers.Dense(backbone.vocabulary_size, name="lm_head")(
            backbone(inputs))
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.backbone = backbone

    def get_config(self):
        return self.task_config()

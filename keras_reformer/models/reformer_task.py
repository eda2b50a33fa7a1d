"""What every Reformer task adds to its keras-hub task class."""

import keras

from keras_reformer.models.token_inputs import TokenInputsMixin
from keras_reformer.models.transformers_presets import TransformersPresets


class ReformerTask(TransformersPresets, TokenInputsMixin):
    """Mixed in before a keras-hub task class (`CausalLM`, `MaskedLM`,
    `TextClassifier`): the input checks of `TokenInputsMixin`, a `.keras`
    file's compile state restored on loading (keras-hub's tasks override
    `compile`, so Keras would skip it), and what `export_for_serving`
    serves: `serving_inputs`, the names of the int32 inputs of the
    `serving_default` signature, and `serves_generation`, whether a
    `generate` signature is added; `from_preset` also reads Hugging Face
    Reformer directories (`TransformersPresets`)."""

    serving_inputs = ("token_ids", "padding_mask")
    serves_generation = False

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(dict(config)))
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

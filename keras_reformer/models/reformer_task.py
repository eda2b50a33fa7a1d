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
    Reformer directories (`TransformersPresets`).

    A task's own head (the Dense layer named by `head_attribute`) keeps its
    int8 quantization through `get_config` as `head_dtype`, as keras-hub's
    backbones keep their layers' (the task's constructor takes it)."""

    serving_inputs = ("token_ids", "padding_mask")
    serves_generation = False
    head_attribute = None

    @staticmethod
    def head_policy(backbone, head_dtype):
        """The head's dtype policy: `head_dtype` (a policy or its config,
        from `get_config`) or the backbone's."""
        if head_dtype is None:
            return backbone.dtype_policy
        return keras.dtype_policies.get(head_dtype)

    def get_config(self):
        config = super().get_config()
        head = getattr(self, self.head_attribute)
        if head.quantization_mode is not None:
            config["head_dtype"] = keras.dtype_policies.serialize(
                head.dtype_policy)
        return config

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(dict(config)))
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

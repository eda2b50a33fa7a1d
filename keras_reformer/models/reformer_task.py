"""What every Reformer task adds to its keras-hub task class."""

import keras

from keras_reformer.models.token_inputs import TokenInputsMixin


class ReformerTask(TokenInputsMixin):
    """Mixed in before a keras-hub task class (`CausalLM`, `MaskedLM`,
    `TextClassifier`): the input checks of `TokenInputsMixin`, and a
    `.keras` file's compile state restored on loading (keras-hub's tasks
    override `compile`, so Keras would skip it)."""

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(dict(config)))
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

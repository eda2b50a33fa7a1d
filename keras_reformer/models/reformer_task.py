"""Base of the task models: a functional model on a `ReformerBackbone`."""

import keras

from keras_reformer.models.token_inputs import TokenInputsMixin


class ReformerTask(TokenInputsMixin, keras.Model):
    """A functional model on top of a `ReformerBackbone`, which its config
    holds serialised (keras-hub's task pattern)."""

    def task_config(self):
        """The config entries every task has: name and backbone."""
        return {"name": self.name, "trainable": self.trainable,
                "backbone": keras.layers.serialize(self.backbone)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.layers.deserialize(config["backbone"])
        return cls(**config)

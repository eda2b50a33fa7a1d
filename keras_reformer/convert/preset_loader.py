"""keras-hub's preset loading for Hugging Face Reformer directories.

keras-hub picks the converter of a transformers directory from a fixed list
of `model_type`s, without "reformer" and without a way to add one, so the
Reformer classes' `from_preset` (`TransformersPresets`) asks
`reformer_preset_loader` first and hands every other preset to keras-hub.
"""

import math

import keras_hub
from keras_hub.src.utils.preset_utils import CONFIG_FILE
from keras_hub.src.utils.preset_utils import PresetLoader
from keras_hub.src.utils.preset_utils import check_file_exists
from keras_hub.src.utils.preset_utils import load_json

from keras_reformer.convert import huggingface
from keras_reformer.convert.checkpoint import CheckpointTensors
from keras_reformer.models import ReformerCausalLM
from keras_reformer.models import ReformerCausalLMPreprocessor
from keras_reformer.models.reformer_causal_lm_preprocessor import (
    DEFAULT_SEQUENCE_LENGTH)

LM_ARCHITECTURE = "ReformerModelWithLMHead"


def reformer_preset_loader(preset):
    """A `ReformerPresetLoader` if `preset`'s config.json is a transformers
    Reformer config (`model_type: "reformer"`), else None."""
    if not check_file_exists(preset, CONFIG_FILE):
        return None
    config = load_json(preset, CONFIG_FILE)
    if config.get("model_type") != "reformer":
        return None
    return ReformerPresetLoader(preset, config)


class ReformerPresetLoader(PresetLoader):
    """keras-hub's `PresetLoader` for a directory written by transformers'
    `save_pretrained` from a Reformer: config, weights and tokenizer
    through `keras_reformer.convert.huggingface`."""

    def load(self, cls, *args, **kwargs):
        """What `cls.from_preset(preset, *args, **kwargs)` returns for this
        directory; `args` is keras-hub's `load_weights` for backbones and
        tasks, its `config_file` (unused here) for tokenizers and
        preprocessors."""
        if issubclass(cls, (keras_hub.models.Backbone, keras_hub.models.Task)):
            load_weights = args[0] if args else kwargs.pop("load_weights",
                                                           True)
            if issubclass(cls, keras_hub.models.Backbone):
                return self.load_backbone(cls, load_weights, **kwargs)
            return self.load_task(cls, load_weights, True, **kwargs)
        kwargs.pop("config_file", None)
        if issubclass(cls, keras_hub.tokenizers.Tokenizer):
            return self.load_tokenizer(cls, **kwargs)
        return self.load_preprocessor(cls, **kwargs)

    def check_backbone_class(self):
        return huggingface.backbone_cls

    def load_backbone(self, cls, load_weights, **kwargs):
        backbone = cls(**{**huggingface.convert_backbone_config(self.config),
                          **kwargs})
        if load_weights:
            with CheckpointTensors.from_directory(self.preset) as tensors:
                huggingface.convert_weights(backbone, tensors, self.config)
        return backbone

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        architectures = self.config.get("architectures") or []
        if not issubclass(cls, ReformerCausalLM) or (
                LM_ARCHITECTURE not in architectures):
            raise ValueError(
                f"{self.preset} holds a Hugging Face {architectures}; only a "
                f"{LM_ARCHITECTURE} converts to a task (ReformerCausalLM), "
                f"not to a {cls.__name__}. Its backbone loads with "
                "ReformerBackbone.from_preset.")
        own_backbone = "backbone" not in kwargs
        task = super().load_task(cls, False, load_task_weights, **kwargs)
        if load_weights:
            with CheckpointTensors.from_directory(self.preset) as tensors:
                if own_backbone:
                    huggingface.convert_weights(task.backbone, tensors,
                                                self.config)
                huggingface.convert_head(task, tensors, self.config)
                if own_backbone:
                    huggingface.check_all_read(tensors)
        return task

    def load_tokenizer(self, cls, config_file=None, **kwargs):
        return huggingface.convert_tokenizer(cls, self.preset, self.config,
                                             **kwargs)

    def load_preprocessor(self, cls, config_file=None, **kwargs):
        """A `ReformerCausalLMPreprocessor` with the checkpoint's tokenizer
        and, unless given, `sequence_length` the default or the model's
        maximum length if shorter."""
        if not issubclass(cls, ReformerCausalLMPreprocessor):
            raise ValueError(
                f"A Hugging Face Reformer directory converts to a "
                f"ReformerCausalLMPreprocessor, not to a {cls.__name__}.")
        if "tokenizer" not in kwargs:
            kwargs["tokenizer"] = self.load_tokenizer(
                keras_hub.tokenizers.Tokenizer)
        if "sequence_length" not in kwargs:
            kwargs["sequence_length"] = min(
                DEFAULT_SEQUENCE_LENGTH,
                math.prod(self.config["axial_pos_shape"]))
        return cls(**kwargs)

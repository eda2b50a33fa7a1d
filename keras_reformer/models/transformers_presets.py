"""`from_preset` that also reads Hugging Face Reformer directories."""


class TransformersPresets:
    """Mixed in before a keras-hub class (backbone, task, tokenizer,
    preprocessor): `from_preset(path)` of a directory written by
    transformers' `save_pretrained` from a Reformer (config.json with
    `model_type: "reformer"`) converts its config, weights and tokenizer
    (see `keras_reformer.convert.preset_loader`); every other preset
    loads as keras-hub loads it."""

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """keras-hub's `from_preset`; a Hugging Face Reformer directory
        converts on the way in (docs/huggingface.md)."""
        # Imported here: the converter imports the models.
        from keras_reformer.convert.preset_loader import reformer_preset_loader

        loader = reformer_preset_loader(preset)
        if loader is None:
            return super().from_preset(preset, *args, **kwargs)
        return loader.load(cls, *args, **kwargs)

"""Tokenizers of the Reformer family: UTF-8 bytes and SentencePiece."""

import keras
import keras_hub
import numpy as np

from keras_reformer.layers.validation import check_non_negative_int
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.transformers_presets import TransformersPresets
from keras_reformer.optional_tensorflow import tf

NUM_BYTES = 256
# Special tokens: the attribute keras-hub reads and the token's text.
_SPECIAL_TOKENS = {"start_token": "<s>", "end_token": "</s>",
                   "pad_token": "<pad>", "mask_token": "<mask>"}


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerTokenizer(TransformersPresets,
                        keras_hub.tokenizers.ByteTokenizer):
    """UTF-8 bytes as token ids `byte + id_offset`, with special ids.

    Ids below `id_offset` are reserved (google/reformer-enwik8 uses
    `id_offset=2`: 0 pads and 1 is unused), the next 256 ids are the
    bytes, and special ids may follow; `vocabulary_size()` is
    `256 + id_offset`, or one past the largest special id. `detokenize`
    drops every id that is not a byte, the pad id and NUL bytes (as
    keras-hub's `ByteTokenizer`, which pads with NUL). Tokenizes inside
    `tf.data` and eagerly.

    Args:
        id_offset: int >= 0, the id of byte 0.
        pad_token_id: int, the id that pads packed sequences. The default
            0 is the NUL byte when `id_offset=0`, as in keras-hub's
            `ByteTokenizer`.
        start_token_id: None or int, a start-of-text id, outside the bytes.
        end_token_id: None or int, an end-of-text id, outside the bytes.
        mask_token_id: None or int, the masked LM's mask id, outside the
            bytes (`text_data.MASK_TOKEN_ID` for `id_offset=0`).
        lowercase: bool, lowercase text before tokenizing.
        **kwargs: `ByteTokenizer`'s `normalization_form`, `errors`,
            `replacement_char`, `dtype` and layer arguments.

    Example:
    >>> tokenizer = ReformerTokenizer(id_offset=2)
    >>> tokenizer("hé")
    array([106, 197, 171], dtype=int32)
    >>> tokenizer.detokenize([106, 197, 171, 0])
    'hé'
    >>> ReformerTokenizer(mask_token_id=256).vocabulary_size()
    257
    """

    backbone_cls = ReformerBackbone

    def __init__(self, id_offset=0, pad_token_id=0, start_token_id=None,
                 end_token_id=None, mask_token_id=None, lowercase=False,
                 sequence_length=None, **kwargs):
        check_non_negative_int("id_offset", id_offset)
        if sequence_length is not None:
            raise ValueError(
                "ReformerTokenizer does not pad; received sequence_length="
                f"{sequence_length!r}. Pad with a preprocessor's "
                "sequence_length (ReformerCausalLMPreprocessor, "
                "ReformerMaskedLMPreprocessor).")
        special_ids = {"start_token": start_token_id,
                       "end_token": end_token_id,
                       "pad_token": pad_token_id,
                       "mask_token": mask_token_id}
        _check_special_ids(special_ids, id_offset)
        super().__init__(lowercase=lowercase, **kwargs)
        self.id_offset = id_offset
        self._special_token_attrs = [
            name for name, id in special_ids.items() if id is not None]
        for name, id in special_ids.items():
            setattr(self, f"{name}_id", id)
        for name, id in special_ids.items():
            setattr(self, name, None if id is None else self.id_to_token(id))

    def vocabulary_size(self):
        """The number of token ids: bytes, reserved and special ids."""
        return max(self.id_offset + NUM_BYTES, *(
            id + 1 for id in self.special_token_ids))

    def get_vocabulary(self):
        """Every id's token (see `id_to_token`), in id order."""
        return [self.id_to_token(id) for id in range(self.vocabulary_size())]

    def id_to_token(self, id):
        """A byte's id -> `chr(byte)`; a special id -> "<s>", "</s>",
        "<pad>" or "<mask>"; any other id -> "<unused{id}>"."""
        if not 0 <= id < self.vocabulary_size():
            raise ValueError(
                f"id must be in [0, {self.vocabulary_size()}); received "
                f"id={id!r}.")
        if 0 <= id - self.id_offset < NUM_BYTES:
            return chr(id - self.id_offset)
        for name in self._special_token_attrs:
            if getattr(self, f"{name}_id") == id:
                return _SPECIAL_TOKENS[name]
        return f"<unused{id}>"

    def token_to_id(self, token):
        """The id whose `id_to_token` is `token`."""
        vocabulary = self.get_vocabulary()
        if token not in vocabulary:
            raise ValueError(
                f"token {token!r} is not in the vocabulary; tokens are "
                "single characters (bytes), <unused{id}> and the special "
                f"tokens {self.special_tokens}.")
        return vocabulary.index(token)

    def tokenize(self, inputs):
        """Strings -> int ids `byte + id_offset` (ragged for a batch)."""
        offset = self.id_offset
        tokens = super().tokenize(inputs)
        if isinstance(tokens, (tf.Tensor, tf.RaggedTensor)):
            return tokens + offset
        return keras.tree.map_structure(lambda ids: ids + offset, tokens)

    def detokenize(self, inputs):
        """Ids -> strings, dropping ids that are not bytes (see above)."""
        offset, pad = self.id_offset, self.pad_token_id

        def as_bytes(ids, module):
            keep = (ids >= offset) & (ids < offset + NUM_BYTES) & (ids != pad)
            return module.where(keep, ids - offset, 0)

        if isinstance(inputs, (tf.Tensor, tf.RaggedTensor)):
            ids = tf.ragged.map_flat_values(lambda v: as_bytes(v, tf), inputs)
        else:
            ids = keras.tree.map_structure(
                lambda leaf: as_bytes(np.asarray(leaf), np).tolist(), inputs)
        return super().detokenize(ids)

    def save_assets(self, dir_path):
        """No files to save: the vocabulary is the bytes."""

    def load_preset_assets(self, preset):
        """No files to load: the vocabulary is the bytes."""

    def get_config(self):
        config = super().get_config()
        config.update({
            "id_offset": self.id_offset,
            "pad_token_id": self.pad_token_id,
            "start_token_id": self.start_token_id,
            "end_token_id": self.end_token_id,
            "mask_token_id": self.mask_token_id,
        })
        return config


def _check_special_ids(special_ids, id_offset):
    """Special ids are ints >= 0, distinct, and (but for the pad id) not
    byte ids."""
    given = {name: id for name, id in special_ids.items() if id is not None}
    for name, id in given.items():
        check_non_negative_int(f"{name}_id", id)
        if name != "pad_token" and 0 <= id - id_offset < NUM_BYTES:
            raise ValueError(
                f"{name}_id must not be a byte id, in [{id_offset}, "
                f"{id_offset + NUM_BYTES}) for id_offset={id_offset}; "
                f"received {name}_id={id}. Use an id below id_offset or "
                f"from {id_offset + NUM_BYTES} on.")
    if len(set(given.values())) < len(given):
        raise ValueError(
            "The special token ids must differ from each other; received "
            + ", ".join(f"{name}_id={id}" for name, id in given.items()) + ".")


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerSentencePieceTokenizer(
        TransformersPresets, keras_hub.tokenizers.SentencePieceTokenizer):
    """keras-hub's `SentencePieceTokenizer` for Reformer checkpoints.

    For SentencePiece checkpoints such as google/reformer-crime-and-punishment
    (320 pieces): "</s>" ends text and id 0 pads, as in Hugging Face's
    Reformer; there is no start token.

    Args:
        proto: the SentencePiece model, as a file path or serialized bytes.
        **kwargs: `SentencePieceTokenizer`'s other arguments.

    Example:
    >>> import io, sentencepiece
    >>> model = io.BytesIO()
    >>> sentencepiece.SentencePieceTrainer.train(
    ...     sentence_iterator=iter(["the quick brown fox"] * 50),
    ...     model_writer=model, vocab_size=20, minloglevel=3)
    >>> tokenizer = ReformerSentencePieceTokenizer(model.getvalue())
    >>> tokenizer.detokenize(tokenizer("the fox"))
    'the fox'
    >>> tokenizer.end_token_id, tokenizer.pad_token_id
    (2, 0)
    """

    backbone_cls = ReformerBackbone

    def __init__(self, proto, **kwargs):
        self._add_special_token("</s>", "end_token")
        self.start_token_id = None
        self.pad_token_id = 0
        super().__init__(proto=proto, **kwargs)

"""keras-hub citizenship: presets with their tokenizer, `fit` on strings,
`generate` on a dataset, `from_preset` through keras-hub's base classes."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer import text_data
from keras_reformer.export import save_preset
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM
from keras_reformer.models import ReformerClassifier
from keras_reformer.models import ReformerMaskedLM
from keras_reformer.models import ReformerMaskedLMPreprocessor
from keras_reformer.models import ReformerTokenizer
from tests.helpers import assert_close

TEXTS = ["def f(x):\n    return x", "import os", "class A:\n    pass"]


def backbone(causal=True, vocabulary_size=256):
    keras.utils.set_random_seed(1)
    after = 0 if causal else 1
    return ReformerBackbone(
        vocabulary_size=vocabulary_size, hidden_dim=16, num_heads=2,
        head_dim=8, intermediate_dim=32, attention_types=["lsh", "local"],
        axial_shape=(4, 8), causal=causal, seed=1, attention_options={
            "lsh": {"chunk_length": 8, "num_hashes": 2,
                    "num_chunks_after": after},
            "local": {"chunk_length": 8, "num_chunks_after": after}})


def test_a_trained_lm_round_trips_through_a_preset_with_its_tokenizer(
        tmp_path):
    lm = ReformerCausalLM(backbone(),
                          preprocessor=text_data.byte_preprocessor(32))
    lm.compile(optimizer=keras.optimizers.Adam(0.01), sampler="greedy")
    history = lm.fit(TEXTS * 4, batch_size=4, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    lm.save_to_preset(str(tmp_path))
    for loaded in (ReformerCausalLM.from_preset(str(tmp_path)),
                   keras_hub.models.CausalLM.from_preset(str(tmp_path))):
        assert isinstance(loaded, ReformerCausalLM)
        assert isinstance(loaded.preprocessor.tokenizer, ReformerTokenizer)
        assert_close(loaded.predict(TEXTS, verbose=0),
                     lm.predict(TEXTS, verbose=0), atol=0)
        loaded.compile(sampler="greedy")
        assert loaded.generate("def ", max_length=16) == lm.generate(
            "def ", max_length=16)
    backbone_only = keras_hub.models.Backbone.from_preset(str(tmp_path))
    assert backbone_only.get_config() == lm.backbone.get_config()


def test_generate_on_a_dataset_equals_generate_on_its_batches():
    lm = ReformerCausalLM(backbone(),
                          preprocessor=text_data.byte_preprocessor(32))
    lm.compile(sampler="greedy")
    prompts = ["de", "im", "cl", "re"]
    dataset = tf.data.Dataset.from_tensor_slices(prompts).batch(2)
    assert lm.generate(dataset, max_length=12) == lm.generate(
        prompts, max_length=12)


def test_masked_lm_and_classifier_presets_round_trip(tmp_path):
    tokenizer = ReformerTokenizer(mask_token_id=text_data.MASK_TOKEN_ID)
    mlm = ReformerMaskedLM(
        backbone(causal=False,
                 vocabulary_size=text_data.MASKED_LM_VOCABULARY_SIZE),
        preprocessor=ReformerMaskedLMPreprocessor(tokenizer,
                                                  sequence_length=32))
    mlm.fit(TEXTS * 4, batch_size=4, epochs=1, verbose=0)
    mlm.save_to_preset(str(tmp_path / "mlm"))
    loaded = keras_hub.models.MaskedLM.from_preset(str(tmp_path / "mlm"))
    assert isinstance(loaded, ReformerMaskedLM)
    ids = np.random.RandomState(0).randint(0, 256, (2, 32)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids),
         "mask_positions": np.array([[1, 5], [0, 31]], "int32")}
    assert_close(loaded(x), mlm(x), atol=0)
    classifier = ReformerClassifier(loaded.backbone, num_classes=3)
    classifier.save_to_preset(str(tmp_path / "classifier"))
    again = keras_hub.models.TextClassifier.from_preset(
        str(tmp_path / "classifier"))
    assert isinstance(again, ReformerClassifier) and again.num_classes == 3
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    assert_close(again(x), classifier(x), atol=0)


def test_save_preset_needs_a_tokenizer_and_keeps_foreign_directories(
        tmp_path):
    lm = ReformerCausalLM(backbone())
    with pytest.raises(ValueError, match="needs a task with a preprocessor"):
        save_preset(lm, str(tmp_path / "preset"))
    lm.preprocessor = text_data.byte_preprocessor(32)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no config.json"):
        save_preset(lm, str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    path = save_preset(lm, str(tmp_path / "preset"))
    assert save_preset(lm, path) == path  # a preset is replaced

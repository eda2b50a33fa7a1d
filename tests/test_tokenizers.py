"""ReformerTokenizer, ReformerSentencePieceTokenizer and the preprocessors:
ids against Python's own bytes, SentencePiece's own ids and numpy
references; masking shares within binomial tolerance; configs and presets."""

import io
import math

import keras
import keras_hub
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf

import keras_reformer  # noqa: F401 (registers the classes for presets)
from keras_reformer import text_data
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLMPreprocessor
from keras_reformer.models import ReformerMaskedLMPreprocessor
from keras_reformer.models import ReformerSentencePieceTokenizer
from keras_reformer.models import ReformerTokenizer

TEXTS = ["hello, world", "naïve café — 日本語 🙂", "", "tab\tand\nnewline"]


def _numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _in_tf_data(function, texts):
    """`function` mapped over a batch of `texts` inside tf.data."""
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(len(texts))
    return next(iter(dataset.map(function)))


@pytest.mark.parametrize("offset", [0, 2])
def test_ids_are_utf8_bytes_plus_offset_and_round_trip(offset):
    tokenizer = ReformerTokenizer(id_offset=offset)
    expected = [[b + offset for b in text.encode()] for text in TEXTS]
    assert tokenizer(TEXTS) == expected
    assert _in_tf_data(tokenizer, TEXTS).to_list() == expected
    assert _numpy(tokenizer(TEXTS[1])).tolist() == expected[1]
    assert tokenizer.detokenize(expected) == TEXTS
    detokenized = _in_tf_data(
        lambda texts: tokenizer.detokenize(tokenizer(texts)), TEXTS)
    assert [t.decode() for t in detokenized.numpy()] == TEXTS
    assert tokenizer.vocabulary_size() == 256 + offset


def test_detokenize_drops_padding_reserved_and_special_ids():
    tokenizer = ReformerTokenizer(id_offset=2, end_token_id=258,
                                  mask_token_id=259)
    ids = [[0, 106, 1, 107, 258, 259], [106, 0, 0, 0, 0, 0]]
    assert tokenizer.detokenize(ids) == ["hi", "h"]
    assert tokenizer.detokenize(np.array(ids)) == ["hi", "h"]
    assert tokenizer.vocabulary_size() == 260
    assert sorted(tokenizer.special_token_ids) == [0, 258, 259]
    assert [tokenizer.id_to_token(i) for i in (0, 1, 2, 258, 259)] == [
        "<pad>", "<unused1>", "\x00", "</s>", "<mask>"]
    assert tokenizer.token_to_id("<mask>") == 259


@pytest.mark.parametrize("arguments, message", [
    ({"id_offset": -1}, "id_offset=-1"),
    ({"mask_token_id": 100}, "mask_token_id=100"),
    ({"id_offset": 2, "end_token_id": 257}, "end_token_id=257"),
    ({"id_offset": 2, "mask_token_id": 0}, "pad_token_id=0, mask_token_id=0"),
    ({"sequence_length": 8}, "sequence_length=8"),
])
def test_tokenizer_errors_name_the_argument_and_value(arguments, message):
    with pytest.raises(ValueError, match=message):
        ReformerTokenizer(**arguments)


def _causal_lm_reference(texts, offset, length):
    """numpy: ids `byte + offset` padded with 0 to `length + 1`, then x
    drops the last position and y the first."""
    ids = np.zeros((len(texts), length + 1), np.int32)
    for row, text in enumerate(texts):
        data = np.frombuffer(text.encode(), np.uint8)[:length + 1]
        ids[row, :len(data)] = data.astype(np.int32) + offset
    mask = np.zeros_like(ids, bool)
    for row, text in enumerate(texts):
        mask[row, :len(text.encode())] = True
    return ids[:, :-1], mask[:, :-1], ids[:, 1:], mask[:, 1:]


@pytest.mark.parametrize("offset", [0, 2])
def test_causal_lm_preprocessor_matches_numpy(offset):
    length = 12  # TEXTS[1] is longer: truncated
    preprocessor = ReformerCausalLMPreprocessor(
        ReformerTokenizer(id_offset=offset), sequence_length=length)
    ids, mask, y, weight = _causal_lm_reference(TEXTS, offset, length)
    for x_, y_, weight_ in (preprocessor(TEXTS),
                            _in_tf_data(preprocessor, TEXTS)):
        np.testing.assert_array_equal(_numpy(x_["token_ids"]), ids)
        np.testing.assert_array_equal(_numpy(x_["padding_mask"]), mask)
        np.testing.assert_array_equal(_numpy(y_), y)
        np.testing.assert_array_equal(_numpy(weight_), weight)
    if offset == 0:
        today = text_data.byte_preprocessor(length)(TEXTS)
        for ours, theirs in zip(keras.tree.flatten(preprocessor(TEXTS)),
                                keras.tree.flatten(today)):
            np.testing.assert_array_equal(_numpy(ours), _numpy(theirs))


def test_causal_lm_generate_round_trip_and_end_token():
    preprocessor = ReformerCausalLMPreprocessor(
        ReformerTokenizer(id_offset=2, end_token_id=258),
        sequence_length=40, add_end_token=True)
    prompts = preprocessor.generate_preprocess(TEXTS[:2])
    np.testing.assert_array_equal(
        _numpy(prompts["token_ids"])[0, :13],
        [b + 2 for b in b"hello, world"] + [0])
    assert preprocessor.generate_postprocess(prompts) == TEXTS[:2]
    x, _, _ = preprocessor(["ab"])
    assert _numpy(x["token_ids"])[0, :4].tolist() == [99, 100, 258, 0]
    with pytest.raises(ValueError, match="add_start_token=True"):
        ReformerCausalLMPreprocessor(ReformerTokenizer(), add_start_token=True)


def test_masked_lm_preprocessor_shares_padding_and_labels():
    rate, length = 0.15, 64
    preprocessor = ReformerMaskedLMPreprocessor(
        ReformerTokenizer(mask_token_id=text_data.MASK_TOKEN_ID),
        sequence_length=length, mask_selection_rate=rate)
    corpus = text_data.stdlib_corpus(max_bytes=40_000).decode("utf-8",
                                                              "replace")
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(corpus) - length, 400)
    texts = [corpus[s:s + int(rng.integers(8, length + 8))] for s in starts]
    x, labels, weights = _in_tf_data(preprocessor, texts)
    ids = np.array([(list(t.encode()) + [0] * length)[:length]
                    for t in texts], np.int32)
    sizes = np.minimum([len(t.encode()) for t in texts], length)
    token_ids, padding_mask, positions, labels, weights = (
        _numpy(t) for t in (x["token_ids"], x["padding_mask"],
                            x["mask_positions"], labels, weights))
    np.testing.assert_array_equal(padding_mask,
                                  np.arange(length) < sizes[:, None])
    used = weights == 1
    counts = np.maximum(1, np.round(rate * sizes).astype(int))
    np.testing.assert_array_equal(used.sum(-1), counts)
    rows = np.nonzero(used)[0]
    chosen = positions[used]
    assert (chosen < sizes[rows]).all()  # never padding
    assert all(len(set(p[u])) == u.sum() for p, u in zip(positions, used))
    np.testing.assert_array_equal(labels[used], ids[rows, chosen])
    np.testing.assert_array_equal(labels[~used], 0)
    unselected = np.ones_like(ids, bool)
    unselected[rows, chosen] = False
    np.testing.assert_array_equal(token_ids[unselected], ids[unselected])
    replaced = token_ids[rows, chosen]
    n = len(chosen)
    assert n > 2000
    shares = {
        "mask": (np.mean(replaced == text_data.MASK_TOKEN_ID), 0.8),
        "kept": (np.mean(replaced == labels[used]), 0.1 + 0.1 / 256),
        "random": (np.mean((replaced != text_data.MASK_TOKEN_ID)
                           & (replaced != labels[used])), 0.1 * 255 / 256),
    }
    for name, (share, p) in shares.items():
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), name
    assert replaced.max() <= 256


def test_masked_lm_preprocessor_random_ids_are_bytes_past_the_offset():
    preprocessor = ReformerMaskedLMPreprocessor(
        ReformerTokenizer(id_offset=2, mask_token_id=258),
        sequence_length=32, mask_selection_rate=0.5, mask_token_rate=0.0,
        random_token_rate=1.0)
    x, _, weights = preprocessor(["z" * 32] * 64)
    replaced = _numpy(x["token_ids"])[_numpy(x["padding_mask"])]
    assert replaced.min() >= 2 and replaced.max() < 258
    assert _numpy(weights).sum() == 64 * 16


def test_masked_lm_preprocessor_errors():
    with pytest.raises(ValueError, match="mask_token_id=None"):
        ReformerMaskedLMPreprocessor(ReformerTokenizer())
    with pytest.raises(ValueError, match="mask_selection_rate=1.5"):
        ReformerMaskedLMPreprocessor(ReformerTokenizer(mask_token_id=256),
                                     mask_selection_rate=1.5)
    with pytest.raises(ValueError, match="random_token_rate=0.3"):
        ReformerMaskedLMPreprocessor(ReformerTokenizer(mask_token_id=256),
                                     mask_token_rate=0.8,
                                     random_token_rate=0.3)


@pytest.fixture(scope="module")
def sentence_piece_proto():
    lines = text_data.stdlib_corpus(max_bytes=60_000).decode(
        "utf-8", "replace").splitlines()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=320,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=3)
    return model.getvalue(), lines


def test_sentence_piece_matches_sentencepiece(sentence_piece_proto):
    proto, lines = sentence_piece_proto
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tokenizer = ReformerSentencePieceTokenizer(proto)
    texts = [line for line in lines[200:260] if line.strip()]
    expected = processor.encode(texts)
    assert tokenizer.vocabulary_size() == 320
    assert _numpy(tokenizer(texts[0])).tolist() == expected[0]
    assert _in_tf_data(tokenizer, texts).to_list() == expected
    assert tokenizer.detokenize(expected) == texts
    assert (tokenizer.end_token_id, tokenizer.pad_token_id) == (
        processor.piece_to_id("</s>"), 0)


def _assert_same_tokenizer(restored, tokenizer, texts):
    assert type(restored) is type(tokenizer)
    assert restored.get_config() == tokenizer.get_config()
    assert _in_tf_data(restored, texts).to_list() == _in_tf_data(
        tokenizer, texts).to_list()


def test_configs_and_presets_round_trip(tmp_path, sentence_piece_proto):
    backbone = ReformerBackbone(
        vocabulary_size=260, hidden_dim=8, num_heads=1, head_dim=4,
        intermediate_dim=8, attention_types=["full"], axial_shape=(2, 4))
    byte_tokenizer = ReformerTokenizer(id_offset=2, end_token_id=258,
                                       mask_token_id=259)
    piece_tokenizer = ReformerSentencePieceTokenizer(sentence_piece_proto[0])
    _assert_same_tokenizer(
        ReformerTokenizer.from_config(byte_tokenizer.get_config()),
        byte_tokenizer, TEXTS)
    # A SentencePiece config holds no proto (keras-hub saves it as an
    # asset), so it round-trips through a preset.
    for name, tokenizer in (("bytes", byte_tokenizer),
                            ("pieces", piece_tokenizer)):
        preset = str(tmp_path / name)
        backbone.save_to_preset(preset)
        tokenizer.save_to_preset(preset)
        _assert_same_tokenizer(
            keras_hub.tokenizers.Tokenizer.from_preset(preset), tokenizer,
            TEXTS)
    for preprocessor in (
            ReformerCausalLMPreprocessor(byte_tokenizer, sequence_length=8),
            ReformerMaskedLMPreprocessor(byte_tokenizer, sequence_length=8)):
        restored = keras.layers.deserialize(
            keras.layers.serialize(preprocessor))
        assert type(restored) is type(preprocessor)
        assert restored.get_config() == preprocessor.get_config()
        preset = str(tmp_path / type(preprocessor).__name__)
        backbone.save_to_preset(preset)
        preprocessor.save_to_preset(preset)
        loaded = type(preprocessor).from_preset(preset)
        assert loaded.get_config() == preprocessor.get_config()

"""The embedded corpus, file and tfds sources, and the tf.data pipeline."""

import os
import sysconfig
import time

import numpy as np
import pytest

from keras_reformer import text_data


def test_stdlib_corpus_is_deterministic_stdlib_source():
    corpus = text_data.stdlib_corpus(max_bytes=200_000)
    assert isinstance(corpus, bytes)
    assert len(corpus) == 200_000
    assert corpus == text_data.stdlib_corpus(max_bytes=200_000)
    # It starts with the first file in sorted order, read from the stdlib.
    root = sysconfig.get_paths()["stdlib"]
    first = min(name for name in os.listdir(root) if name.endswith(".py"))
    with open(os.path.join(root, first), "rb") as f:
        assert corpus.startswith(f.read())
    assert b"def " in corpus and b"import " in corpus
    # A smaller corpus is a prefix of a larger one.
    assert text_data.stdlib_corpus(max_bytes=1000) == corpus[:1000]


def test_stdlib_corpus_rejects_bad_max_bytes():
    with pytest.raises(ValueError, match="max_bytes=0"):
        text_data.stdlib_corpus(max_bytes=0)


def test_read_text_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"first")
    b.write_bytes(b"second\xff")
    assert text_data.read_text_files([a, b]) == b"first\nsecond\xff"
    assert text_data.read_text_files([a, b], max_bytes=3) == b"fir"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_data.read_text_files([a, tmp_path / "missing.txt"])


def test_tfds_text_reports_a_dataset_it_cannot_load(tmp_path):
    with pytest.raises(RuntimeError, match="no_such_dataset_xyz"):
        text_data.tfds_text("no_such_dataset_xyz", data_dir=str(tmp_path))


def test_tfds_text_without_download_fails_at_once_on_an_unprepared_dataset(
        tmp_path):
    start = time.time()
    with pytest.raises(RuntimeError, match="download=False reads only"):
        text_data.tfds_text("tiny_shakespeare", data_dir=str(tmp_path),
                            download=False)
    assert time.time() - start < 30  # a download would retry for minutes


def test_tfds_text_reads_the_text_feature():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=3):
        text = text_data.tfds_text("tiny_shakespeare", split="train")
    assert isinstance(text, bytes) and text.count(b"\n") >= 2


def test_split_corpus_holds_out_the_end():
    data = bytes(range(256)) * 4
    train, held_out = text_data.split_corpus(data, 0.05)
    assert train + held_out == data
    assert len(held_out) == round(0.05 * len(data))
    with pytest.raises(ValueError, match="held_out_fraction=1.5"):
        text_data.split_corpus(data, 1.5)


def test_dataset_shapes_and_next_byte_targets():
    data = text_data.stdlib_corpus(max_bytes=20_000)
    length, batch = 64, 8
    dataset = text_data.language_model_dataset(data, length, batch)
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == text_data.num_windows(data, length) // batch
    raw = np.frombuffer(data, np.uint8).astype("int32")
    for i, (x, y) in enumerate(batches[:3]):
        ids, mask = x["token_ids"], x["padding_mask"]
        assert ids.shape == mask.shape == y.shape == (batch, length)
        assert ids.dtype == y.dtype == mask.dtype == np.int32
        assert (mask == 1).all()
        for row in range(batch):
            start = (i * batch + row) * length
            np.testing.assert_array_equal(ids[row], raw[start:start + length])
            np.testing.assert_array_equal(
                y[row], raw[start + 1:start + length + 1])
        # The targets are the inputs shifted by one.
        np.testing.assert_array_equal(y[:, :-1], ids[:, 1:])


def test_shuffled_dataset_is_seeded_and_static():
    data = text_data.stdlib_corpus(max_bytes=20_000)
    first = [x["token_ids"] for x, _ in text_data.language_model_dataset(
        data, 32, 4, shuffle=True, seed=3).take(3).as_numpy_iterator()]
    again = [x["token_ids"] for x, _ in text_data.language_model_dataset(
        data, 32, 4, shuffle=True, seed=3).take(3).as_numpy_iterator()]
    plain = [x["token_ids"] for x, _ in text_data.language_model_dataset(
        data, 32, 4).take(3).as_numpy_iterator()]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, plain)
    spec = text_data.language_model_dataset(data, 32, 4).element_spec
    assert spec[0]["token_ids"].shape == (4, 32) and spec[1].shape == (4, 32)


def test_dataset_without_drop_remainder_scores_every_window():
    data = bytes(range(256)) * 3  # 767 targets: 5 windows of 128, 1 short
    batches = list(text_data.language_model_dataset(
        data, 128, 2, drop_remainder=False).as_numpy_iterator())
    assert [y.shape for _, y in batches] == [(2, 128), (2, 128), (1, 128)]
    targets = np.concatenate([y.ravel() for _, y in batches])
    np.testing.assert_array_equal(targets, np.frombuffer(data[1:641], "uint8"))
    with pytest.raises(ValueError, match="drop_remainder=False"):
        text_data.language_model_dataset(b"x" * 100, 128, 2,
                                         drop_remainder=False)


def test_dataset_rejects_too_little_text():
    with pytest.raises(ValueError, match="batch_size=8"):
        text_data.language_model_dataset(b"x" * 100, 32, 8)
    with pytest.raises(ValueError, match="sequence_length=0"):
        text_data.language_model_dataset(b"x" * 100, 0, 1)


def test_detokenize_round_trips_utf8():
    text = "héllo → wörld"
    assert text_data.detokenize(text.encode("utf-8")) == text
    assert text_data.detokenize([104, 105]) == "hi"


def test_as_text_takes_every_form_detokenize_returns():
    import tensorflow as tf

    assert text_data.as_text("h\u00e9") == "h\u00e9"
    assert text_data.as_text(b"h\xc3\xa9") == "h\u00e9"
    assert text_data.as_text(tf.constant(b"a\xffb")) == "a\ufffdb"

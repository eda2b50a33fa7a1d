"""Byte-level text corpora and the tf.data pipeline for language modelling.

Three sources of text, all returned as raw `bytes`:

- `stdlib_corpus()`: the installed Python standard library's own `.py`
  sources (always on the machine, nothing is downloaded);
- `read_text_files(paths)`: the user's own files;
- `tfds_text(name)`: a tensorflow-datasets dataset that is already prepared
  on this machine (for example "tiny_shakespeare").

`split_corpus` holds out the end of a corpus, and `language_model_dataset`
cuts bytes into windows, tokenises them with keras-hub's `ByteTokenizer`
inside tf.data and yields `({"token_ids", "padding_mask"}, next_bytes)`.
"""

import os
import sysconfig

import keras
import numpy as np

from keras_reformer.bert_masking import mask_tokens
from keras_reformer.layers.validation import check_positive_int
from keras_reformer.models.reformer_causal_lm_preprocessor import (
    ReformerCausalLMPreprocessor)
from keras_reformer.models.reformer_tokenizer import ReformerTokenizer
from keras_reformer.optional_tensorflow import tf

# Directories of the standard library that are not hand-written library
# source: its test suites (large, repetitive, some deliberately malformed
# files), `encodings` (mostly generated code-page tables, 1.4 MB of nearly
# identical lines that would make held-out text look easy) and the
# third-party packages installed next to it.
_SKIPPED_DIRS = frozenset({
    "test", "tests", "idle_test", "encodings", "site-packages",
    "dist-packages", "__pycache__",
})

DEFAULT_MAX_CORPUS_BYTES = 4_000_000
# Byte-level: one token id per byte value.
VOCABULARY_SIZE = 256
# `masked_lm_dataset`'s mask token: one id past the bytes.
MASK_TOKEN_ID = VOCABULARY_SIZE
MASKED_LM_VOCABULARY_SIZE = VOCABULARY_SIZE + 1


def stdlib_corpus(max_bytes=DEFAULT_MAX_CORPUS_BYTES):
    """The Python standard library's `.py` sources, concatenated.

    Files are read in sorted order of their path relative to the standard
    library directory (`sysconfig.get_paths()["stdlib"]`), skipping test
    directories, the generated `encodings` tables and installed third-party
    packages, and joined with newlines; the result is cut to `max_bytes`.
    The same Python installation always gives the same bytes.

    Args:
        max_bytes: int, the most bytes to return; None for all of them
            (about 10.7 MB on CPython 3.11).

    Returns:
        `bytes`, non-empty.

    Example:
    >>> text = stdlib_corpus(max_bytes=100_000)
    >>> len(text)
    100000
    """
    if max_bytes is not None:
        check_positive_int("max_bytes", max_bytes)
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories
                             if d not in _SKIPPED_DIRS]
        paths.extend(os.path.relpath(os.path.join(directory, name), root)
                     for name in files if name.endswith(".py"))
    corpus = _join_up_to(
        (_read_bytes(os.path.join(root, relative_path))
         for relative_path in sorted(paths)), max_bytes)
    if not corpus:
        raise RuntimeError(
            f"Found no Python source files under the standard library "
            f"directory {root!r} (sysconfig.get_paths()['stdlib']).")
    return corpus


def read_text_files(paths, max_bytes=None):
    """The bytes of the given files, in the given order, joined by newlines.

    Args:
        paths: list of file paths.
        max_bytes: int or None, cut the result to this many bytes.

    Returns:
        `bytes`, non-empty.

    Example:
    >>> with open("notes.txt", "w") as f:
    ...     _ = f.write("first file")
    >>> read_text_files(["notes.txt", "notes.txt"])
    b'first file\\nfirst file'
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("paths must name at least one file; received "
                         "paths=[].")
    if max_bytes is not None:
        check_positive_int("max_bytes", max_bytes)
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Each entry of paths must be an existing file; received "
                f"{path!r}, which is not a file.")
    corpus = _join_up_to((_read_bytes(path) for path in paths), max_bytes)
    if not corpus:
        raise ValueError(f"The files in paths={paths!r} are all empty.")
    return corpus


def tfds_text(name, split="train", feature="text", max_bytes=None,
              data_dir=None, download=True):
    """The text feature of a tensorflow-datasets dataset, joined by newlines.

    tensorflow-datasets downloads and prepares data on first use; on a
    machine without network access this works only for a dataset that is
    already prepared in `data_dir` (default `~/tensorflow_datasets`), and
    `download=False` fails at once where a download would retry for minutes.

    Args:
        name: str, the dataset name, e.g. "tiny_shakespeare".
        split: str, the split to read, e.g. "train".
        feature: str, the string feature holding the text.
        max_bytes: int or None, cut the result to this many bytes.
        data_dir: str or None, where tensorflow-datasets keeps its data.
        download: bool, download and prepare the dataset if it is not
            prepared yet.

    Returns:
        `bytes`, non-empty.

    Example (with the dataset prepared, or network access):
    >>> text = tfds_text("tiny_shakespeare", split="train")  # doctest: +SKIP
    """
    if max_bytes is not None:
        check_positive_int("max_bytes", max_bytes)
    import tensorflow_datasets as tfds

    try:
        dataset = tfds.load(name, split=split, data_dir=data_dir,
                            download=download)
    except Exception as error:
        hint = ("tensorflow-datasets needs network access to download a "
                "dataset the first time; offline, prepare it beforehand or "
                "use --text-files / the default standard-library corpus."
                if download else
                "download=False reads only a dataset already prepared in "
                "data_dir; with network access, allow the download "
                "(train_lm.py: --tfds-download).")
        raise RuntimeError(
            f"Could not load the tensorflow-datasets dataset name={name!r} "
            f"split={split!r} (data_dir={data_dir!r}): {error}\n{hint}"
        ) from error
    if feature not in dataset.element_spec:
        raise ValueError(
            f"The dataset {name!r} has no feature {feature!r}; its features "
            f"are {sorted(dataset.element_spec)}. Pass feature=<one of them>.")
    corpus = _join_up_to((example[feature] for example
                          in dataset.as_numpy_iterator()), max_bytes)
    if not corpus:
        raise ValueError(
            f"The feature {feature!r} of dataset {name!r} split {split!r} "
            "holds no text.")
    return corpus


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _join_up_to(pieces, max_bytes):
    """Joins byte strings with newlines, reading no more than `max_bytes`
    needs; the result is cut to `max_bytes` (None: no limit)."""
    taken, size = [], 0
    for piece in pieces:
        taken.append(piece)
        size += len(piece) + 1
        if max_bytes is not None and size >= max_bytes:
            break
    return b"\n".join(taken)[:max_bytes]


def split_corpus(data, held_out_fraction=0.05):
    """Splits bytes into a training part and the held-out end.

    Args:
        data: `bytes`.
        held_out_fraction: float in (0, 1), the share held out at the end.

    Returns:
        `(train_bytes, held_out_bytes)`, both non-empty.

    Example:
    >>> split_corpus(b"0123456789" * 10, 0.1)[1]
    b'0123456789'
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(
            f"held_out_fraction must be in (0, 1); received "
            f"held_out_fraction={held_out_fraction!r}.")
    cut = len(data) - int(round(len(data) * held_out_fraction))
    if cut <= 0 or cut >= len(data):
        raise ValueError(
            f"A corpus of {len(data)} bytes is too small to hold out "
            f"held_out_fraction={held_out_fraction}; give more text.")
    return data[:cut], data[cut:]


def byte_tokenizer():
    """`ReformerTokenizer()`: one id in [0, 256) per byte, no lowercasing.

    Note it pads with id 0, which is also the NUL byte; the windows made by
    `language_model_dataset` are all full length, so no padding occurs.
    """
    return ReformerTokenizer()


def byte_preprocessor(sequence_length=1024):
    """A `ReformerCausalLMPreprocessor` over bytes, for
    `ReformerCausalLM(..., preprocessor=byte_preprocessor())`: strings in
    and out of `fit` and `generate()`.

    Example:
    >>> keras.ops.convert_to_numpy(byte_preprocessor(8).generate_preprocess(
    ...     ["hi"])["token_ids"])
    array([[104, 105,   0,   0,   0,   0,   0,   0]], dtype=int32)
    """
    return ReformerCausalLMPreprocessor(ReformerTokenizer(),
                                        sequence_length=sequence_length)


def detokenize(token_ids):
    """Text from byte ids (or `bytes`) through `ByteTokenizer.detokenize`.

    Invalid UTF-8 becomes U+FFFD and id 0 (NUL, the tokenizer's padding) is
    dropped.

    Args:
        token_ids: `bytes` or a 1-D sequence of ints in [0, 256).

    Returns:
        `str`.

    Example:
    >>> detokenize([104, 105])
    'hi'
    """
    ids = [int(i) for i in token_ids]
    if ids and any(not 0 <= i < VOCABULARY_SIZE for i in ids):
        raise ValueError(
            f"token_ids must be byte ids in [0, {VOCABULARY_SIZE}); received "
            f"values from {min(ids)} to {max(ids)}.")
    return as_text(byte_tokenizer().detokenize(tf.constant(ids, tf.int32)))


def as_text(detokenized):
    """`str` from what a keras-hub tokenizer's `detokenize` returns: a
    `str` (its Python path), `bytes` or a scalar string tensor. Invalid
    UTF-8 becomes U+FFFD.

    Example:
    >>> as_text(tf.constant(b"hi"))
    'hi'
    """
    if isinstance(detokenized, str):
        return detokenized
    if not isinstance(detokenized, (bytes, np.bytes_)):
        detokenized = keras.ops.convert_to_numpy(detokenized).item()
    return detokenized.decode("utf-8", "replace")


def num_windows(data, sequence_length, overlap=1):
    """How many examples `language_model_dataset` (`overlap=1`: each window
    holds one more byte, the last target) or `masked_lm_dataset`
    (`overlap=0`) cuts from `data`."""
    return max(0, (len(data) - overlap) // sequence_length)


def language_model_dataset(data, sequence_length, batch_size, shuffle=False,
                           seed=0, repeat=False, drop_remainder=True):
    """Next-byte prediction examples from raw bytes.

    `data` is cut into windows of `sequence_length + 1` bytes that start
    every `sequence_length` bytes (so every byte after the first is a target
    exactly once); each window is tokenised by `ByteTokenizer` inside
    tf.data and split into inputs (all but the last byte) and targets (all
    but the first).

    Args:
        data: `bytes`, at least `sequence_length + 1` long.
        sequence_length: int, tokens per example.
        batch_size: int, examples per batch.
        shuffle: bool, shuffle the windows (a new order every pass).
        seed: int, the shuffle seed.
        repeat: bool, repeat forever (for `fit(steps_per_epoch=...)`).
        drop_remainder: bool, drop the last batch if it is incomplete (every
            batch then has the same shape); False scores every window.

    Returns:
        `tf.data.Dataset` of `({"token_ids": x, "padding_mask": ones}, y)`,
        all int32 with shape `(batch_size, sequence_length)` (the last
        batch may be smaller when `drop_remainder` is False).

    Example:
    >>> ds = language_model_dataset(b"hello world " * 100, 16, 4)
    >>> x, y = next(iter(ds))
    >>> x["token_ids"].shape, y.shape
    (TensorShape([4, 16]), TensorShape([4, 16]))
    """
    def to_example(ids):
        inputs = {"token_ids": ids[:, :-1],
                  "padding_mask": tf.ones_like(ids[:, :-1])}
        return inputs, ids[:, 1:]

    return _byte_window_batches(
        data, sequence_length, sequence_length + 1, batch_size, shuffle,
        seed, repeat, drop_remainder).map(
            to_example, num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True).prefetch(tf.data.AUTOTUNE)


def masked_lm_dataset(data, sequence_length, batch_size, mask_rate=0.15,
                      shuffle=False, seed=0, repeat=False,
                      drop_remainder=True):
    """Masked-byte prediction examples from raw bytes (BERT's masking).

    `data` is cut into windows of `sequence_length` bytes. In each window
    `round(mask_rate * sequence_length)` positions (at least one) are
    selected at random; of those, 80% become `MASK_TOKEN_ID`, 10% a random
    byte and 10% stay, and the model predicts the original bytes there.
    The selection is drawn from stateless random numbers of `seed` and the
    batch's index in the stream, so iterating an unshuffled, unrepeated
    dataset again gives the same masks (an evaluation is repeatable); with
    `shuffle` or `repeat`, a window meets new masks on each pass.

    Args:
        data: `bytes`, at least `sequence_length` long.
        sequence_length: int, tokens per example.
        batch_size: int, examples per batch.
        mask_rate: float in (0, 1), the share of positions to predict.
        shuffle: bool, shuffle the windows (a new order every pass).
        seed: int, the seed of the shuffle and of the masks.
        repeat: bool, repeat forever (for `fit(steps_per_epoch=...)`).
        drop_remainder: bool, drop the last batch if it is incomplete.

    Returns:
        `tf.data.Dataset` of `({"token_ids", "padding_mask",
        "mask_positions"}, original_ids)`: int32, `token_ids` and
        `padding_mask` `(batch, sequence_length)`, `mask_positions` (sorted)
        and `original_ids` `(batch, num_masked)`; for a `ReformerMaskedLM`
        whose vocabulary holds `MASKED_LM_VOCABULARY_SIZE` ids.

    Example:
    >>> ds = masked_lm_dataset(b"hello world " * 100, 32, 4, mask_rate=0.25)
    >>> x, y = next(iter(ds))
    >>> x["token_ids"].shape, x["mask_positions"].shape, y.shape
    (TensorShape([4, 32]), TensorShape([4, 8]), TensorShape([4, 8]))
    """
    if not 0.0 < mask_rate < 1.0:
        raise ValueError(f"mask_rate must be in (0, 1); received "
                         f"mask_rate={mask_rate!r}.")
    num_masked = max(1, int(round(mask_rate * sequence_length)))

    def to_example(index, ids):
        masked_ids, positions, originals, _ = mask_tokens(
            ids, tf.ones_like(ids, tf.bool), mask_rate, num_masked,
            tf.stack([tf.cast(seed, tf.int64), index]), MASK_TOKEN_ID)
        inputs = {"token_ids": masked_ids,
                  "padding_mask": tf.ones_like(ids),
                  "mask_positions": positions}
        return inputs, originals

    return _byte_window_batches(
        data, sequence_length, sequence_length, batch_size, shuffle, seed,
        repeat, drop_remainder).enumerate().map(
            to_example, num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True).prefetch(tf.data.AUTOTUNE)


def _byte_window_batches(data, sequence_length, window_length, batch_size,
                         shuffle, seed, repeat, drop_remainder):
    """Batches of `window_length`-byte windows of `data` starting every
    `sequence_length` bytes, tokenised: int32 `(batch, window_length)`."""
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes; received data of type "
                        f"{type(data).__name__}.")
    check_positive_int("sequence_length", sequence_length)
    check_positive_int("batch_size", batch_size)
    count = num_windows(data, sequence_length,
                        overlap=window_length - sequence_length)
    needed = batch_size if drop_remainder else 1
    if count < needed:
        raise ValueError(
            f"data of {len(data)} bytes gives {count} windows of "
            f"{window_length} bytes (sequence_length={sequence_length}), "
            f"fewer than {needed} (batch_size={batch_size}, drop_remainder="
            f"{drop_remainder}); give more text or make sequence_length "
            "smaller.")
    windows = [data[i * sequence_length:i * sequence_length + window_length]
               for i in range(count)]
    tokenizer = byte_tokenizer()

    def tokenize(strings):
        ids = tokenizer(strings)  # ragged (batch, None): all rows full
        rows = batch_size if drop_remainder else None  # static when it can be
        return tf.cast(ids.to_tensor(shape=(rows, window_length)), tf.int32)

    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(windows))
    if shuffle:
        dataset = dataset.shuffle(count, seed=seed,
                                  reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)

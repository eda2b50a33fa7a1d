"""ReformerMaskedLM and masked_lm_dataset: numbers, masking, learning."""

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer import text_data
from keras_reformer.export import export_for_serving
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerMaskedLM
from tests.helpers import assert_close
from tests.helpers import to_numpy

VOCABULARY = text_data.MASKED_LM_VOCABULARY_SIZE


def encoder(attention_types=("lsh", "local"), hidden_dim=32, length=64):
    return ReformerBackbone(
        vocabulary_size=VOCABULARY, hidden_dim=hidden_dim, num_heads=2,
        head_dim=hidden_dim // 2, intermediate_dim=2 * hidden_dim,
        attention_types=attention_types, axial_shape=(8, length // 8),
        causal=False, seed=1, attention_options={
            "lsh": {"chunk_length": 16, "num_hashes": 2,
                    "num_chunks_after": 1},
            "local": {"chunk_length": 16, "num_chunks_after": 1}})


def inputs(positions, length=64, seed=0):
    ids = np.random.RandomState(seed).randint(0, VOCABULARY, (2, length))
    return {"token_ids": ids.astype("int32"),
            "padding_mask": np.ones((2, length), "int32"),
            "mask_positions": np.array(positions, "int32")}


def test_logits_are_the_head_applied_to_the_backbone_at_the_positions():
    mlm = ReformerMaskedLM(encoder())
    x = inputs([[0, 5, 63], [17, 17, 2]])
    features = to_numpy(mlm.backbone(
        {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}))
    rows = np.arange(2)[:, None]
    gathered = features[rows, x["mask_positions"]]
    head = mlm.get_layer("mlm_head")
    expected = gathered @ to_numpy(head.kernel) + to_numpy(head.bias)
    logits = to_numpy(mlm(x))
    assert logits.shape == (2, 3, VOCABULARY)
    assert_close(logits, expected, atol=1e-5)


def test_save_and_load(tmp_path):
    mlm = ReformerMaskedLM(encoder())
    x = inputs([[1, 2, 3], [4, 5, 6]])
    path = str(tmp_path / "mlm.keras")
    mlm.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, ReformerMaskedLM)
    assert_close(loaded(x), mlm(x), atol=0)


def test_bad_backbone_and_positions_raise():
    with pytest.raises(ValueError, match="bidirectional backbone"):
        ReformerMaskedLM(ReformerBackbone(
            vocabulary_size=10, hidden_dim=8, num_heads=1, head_dim=8,
            intermediate_dim=8, axial_shape=(4, 4), causal=True))
    mlm = ReformerMaskedLM(encoder())
    for bad in (64, -1):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"mask_positions must be in \[0, sequence"):
            mlm(inputs([[0, bad], [1, 2]]))
    fractional = dict(inputs([[0, 1]]), mask_positions=np.array(
        [[0, 1.5], [1, 2]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
            "mask_positions must be whole numbers in the int32 range "
            "[-2**31, 2**31) (received dtype float64)")):
        mlm(fractional)
    one_row = dict(inputs([[0, 1]]), mask_positions=np.array([[0, 1]]))
    message = re.escape("mask_positions must have the batch size of "
                        "token_ids; received a mask_positions batch of 1 "
                        "and a token_ids batch of 2.")
    with pytest.raises(ValueError, match=message):
        mlm(one_row)
    with pytest.raises(ValueError, match=re.escape(
            "The inputs must have one batch size; received batch sizes "
            "{'token_ids': 2, 'padding_mask': 2, 'mask_positions': 1}.")):
        mlm.predict(one_row, verbose=0)
    # XLA drops assertions: the bad row is NaN, never a clamped or
    # truncated lookup.
    mlm.compile(jit_compile=True)
    for bad in (inputs([[0, 64], [1, 2]]), fractional):
        logits = mlm.predict(bad, verbose=0)
        assert np.isnan(logits[0, 1]).all()
        assert np.isfinite(np.delete(logits.reshape(4, -1), 1, axis=0)).all()


def test_dataset_masks_as_bert_does_and_repeatably():
    data = text_data.stdlib_corpus(max_bytes=64 * 400)
    dataset = text_data.masked_lm_dataset(data, 64, 100, mask_rate=0.25,
                                          seed=3)
    batches = list(dataset)
    assert len(batches) == 4
    windows = np.frombuffer(data, np.uint8).reshape(400, 64).astype("int32")
    mask_token = replaced_by_random = kept = 0
    for index, (x, originals) in enumerate(batches):
        ids, positions = x["token_ids"].numpy(), x["mask_positions"].numpy()
        window = windows[index * 100:(index + 1) * 100]
        assert positions.shape == (100, 16)  # round(0.25 * 64)
        assert (np.diff(positions, axis=1) > 0).all()  # sorted, distinct
        rows = np.arange(100)[:, None]
        assert (originals.numpy() == window[rows, positions]).all()
        unselected = np.ones(ids.shape, bool)
        unselected[rows, positions] = False
        assert (ids[unselected] == window[unselected]).all()
        selected = ids[rows, positions]
        mask_token += (selected == text_data.MASK_TOKEN_ID).sum()
        kept += (selected == window[rows, positions]).sum()
        replaced_by_random += ((selected != text_data.MASK_TOKEN_ID) & (
            selected != window[rows, positions])).sum()
        assert (x["padding_mask"].numpy() == 1).all()
    total = 4 * 100 * 16
    # 80% mask token, 10% a random byte (1/256 of them equal the original),
    # 10% kept; binomial standard deviations are under 0.005.
    assert abs(mask_token / total - 0.8) < 0.02
    assert abs(replaced_by_random / total - 0.1) < 0.02
    assert abs(kept / total - 0.1) < 0.02
    again = list(dataset)
    for (x, y), (x2, y2) in zip(batches, again):
        assert (x["token_ids"].numpy() == x2["token_ids"].numpy()).all()
        assert (y.numpy() == y2.numpy()).all()
    other_seed = next(iter(text_data.masked_lm_dataset(
        data, 64, 100, mask_rate=0.25, seed=4)))
    assert (other_seed[0]["mask_positions"].numpy()
            != batches[0][0]["mask_positions"].numpy()).any()


@pytest.mark.parametrize("mask_rate", [0.0, 1.0, -0.1])
def test_dataset_rejects_bad_mask_rate(mask_rate):
    with pytest.raises(ValueError, match=f"mask_rate={mask_rate}"):
        text_data.masked_lm_dataset(b"x" * 1000, 16, 2, mask_rate=mask_rate)


def test_learns_to_use_context_on_the_corpus():
    # Predicting a masked byte from its neighbours must beat the best
    # context-free guess: the held-out bytes' own unigram entropy.
    train, held_out = text_data.split_corpus(
        text_data.stdlib_corpus(max_bytes=600_000))
    keras.utils.set_random_seed(0)
    mlm = ReformerMaskedLM(encoder(attention_types=("lsh",), hidden_dim=64))
    mlm.compile(optimizer=keras.optimizers.Adam(3e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), jit_compile=True)
    mlm.fit(text_data.masked_lm_dataset(train, 64, 32, shuffle=True,
                                        repeat=True),
            steps_per_epoch=300, epochs=1, verbose=0)
    loss = mlm.evaluate(text_data.masked_lm_dataset(held_out, 64, 32),
                        verbose=0, return_dict=True)["loss"]
    counts = np.bincount(np.frombuffer(held_out, np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    unigram_nats = float(-(p * np.log(p)).sum())
    print(f"masked bits per byte {loss / math.log(2):.3f}, unigram "
          f"{unigram_nats / math.log(2):.3f}")
    assert loss < unigram_nats - 0.5 * math.log(2)


def test_exported_signature_takes_mask_positions(tmp_path):
    mlm = ReformerMaskedLM(encoder())
    path = export_for_serving(mlm, str(tmp_path / "mlm"))
    served = tf.saved_model.load(path).signatures["serving_default"]
    x = inputs([[0, 9, 63], [3, 4, 5]])
    logits = served(token_ids=tf.constant(x["token_ids"]),
                    padding_mask=tf.constant(x["padding_mask"]),
                    mask_positions=tf.constant(x["mask_positions"]))
    assert_close(logits["logits"], mlm(x), atol=1e-5)

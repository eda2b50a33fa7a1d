"""Bad configurations and inputs end in one clear error; served models are
safe to expose. Each case names the argument or input and what is allowed
(see RELIABILITY.md)."""

import re
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.export import export_for_serving
from keras_reformer.layers import AxialPositionEmbedding
from keras_reformer.layers import ChunkedFeedForward
from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import LinformerSelfAttention
from keras_reformer.layers import LocalSelfAttention
from keras_reformer.layers import LSHSelfAttention
from keras_reformer.layers import ReversibleBlock
from keras_reformer.layers import PreNormBranch
from keras_reformer.layers.linformer_self_attention import LinformerProjection
from keras_reformer.layers.validation import check_non_negative_int
from keras_reformer.layers.validation import check_positive_int
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerClassifier
from keras_reformer.models import ReformerCausalLM
from keras_reformer.text_data import byte_preprocessor

SMALL = dict(vocabulary_size=50, hidden_dim=16, num_heads=2, head_dim=8,
             intermediate_dim=32, axial_shape=(8, 8), seed=1,
             attention_options={"lsh": {"chunk_length": 16, "num_hashes": 2},
                                "local": {"chunk_length": 16}})


def backbone(**overrides):
    return ReformerBackbone(**{**SMALL, **overrides})


def call_layer(layer, shape=(1, 32, 16), **kwargs):
    return layer(np.zeros(shape, "float32"), **kwargs)


def call_twice(layer, first_shape, second_shape):
    call_layer(layer, first_shape)
    call_layer(layer, second_shape)


CONFIGURATION_CASES = {
    "lsh num_heads 0": (lambda: LSHSelfAttention(0, 8), "num_heads=0"),
    "lsh head_dim float": (lambda: LSHSelfAttention(2, 8.0), "head_dim=8.0"),
    "lsh chunk_length 0": (lambda: LSHSelfAttention(2, 8, chunk_length=0),
                           "chunk_length=0"),
    "lsh num_hashes 0": (lambda: LSHSelfAttention(2, 8, num_hashes=0),
                         "num_hashes=0"),
    "lsh odd buckets": (lambda: LSHSelfAttention(2, 8, num_buckets=7),
                        "num_buckets=7"),
    "lsh odd bucket factor": (
        lambda: LSHSelfAttention(2, 8, num_buckets=(4, 5)), "num_buckets"),
    "lsh three bucket factors": (
        lambda: LSHSelfAttention(2, 8, num_buckets=(2, 2, 2)), "num_buckets"),
    "lsh causal looks ahead": (
        lambda: LSHSelfAttention(2, 8, causal=True, num_chunks_after=1),
        "num_chunks_after=1"),
    "lsh negative chunks before": (
        lambda: LSHSelfAttention(2, 8, num_chunks_before=-1),
        "num_chunks_before=-1"),
    "lsh dropout 1": (lambda: LSHSelfAttention(2, 8, dropout=1.0),
                      "dropout=1.0"),
    "lsh auto buckets, unknown length": (
        lambda: LSHSelfAttention(2, 8).build((1, None, 16)),
        "num_buckets=None"),
    "local chunk_length 0": (
        lambda: LocalSelfAttention(2, 8, chunk_length=0), "chunk_length=0"),
    "local causal looks ahead": (
        lambda: LocalSelfAttention(2, 8, causal=True, num_chunks_after=2),
        "num_chunks_after=2"),
    "full negative dropout": (
        lambda: FullSelfAttention(2, 8, dropout=-0.1), "dropout=-0.1"),
    "linformer causal": (
        lambda: LinformerSelfAttention(2, 8, 64, 16, causal=True),
        "cannot be causal"),
    "linformer sharing": (
        lambda: LinformerSelfAttention(2, 8, 64, 16, sharing="rows"),
        "sharing='rows'"),
    "linformer max_length 0": (
        lambda: LinformerSelfAttention(2, 8, 0, 16), "max_length=0"),
    "linformer projected_length 0": (
        lambda: LinformerSelfAttention(2, 8, 64, 0), "projected_length=0"),
    "linformer shared projection without layerwise": (
        lambda: LinformerSelfAttention(
            2, 8, 64, 16, shared_projection=LinformerProjection(16, 64)),
        "sharing='layerwise'"),
    "linformer shared projection of another size": (
        lambda: LinformerSelfAttention(
            2, 8, 64, 16, sharing="layerwise",
            shared_projection=LinformerProjection(8, 64)),
        "projected_length=8"),
    "feed-forward intermediate_dim 0": (
        lambda: ChunkedFeedForward(0), "intermediate_dim=0"),
    "feed-forward chunk_length -4": (
        lambda: ChunkedFeedForward(8, chunk_length=-4), "chunk_length=-4"),
    "axial shape of one axis": (
        lambda: AxialPositionEmbedding((64,), (8, 8)), "axial_shape"),
    "axial dims zero": (
        lambda: AxialPositionEmbedding((8, 8), (0, 16)), "axial_dims"),
    "reversible odd width": (
        lambda: ReversibleBlock(PreNormBranch(FullSelfAttention(2, 8)),
                                PreNormBranch(ChunkedFeedForward(8))).build(
            (1, 8, 31)), "31"),
    "backbone vocabulary 0": (lambda: backbone(vocabulary_size=0),
                              "vocabulary_size=0"),
    "backbone hidden_dim 0": (lambda: backbone(hidden_dim=0), "hidden_dim=0"),
    "backbone hidden_dim 1": (lambda: backbone(hidden_dim=1),
                              "hidden_dim must be at least 2"),
    "preprocessor longer than the positions": (
        lambda: ReformerCausalLM(backbone(),
                                 preprocessor=byte_preprocessor()),
        "sequence_length=1024 is longer than the backbone's 64 positions"),
    "backbone unknown attention": (
        lambda: backbone(attention_types=["lsh", "sparse"]), "sparse"),
    "backbone no layers": (lambda: backbone(attention_types=[]),
                           "non-empty"),
    "backbone axial dims sum": (lambda: backbone(axial_dims=(8, 4)),
                                "axial_dims"),
    "backbone causal linformer": (
        lambda: backbone(attention_types=["linformer"]), "cannot be causal"),
    "backbone linformer sharing": (
        lambda: backbone(attention_types=["linformer"], causal=False,
                         attention_options={"linformer": {"sharing": "all"}}),
        "sharing='all'"),
    "language model on an encoder": (
        lambda: ReformerCausalLM(backbone(causal=False)),
        "causal"),
    "classifier on a decoder": (
        lambda: ReformerClassifier(backbone(), num_classes=2), "causal"),
}

INPUT_CASES = {
    "attention input of rank 2": (
        lambda: call_layer(LSHSelfAttention(2, 8, num_buckets=4), (32, 16)),
        "takes inputs of shape (batch, length, hidden)"),
    "attention hidden size changes": (
        lambda: call_twice(FullSelfAttention(2, 8), (1, 32, 16), (1, 32, 12)),
        "expected axis -1"),
    "padding mask of another length": (
        lambda: call_layer(LocalSelfAttention(2, 8, chunk_length=8),
                           padding_mask=np.ones((1, 31))),
        "padding_mask must have shape"),
    "padding mask of rank 3": (
        lambda: call_layer(FullSelfAttention(2, 8),
                           padding_mask=np.ones((1, 32, 1))),
        "padding_mask must have shape"),
    "sequence longer than the axial positions": (
        lambda: call_layer(AxialPositionEmbedding((4, 4), (8, 8)),
                           (1, 17, 16)), "17 exceeds the 16 positions"),
    "sequences of length 0": (
        lambda: ReformerCausalLM(backbone())({
            "token_ids": np.zeros((2, 0), "int32"),
            "padding_mask": np.zeros((2, 0), "int32")}),
        "at least one token per sequence"),
    "sequence longer than linformer max_length": (
        lambda: call_layer(LinformerSelfAttention(2, 8, 16, 8), (1, 17, 16)),
        "max_length=16"),
}


@pytest.mark.parametrize("case", sorted(CONFIGURATION_CASES))
def test_bad_configuration_raises_a_clear_error(case):
    make, message = CONFIGURATION_CASES[case]
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        make()


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_bad_input_raises_a_clear_error(case):
    make, message = INPUT_CASES[case]
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        make()


@pytest.mark.parametrize("value", [np.int64(16), np.int32(1), 16])
def test_numpy_integers_count_as_integers(value):
    check_positive_int("num_heads", value)
    check_non_negative_int("num_chunks_before", value)


@pytest.mark.parametrize("value", [True, np.bool_(True), 16.0,
                                   np.float32(16), np.int64(0)])
def test_bools_floats_and_zero_are_not_positive_integers(value):
    with pytest.raises(ValueError, match="num_heads must be a positive "
                                         "integer; received num_heads="):
        check_positive_int("num_heads", value)


def test_at_least_thirty_distinct_cases():
    assert len(CONFIGURATION_CASES) + len(INPUT_CASES) >= 30


def lm_and_inputs():
    model = ReformerCausalLM(backbone(attention_types=["lsh", "local"]))
    ids = np.random.RandomState(0).randint(0, 50, (3, 40)).astype("int32")
    return model, ids


@pytest.fixture(scope="module")
def served_lm(tmp_path_factory):
    """An LM, valid token ids and its exported signatures (one export for
    the tests below: exporting an LM takes seconds)."""
    model, ids = lm_and_inputs()
    path = export_for_serving(model, str(tmp_path_factory.mktemp("lm")))
    return model, ids, tf.saved_model.load(path).signatures


def served_without_padding(signatures):
    """`serving_default` called with `token_ids` alone, all real."""
    def serve(token_ids):
        return signatures["serving_default"](
            token_ids=token_ids, padding_mask=tf.ones_like(token_ids))
    return serve


def test_out_of_range_token_ids_raise_also_when_served(served_lm):
    model, valid_ids, signatures = served_lm
    serve = served_without_padding(signatures)
    assert np.all(np.isfinite(serve(token_ids=tf.constant(valid_ids))[
        "logits"]))
    for bad_id in (50, -1):
        ids = valid_ids.copy()
        ids[1, 7] = bad_id
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"token ids must be in \[0, 50\)"):
            model(inputs)
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"token ids must be in \[0, 50\)"):
            model.predict(inputs, verbose=0)
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"token ids must be in \[0, 50\)"):
            serve(token_ids=tf.constant(ids))


def test_a_too_long_input_served_names_the_positions(served_lm):
    model, _, signatures = served_lm
    ids = np.ones((1, model.backbone.max_length + 1), "int32")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"token_ids are longer than the 64 positions "
                             r"of axial_shape=\(8, 8\)"):
        signatures["serving_default"](token_ids=tf.constant(ids),
                                      padding_mask=tf.constant(ids))


def test_served_model_gives_identical_answers_under_concurrent_calls(
        served_lm):
    _, ids, signatures = served_lm
    serve = served_without_padding(signatures)
    requests = [np.roll(ids, shift, axis=1) for shift in range(8)]
    serial = [serve(token_ids=tf.constant(r))["logits"].numpy()
              for r in requests]
    results = [None] * (4 * len(requests))
    errors = []

    def worker(index):
        try:
            request = requests[index % len(requests)]
            results[index] = serve(token_ids=tf.constant(request))[
                "logits"].numpy()
        except Exception as error:  # collected and reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,))
               for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result, serial[index % len(requests)])


def test_keras_file_loads_in_safe_mode(tmp_path):
    """Only registered layers are deserialised; no lambda or custom Python
    beyond them runs (safe_mode=True raises on any lambda)."""
    model, ids = lm_and_inputs()
    path = str(tmp_path / "lm.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_array_equal(loaded.predict(inputs, verbose=0),
                                  model.predict(inputs, verbose=0))


def test_empty_batch_and_length_one_work():
    model = ReformerCausalLM(backbone(attention_types=["lsh", "local", "full"]))
    for shape in ((0, 5), (0, 40), (2, 1)):
        ids = np.ones(shape, "int32")
        out = keras.ops.convert_to_numpy(
            model({"token_ids": ids, "padding_mask": ids}))
        assert out.shape == shape + (50,) and np.all(np.isfinite(out))


@pytest.mark.parametrize("options", [
    {"parallel_heads": 1}, {"parallel_heads": 1, "segments": 2}])
def test_an_empty_batch_keeps_its_shape_through_head_groups(options):
    layer = LSHSelfAttention(2, 8, chunk_length=4, num_hashes=2, **options)
    x = tf.zeros((0, 32, 16))
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = layer(x, training=True)
    grads = tape.gradient(outputs, [x] + layer.trainable_variables)
    assert outputs.shape == (0, 32, 16) and grads[0].shape == (0, 32, 16)
    for grad, weight in zip(grads[1:], layer.trainable_variables):
        assert grad.shape == weight.shape
        np.testing.assert_array_equal(grad, 0)


def test_out_of_range_token_ids_poison_outputs_under_xla():
    """XLA drops assertions; the bad sequence's logits are NaN instead of
    plausible numbers, the other sequences are unaffected."""
    model, ids = lm_and_inputs()
    model.compile(jit_compile=True)
    ids[1, 7] = 50
    out = model.predict({"token_ids": ids, "padding_mask": np.ones_like(ids)},
                        verbose=0)
    finite = np.isfinite(out).all(axis=(1, 2))
    np.testing.assert_array_equal(finite, [True, False, True])
    assert np.isnan(out[1, 7]).all()


def test_fractional_token_ids_raise_and_whole_floats_pass():
    model = ReformerCausalLM(backbone())
    mask = np.ones((1, 3), "int32")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="token_ids must be whole numbers"):
        model({"token_ids": np.array([[1.5, 2.0, 3.0]]), "padding_mask": mask})
    whole = model({"token_ids": np.array([[1.0, 2.0, 3.0]]),
                   "padding_mask": mask})
    ints = model({"token_ids": np.array([[1, 2, 3]], "int32"),
                  "padding_mask": mask})
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(whole),
                                  keras.ops.convert_to_numpy(ints))


def test_served_padded_batch_matches_each_row_served_alone(served_lm):
    _, ids, signatures = served_lm
    padded = signatures["serving_default"]
    serve = served_without_padding(signatures)
    lengths = [40, 17, 1]
    mask = (np.arange(40) < np.array(lengths)[:, None]).astype("int32")
    logits = padded(token_ids=tf.constant(ids * mask),
                    padding_mask=tf.constant(mask))["logits"].numpy()
    for row, length in enumerate(lengths):
        alone = serve(token_ids=tf.constant(ids[row:row + 1, :length]))
        np.testing.assert_allclose(logits[row, :length],
                                   alone["logits"].numpy()[0], atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
            "padding_mask must hold only 0 and 1 (or False and True)")):
        padded(token_ids=tf.constant(ids), padding_mask=tf.constant(2 * mask))


def bad_token_inputs(ids):
    """Batches whose rows 0 and 2 hold a value that an int32 cast would
    silently misread: int64 (2**32 + 5 reads as 5) and float (1.5 as 1,
    a 0.5 mask as padding)."""
    mask = np.ones_like(ids)
    wide = {"token_ids": ids.astype("int64"), "padding_mask": mask.astype(
        "int64")}
    wide["token_ids"][0, 3] += 2**32
    wide["padding_mask"][2, 5] = 2**32 + 1
    floats = {"token_ids": ids.astype("float64"),
              "padding_mask": mask.astype("float64")}
    floats["token_ids"][0, 3] = 1.5
    floats["padding_mask"][2, 5] = 0.5
    return {"int64": wide, "float64": floats}


def test_bad_token_ids_and_masks_raise_and_poison_rows_under_xla():
    model, ids = lm_and_inputs()
    expected = model.predict({"token_ids": ids,
                              "padding_mask": np.ones_like(ids)}, verbose=0)
    batches = bad_token_inputs(ids)
    for dtype, batch in batches.items():
        for row, name, rule in [
                (0, "token_ids", r"must be whole numbers in the int32 range "
                                 r"\[-2\*\*31, 2\*\*31\)"),
                (2, "padding_mask", r"must hold only 0 and 1 \(or False and "
                                    r"True\)")]:
            other = 2 - row  # keep only this row's bad value
            clean = {k: v.copy() for k, v in batch.items()}
            clean["token_ids"][other] = ids[other]
            clean["padding_mask"][other] = 1
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match=f"{name} {rule} .received dtype {dtype}"):
                model(clean)
    # The attention layers read masks by the same rule.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="padding_mask must hold only 0 and 1"):
        call_layer(FullSelfAttention(2, 8), (1, 3, 16),
                   padding_mask=np.array([[1, 0.5, 1]]))
    # XLA drops assertions: the bad rows are NaN, the good row exact.
    model.compile(jit_compile=True)
    for batch in batches.values():
        out = model.predict(batch, verbose=0)
        assert np.isnan(out[[0, 2]]).all()
        np.testing.assert_allclose(out[1], expected[1], atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="JAX traces every batch at its own static length")
def test_a_dataset_batch_longer_than_the_positions_raises_or_is_nan():
    """Batches of growing lengths relax TensorFlow's traced length to None,
    so the length check cannot run in Python: the position lookup itself
    must refuse the batch of 65 tokens (an assertion naming the positions,
    or NaN logits under XLA), never read past the table."""
    model, _ = lm_and_inputs()
    ids = np.random.RandomState(1).randint(0, 50, (1, 65)).astype("int32")
    lengths = (24, 65)
    spec = {name: tf.TensorSpec((None, None), tf.int32)
            for name in ("token_ids", "padding_mask")}

    def batches():
        for length in lengths:
            yield {"token_ids": ids[:, :length],
                   "padding_mask": np.ones_like(ids[:, :length])}

    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec)
    model.jit_compile = False
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
            "positions must be below the 64 positions of "
            "axial_shape=(8, 8)")):
        model.predict(dataset, verbose=0)
    model.jit_compile, model.predict_function = True, None
    logits = model.predict(dataset, verbose=0)
    np.testing.assert_allclose(logits[0].numpy(), model(
        {"token_ids": ids[:, :24], "padding_mask": np.ones((1, 24))})[0],
        atol=1e-5)
    assert np.isnan(logits[-1].numpy()).all()


def test_failed_fit_evaluate_or_predict_leaves_the_model_working():
    """A loop that raises before its first step leaves the weights as they
    were, and the next ones still work (on JAX, Keras 3.15's loops detach
    the weights and reattach only a step's state)."""
    model, ids = lm_and_inputs()
    model.compile(optimizer="sgd", loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    good = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    expected = model.predict(good, verbose=0)
    too_long = np.ones((1, 65), "int32")
    too_long = {"token_ids": too_long, "padding_mask": too_long}
    bad_inputs = [too_long]  # arrays: checked before Keras's loop
    if keras.backend.backend() == "jax":  # a dataset: in the loop's trace
        bad_inputs.append(tf.data.Dataset.from_tensors(too_long))
    message = re.escape(
        "Sequence length 65 exceeds the 64 positions of axial_shape=(8, 8)")
    for bad in bad_inputs:
        with pytest.raises(ValueError, match=message):
            model.predict(bad, verbose=0)
        np.testing.assert_array_equal(model.predict(good, verbose=0),
                                      expected)
    for loop in (model.evaluate, model.fit):
        with pytest.raises(ValueError, match=message):
            loop(too_long, too_long["token_ids"], verbose=0)
        np.testing.assert_array_equal(model.predict(good, verbose=0),
                                      expected)
    # A loop that ran steps keeps what they did.
    model.fit(good, ids, epochs=1, verbose=0)
    trained = model.predict(good, verbose=0)
    assert np.abs(trained - expected).max() > 1e-4
    # (TensorFlow relaxes this trace's length: the lookup's own check.)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match=re.escape("64 positions of axial_shape=(8, 8)")):
        model.fit(too_long, too_long["token_ids"], verbose=0)
    np.testing.assert_array_equal(model.predict(good, verbose=0), trained)

"""Backbone, causal LM and classifier: fit, XLA parity, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerClassifier
from keras_reformer.models import ReformerCausalLM
from tests.helpers import assert_close
from tests.helpers import to_numpy

LENGTH = 64


def backbone(causal=True, attention_types=("lsh", "full"), chunk_length=16,
             axial_shape=(8, 8), attention_options=None, **kwargs):
    """A small backbone: LSH and local chunks of `chunk_length`, two hash
    rounds, one chunk ahead when bidirectional; `attention_options` adds
    to those."""
    after = 0 if causal else 1
    options = {"lsh": {"chunk_length": chunk_length, "num_hashes": 2,
                       "num_chunks_after": after},
               "local": {"chunk_length": chunk_length,
                         "num_chunks_after": after}}
    for kind, extra in (attention_options or {}).items():
        options[kind] = {**options.get(kind, {}), **extra} if isinstance(
            extra, dict) else extra
    return ReformerBackbone(
        vocabulary_size=50, hidden_dim=32, num_heads=2, head_dim=8,
        intermediate_dim=48, attention_types=attention_types,
        attention_options=options, axial_shape=axial_shape, causal=causal,
        feed_forward_chunk_length=16, seed=1, **kwargs)


def batch(size=4, length=LENGTH, seed=0):
    ids = np.random.RandomState(seed).randint(1, 50, (size, length + 1))
    ids = ids.astype("int32")
    return ({"token_ids": ids[:, :-1],
             "padding_mask": np.ones((size, length), "int32")}, ids[:, 1:])


def compiled_lm(jit_compile, optimizer=None, **kwargs):
    lm = ReformerCausalLM(backbone(**kwargs))
    lm.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2),
               loss=keras.losses.SparseCategoricalCrossentropy(
                   from_logits=True),
               jit_compile=jit_compile)
    return lm


def test_lm_logits_shape_and_any_length():
    lm = compiled_lm(False)
    for length in (1, 23, 64):
        x, _ = batch(2, length)
        assert to_numpy(lm(x)).shape == (2, length, 50)


def test_causal_lm_never_reads_future_tokens():
    # One chunk spans the sequence, so LSH sorting cannot move chunk
    # boundaries; earlier logits must ignore every later token.
    lm = compiled_lm(False, chunk_length=64)
    x, _ = batch(2)
    changed = {k: v.copy() for k, v in x.items()}
    changed["token_ids"][:, 40:] = (changed["token_ids"][:, 40:] + 7) % 49 + 1
    a, b = to_numpy(lm(x)), to_numpy(lm(changed))
    assert_close(a[:, :40], b[:, :40], atol=1e-5)
    assert np.abs(a[:, 40:] - b[:, 40:]).max() > 1e-3


def test_fit_on_tf_data_learns_a_repeating_sequence():
    pattern = np.arange(1, 17, dtype="int32")
    stream = np.tile(pattern, 200)
    windows = np.stack([stream[i:i + LENGTH + 1] for i in range(0, 512, 3)])
    dataset = tf.data.Dataset.from_tensor_slices((
        {"token_ids": windows[:, :-1],
         "padding_mask": np.ones_like(windows[:, :-1])},
        windows[:, 1:])).shuffle(256, seed=0).batch(16, drop_remainder=True)
    lm = compiled_lm(True)
    history = lm.fit(dataset, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    x, y = batch(1)
    x["token_ids"] = windows[:1, :-1]
    predicted = to_numpy(lm.predict(x, verbose=0)).argmax(-1)
    assert (predicted[0, 20:] == windows[0, 21:]).mean() > 0.9


@pytest.mark.parametrize("attention_types", [("lsh", "full"), ("lsh",),
                                             ("local", "lsh")])
def test_jit_compile_gives_the_same_numbers(attention_types):
    """Same predictions, losses and trained weights with and without XLA
    (LSH rotations are drawn alike in both modes). Plain SGD: Adam would
    magnify float rounding in near-zero gradients (measured: gradients
    agree to 1e-7, Adam-trained weights only to 5e-4)."""
    x, y = batch(8)
    eager, xla = [compiled_lm(jit, keras.optimizers.SGD(0.5),
                              attention_types=attention_types)
                  for jit in (False, True)]
    xla.set_weights(eager.get_weights())
    assert_close(xla.predict(x, verbose=0), eager.predict(x, verbose=0),
                 atol=1e-4)
    losses = [m.fit(x, y, batch_size=4, epochs=2, shuffle=False,
                    verbose=0).history["loss"] for m in (eager, xla)]
    assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for a, b in zip(xla.get_weights(), eager.get_weights()):
        assert_close(a, b, atol=1e-5)


@pytest.mark.parametrize("model_class", [ReformerCausalLM, ReformerBackbone])
def test_training_flag_reaches_the_layers_inside(model_class):
    """`training=True` (and `fit`) must reach the layers inside the nested
    functional models: dropout, fresh LSH rotations and the reversible
    stack's recomputing gradient all depend on it."""
    x, y = batch(4)
    kwargs = dict(attention_types=("lsh", "full"), dropout=0.5)
    model = ReformerCausalLM(backbone(**kwargs)) if (
        model_class is ReformerCausalLM) else backbone(**kwargs)
    inference = to_numpy(model(x, training=False))
    assert_close(to_numpy(model(x)), inference, atol=0)
    assert np.abs(to_numpy(model(x, training=True)) - inference).max() > 0.1
    if model_class is ReformerCausalLM:
        # Learning rate 0: fit's loss is the training-mode loss of the same
        # weights that evaluate sees in inference mode.
        model.compile(optimizer=keras.optimizers.SGD(0.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        fit_loss = model.fit(x, y, batch_size=4, epochs=1,
                             verbose=0).history["loss"][0]
        evaluate_loss = model.evaluate(x, y, batch_size=4, verbose=0,
                                       return_dict=True)["loss"]
        assert abs(fit_loss - evaluate_loss) > 0.05, (fit_loss, evaluate_loss)


def test_lsh_one_head_at_a_time_trains_like_all_heads_under_xla():
    """LSH `parallel_heads=1` (loops with recomputed gradients inside the
    reversible stack) gives the same training under XLA, with several steps
    per execution, as all heads at once."""
    x, y = batch(8)
    models = []
    for parallel_heads in (None, 1):
        lm = ReformerCausalLM(backbone(
            attention_types=("lsh",),
            attention_options={"lsh": {"parallel_heads": parallel_heads}}))
        lm.compile(optimizer=keras.optimizers.SGD(0.5),
                   loss=keras.losses.SparseCategoricalCrossentropy(
                       from_logits=True),
                   jit_compile=True, steps_per_execution=2)
        models.append(lm)
    models[1].set_weights(models[0].get_weights())
    losses = [m.fit(x, y, batch_size=2, epochs=2, shuffle=False,
                    verbose=0).history["loss"] for m in models]
    assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    # The head-group loop sums in another order than the all-heads einsum,
    # and four SGD steps at learning rate 0.5 amplify that rounding to
    # 1e-5..1e-4 in the weights (a query within rounding of a bucket
    # boundary may also hash to the other bucket); the losses above, which
    # a wrong head group or rotation would change, agree to 1e-5.
    for a, b in zip(models[1].get_weights(), models[0].get_weights()):
        assert_close(a, b, atol=5e-4)


def test_full_shared_qk_layers_take_lsh_weights_and_match_one_chunk():
    """A "full_shared_qk" model has LSH's weights (rotations aside) and,
    given an LSH model's, equals it where one LSH chunk spans the sequence."""
    lsh = ReformerCausalLM(backbone(attention_types=("lsh", "lsh"),
                                    chunk_length=LENGTH))
    full = ReformerCausalLM(backbone(attention_types=("full_shared_qk",
                                                     "full_shared_qk"),
                                     chunk_length=LENGTH))
    x, _ = batch(2)
    lsh.predict(x, verbose=0)
    full.predict(x, verbose=0)
    lsh_weights = {w.path: w for w in lsh.weights
                   if "rotations" not in w.path}
    assert sorted(lsh_weights) == sorted(w.path for w in full.weights)
    for weight in full.weights:
        weight.assign(lsh_weights[weight.path])
    assert_close(full.predict(x, verbose=0), lsh.predict(x, verbose=0),
                 atol=1e-5)


def test_lm_keras_file_round_trip(tmp_path):
    lm = compiled_lm(False, attention_options={"lsh": {"parallel_heads": 1}})
    x, y = batch(2)
    lm.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, ReformerCausalLM)
    assert loaded.backbone.get_config() == lm.backbone.get_config()
    assert_close(loaded.predict(x, verbose=0), lm.predict(x, verbose=0),
                 atol=0)


@pytest.mark.parametrize("attention_types", [
    ("lsh", "full"), ("local", "lsh"), ("linformer", "linformer")])
def test_classifier_ignores_padding_and_round_trips(tmp_path,
                                                    attention_types):
    classifier = ReformerClassifier(
        backbone(causal=False, attention_types=attention_types),
        num_classes=3)
    x, _ = batch(2)
    x["padding_mask"][:, 50:] = 0
    x["padding_mask"][0, :4] = 0
    noisy = {"token_ids": np.where(x["padding_mask"] == 1, x["token_ids"],
                                   7).astype("int32"),
             "padding_mask": x["padding_mask"]}
    assert_close(classifier(noisy), classifier(x), atol=1e-5)
    classifier.compile(optimizer="adam", loss=keras.losses.
                       SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(x, np.array([0, 2]), epochs=1, verbose=0)
    path = str(tmp_path / "classifier.keras")
    classifier.save(path)
    loaded = keras.models.load_model(path)
    assert_close(loaded.predict(x, verbose=0),
                 classifier.predict(x, verbose=0), atol=0)


@pytest.mark.parametrize("kwargs,message", [
    ({"attention_types": ("lsh", "sparse")}, "attention_types"),
    ({"attention_types": ()}, "attention_types"),
    ({"axial_dims": (10, 10)}, "axial_dims"),
    ({"attention_types": ("linformer",)}, "causal"),
    ({"attention_types": ("linformer",), "causal": False,
      "attention_options": {"linformer": {"sharing": "x"}}}, "sharing='x'"),
    ({"attention_options": {"lhs": {}}}, "Unknown attention type 'lhs'"),
    ({"attention_options": {"lsh": {"num_hashs": 2}}},
     r"attention_options\['lsh'\].*does not fit LSHSelfAttention"),
    ({"attention_options": {"lsh": {"causal": False}}},
     r"attention_options\['lsh'\] sets \['causal'\]"),
    ({"attention_options": {"lsh": 4}}, "must be a dict of arguments"),
    ({"axial_shape": (64,)}, r"axial_shape must be a pair"),
    ({"axial_shape": (8, 0)}, r"axial_shape must be a positive integer"),
    ({"chunk_length": 0}, r"chunk_length must be a positive integer"),
    ({"attention_types": ("local",),
      "attention_options": {"local": {"chunk_length": 0}}},
     r"chunk_length must be a positive integer; received chunk_length=0"),
    ({"attention_options": {"lsh": {"num_buckets": 0}}},
     r"num_buckets must be None, an even integer"),
    ({"layer_norm_epsilon": -1.0}, r"layer_norm_epsilon must be a non-neg"),
    ({"attention_types": ("linformer",), "causal": False,
      "attention_options": {"linformer": {"projected_length": 0}}},
     r"projected_length must be a positive"),
])
def test_bad_backbone_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backbone(**kwargs)


def test_task_models_check_causality():
    with pytest.raises(ValueError, match="causal"):
        ReformerCausalLM(backbone(causal=False))
    with pytest.raises(ValueError, match="causal"):
        ReformerClassifier(backbone(causal=True), num_classes=2)


def test_layerwise_linformer_shares_one_projection(tmp_path):
    classifier = ReformerClassifier(
        backbone(causal=False, attention_types=("linformer",) * 3,
                 attention_options={"linformer": {"sharing": "layerwise",
                                                  "projected_length": 16}}),
        num_classes=2)
    projections = [w for w in classifier.weights
                   if "linformer_projection" in w.path]
    assert len(projections) == 1 and projections[0].shape == (16, 64)
    x, _ = batch(4)
    before = to_numpy(projections[0])
    classifier.compile(optimizer=keras.optimizers.SGD(0.5),
                       loss=keras.losses.SparseCategoricalCrossentropy(
                           from_logits=True))
    classifier.fit(x, np.array([0, 1, 1, 0]), epochs=1, verbose=0)
    assert np.abs(to_numpy(projections[0]) - before).max() > 0
    path = str(tmp_path / "layerwise.keras")
    classifier.save(path)
    loaded = keras.models.load_model(path)
    assert_close(loaded.predict(x, verbose=0),
                 classifier.predict(x, verbose=0), atol=0)
    # Still one matrix after loading: changing it changes every layer.
    attentions = loaded.backbone.attention_layers
    assert all(a.key_projection is attentions[0].key_projection
               for a in attentions)


def test_encoder_jit_compile_parity_for_linformer_and_local():
    x, _ = batch(8)
    labels = np.arange(8) % 2
    models = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(3)
        model = ReformerClassifier(
            backbone(causal=False, attention_types=("linformer", "local")),
            num_classes=2)
        # SGD moves weights in proportion to the gradients (Adam would
        # amplify float noise in near-zero gradients).
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True), jit_compile=jit_compile)
        models.append(model)
    initial = models[0].get_weights()
    models[1].set_weights(initial)
    for model in models:
        model.fit(x, labels, batch_size=4, epochs=2, shuffle=False, verbose=0)
    moved = [np.abs(a - b).max() for a, b in
             zip(models[0].get_weights(), initial)]
    assert max(moved) > 1e-3
    # XLA fuses and orders float32 sums its own way: measured up to 1.35e-5
    # apart after the two epochs on an AMD EPYC host (earlier hosts: 1e-5).
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        assert_close(a, b, atol=5e-5)

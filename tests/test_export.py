"""SavedModel export: served without keras_reformer, dynamic shapes, atomic."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer import export
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM
from keras_reformer.models import ReformerClassifier

VOCABULARY = 256
MAX_LENGTH = 64

# Runs in a fresh interpreter. keras_reformer is pip-installed in editable
# mode, so it stays importable from any directory through the import hook
# that the venv's `__editable__*.pth` file installs; neither unsetting
# PYTHONPATH nor changing directory removes it, and `python -S` would drop
# TensorFlow's site-packages as well. The child therefore puts a finder at
# the front of `sys.meta_path` that refuses `keras_reformer` and its
# submodules before any other finder is asked, checks that the import really
# fails, loads and calls the SavedModel, and finally checks that nothing
# imported keras_reformer behind its back. `-I` (isolated mode) additionally
# ignores PYTHON* variables and keeps the working directory off `sys.path`.
CHILD = r"""
import importlib.abc
import sys


class RefuseKerasReformer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "keras_reformer" or name.startswith("keras_reformer."):
            raise ModuleNotFoundError(f"{name} is blocked here", name=name)
        return None


sys.meta_path.insert(0, RefuseKerasReformer())
try:
    import keras_reformer  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    sys.exit("keras_reformer is still importable in the child")

import numpy as np
import tensorflow as tf

export_dir, io_dir = sys.argv[1], sys.argv[2]
serve = tf.saved_model.load(export_dir).signatures["serving_default"]
inputs = np.load(io_dir + "/inputs.npz")
outputs = {}
for key in sorted(inputs.files):
    ids = tf.constant(inputs[key])
    result = serve(token_ids=ids, padding_mask=tf.ones_like(ids))
    assert sorted(result) == ["logits"], sorted(result)
    outputs[key] = result["logits"].numpy()
np.savez(io_dir + "/outputs.npz", **outputs)
generate = tf.saved_model.load(export_dir).signatures["generate"]
prompts = np.load(io_dir + "/prompts.npz")
generated = {}
for name, (max_length, top_k, temperature, seed) in [
        ("greedy", (12, 0, 0.0, 0)), ("top_1", (12, 1, 1.0, 3)),
        ("top_5", (12, 5, 1.0, 3)), ("top_5_again", (12, 5, 1.0, 3)),
        ("top_5_seed_4", (12, 5, 1.0, 4))]:
    result = generate(
        token_ids=tf.constant(prompts["token_ids"]),
        padding_mask=tf.constant(prompts["padding_mask"]),
        max_length=tf.constant(max_length), top_k=tf.constant(top_k),
        temperature=tf.constant(temperature), seed=tf.constant(seed))
    assert sorted(result) == ["padding_mask", "token_ids"], sorted(result)
    generated[name] = result["token_ids"].numpy()
np.savez(io_dir + "/generated.npz", **generated)
loaded = [m for m in sys.modules
          if m == "keras_reformer" or m.startswith("keras_reformer.")]
if loaded:
    sys.exit(f"the SavedModel imported {loaded}")
print("served", {k: v.shape for k, v in outputs.items()})
"""


def tiny_lm(seed):
    return ReformerCausalLM(ReformerBackbone(
        vocabulary_size=VOCABULARY, hidden_dim=16, num_heads=2, head_dim=8,
        intermediate_dim=32, attention_types=["lsh", "full"],
        axial_shape=(8, 8), feed_forward_chunk_length=16, seed=seed,
        attention_options={"lsh": {"chunk_length": 16, "num_hashes": 2,
                                   "num_buckets": 4}}))


def tiny_classifier(seed):
    """A model that exports faster than an LM (no `generate` signature)."""
    return ReformerClassifier(ReformerBackbone(
        vocabulary_size=VOCABULARY, hidden_dim=16, num_heads=2, head_dim=8,
        intermediate_dim=32, attention_types=["local"], axial_shape=(8, 8),
        causal=False, seed=seed, attention_options={
            "local": {"chunk_length": 16, "num_chunks_after": 1}}),
        num_classes=3)


def python_logits(model, token_ids):
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return keras.ops.convert_to_numpy(model(inputs, training=False))


def served_logits(path, token_ids):
    serve = tf.saved_model.load(path).signatures["serving_default"]
    ids = tf.constant(token_ids)
    return serve(token_ids=ids, padding_mask=tf.ones_like(ids))[
        "logits"].numpy()


def random_ids(batch, length, seed):
    return np.random.RandomState(seed).randint(
        0, VOCABULARY, (batch, length)).astype("int32")


def child_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_lm(seed=1)
    path = str(tmp_path_factory.mktemp("export") / "reformer_lm")
    assert export.export_for_serving(model, path) == path
    return model, path


def test_signature_is_dynamic_int32_token_ids_to_logits(exported):
    _, path = exported
    serve = tf.saved_model.load(path).signatures["serving_default"]
    _, kwargs = serve.structured_input_signature
    assert sorted(kwargs) == ["padding_mask", "token_ids"]
    assert {spec.dtype for spec in kwargs.values()} == {tf.int32}
    assert {tuple(spec.shape.as_list()) for spec in kwargs.values()} == {
        (None, None)}
    assert list(serve.structured_outputs) == ["logits"]
    assert serve.structured_outputs["logits"].shape.as_list() == [
        None, None, VOCABULARY]


PROMPTS = {"token_ids": np.array([[5, 6, 7, 0], [8, 9, 10, 11]], "int32"),
           "padding_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], "int32")}


def test_served_without_keras_reformer_matches_python(exported, tmp_path):
    model, path = exported
    inputs = {"small": random_ids(2, 17, seed=0),
              "large": random_ids(3, MAX_LENGTH, seed=1)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    np.savez(tmp_path / "prompts.npz", **PROMPTS)
    run = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, path, str(tmp_path)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True,
        timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    outputs = np.load(tmp_path / "outputs.npz")
    for key, token_ids in inputs.items():
        expected = python_logits(model, token_ids)
        assert outputs[key].shape == expected.shape == (
            *token_ids.shape, VOCABULARY)
        np.testing.assert_allclose(outputs[key], expected, atol=1e-4)
    # Different inputs give different logits (the check is not vacuous).
    assert np.abs(outputs["large"][:2, :17] - outputs["small"]).max() > 1e-2
    check_served_generation(model, np.load(tmp_path / "generated.npz"))


def check_served_generation(model, generated):
    """The `generate` signature: greedy as Python's greedy `generate()`,
    top-1 sampling greedy too, top-5 sampling reproducible per seed and
    always among the 5 best tokens of the cached logits."""
    model.compile(sampler="greedy")
    greedy = model.generate(PROMPTS, max_length=12)["token_ids"]
    np.testing.assert_array_equal(generated["greedy"], greedy)
    np.testing.assert_array_equal(generated["top_1"], greedy)
    np.testing.assert_array_equal(generated["top_5"],
                                  generated["top_5_again"])
    assert (generated["top_5"] != generated["top_5_seed_4"]).any()
    sampled = generated["top_5"]
    np.testing.assert_array_equal(sampled[:, :3], PROMPTS["token_ids"][:, :3])
    _, cache = model.build_cache(sampled, 2)
    for t in range(2, 11):
        logits, _, cache = model.call_with_cache(sampled[:, t:t + 1], cache, t)
        best_5 = np.argsort(keras.ops.convert_to_numpy(logits)[:, 0])[:, -5:]
        for row in range(2):
            if t + 1 >= 4 or not PROMPTS["padding_mask"][row, t + 1]:
                assert sampled[row, t + 1] in best_5[row]


def test_generate_signature_rejects_bad_requests(exported):
    _, path = exported
    generate = tf.saved_model.load(path).signatures["generate"]
    settings = dict(top_k=tf.constant(0), temperature=tf.constant(0.0),
                    seed=tf.constant(0))
    not_right_padded = re.escape(
        "padding_mask must be 1s followed by 0s in every row (right-padded "
        "prompts)")
    for mask, max_length, message in [
            ([[0, 0, 0]], 4, "at least one token"),
            ([[1, 1, 1]], 1, "at least the prompt width"),
            ([[1, 1, 1]], MAX_LENGTH + 1, "at most the 64 positions"),
            ([[0, 1, 1]], 4, not_right_padded),  # left padding
            ([[1, 0, 1]], 4, not_right_padded),  # a hole
            ([[1, 2, 0]], 4, not_right_padded)]:  # not 0 or 1
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            generate(token_ids=tf.constant([[1, 2, 3]]),
                     padding_mask=tf.constant(mask),
                     max_length=tf.constant(max_length), **settings)
    request = dict(token_ids=tf.constant([[1, 2]]),
                   padding_mask=tf.constant([[1, 1]]),
                   max_length=tf.constant(4), seed=tf.constant(0))
    for top_k, temperature, message in [
            (0, float("nan"), r"temperature must be a finite number >= 0 "
                              r"\(0: greedy\); received. \[nan\]"),
            (0, float("inf"), r"finite number >= 0 .*received. \[inf\]"),
            (0, -1.0, r"finite number >= 0 .*received. \[-1\]"),
            (-1, 1.0, r"top_k must be >= 0 \(0: no cut-off\)")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            generate(top_k=tf.constant(top_k),
                     temperature=tf.constant(temperature), **request)


def test_saved_model_cli_runs_the_serving_signature(exported):
    model, path = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    run = subprocess.run(
        [cli, "run", "--dir", path, "--tag_set", "serve",
         "--signature_def", "serving_default",
         "--input_exprs", "token_ids=[[1,2,3]];padding_mask=[[1,1,1]]"],
        env=child_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    printed = run.stdout.split("Result for output key logits:")[1]
    assert "..." not in printed  # numpy printed every value
    values = np.array([float(v) for v in re.findall(
        r"[-+]?\d+\.\d*(?:[eE][-+]?\d+)?", printed)])
    expected = python_logits(model, np.array([[1, 2, 3]], "int32"))
    assert values.size == expected.size == 3 * VOCABULARY
    np.testing.assert_allclose(values, expected.ravel(), atol=1e-4)


def test_failed_export_leaves_the_previous_model(tmp_path, monkeypatch):
    path = str(tmp_path / "model")
    good, other = tiny_classifier(seed=1), tiny_classifier(seed=2)
    export.export_for_serving(good, path)
    token_ids = random_ids(2, 20, seed=3)
    before = served_logits(path, token_ids)

    real_save = tf.saved_model.save

    def save_then_fail(obj, export_dir, *args, **kwargs):
        real_save(obj, export_dir, *args, **kwargs)  # written in full ...
        raise OSError("simulated crash at the end of the write")  # ... then

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(OSError, match="simulated crash"):
        export.export_for_serving(other, path)
    monkeypatch.undo()
    np.testing.assert_array_equal(served_logits(path, token_ids), before)
    # The partial export was cleaned away; only the good model is left.
    assert os.listdir(tmp_path) == ["model"]

    # A successful export replaces the model.
    export.export_for_serving(other, path)
    replaced = served_logits(path, token_ids)
    np.testing.assert_allclose(replaced, python_logits(other, token_ids),
                               atol=1e-4)
    assert np.abs(replaced - before).max() > 1e-2
    assert os.listdir(tmp_path) == ["model"]


def test_export_refuses_to_replace_a_directory_without_a_savedmodel(
        tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="no saved_model.pb"):
        export.export_for_serving(tiny_classifier(seed=1),
                                  str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_save_keras_model_round_trip(tmp_path):
    model = tiny_lm(seed=1)
    path = export.save_keras_model(model, str(tmp_path / "lm.keras"))
    assert os.listdir(tmp_path) == ["lm.keras"]
    restored = keras.saving.load_model(path)
    token_ids = random_ids(2, 24, seed=4)
    np.testing.assert_allclose(python_logits(restored, token_ids),
                               python_logits(model, token_ids), atol=1e-5)
    with pytest.raises(ValueError, match="must end in '.keras'"):
        export.save_keras_model(model, str(tmp_path / "lm.h5"))


@pytest.mark.parametrize("attention_types,causal", [
    (["lsh", "local", "full"], True),
    (["linformer", "local"], False),
    (["lsh", "linformer"], False),
])
def test_every_attention_mix_exports(tmp_path, attention_types, causal):
    """The serving signature works for every attention type: LMs, and
    bidirectional classifiers (Linformer)."""
    backbone = ReformerBackbone(
        vocabulary_size=VOCABULARY, hidden_dim=16, num_heads=2, head_dim=8,
        intermediate_dim=32, attention_types=attention_types,
        axial_shape=(8, 8), causal=causal, seed=3, attention_options={
            "lsh": {"chunk_length": 16, "num_hashes": 2, "num_buckets": 4,
                    "num_chunks_after": 0 if causal else 1},
            "local": {"chunk_length": 16,
                      "num_chunks_after": 0 if causal else 1},
            "linformer": {"projected_length": 16}})
    model = ReformerCausalLM(backbone) if causal else ReformerClassifier(
        backbone, num_classes=3)
    path = export.export_for_serving(model, str(tmp_path / "model"))
    for batch, length in ((2, 64), (1, 37)):
        ids = random_ids(batch, length, seed=length)
        np.testing.assert_allclose(served_logits(path, ids),
                                   python_logits(model, ids), atol=1e-4)


def test_only_tasks_are_exported(tmp_path):
    """The task declares what it serves; a backbone declares nothing."""
    with pytest.raises(ValueError, match="takes a keras_reformer task .* "
                                         "received a ReformerBackbone"):
        export.export_for_serving(tiny_lm(seed=1).backbone,
                                  str(tmp_path / "backbone"))

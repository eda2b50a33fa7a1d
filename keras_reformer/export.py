"""Export a Reformer task for serving (TF SavedModel), save `.keras` files
and presets.

Every writer is atomic: they write into a temporary sibling and rename it
over the destination only once it is complete, so an export that fails or is
killed half-way never leaves a half-written model where a good one was.
"""

import os
import shutil
import tempfile

import keras
import keras_hub
import tensorflow as tf

from keras_reformer.models.reformer_task import ReformerTask

SERVING_ENDPOINT = "serve"
GENERATE_ENDPOINT = "generate"
GENERATE_SIGNATURE = [
    tf.TensorSpec((None, None), tf.int32, name="token_ids"),
    tf.TensorSpec((None, None), tf.int32, name="padding_mask"),
    tf.TensorSpec((), tf.int32, name="max_length"),
    tf.TensorSpec((), tf.int32, name="top_k"),
    tf.TensorSpec((), tf.float32, name="temperature"),
    tf.TensorSpec((), tf.int32, name="seed"),
]


def export_for_serving(model, path, verbose=False):
    """Writes `model` as a TF SavedModel for serving.

    The signature `serving_default` takes the task's `serving_inputs`,
    int32 with any batch size and any length up to the model's maximum:
    `token_ids` and `padding_mask` `(batch, length)` (1: real token, 0:
    padding, anywhere; any other value is an `InvalidArgumentError`), and
    for a `ReformerMaskedLM` `mask_positions` `(batch, masked)`. It returns
    the model's output as `{"logits": float32}`: `(batch, length,
    vocabulary)` for a `ReformerCausalLM`, `(batch, classes)` for a
    `ReformerClassifier`, `(batch, masked, vocabulary)` for a
    `ReformerMaskedLM`. A padded batch gives each row, at its real
    positions, the logits of the row served alone. The model runs with
    `training=False`, so LSH layers hash with their fixed rotations and the
    outputs are deterministic. Loading needs only TensorFlow, not
    keras_reformer (TF Serving's case).

    A `ReformerCausalLM` also gets the signature `generate` (cached
    decoding): int32 `token_ids` and `padding_mask` `(batch, width)` (each
    row's prompt, right-padded, at least one token), scalars `max_length`
    (total tokens per row, at least `width`), `top_k` (int, 0: no cut-off),
    `temperature` (finite float, 0: greedy) and `seed` (int) ->
    `{"token_ids", "padding_mask"}` `(batch, max_length)` int32. A mask
    that is not 1s followed by 0s in each row (left padding, holes), a
    negative `top_k` or a negative or non-finite `temperature` is an
    `InvalidArgumentError`. Sampling is reproducible for a seed and keeps
    no state between calls.

    `keras.export.ExportArchive` registers the endpoints; on writing, it
    also publishes its first endpoint (`serve`) under `serving_default`,
    the signature TF Serving calls by default.

    It runs on the TensorFlow backend (the signatures are TensorFlow
    functions). A model trained on another backend is exported from its
    `.keras` file in a TensorFlow process:
    `python examples/saved_lm.py export MODEL.keras DIRECTORY`.

    Args:
        model: a `ReformerCausalLM`, `ReformerMaskedLM` or
            `ReformerClassifier`.
        path: destination directory; an existing SavedModel there is
            replaced only once the new one is completely written.
        verbose: bool, let Keras print the exported endpoints.

    Returns:
        The absolute destination path.

    Example:
    >>> from keras_reformer.models import ReformerBackbone, ReformerCausalLM
    >>> lm = ReformerCausalLM(ReformerBackbone(vocabulary_size=256,
    ...     hidden_dim=32, num_heads=2, head_dim=16, intermediate_dim=64,
    ...     axial_shape=(8, 8),
    ...     attention_options={"lsh": {"chunk_length": 16}}))
    >>> path = export_for_serving(lm, "saved_models/reformer_lm")
    >>> served = tf.saved_model.load("saved_models/reformer_lm")
    >>> served.signatures["serving_default"](
    ...     token_ids=tf.constant([[104, 105, 0]]),
    ...     padding_mask=tf.constant([[1, 1, 0]]))["logits"].shape
    TensorShape([1, 3, 256])
    >>> served.signatures["generate"](
    ...     token_ids=tf.constant([[104, 105]]), padding_mask=tf.constant(
    ...     [[1, 1]]), max_length=tf.constant(40), top_k=tf.constant(10),
    ...     temperature=tf.constant(1.0), seed=tf.constant(7)
    ...     )["token_ids"].shape
    TensorShape([1, 40])
    """
    if not isinstance(model, ReformerTask):
        raise ValueError(
            "export_for_serving takes a keras_reformer task "
            "(ReformerCausalLM, ReformerMaskedLM, ReformerClassifier), "
            "which declares its serving inputs; received a "
            f"{type(model).__name__}.")
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"export_for_serving writes TensorFlow signatures and needs the "
            f"TensorFlow backend; the active backend is {backend!r}. Save "
            "the model as a .keras file (save_keras_model) and export that "
            "with KERAS_BACKEND=tensorflow: python examples/saved_lm.py "
            "export MODEL.keras DIRECTORY.")
    path = _check_destination(path, is_directory=True)
    archive = keras.export.ExportArchive()
    archive.track(model)

    archive.add_endpoint(SERVING_ENDPOINT, *_serving_function(model))
    if model.serves_generation:
        archive.add_endpoint(GENERATE_ENDPOINT, _generate_function(model),
                             input_signature=GENERATE_SIGNATURE)
    _write_directory(path, lambda directory: archive.write_out(
        directory, verbose=verbose))
    return path


def _serving_function(model):
    """`(function, input_signature)` of the serving endpoint: the task's
    `serving_inputs` to `{"logits"}`."""
    names = model.serving_inputs
    positions = model.backbone.position_embedding

    def serve(*tensors):
        inputs = dict(zip(names, tensors))
        # The Python model names the limit; the graph would fail in a gather.
        tf.debugging.assert_less_equal(
            tf.shape(inputs["token_ids"])[1], positions.max_length,
            message=f"token_ids are longer than the {positions.max_length} "
            f"positions of axial_shape={positions.axial_shape}")
        logits = model(inputs, training=False)
        return {"logits": tf.cast(logits, tf.float32)}

    return serve, [tf.TensorSpec((None, None), tf.int32, name=name)
                   for name in names]


def _generate_function(lm):
    """The `generate` signature of a causal LM: cached decoding, greedy
    (`temperature` 0) or sampled from the `top_k` most likely tokens (0:
    all) at `temperature`, reproducibly for a given `seed`.

    Sampling draws `argmax(logits / temperature + Gumbel noise)` (the
    Gumbel-max trick: a sample of `softmax(logits / temperature)`) with
    keras-hub's greedy sampler, the noise from stateless random numbers of
    `(seed, position)`, so the signature keeps no state and concurrent calls
    do not interfere.
    """
    greedy = keras_hub.samplers.GreedySampler()

    def generate(token_ids, padding_mask, max_length, top_k, temperature,
                 seed):
        prompt_length = tf.shape(token_ids)[1]
        checks = [
            tf.debugging.assert_greater_equal(
                max_length, prompt_length,
                message="max_length must be at least the prompt width"),
            tf.debugging.assert_less_equal(
                max_length, lm.backbone.max_length,
                message=f"max_length must be at most the "
                        f"{lm.backbone.max_length} positions of the model"),
            tf.debugging.assert_positive(
                tf.reduce_sum(padding_mask, axis=1),
                message="every prompt needs at least one token"),
            tf.debugging.assert_equal(
                padding_mask, tf.cast(
                    tf.range(prompt_length)[None] < tf.reduce_sum(
                        padding_mask, axis=1, keepdims=True), tf.int32),
                message="padding_mask must be 1s followed by 0s in every "
                        "row (right-padded prompts)"),
            tf.debugging.assert_non_negative(
                top_k, message="top_k must be >= 0 (0: no cut-off)"),
            tf.debugging.Assert(
                tf.logical_and(tf.math.is_finite(temperature),
                               temperature >= 0),
                ["temperature must be a finite number >= 0 (0: greedy); "
                 "received", temperature]),
        ]
        with tf.control_dependencies(checks):
            extra = [[0, 0], [0, max_length - prompt_length]]
            inputs = {"token_ids": tf.pad(token_ids, extra),
                      "padding_mask": tf.pad(padding_mask, extra)}

        def sample(logits, index):
            vocabulary = tf.shape(logits)[-1]
            k = tf.where(top_k > 0, tf.minimum(top_k, vocabulary), vocabulary)
            kth_best = tf.math.top_k(logits, k).values[:, -1:]
            kept = tf.where(logits >= kth_best, logits, -1e9)
            uniform = tf.random.stateless_uniform(
                tf.shape(logits), tf.stack([seed, index]), minval=1e-20,
                maxval=1.0)
            noisy = kept / tf.maximum(temperature, 1e-6) - tf.math.log(
                -tf.math.log(uniform))
            return tf.where(temperature > 0, noisy, logits)

        outputs = lm.generate_step(inputs, sampler=greedy,
                                   process_logits=sample)
        return {"token_ids": outputs["token_ids"],
                "padding_mask": tf.cast(outputs["padding_mask"], tf.int32)}

    return generate


def save_keras_model(model, path):
    """Saves `model` to a `.keras` file, atomically (see `export_for_serving`).

    Args:
        model: a Keras model.
        path: destination file name, ending in `.keras`.

    Returns:
        The absolute destination path.

    Example:
    >>> from keras_reformer.models import ReformerBackbone, ReformerCausalLM
    >>> lm = ReformerCausalLM(ReformerBackbone(vocabulary_size=256,
    ...     hidden_dim=32, num_heads=2, head_dim=16, intermediate_dim=64,
    ...     axial_shape=(8, 8),
    ...     attention_options={"lsh": {"chunk_length": 16}}))
    >>> path = save_keras_model(lm, "saved_models/reformer_lm.keras")
    >>> keras.saving.load_model(path).count_params() == lm.count_params()
    True
    """
    if not os.fspath(path).endswith(".keras"):
        raise ValueError(f"path must end in '.keras'; received path={path!r}.")
    path = _check_destination(path, is_directory=False)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)[:-len('.keras')]}.partial-",
        suffix=".keras", dir=os.path.dirname(path))
    os.close(handle)
    try:
        model.save(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp made it 0o600
        os.replace(temporary, path)  # atomic for files on one filesystem
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def save_preset(task, path):
    """Saves `task` as a keras-hub preset directory, atomically (see
    `export_for_serving`): config, weights, and the preprocessor with its
    tokenizer, for `from_preset`.

    Args:
        task: a Reformer task with a preprocessor (its tokenizer belongs to
            the preset).
        path: destination directory; an existing preset there is replaced
            only once the new one is completely written.

    Returns:
        The absolute destination path.

    Example:
    >>> from keras_reformer.models import ReformerBackbone, ReformerCausalLM
    >>> from keras_reformer.text_data import byte_preprocessor
    >>> lm = ReformerCausalLM(ReformerBackbone(vocabulary_size=256,
    ...     hidden_dim=32, num_heads=2, head_dim=16, intermediate_dim=64,
    ...     axial_shape=(8, 8),
    ...     attention_options={"lsh": {"chunk_length": 16}}),
    ...     preprocessor=byte_preprocessor(64))
    >>> path = save_preset(lm, "saved_models/reformer_lm_preset")
    >>> keras_hub.models.CausalLM.from_preset(path).count_params() == (
    ...     lm.count_params())
    True
    """
    if getattr(task, "preprocessor", None) is None:
        raise ValueError(
            "save_preset needs a task with a preprocessor (its tokenizer is "
            f"part of the preset); the {type(task).__name__} has none. "
            "Attach one, e.g. task.preprocessor = "
            "text_data.byte_preprocessor(sequence_length).")
    path = _check_destination(path, is_directory=True, marker="config.json")
    _write_directory(path, task.save_to_preset)
    return path


def _write_directory(path, write):
    """Runs `write(directory)` on a temporary sibling of `path` and renames
    it over `path` once complete; on failure nothing is left behind."""
    temporary = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.partial-",
        dir=os.path.dirname(path))
    try:
        write(temporary)
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp made it 0o700
        _replace_directory(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_destination(path, is_directory, marker="saved_model.pb"):
    """The absolute path, after checking what already lies there: a
    directory is replaced only if it is empty or holds `marker` (the file
    that says it is what we write)."""
    path = os.path.abspath(os.fspath(path))
    if is_directory and os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(
                f"path must be a directory for the SavedModel; received "
                f"path={path!r}, which is an existing file.")
        if os.listdir(path) and not os.path.exists(
                os.path.join(path, marker)):
            raise ValueError(
                f"path={path!r} is a non-empty directory that holds no "
                f"{marker}; refusing to replace it. Pass a new directory "
                "or one written here before.")
    if not is_directory and os.path.isdir(path):
        raise ValueError(f"path must be a file name; received path={path!r}, "
                         "which is an existing directory.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _replace_directory(source, destination):
    """Renames the finished directory `source` to `destination`.

    A directory cannot be renamed over a non-empty one, so an existing
    destination is first renamed aside and deleted only once the new one is
    in place; if the second rename fails, the old one is put back.
    """
    old = None
    if os.path.exists(destination):
        old = tempfile.mkdtemp(
            prefix=f".{os.path.basename(destination)}.old-",
            dir=os.path.dirname(destination))
        os.rmdir(old)
        os.rename(destination, old)
    try:
        os.rename(source, destination)
    except BaseException:
        if old is not None:
            os.rename(old, destination)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

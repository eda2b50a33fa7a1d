"""Export a Reformer LM for serving (TF SavedModel) and save `.keras` files.

Both writers are atomic: they write into a temporary sibling and rename it
over the destination only once it is complete, so an export that fails or is
killed half-way never leaves a half-written model where a good one was.
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf

SERVING_ENDPOINT = "serve"


def export_for_serving(model, path, verbose=False):
    """Writes `model` as a TF SavedModel with a `serving_default` signature.

    The signature takes `token_ids`, int32 `(batch, length)` with any batch
    size and any length up to the model's maximum, treats every token as real
    (padding mask of ones) and returns the model's output as
    `{"logits": float32}`: `(batch, length, vocabulary)` for a `ReformerCausalLM`,
    `(batch, classes)` for a `ReformerClassifier`. The model runs with `training=False`, so LSH layers hash
    with their fixed rotations and the outputs are deterministic. Loading
    needs only TensorFlow, not keras_reformer (TF Serving's case).

    `keras.export.ExportArchive` registers the endpoint `serve`; on writing,
    it also publishes its first endpoint under `serving_default`, the
    signature TF Serving calls by default.

    Args:
        model: a Keras model with dict inputs `token_ids` and `padding_mask`
            (e.g. a `ReformerCausalLM`) returning logits.
        path: destination directory; an existing SavedModel there is
            replaced only once the new one is completely written.
        verbose: bool, let Keras print the exported endpoints.

    Returns:
        The absolute destination path.

    Example:
    >>> export_for_serving(lm, "saved_models/reformer_lm")
    >>> served = tf.saved_model.load("saved_models/reformer_lm")
    >>> served.signatures["serving_default"](
    ...     token_ids=tf.constant([[104, 105]]))["logits"].shape
    TensorShape([1, 2, 256])
    """
    path = _check_destination(path, is_directory=True)
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(token_ids):
        inputs = {"token_ids": token_ids,
                  "padding_mask": tf.ones_like(token_ids)}
        logits = model(inputs, training=False)
        return {"logits": tf.cast(logits, tf.float32)}

    archive.add_endpoint(
        SERVING_ENDPOINT, serve,
        input_signature=[tf.TensorSpec((None, None), tf.int32,
                                       name="token_ids")])
    temporary = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.partial-",
        dir=os.path.dirname(path))
    try:
        archive.write_out(temporary, verbose=verbose)
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp made it 0o700
        _replace_directory(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


def save_keras_model(model, path):
    """Saves `model` to a `.keras` file, atomically (see `export_for_serving`).

    Args:
        model: a Keras model.
        path: destination file name, ending in `.keras`.

    Returns:
        The absolute destination path.

    Example:
    >>> save_keras_model(lm, "saved_models/reformer_lm.keras")
    >>> lm = keras.saving.load_model("saved_models/reformer_lm.keras")
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


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_destination(path, is_directory):
    """The absolute path, after checking what already lies there."""
    path = os.path.abspath(os.fspath(path))
    if is_directory and os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(
                f"path must be a directory for the SavedModel; received "
                f"path={path!r}, which is an existing file.")
        if os.listdir(path) and not os.path.exists(
                os.path.join(path, "saved_model.pb")):
            raise ValueError(
                f"path={path!r} is a non-empty directory that holds no "
                "SavedModel (no saved_model.pb); refusing to replace it. "
                "Pass a new or SavedModel directory.")
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

"""Keras's distribution API on JAX through examples/train_lm.py.

Two processes on 127.0.0.1 (one CPU device each, gloo collectives) train
with `model.fit` for 3 epochs, one run after another:

- `dp`: `--distribution data_parallel`, with `--tensorboard-dir`;
- `mp`: `--distribution model_parallel`, heads and feed-forward width split
  over the two processes' devices (`ReformerBackbone.get_layout_map`), with
  an `EarlyStopping` that stops it after epoch 2;
- `killed`: `dp` again, ending both processes abruptly (`os._exit`,
  nothing cleans up) after epoch 1, once the chief has backed it up.

A third process trains `single`, the run of `dp` on one device. Then two
new processes run `killed`'s command again (`resumed`). All runs start
from the same weights and see the same global batches, so they must end
with the same weights (`mp` with those of `single` after epoch 2).

The processes share a persistent compilation cache: `killed` and
`resumed` run the programs compiled for `dp`.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tests.processes import ROOT
from tests.processes import fast_compile_xla_flags
from tests.processes import free_ports
from tests.processes import run_workers
from tests.processes import tensorboard_scalars

# Three epochs of 2 steps, 4 x 32 bytes, one LSH layer of 2 heads (hidden
# 16, feed-forward 32), Adam with warm-up.
FLAGS = ["--sequence-length", "32", "--num-layers", "1", "--hidden-dim",
         "16", "--chunk-length", "16", "--batch-size", "4",
         "--steps-per-epoch", "2", "--epochs", "3", "--max-corpus-bytes",
         "20000", "--sample-length", "8", "--learning-rate", "1e-2"]

# argv: output prefix, then a JSON list of runs, each {"name", "flags",
# "early_stopping": bool, "kill_after": epoch or absent}. Each run goes
# through train_lm.main; its weights are saved to <prefix>.<name>.npz, and
# a RESULT line gives its history, when EarlyStopping stopped it and the
# sharding of its weights.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, "examples")
    import keras
    import numpy as np
    import train_lm

    class Kill(keras.callbacks.Callback):
        def __init__(self, after):
            super().__init__()
            self.after = after

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == self.after:
                from jax.experimental import multihost_utils
                # Every process is done with the epoch: the chief has
                # backed it up.
                multihost_utils.sync_global_devices("kill")
                print("KILLED", flush=True)
                os._exit(0)

    output, runs = sys.argv[1], json.loads(sys.argv[2])
    for run in runs:
        print(f"RUN {run['name']}", flush=True)
        stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0,
                                             min_delta=100.0)
        callbacks = [stop] if run.get("early_stopping") else []
        if run.get("kill_after"):
            callbacks.append(Kill(run["kill_after"]))
        model = train_lm.main(run["flags"], callbacks)
        with train_lm.whole_weights(model):
            np.savez(f"{output}.{run['name']}.npz", *model.get_weights())
        print("RESULT" + json.dumps({run["name"]: {
            "history": model.history.history,
            "stopped_epoch": stop.stopped_epoch,
            "sharding": {v.path: list(v.value.sharding.spec)
                         for v in model.backbone.weights
                         if hasattr(v.value.sharding, "spec")}}}),
              flush=True)
""")


def run(name, *flags, **options):
    return dict(name=name, flags=FLAGS + list(flags), **options)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`(directory, outputs, results)`: the output of every run by process
    (`outputs["dp"][1]`: `dp` in process 1) and its RESULT."""
    directory = tmp_path_factory.mktemp("jax_distribution")
    env = dict(
        os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=str(directory / "compilation_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        # Compiling costs more than these runs' few steps.
        XLA_FLAGS=fast_compile_xla_flags())

    def command(process, runs):
        return ([sys.executable, "-c", SCRIPT,
                 str(directory / f"process{process}"), json.dumps(runs)], env)

    def pair(runs):
        port, = free_ports(1)
        return [command(index, [dict(run, flags=run["flags"] + [
            "--num-processes", "2", "--process-id", str(index),
            "--coordinator-address", f"127.0.0.1:{port}"]) for run in runs])
            for index in range(2)]

    def export(name):
        return ["--export-dir", str(directory / name),
                "--tensorboard-dir", str(directory / f"{name}.logs")]

    data_parallel = ["--distribution", "data_parallel"]
    finished = run_workers(pair([
        run("dp", *data_parallel, *export("dp")),
        run("mp", "--distribution", "model_parallel", *export("mp"),
            early_stopping=True),
        run("killed", *data_parallel, *export("resumed"), kill_after=1),
    ]) + [command(2, [run("single", *export("single"))])], timeout=600)
    finished += run_workers(pair([
        run("resumed", *data_parallel, *export("resumed"))]), timeout=300)
    outputs, results = {}, {}
    for process, (code, output) in zip([0, 1, 2, 0, 1], finished):
        assert code == 0, output[-5000:]
        for part in output.split("RUN ")[1:]:
            name = part.split("\n", 1)[0]
            outputs.setdefault(name, {})[process] = part
            for line in part.splitlines():
                if line.startswith("RESULT"):
                    results.setdefault(name, {})[process] = json.loads(
                        line[len("RESULT"):])[name]
    return directory, outputs, results


def weights(directory, process, name):
    with np.load(directory / f"process{process}.{name}.npz") as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def held_out_bits(output):
    return re.search(r"by epoch: (.*)", output).group(1)


def sample(output):
    return output.split("----- sample -----\n")[1].split("\n-----")[0]


def assert_same_weights(actual, expected, atol):
    assert len(actual) == len(expected) > 0
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def assert_same_history(actual, expected, atol=1e-5):
    assert sorted(actual) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(actual[name], values, rtol=0, atol=atol,
                                   err_msg=name)


def test_two_processes_train_alike_and_as_one_process_on_the_batch(runs):
    """`dp` in both processes: identical weights, those of one process
    training on the whole batch, the same history and held-out report, the
    same sample."""
    directory, outputs, results = runs
    for index in range(2):
        assert (f"over 2 device(s) of 2 process(es); this is process "
                f"{index}") in outputs["dp"][index]
    first, second, single = (weights(directory, process, name) for
                             process, name in [(0, "dp"), (1, "dp"),
                                               (2, "single")])
    assert_same_weights(second, first, atol=0)
    assert_same_weights(first, single, atol=1e-5)
    histories = [results["dp"][i]["history"] for i in range(2)]
    assert histories[0] == histories[1]
    assert len(histories[0]["loss"]) == 3
    assert_same_history(histories[0], results["single"][2]["history"])
    reported = [held_out_bits(outputs["dp"][i]) for i in range(2)]
    assert len(reported[0].split(", ")) == 3
    assert reported[0] == reported[1] == held_out_bits(
        outputs["single"][2]), reported
    assert sample(outputs["dp"][0]) == sample(outputs["dp"][1])
    # One progress bar, the chief's (Keras's per-epoch lines at verbose 2).
    progress = re.compile(r"\d+/\d+ - .* - loss: ")
    assert progress.search(outputs["dp"][0])
    assert not progress.search(outputs["dp"][1])


def test_only_process_zero_writes_files(runs):
    """`dp`: process 0 wrote the epochs' checkpoints, the `.keras` file
    holding the trained weights, the preset and the TensorBoard logs;
    process 1 wrote nothing; the finished run's backup is deleted."""
    directory, outputs, _ = runs
    assert sorted(os.listdir(directory / "dp.checkpoints")) == [
        "epoch_01.weights.h5", "epoch_02.weights.h5", "epoch_03.weights.h5"]
    assert (directory / "dp.keras").is_file()
    assert (directory / "dp_preset" / "config.json").is_file()
    assert not (directory / "dp.backup").exists()
    assert f"Saved {directory / 'dp.keras'}" in outputs["dp"][0]
    assert "Saved" not in outputs["dp"][1]
    assert "Process 1 saves nothing" in outputs["dp"][1]
    for writer in ["train", "validation"]:
        assert len(os.listdir(directory / "dp.logs" / writer)) == 1
    model = load_model(directory / "dp.keras")
    assert_same_weights(model.get_weights(), weights(directory, 0, "dp"),
                        atol=0)


def load_model(path):
    import keras_reformer  # noqa: F401  (registers the saved classes)

    return keras.saving.load_model(path, compile=False)


def test_tensorboard_logs_every_step_of_the_chief(runs):
    """Process 0 of `dp` logged the loss after each of its 6 steps (the
    epoch's running mean, as Keras logs it), as did the single process, and
    each epoch's training and held-out loss, as its History holds them."""
    directory, _, results = runs
    history = results["dp"][0]["history"]

    def logged(run, writer, tag):
        return tensorboard_scalars(directory / f"{run}.logs" / writer,
                                   tag)[tag]

    steps = logged("dp", "train", "batch_loss")
    assert [step for step, _ in steps] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [v for _, v in steps],
        [v for _, v in logged("single", "train", "batch_loss")],
        rtol=0, atol=1e-5)
    # The last step of each epoch logs the epoch's loss.
    np.testing.assert_allclose([v for _, v in steps[1::2]], history["loss"],
                               rtol=0, atol=1e-6)
    for writer, key in [("train", "loss"), ("validation", "val_loss")]:
        epochs = logged("dp", writer, "epoch_loss")
        assert [step for step, _ in epochs] == [0, 1, 2]
        np.testing.assert_allclose([v for _, v in epochs], history[key],
                                   rtol=0, atol=1e-6)


def test_model_parallel_across_processes_matches_the_unsharded_model(runs):
    """`mp`, each weight of the attention and feed-forward split over the
    two processes, stopped by EarlyStopping after epoch 2 of 3 in both:
    the losses of the single process's first two epochs and its weights
    after them, on both; process 0 saved (gathering the split weights with
    process 1) the trained weights in the `.keras` file and each epoch's
    checkpoint."""
    directory, outputs, results = runs
    single = load_model(directory / "single.keras")
    single.load_weights(directory / "single.checkpoints" /
                        "epoch_02.weights.h5")
    expected = {name: values[:2] for name, values in
                results["single"][2]["history"].items()}
    for process in range(2):
        assert results["mp"][process]["stopped_epoch"] == 1
        assert_same_history(results["mp"][process]["history"], expected)
        assert_same_weights(weights(directory, process, "mp"),
                            single.get_weights(), atol=1e-5)
        assert held_out_bits(outputs["mp"][process]) == ", ".join(
            held_out_bits(outputs["single"][2]).split(", ")[:2])
    # Query-key and value by head, output by head, the feed-forward's
    # width; nothing else.
    sharded = sorted(str(spec) for spec in
                     results["mp"][0]["sharding"].values() if "model" in spec)
    assert sharded == sorted(str(spec) for spec in [
        [None, "model", None], [None, "model", None], ["model", None, None],
        [None, "model"], ["model"], ["model", None]]), sharded
    trained = weights(directory, 0, "mp")
    model = load_model(directory / "mp.keras")
    assert_same_weights(model.get_weights(), trained, atol=0)
    assert sorted(os.listdir(directory / "mp.checkpoints")) == [
        "epoch_01.weights.h5", "epoch_02.weights.h5"]
    model.load_weights(directory / "mp.checkpoints" / "epoch_02.weights.h5")
    assert_same_weights(model.get_weights(), trained, atol=0)
    assert "Process 1 saves nothing" in outputs["mp"][1]


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(runs):
    """`killed` ended both processes after epoch 1's backup; two new
    processes with the same command resumed at epoch 2 and ended with the
    weights and held-out bits per byte of `dp`, which ran uninterrupted."""
    directory, outputs, _ = runs
    for process in range(2):
        assert "KILLED" in outputs["killed"][process]
        assert "RESULT" not in outputs["killed"][process]
        assert "resuming from epoch 2 of 3" in outputs["resumed"][process]
        assert_same_weights(weights(directory, process, "resumed"),
                            weights(directory, 0, "dp"), atol=1e-5)
    assert held_out_bits(outputs["resumed"][0]) == held_out_bits(
        outputs["dp"][0])
    assert not (directory / "resumed.backup").exists()


def expected_axes(shape, hidden=32, heads=2, head_dim=8, width=48):
    """The axes `get_layout_map` should give a weight of an attention or
    feed-forward layer, told by its shape alone (all sizes differ)."""
    return {(hidden, heads, head_dim): (None, "model", None),
            (heads, head_dim, hidden): ("model", None, None),
            (hidden, width): (None, "model"),
            (width,): ("model",),
            (width, hidden): ("model", None)}.get(tuple(shape))


def test_the_layout_map_gives_each_attention_and_feed_forward_kernel_its_rule():
    """Every weight of a backbone with each attention type: query, key,
    value and output projections split by head, feed-forward kernels and
    first bias by width, everything else (embeddings, norms, rotations,
    Linformer projections) replicated. A rule that matched nothing (after a
    weight is renamed) leaves its weights replicated and fails here; two
    rules matching one weight raise in the LayoutMap itself."""
    from keras_reformer.models import ReformerBackbone

    backbone = ReformerBackbone(
        50, hidden_dim=32, num_heads=2, head_dim=8, intermediate_dim=48,
        attention_types=["lsh", "local", "full", "linformer"],
        axial_shape=(8, 8), causal=False)
    mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"),
                                         ["cpu:0", "cpu:1"])
    layout_map = ReformerBackbone.get_layout_map(mesh)
    counts = {}
    for variable in backbone.weights:
        layout = layout_map[variable.path]
        axes = layout.axes if layout is not None else None
        in_layer = re.search(r"/(attention|feed_forward)_\d+/", variable.path)
        expected = expected_axes(variable.shape) if in_layer else None
        assert axes == expected, (variable.path, axes, expected)
        counts[axes] = counts.get(axes, 0) + 1
    # Four layers: 2 + 3 + 3 + 3 head-split input projections (LSH shares
    # queries and keys), one output projection and one feed-forward each.
    assert counts[(None, "model", None)] == 11
    for axes in [("model", None, None), (None, "model"), ("model",),
                 ("model", None)]:
        assert counts[axes] == 4, counts


def test_get_layout_map_rejects_a_mesh_without_the_model_axis():
    from keras_reformer.models import ReformerBackbone

    mesh = keras.distribution.DeviceMesh((2,), ("batch",), ["cpu:0", "cpu:1"])
    with pytest.raises(ValueError, match="model_parallel_dim_name must name "
                                         "an axis of device_mesh"):
        ReformerBackbone.get_layout_map(mesh)
    with pytest.raises(ValueError, match="device_mesh must be"):
        ReformerBackbone.get_layout_map("mesh")


def test_a_model_trained_on_jax_is_exported_from_tensorflow(runs):
    """On JAX the example trains, samples and saves, and says how to export;
    `saved_lm.py export` then writes the SavedModel from the .keras file in
    a TensorFlow process and checks its logits against the model's."""
    directory, outputs, _ = runs
    export_dir = directory / "single"
    output = outputs["single"][2]
    assert "Not exported" in output and "saved_lm.py export" in output
    assert not export_dir.exists()
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "saved_lm.py"),
         "export", str(export_dir) + ".keras", str(export_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
        env=dict(os.environ, KERAS_BACKEND="tensorflow",
                 TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    difference = re.search(r"max difference ([0-9.e+-]+)", run.stdout)
    assert difference and float(difference.group(1)) < 1e-3, run.stdout
    assert (export_dir / "saved_model.pb").is_file()

"""Keras's distribution API on JAX through examples/train_lm.py.

Two processes on 127.0.0.1 (one CPU device each, gloo collectives) train
with `--distribution data_parallel` and `model.fit`; a third process with
two host devices trains the same run unsharded, with
`--distribution model_parallel` (heads and feed-forward width split over
the devices by `ReformerBackbone.get_layout_map`) and with
`--distribution data_parallel` over its two devices. All runs start from
the same weights and see the same global batches, so they must end with
the same weights. The three processes run side by side, once for every
test here.
"""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tests.processes import ROOT
from tests.processes import free_ports
from tests.processes import result_of
from tests.processes import run_workers

# Two epochs of 2 steps, 4 x 32 bytes, one LSH layer of 2 heads (hidden
# 16, feed-forward 32), Adam with warm-up.
FLAGS = ["--sequence-length", "32", "--num-layers", "1", "--hidden-dim",
         "16", "--chunk-length", "16", "--batch-size", "4",
         "--steps-per-epoch", "2", "--epochs", "2", "--max-corpus-bytes",
         "20000", "--sample-length", "8", "--learning-rate", "1e-2"]

# argv: output prefix, then runs as "name" "flag flag ...". Each run goes
# through train_lm.main; its weights are saved to <prefix>.<name>.npz and
# the sharding of its weights is printed.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, "examples")
    import numpy as np
    import train_lm

    output, runs = sys.argv[1], sys.argv[2:]
    result = {}
    for name, flags in zip(runs[::2], runs[1::2]):
        model = train_lm.main(flags.split())
        np.savez(f"{output}.{name}.npz", *model.get_weights())
        result[name] = {v.path: list(v.value.sharding.spec)
                        for v in model.backbone.weights
                        if hasattr(v.value.sharding, "spec")}
    print("RESULT" + json.dumps(result), flush=True)
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`(directory, outputs, results)` of the three processes: data-parallel
    processes 0 and 1, then the unsharded and model-parallel runs."""
    directory = tmp_path_factory.mktemp("jax_distribution")
    port, = free_ports(1)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    commands = [
        ([sys.executable, "-c", SCRIPT, str(directory / "out"),
          f"process{index}", " ".join(FLAGS + [
              "--distribution", "data_parallel", "--num-processes", "2",
              "--process-id", str(index), "--coordinator-address",
              f"127.0.0.1:{port}", "--export-dir", str(directory / "dp")])],
         env)
        for index in range(2)]
    commands.append((
        [sys.executable, "-c", SCRIPT, str(directory / "out"),
         "single", " ".join(FLAGS + [
             "--export-dir", str(directory / "single")]),
         "model_parallel", " ".join(FLAGS + [
             "--distribution", "model_parallel",
             "--export-dir", str(directory / "mp")]),
         "two_devices", " ".join(FLAGS + [
             "--distribution", "data_parallel",
             "--export-dir", str(directory / "two_devices")])],
        dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")))
    finished = run_workers(commands, timeout=500)
    for code, output in finished:
        assert code == 0, output[-5000:]
    outputs = [output for _, output in finished]
    return directory, outputs, [result_of(output) for output in outputs]


def weights(directory, name):
    with np.load(directory / f"out.{name}.npz") as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def held_out_bits(output):
    return re.search(r"by epoch: (.*)", output).group(1)


def sample(output):
    return output.split("----- sample -----\n")[1].split("\n-----")[0]


def assert_same_weights(actual, expected, atol):
    assert len(actual) == len(expected) > 0
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_two_processes_train_alike_and_as_one_process_on_the_batch(runs):
    directory, outputs, _ = runs
    for index, output in enumerate(outputs[:2]):
        assert (f"over 2 device(s) of 2 process(es); this is process "
                f"{index}") in output, output[-3000:]
    first, second, single = (weights(directory, name) for name in
                             ("process0", "process1", "single"))
    assert_same_weights(second, first, atol=0)
    assert_same_weights(first, single, atol=1e-5)
    # Two devices of one process split the batch the same way.
    assert_same_weights(weights(directory, "two_devices"), single, atol=1e-5)
    # Every process reports the same held-out bits per byte for both
    # epochs, the single process's, and samples the same text.
    reported = [held_out_bits(output) for output in outputs]
    assert len(reported[0].split(", ")) == 2
    assert reported[0] == reported[1] == reported[2], reported
    assert sample(outputs[0]) == sample(outputs[1])


def test_only_process_zero_writes_files(runs):
    directory, outputs, _ = runs
    assert sorted(os.listdir(directory / "dp.checkpoints")) == [
        "epoch_01.weights.h5", "epoch_02.weights.h5"]
    assert (directory / "dp.keras").is_file()
    assert (directory / "dp_preset" / "config.json").is_file()
    assert not (directory / "dp.backup").exists()  # deleted when done
    assert f"Saved {directory / 'dp.keras'}" in outputs[0]
    assert "Saved" not in outputs[1]
    assert "Process 1 saves nothing" in outputs[1]
    # Process 0 saved the trained weights: those both processes hold.
    import keras_reformer  # noqa: F401  (registers the saved classes)

    model = keras.saving.load_model(directory / "dp.keras", compile=False)
    assert_same_weights(model.get_weights(), weights(directory, "process0"),
                        atol=0)


def test_model_parallel_matches_the_unsharded_model(runs):
    directory, outputs, results = runs
    assert_same_weights(weights(directory, "model_parallel"),
                        weights(directory, "single"), atol=1e-5)
    assert held_out_bits(outputs[2].split("Distribution: model_parallel")[1]
                         ) == held_out_bits(outputs[2])
    # The attention and feed-forward weights were split over the devices:
    # query-key and value by head, output by head, the feed-forward's
    # width; nothing else.
    sharded = sorted(str(spec) for spec in
                     results[2]["model_parallel"].values() if "model" in spec)
    assert sharded == sorted(str(spec) for spec in [
        [None, "model", None], [None, "model", None], ["model", None, None],
        [None, "model"], ["model"], ["model", None]]), sharded


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
    assert "Not exported" in outputs[2] and "saved_lm.py export" in outputs[2]
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

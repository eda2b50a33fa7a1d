"""Smoke run of examples/train_lm.py with tiny settings."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.processes import cluster_env
from tests.processes import free_ports
from tests.processes import run_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_lm.py")
SAVED_LM = os.path.join(ROOT, "examples", "saved_lm.py")
sys.path.insert(0, os.path.join(ROOT, "examples"))

import saved_lm  # noqa: E402
import train_lm  # noqa: E402


def run_example(*flags, timeout=150, script=SCRIPT, backend="tensorflow"):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=backend)
    return subprocess.run(
        [sys.executable, script, *flags], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout)


# The smallest run: one layer, 3 steps of 4 x 32 bytes per epoch.
TINY_FLAGS = ["--sequence-length", "32", "--num-layers", "1", "--hidden-dim",
              "16", "--chunk-length", "16", "--batch-size", "4",
              "--steps-per-epoch", "3", "--max-corpus-bytes", "20000",
              "--sample-length", "4"]

# 62,000 bytes hold out 3,100: 48 windows of 64 + 1, six whole batches of 8,
# so the held-out report and `saved_lm.py evaluate` score the same windows.
CORPUS_FLAGS = ["--max-corpus-bytes", "62000"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run: `(export_dir, output)`."""
    export_dir = tmp_path_factory.mktemp("trained") / "reformer_lm"
    run = run_example(
        "--sequence-length", "64", "--num-layers", "1", "--attention", "lsh",
        "--hidden-dim", "32", "--chunk-length", "16", "--batch-size", "8",
        "--steps-per-epoch", "10", "--epochs", "1", *CORPUS_FLAGS,
        "--sample-length", "16", "--learning-rate", "1e-2",
        "--export-dir", str(export_dir))
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    return export_dir, output


def test_tiny_training_run_reports_bits_per_byte_and_exports(trained):
    export_dir, output = trained
    reported = re.findall(r"held-out bits per byte ([0-9.]+|nan|inf)", output)
    assert len(reported) == 1, output[-3000:]
    bits = float(reported[0])
    assert math.isfinite(bits) and 0.0 < bits < 8.5, bits
    assert (export_dir / "saved_model.pb").is_file()
    assert (export_dir.parent / "reformer_lm.keras").is_file()
    assert (export_dir.parent / "reformer_lm_preset" / "tokenizer.json"
            ).is_file()
    difference = re.search(r"max difference ([0-9.e+-]+)", output)
    assert difference and float(difference.group(1)) < 1e-3, output[-2000:]
    assert "----- sample -----" in output


def fresh_python(code):
    """What `code` prints in a new Python process (which must succeed)."""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_the_preset_loads_with_the_weights_of_the_keras_file(trained):
    export_dir, _ = trained
    code = ("import keras_reformer, keras, keras_hub, numpy as np; "
            f"a = keras.saving.load_model({str(export_dir) + '.keras'!r}); "
            "b = keras_hub.models.CausalLM.from_preset("
            f"{str(export_dir) + '_preset'!r}); "
            "ids = np.arange(64, dtype='int32')[None] + 40; "
            "x = {'token_ids': ids, 'padding_mask': np.ones_like(ids)}; "
            "print(type(b).__name__, type(b.preprocessor.tokenizer).__name__,"
            " float(np.abs(np.asarray(a(x)) - np.asarray(b(x))).max()))")
    assert "ReformerCausalLM ReformerTokenizer 0.0" in fresh_python(code)


def test_saved_model_loads_compiled_after_importing_the_package(trained):
    """A fresh process that only imports keras_reformer loads the .keras
    file with its compile state (the bits-per-byte metric included)."""
    export_dir, _ = trained
    code = ("import keras_reformer, keras, numpy as np; "
            f"m = keras.saving.load_model({str(export_dir) + '.keras'!r}); "
            "ids = np.arange(65, dtype='int32')[None] + 40; "
            "x = {'token_ids': ids[:, :-1], 'padding_mask': ids[:, :-1] > 0}; "
            "print(type(m).__name__, type(m.optimizer).__name__, "
            "sorted(m.evaluate(x, ids[:, 1:], verbose=0, return_dict=True)))")
    assert ("ReformerCausalLM Adam ['bits_per_byte', 'loss']"
            in fresh_python(code))


def test_saved_model_evaluates_to_the_reported_held_out_bits(trained):
    export_dir, output = trained
    reported = float(re.search(r"held-out bits per byte ([0-9.]+)",
                               output).group(1))
    run = run_example("evaluate", str(export_dir) + ".keras", *CORPUS_FLAGS,
                      "--batch-size", "8", script=SAVED_LM)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "in 48 windows of 64 bytes" in run.stdout, run.stdout[-2000:]
    evaluated = float(re.search(r"==> bits per byte ([0-9.]+)",
                                run.stdout).group(1))
    assert abs(evaluated - reported) <= 0.0015, (evaluated, reported)


def test_saved_model_generates_what_greedy_whole_prefix_decoding_gives(
        trained):
    """`generate --sampler greedy` (cached decoding in the script's
    process) against argmax over the whole prefix, one token at a time,
    of the same saved model loaded here (LSH in its only layer: cached
    decoding equals the whole prefix)."""
    import keras

    import keras_reformer  # noqa: F401
    from keras_reformer import text_data

    export_dir, _ = trained
    path = str(export_dir) + ".keras"
    prompt = "def main("
    run = run_example("generate", path, "--prompt", prompt, "--length", "12",
                      "--sampler", "greedy", script=SAVED_LM)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    sample = run.stdout.split("----- sample -----\n")[1].rsplit("\n-----", 1)[0]

    model = keras.saving.load_model(path, compile=False)
    ids = list(prompt.encode())
    for _ in range(12):
        token_ids = np.array([ids], "int32")
        logits = model({"token_ids": token_ids,
                        "padding_mask": np.ones_like(token_ids)},
                       training=False)
        ids.append(int(np.argmax(np.asarray(logits)[0, -1])))
    assert sample == text_data.detokenize(ids[len(prompt):])


def usage_error(parse_args, flags, capsys):
    """The message `parse_args(flags)` exits with (status 2, argparse's)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["generate", "missing.keras", "--prompt", "x"], "does not exist"),
    (["generate", SCRIPT, "--prompt", "x"], "is not a .keras file"),
    (["evaluate", "MODEL", "--batch-size", "0"],
     "--batch-size must be a positive integer; received 0"),
    (["generate", "MODEL", "--prompt", "x", "--top-p", "1.5"],
     "--top-p must be in (0, 1]; received 1.5"),
    (["generate", "MODEL", "--prompt", ""], "--prompt must hold"),
    (["generate", "MODEL", "--prompt", "x", "--top-k", "100000"],
     "--top-k must be an integer between 1 and 256; received 100000"),
    (["generate", "MODEL", "--prompt", "x", "--seed", "-1"],
     "--seed must be an integer between 0 and 2147483647; received -1"),
    (["generate", "MODEL", "--prompt", "x", "--temperature", "inf"],
     "--temperature must be a positive finite number; received inf"),
])
def test_saved_lm_rejects_bad_arguments_with_a_clear_message(
        tmp_path, flags, message, capsys):
    model = tmp_path / "model.keras"
    model.write_bytes(b"")  # the flags are checked before it is loaded
    flags = [str(model) if f == "MODEL" else f for f in flags]
    assert message in usage_error(saved_lm.parse_args, flags, capsys)


def test_saved_lm_refuses_a_truncated_keras_file(tmp_path, capsys):
    model = tmp_path / "model.keras"
    model.write_bytes(b"PK\x03\x04 truncated")
    parser, _ = saved_lm.parse_args(["generate", str(model), "--prompt", "x"])
    with pytest.raises(SystemExit):
        saved_lm.load_lm(parser, str(model))
    assert "is not a complete .keras file" in capsys.readouterr().err


def test_an_unreadable_corpus_ends_with_its_message_not_a_traceback():
    run = run_example("--text-files", "no/such/file.txt", timeout=60)
    assert run.returncode == 1
    assert "error:" in run.stderr and "no/such/file.txt" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--attention", "lsh,bogus"], "--attention takes types"),
    (["--attention", "lsh,full", "--num-layers", "3"], "names 2 layers"),
    (["--sample-length", "300"], "--sample-length must be smaller"),
    (["--learning-rate", "nan"],
     "--learning-rate must be a positive finite number; received nan"),
    (["--learning-rate", "inf"], "finite number; received inf"),
    (["--learning-rate", "-0.1"], "finite number; received -0.1"),
    (["--learning-rate", "0"], "finite number; received 0.0"),
    (["--num-hashes", "100000"],
     "--num-hashes must be an integer between 1 and 64; received 100000"),
    (["--seed", "-1"],
     "--seed must be an integer between 0 and 2147483647; received -1"),
    (["--distribution", "data_parallel"],
     "--distribution data_parallel needs the JAX backend (KERAS_BACKEND=jax)"
     "; this run uses tensorflow"),
    (["--num-processes", "2", "--coordinator-address", "127.0.0.1:1234"],
     "--num-processes 2 needs --distribution data_parallel or "
     "model_parallel"),
    (["--num-processes", "2", "--process-id", "2"],
     "--process-id must be an integer between 0 and 1; received 2"),
    (["--num-processes", "0"],
     "--num-processes must be a positive integer; received 0"),
])
def test_bad_flags_are_rejected_with_a_clear_message(flags, message, capsys):
    assert message in usage_error(train_lm.parse_args, flags, capsys)


def main_error(flags):
    """The message `train_lm.main(flags)` exits with, before training."""
    with pytest.raises(SystemExit) as exit_info:
        train_lm.main(flags)
    return str(exit_info.value.code)


def test_an_unwritable_export_dir_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    export_dir = tmp_path / "file" / "lm"  # a folder in a file
    message = main_error([*TINY_FLAGS, "--export-dir", str(export_dir)])
    assert f"--export-dir {export_dir} cannot be written" in message


@pytest.mark.parametrize("size, message", [
    (1000, "a corpus of 1,000 bytes is too small: its held-out last 5% (50 "
           "bytes) must hold a batch of --batch-size 4 windows of "
           "--sequence-length 32 + 1 bytes, 129 bytes"),
    (5, "A corpus of 5 bytes is too small to hold out"),
])
def test_a_corpus_too_small_for_a_held_out_batch_is_refused(
        tmp_path, size, message):
    text = tmp_path / "small.txt"
    text.write_bytes(b"x" * size)
    assert message in main_error([*TINY_FLAGS, "--text-files", str(text),
                                  "--export-dir", str(tmp_path / "lm")])


def test_killed_run_resumes_from_its_last_epoch(tmp_path):
    """SIGKILL after epoch 2 of 3: the same command resumes at epoch 3 from
    the backup; killed again after training, before the export, it trains
    nothing, reports all epochs, exports and removes the backup. The
    backup refuses a run with other model flags."""
    export_dir = tmp_path / "reformer_lm"
    backup = tmp_path / "reformer_lm.backup"
    flags = [*TINY_FLAGS, "--epochs", "3", "--no-jit-compile",
             "--export-dir", str(export_dir)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")

    def kill_at(prefix):
        """Runs the example until a line starts with `prefix`, SIGKILLs it
        there (no clean-up runs) and returns its output."""
        run = subprocess.Popen([sys.executable, SCRIPT, *flags], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in run.stdout:
            seen.append(line)
            if line.startswith(prefix):
                run.kill()
                break
        run.wait(timeout=60)
        assert run.returncode == -9, "".join(seen)[-3000:]
        assert backup.is_dir() and not (export_dir / "saved_model.pb").exists()
        return "".join(seen)

    kill_at("==> epoch 2:")
    message = main_error([*flags, "--hidden-dim", "32"])
    assert f"the backup {backup} belongs to another configuration" in message
    assert "--hidden-dim 16 there, 32 here" in message

    output = kill_at("Trained in")
    assert "resuming from epoch 3 of 3" in output, output[-3000:]
    assert re.findall(r"==> epoch (\d+):", output) == ["3"]
    bits = re.search(r"by epoch: (.*)", output).group(1)
    assert len(bits.split(", ")) == 3, bits

    finished = run_example(*flags)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    assert "holds all 3 epochs: nothing left to train" in output
    assert "==> epoch" not in output and f"by epoch: {bits}\n" in output
    assert not backup.exists()
    assert (export_dir / "saved_model.pb").is_file()


def test_multi_worker_strategy_trains_on_two_workers_and_the_chief_exports(
        tmp_path):
    """Two worker processes on 127.0.0.1 (TF_CONFIG): both train, report the
    same held-out bits per byte, and only the chief's export and per-epoch
    weights are kept."""
    ports = free_ports(2)
    export_dir = tmp_path / "lm"
    flags = ["--strategy", "multi_worker_mirrored", *TINY_FLAGS, "--epochs",
             "1", "--export-dir", str(export_dir)]
    runs = run_workers([([sys.executable, SCRIPT, *flags],
                         cluster_env(ports, index)) for index in range(2)],
                       timeout=240)
    outputs = [output for _, output in runs]
    for code, output in runs:
        assert code == 0, output[-4000:]
        assert "2 replica(s)" in output, output[-3000:]
    reported = [re.findall(r"held-out bits per byte ([0-9.]+|nan|inf)", out)
                for out in outputs]
    assert len(reported[0]) == 1 and reported[0] == reported[1], reported
    assert 0.0 < float(reported[0][0]) < 8.5
    # The chief (worker 0) exported and kept the epoch's weights; worker 1
    # wrote to a deleted temporary; the finished run's backup is deleted.
    assert sorted(os.listdir(tmp_path / "lm.checkpoints")) == [
        "epoch_01.weights.h5"]
    assert not (tmp_path / "lm.backup").exists()
    assert (export_dir / "saved_model.pb").is_file()
    assert (tmp_path / "lm.keras").is_file()
    assert f"Saved {tmp_path / 'lm.keras'}" in outputs[0]
    saved = re.search(r"Saved (\S+)", outputs[1]).group(1)
    assert not saved.startswith(str(tmp_path)) and not os.path.exists(saved)
    for output in outputs:
        difference = re.search(r"max difference ([0-9.e+-]+)", output)
        assert difference and float(difference.group(1)) < 1e-3, output[-2000:]

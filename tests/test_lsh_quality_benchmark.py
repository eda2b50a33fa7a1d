"""A tiny run of benchmarks/lsh_quality.py, its records recomputed."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import lsh_quality  # noqa: E402

# 40,000 bytes hold out 2,000: three batches of 2 x (64 + 1) bytes.
TINY_FLAGS = ["--sequence-length", "64", "--hidden-dim", "16",
              "--chunk-length", "16", "--batch-size", "2", "--steps", "4",
              "--eval-every", "2", "--eval-batches", "2",
              "--max-corpus-bytes", "40000"]


def log_softmax_bits(logits, targets):
    """Mean `-log2 softmax(logits)[target]` in numpy."""
    logits = logits.astype("float64")
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], -1)
    return float(-picked.mean() / np.log(2.0))


def test_smoke_run_records_reload_and_resume(tmp_path, capsys):
    output = tmp_path / "quality.jsonl"
    flags = TINY_FLAGS + ["--output", str(output), "--configs", "lsh2",
                          "--cross", "full_shared_qk", "--weights-dir",
                          str(tmp_path / "weights")]
    lsh_quality.main(flags)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    kinds = [(r["kind"], r.get("step") or r.get("eval_config"))
             for r in records]
    assert kinds == [("eval", 2), ("eval", 4), ("cross", "full_shared_qk"),
                     ("fresh_rotations", None), ("done", None)]

    # The last evaluation, recomputed in numpy from the saved weights.
    args = lsh_quality.parse_args(flags)
    model = lsh_quality.build_model("lsh2", args)
    model(lsh_quality._dummy_inputs(args))
    model.load_weights(tmp_path / "weights" / "lsh2.weights.h5")
    _, batches = lsh_quality.corpus(args)
    bits = np.mean([log_softmax_bits(np.asarray(model(x)), y)
                    for x, y in batches])
    assert abs(bits - records[1]["held_out_bits_per_byte"]) < 2e-4
    # Exact attention on the same weights: sees every earlier key, so it
    # differs from the 2-round hashing at this length (4 chunks).
    assert records[2]["held_out_bits_per_byte"] != records[1][
        "held_out_bits_per_byte"]

    # Started again: the finished configuration is skipped.
    lsh_quality.main(flags)
    assert "Every configuration is finished" in capsys.readouterr().out
    assert len(output.read_text().splitlines()) == len(records)

    # The saved weights with LSH of one chunk spanning the 64 bytes: exact
    # shared-QK attention, whatever the hashing.
    lsh_quality.main(flags + ["--cross-only", "--cross", "lsh1-c64"])
    added = json.loads(output.read_text().splitlines()[-1])
    assert added["eval_config"] == "lsh1-c64"
    assert abs(added["held_out_bits_per_byte"]
               - records[2]["held_out_bits_per_byte"]) < 2e-4

    lsh_quality.main(["--report", "--output", str(output), "--plot",
                      str(tmp_path / "plot.png")])
    table = capsys.readouterr().out
    assert f"| lsh2 | 4 | {records[1]['held_out_bits_per_byte']:.3f} |" in (
        table)
    assert (tmp_path / "plot.png").stat().st_size > 1000

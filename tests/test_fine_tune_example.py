"""examples/fine_tune.py on a small Hugging Face directory made in the test:
its bits per byte against Hugging Face's own cross-entropy, LoRA training,
and the saved preset."""

import math
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from keras_reformer import text_data  # noqa: E402
from keras_reformer.models import ReformerCausalLM  # noqa: E402
from tests.test_huggingface_presets import save_huggingface_lm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples"))
import fine_tune  # noqa: E402

LENGTH = 64
CORPUS_BYTES = 40_000


def huggingface_bits_per_byte(hf, windows):
    """Hugging Face's mean next-byte cross-entropy over the windows, in
    bits (its ids are bytes + 2)."""
    ids = torch.tensor([[byte + 2 for byte in window] for window in windows])
    with torch.no_grad():
        logits = hf(ids[:, :-1]).logits
    nats = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return nats.item() / math.log(2.0)


def test_fine_tune_scores_like_huggingface_trains_adapters_and_reloads(
        tmp_path):
    hf = save_huggingface_lm(tmp_path / "hf", 258, ["local", "lsh"])
    result = fine_tune.main([
        "--checkpoint", str(tmp_path / "hf"),
        "--preset-dir", str(tmp_path / "preset"),
        "--sequence-length", str(LENGTH), "--batch-size", "2",
        "--steps", "6", "--rank", "2", "--learning-rate", "1e-2",
        "--held-out-windows", "3", "--max-corpus-bytes", str(CORPUS_BYTES)])

    _, held_out = text_data.split_corpus(
        text_data.stdlib_corpus(max_bytes=CORPUS_BYTES))
    windows = fine_tune.text_windows(held_out, LENGTH, 3)
    assert len(windows) == 3
    np.testing.assert_allclose(result["bits_per_byte_before"],
                               huggingface_bits_per_byte(hf, windows),
                               rtol=1e-5)
    assert result["bits_per_byte_after"] < result["bits_per_byte_before"]

    # The preset holds base + adapters: only the attention projections the
    # adapters touch (and nothing else) differ from the checkpoint.
    base = ReformerCausalLM.from_preset(str(tmp_path / "hf"))
    tuned = ReformerCausalLM.from_preset(result["preset"])
    tuned_weights = {weight.path: weight for weight in tuned.weights}
    changed = {weight.path for weight in base.weights if not np.array_equal(
        np.asarray(weight), np.asarray(tuned_weights[weight.path]))}
    assert changed
    assert all(path.endswith(("query/kernel", "query_key/kernel",
                              "value/kernel")) for path in changed), changed

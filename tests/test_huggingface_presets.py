"""Hugging Face Reformer directories through `from_preset`: logits and token
ids against transformers run in the test.

Each directory is written in the test by transformers' `save_pretrained`
from a small random `ReformerModelWithLMHead` (no download): a byte-level
one (ids `byte + 2`, as google/reformer-enwik8) and a SentencePiece one
(`spiece.model` trained here, as google/reformer-crime-and-punishment).

The reference logits are Hugging Face's in float64. Hugging Face combines
its hash rounds with `exp(logits - logsumexp)` at magnitudes near its -1e5
self-mask score, where float32's spacing is 2^-7, so with weights larger
than its default initialisation its own float32 logits drift by about 1e-3
from its float64 ones; ours stay within about 1e-6 of those. It draws its
LSH rotations in the model's dtype, and torch's float64 normal numbers are
not its float32 ones, so the float64 run draws them in float32 (the ones
the float32 model, and the converted one, use) and casts them.
"""

import copy
import io
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

from keras_reformer import text_data  # noqa: E402
from keras_reformer.models import ReformerBackbone  # noqa: E402
from keras_reformer.models import ReformerCausalLM  # noqa: E402
from keras_reformer.models import ReformerCausalLMPreprocessor  # noqa: E402
from keras_reformer.models import ReformerMaskedLM  # noqa: E402
from keras_reformer.models import ReformerSentencePieceTokenizer  # noqa: E402
from keras_reformer.models import ReformerTokenizer  # noqa: E402
from tests.helpers import to_numpy  # noqa: E402

LENGTH = 128
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_huggingface_lm(path, vocab_size, attn_layers, max_shard_size="50GB",
                        **kwargs):
    """A random Hugging Face Reformer LM, saved to `path`; returns it."""
    settings = dict(
        vocab_size=vocab_size, hidden_size=32, num_attention_heads=2,
        attention_head_size=16, feed_forward_size=64, attn_layers=attn_layers,
        axial_pos_shape=[8, 16], axial_pos_embds_dim=[16, 16],
        lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=2,
        num_buckets=4, is_decoder=True, hash_seed=7,
        max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(
        **{**settings, **kwargs})).eval()
    hf.save_pretrained(str(path), max_shard_size=max_shard_size)
    return hf


def huggingface_float64_logits(hf, ids):
    """Hugging Face's logits in float64, its rotations drawn in float32."""
    randn = torch.randn

    def float32_randn(*shape, dtype=None, **kwargs):
        return randn(*shape, dtype=torch.float32, **kwargs).to(dtype)

    with torch.no_grad(), mock.patch.object(torch, "randn", float32_randn):
        return copy.deepcopy(hf).double()(torch.tensor(ids)).logits.numpy()


def our_logits(lm, ids):
    return to_numpy(lm({"token_ids": np.asarray(ids, "int32"),
                        "padding_mask": np.ones_like(ids, "int32")}))


def corpus_text():
    return text_data.stdlib_corpus(max_bytes=8000).decode("utf-8", "replace")


def test_byte_level_directory_matches_huggingface(tmp_path):
    # Weights 5x Hugging Face's default scale: its float32 drifts here.
    hf = save_huggingface_lm(tmp_path / "hf", 258, ["local", "lsh"],
                             initializer_range=0.1)
    lm = ReformerCausalLM.from_preset(str(tmp_path / "hf"))

    text = corpus_text()[:LENGTH]
    ids = to_numpy(lm.preprocessor.tokenizer(text))
    # google/reformer-enwik8's model card encodes text as bytes + 2.
    np.testing.assert_array_equal(ids, [b + 2 for b in text.encode()])
    np.testing.assert_allclose(
        our_logits(lm, ids[None]), huggingface_float64_logits(hf, ids[None]),
        atol=1e-4)
    assert lm.preprocessor.sequence_length == LENGTH  # the model's maximum

    # The other classes load the same parts.
    backbone = ReformerBackbone.from_preset(str(tmp_path / "hf"))
    for ours, theirs in zip(backbone.weights, lm.backbone.weights):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    np.testing.assert_array_equal(
        to_numpy(ReformerTokenizer.from_preset(str(tmp_path / "hf"))(text)),
        ids)
    assert ReformerCausalLMPreprocessor.from_preset(
        str(tmp_path / "hf")).tokenizer.id_offset == 2

    # A PyTorch checkpoint (as transformers 4 wrote it) loads with torch.
    hf.config.save_pretrained(str(tmp_path / "bin"))
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    from_bin = ReformerCausalLM.from_preset(str(tmp_path / "bin"))
    np.testing.assert_array_equal(our_logits(from_bin, ids[None]),
                                  our_logits(lm, ids[None]))


def test_sentence_piece_directory_matches_huggingface(tmp_path):
    lines = corpus_text().splitlines()
    model = io.BytesIO()
    # A BPE model, as the Reformer checkpoints' (transformers 5 reads
    # spiece.model as BPE).
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=320,
        model_type="bpe", minloglevel=3)
    path = tmp_path / "hf"
    hf = save_huggingface_lm(path, 320, ["lsh", "local"], hidden_act="gelu",
                             num_buckets=[2, 4], hash_seed=3,
                             max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()  # sharded
    (path / "spiece.model").write_bytes(model.getvalue())
    transformers.ReformerTokenizer.from_pretrained(str(path)).save_pretrained(
        str(path))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))

    lm = ReformerCausalLM.from_preset(str(path))
    tokenizer = lm.preprocessor.tokenizer
    assert isinstance(tokenizer, ReformerSentencePieceTokenizer)
    texts = lines[100:140] + ["two  spaces,\ttab\nnewline", "naïve café"]
    assert tokenizer(texts) == hf_tokenizer(texts)["input_ids"]

    ids = np.array(hf_tokenizer(" ".join(lines))["input_ids"][:LENGTH])
    np.testing.assert_allclose(
        our_logits(lm, ids[None]), huggingface_float64_logits(hf, ids[None]),
        atol=1e-4)
    with pytest.raises(ValueError, match="ReformerSentencePieceTokenizer"):
        ReformerTokenizer.from_preset(str(path))


# Loads the directories given with `import torch` failing.
WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError
sys.path.insert(0, sys.argv[1])
import numpy as np
from keras_reformer.models import ReformerCausalLM

no_seed, with_seed, pytorch, ids, out = sys.argv[2:]
lm = ReformerCausalLM.from_preset(no_seed, preprocessor=None)
ids = np.load(ids)
logits = lm({"token_ids": ids, "padding_mask": np.ones_like(ids)})
errors = []
for path in (with_seed, pytorch):
    try:
        ReformerCausalLM.from_preset(path, preprocessor=None)
    except ImportError as error:
        errors.append(str(error))
np.savez(out, logits=np.asarray(logits), errors=np.array(errors))
"""


def test_safetensors_load_without_torch_unless_rotations_need_it(tmp_path):
    # One LSH chunk per round holding the whole sequence: every query sees
    # every earlier key whatever the rotations, so Hugging Face's fresh
    # random ones (no hash_seed) give the same logits as our fixed ones.
    hf = save_huggingface_lm(
        tmp_path / "no_seed", 64, ["local", "lsh"], hash_seed=None,
        lsh_attn_chunk_length=LENGTH, lsh_num_chunks_before=0, num_buckets=2)
    save_huggingface_lm(tmp_path / "with_seed", 64, ["lsh"])
    hf.config.save_pretrained(str(tmp_path / "pytorch"))
    torch.save(hf.state_dict(), tmp_path / "pytorch" / "pytorch_model.bin")
    ids = np.random.RandomState(0).randint(1, 64, (2, LENGTH)).astype("int32")
    np.save(tmp_path / "ids.npy", ids)

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, REPO_ROOT,
         *(str(tmp_path / name) for name in ("no_seed", "with_seed",
                                             "pytorch", "ids.npy")),
         str(tmp_path / "out.npz")],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["logits"],
                               huggingface_float64_logits(hf, ids), atol=1e-4)
    seed_error, pytorch_error = out["errors"]
    assert "hash_seed=7" in seed_error and "[convert]" in seed_error
    assert "pytorch_model.bin" in pytorch_error

    # Without hash_seed, every load has the same fixed rotations.
    first, second = (
        ReformerBackbone.from_preset(str(tmp_path / "no_seed")
                                     ).attention_layers[1].rotations
        for _ in range(2))
    np.testing.assert_array_equal(to_numpy(first), to_numpy(second))

    # Neither a SentencePiece model nor 258 byte ids: no tokenizer to give.
    with pytest.raises(ValueError, match="vocab_size=64 is not 258"):
        ReformerCausalLM.from_preset(str(tmp_path / "no_seed"))
    with pytest.raises(ValueError, match="not to a ReformerMaskedLM"):
        ReformerMaskedLM.from_preset(str(tmp_path / "no_seed"))

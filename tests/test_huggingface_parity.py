"""Logits parity with Hugging Face transformers' PyTorch Reformer in memory.

The Hugging Face model is built from a `ReformerConfig` in the test (random
weights, no download), converted with `keras_reformer.convert.
from_huggingface`, and both run in eval mode; `hash_seed` makes Hugging
Face's LSH rotations reproducible and the converter gives our layers the
same ones. Directories written by `save_pretrained` are tested through
`from_preset` in tests/test_huggingface_presets.py.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from keras_reformer.convert import from_huggingface  # noqa: E402
from tests.helpers import to_numpy  # noqa: E402

LENGTH = 128


def huggingface_lm(attn_layers, num_buckets, num_hashes, **kwargs):
    config = transformers.ReformerConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=2,
        attention_head_size=16, feed_forward_size=64, attn_layers=attn_layers,
        axial_pos_shape=[8, 16], axial_pos_embds_dim=[16, 16],
        lsh_attn_chunk_length=16, local_attn_chunk_length=16,
        num_hashes=num_hashes, num_buckets=num_buckets, is_decoder=True,
        hash_seed=7, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, **kwargs)
    torch.manual_seed(0)
    return transformers.ReformerModelWithLMHead(config).eval()


def logits_of_both(hf, ids, mask):
    with torch.no_grad():
        expected = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)
                      ).logits.numpy()
    lm = from_huggingface(hf)
    actual = to_numpy(lm({"token_ids": ids.astype("int32"),
                          "padding_mask": mask.astype("int32")}))
    return actual, expected


@pytest.mark.parametrize("attn_layers,num_buckets,num_hashes", [
    (["local", "lsh"], 4, 2),
    (["lsh", "local", "lsh"], [2, 4], 4),
    (["lsh"], 8, 1),
])
def test_causal_lm_logits_equal_huggingface(attn_layers, num_buckets,
                                            num_hashes):
    hf = huggingface_lm(attn_layers, num_buckets, num_hashes)
    ids = np.random.RandomState(0).randint(1, 64, (2, LENGTH))
    actual, expected = logits_of_both(hf, ids, np.ones_like(ids))
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_padding_mask_logits_equal_huggingface():
    # Less than a chunk (16) of padding per row: with a whole chunk of it,
    # Hugging Face's ring of LSH chunks passes through padding-only chunks
    # while ours closes at the last chunk holding a real token, so that
    # padding never changes the real tokens' outputs.
    hf = huggingface_lm(["local", "lsh"], 4, 2)
    ids = np.random.RandomState(1).randint(1, 64, (2, LENGTH))
    mask = np.ones_like(ids)
    mask[0, 115:] = 0
    mask[1, :9] = 0
    actual, expected = logits_of_both(hf, ids, mask)
    valid = mask[..., None]
    np.testing.assert_allclose(actual * valid, expected * valid, atol=1e-4)


def test_unsupported_configuration_raises():
    hf = huggingface_lm(["lsh"], None, 2)
    with pytest.raises(ValueError, match="num_buckets=None"):
        from_huggingface(hf)

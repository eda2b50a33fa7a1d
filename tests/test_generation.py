"""Cached incremental decoding against running the whole prefix.

Backend-agnostic (re-run on JAX by test_jax_backend.py).
"""

import re

import keras
import keras_hub
import numpy as np
import pytest

from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import LinformerSelfAttention
from keras_reformer.layers import LocalSelfAttention
from keras_reformer.layers import LSHSelfAttention
from keras_reformer.models import ReformerBackbone
from keras_reformer.models import ReformerCausalLM
from keras_reformer.text_data import byte_preprocessor
from tests.helpers import assert_close
from tests.helpers import to_numpy

HIDDEN, LENGTH, PREFIX = 16, 15, 3


def layer_cases():
    return {
        "local": lambda: LocalSelfAttention(2, 8, chunk_length=4,
                                            causal=True),
        "local_two_before": lambda: LocalSelfAttention(
            2, 8, chunk_length=4, num_chunks_before=2, causal=True),
        "full": lambda: FullSelfAttention(2, 8, causal=True),
        "full_shared_qk": lambda: FullSelfAttention(2, 8, causal=True,
                                                    shared_qk=True),
        "lsh": lambda: LSHSelfAttention(2, 8, chunk_length=4, num_hashes=3,
                                        num_buckets=4, causal=True, seed=2),
        "lsh_one_round_two_before": lambda: LSHSelfAttention(
            2, 8, chunk_length=4, num_hashes=1, num_buckets=4,
            num_chunks_before=2, causal=True, seed=3),
        "lsh_factorised": lambda: LSHSelfAttention(
            2, 8, chunk_length=2, num_hashes=2, num_buckets=(2, 4),
            causal=True, seed=4),
        # Prefill by head groups, with the cache of every head beside it.
        "lsh_one_head_at_a_time": lambda: LSHSelfAttention(
            2, 8, chunk_length=4, num_hashes=3, num_buckets=4, causal=True,
            seed=2, parallel_heads=1),
    }


@pytest.mark.parametrize("case", sorted(layer_cases()))
def test_each_decoded_position_equals_the_whole_prefix(case):
    layer = layer_cases()[case]()
    x = np.random.RandomState(0).randn(2, LENGTH, HIDDEN).astype("float32")
    layer.build(x.shape)
    prefill, cache = layer.call_with_cache(x, None, PREFIX)
    assert_close(to_numpy(prefill)[:, :PREFIX], layer(x[:, :PREFIX]),
                 atol=1e-5)

    def whole_prefix(t):
        """Position `t`'s output for the prefix up to it, the later
        positions masked as padding (which changes nothing before them,
        tested per layer; one shape, so JAX compiles once)."""
        mask = np.broadcast_to(np.arange(LENGTH) <= t, (2, LENGTH))
        return to_numpy(layer(x, padding_mask=mask.astype("int32")))[:, t]

    for t in range(PREFIX, LENGTH):
        out, cache = layer.call_with_cache(x[:, t:t + 1], cache, t)
        assert_close(to_numpy(out)[:, 0], whole_prefix(t), atol=1e-5)


def test_decoding_needs_a_causal_layer():
    layer = LocalSelfAttention(2, 8, chunk_length=4, causal=False)
    x = np.zeros((1, 8, HIDDEN), "float32")
    layer.build(x.shape)
    with pytest.raises(ValueError, match="causal=True"):
        layer.call_with_cache(x, None, 2)
    linformer = LinformerSelfAttention(2, 8, max_length=8,
                                       projected_length=4)
    linformer.build(x.shape)
    with pytest.raises(ValueError, match="causal=True"):
        linformer.call_with_cache(x, None, 2)


def causal_lm(attention_types, vocabulary=40, **kwargs):
    keras.utils.set_random_seed(0)
    backbone = ReformerBackbone(
        vocabulary, hidden_dim=16, num_heads=2, head_dim=8,
        intermediate_dim=24, attention_types=attention_types,
        axial_shape=(8, 8), feed_forward_chunk_length=3, seed=1,
        attention_options={"lsh": {"chunk_length": 4, "num_hashes": 2,
                                   "num_buckets": 4},
                           "local": {"chunk_length": 4}}, **kwargs)
    return ReformerCausalLM(backbone)


def whole_prefix_logits(lm, ids):
    return to_numpy(lm({"token_ids": ids,
                        "padding_mask": np.ones_like(ids)}))[:, -1]


# Exact wherever no LSH layer lies below another layer: a new token moves
# the LSH chunk boundaries of the tokens before it, which the cache (like
# the Reformer's predict mode) keeps as they were computed.
@pytest.mark.parametrize("attention_types", [
    ["local", "lsh"], ["full", "local"], ["lsh"]])
def test_model_logits_equal_the_whole_prefix(attention_types):
    lm = causal_lm(attention_types)
    ids = np.random.RandomState(1).randint(0, 40, (2, LENGTH)).astype("int32")
    _, cache = lm.build_cache(ids, PREFIX)
    for t in range(PREFIX, LENGTH):
        logits, hidden, cache = lm.call_with_cache(ids[:, t:t + 1], cache, t)
        assert_close(to_numpy(logits)[:, 0], whole_prefix_logits(
            lm, ids[:, :t + 1]), atol=1e-4)


def greedy_by_recomputing(lm, prompt, total):
    """Greedy decoding by running the whole model on each prefix, padded to
    `total` tokens (padding changes no earlier position's logits, tested
    per layer; one shape, so JAX compiles once)."""
    tokens = list(prompt)
    while len(tokens) < total:
        known = len(tokens)
        ids = np.zeros((1, total), "int32")
        ids[0, :known] = tokens
        mask = (np.arange(total) < known).astype("int32")[None]
        logits = to_numpy(lm({"token_ids": ids, "padding_mask": mask}))
        tokens.append(int(np.argmax(logits[0, known - 1])))
    return tokens


def test_greedy_generation_of_right_padded_prompts():
    lm = causal_lm(["local", "lsh"])
    lm.compile(sampler="greedy")  # generate() compiles with XLA
    rng = np.random.RandomState(2)
    ids = rng.randint(0, 40, (3, 10)).astype("int32")
    lengths = [2, 6, 10]
    mask = (np.arange(10) < np.array(lengths)[:, None]).astype("int32")
    out = lm.generate({"token_ids": ids, "padding_mask": mask},
                      max_length=14)
    assert out["token_ids"].shape == (3, 14) and out["padding_mask"].all()
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(
            out["token_ids"][row],
            greedy_by_recomputing(lm, ids[row, :length], 14))


def test_top_k_sampling_stays_in_the_top_k_and_follows_the_seed():
    lm = causal_lm(["full", "lsh"])
    prompt = {"token_ids": np.array([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0]],
                                    "int32"),
              "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]],
                                       "int32")}
    results = []
    for seed in (1, 1, 2):
        lm.compile(sampler=keras_hub.samplers.TopKSampler(k=3, seed=seed))
        results.append(lm.generate(prompt)["token_ids"][0])
    np.testing.assert_array_equal(results[0], results[1])
    assert (results[0] != results[2]).any()
    tokens = results[0]
    for t in range(3, 10):
        top_3 = np.argsort(whole_prefix_logits(lm, tokens[None, :t])[0])[-3:]
        assert tokens[t] in top_3


def sequence_log_probability(lm, tokens, start):
    total = 0.0
    for t in range(start, len(tokens)):
        logits = whole_prefix_logits(lm, np.array([tokens[:t]], "int32"))[0]
        total += logits[tokens[t]] - np.log(np.exp(logits).sum())
    return total


def test_beam_search_scores_at_least_greedy_and_top_p_runs():
    lm = causal_lm(["local", "lsh"])
    prompt = {"token_ids": np.array([[3, 4, 5, 0, 0, 0, 0, 0]], "int32"),
              "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]], "int32")}
    scores = {}
    for name, sampler in [
            ("greedy", "greedy"),
            ("beam", keras_hub.samplers.BeamSampler(num_beams=3))]:
        lm.compile(sampler=sampler)
        tokens = lm.generate(prompt)["token_ids"][0]
        scores[name] = sequence_log_probability(lm, tokens, 3)
    assert scores["beam"] >= scores["greedy"] - 1e-4
    lm.compile(sampler=keras_hub.samplers.TopPSampler(p=0.5, seed=1))
    tokens = lm.generate(prompt)["token_ids"][0]
    for t in range(3, 8):  # each token within the top 50% of the mass
        logits = whole_prefix_logits(lm, tokens[None, :t])[0]
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        better = probabilities[probabilities > probabilities[tokens[t]]]
        assert better.sum() < 0.5 + 1e-5


def test_stop_tokens_and_strip_prompt():
    lm = causal_lm(["local"])
    lm.compile(sampler="greedy")
    prompt = {"token_ids": np.array([[3, 4, 0, 0, 0, 0, 0, 0]], "int32"),
              "padding_mask": np.array([[1, 1, 0, 0, 0, 0, 0, 0]], "int32")}
    free = lm.generate(prompt)["token_ids"][0]
    stop = int(free[4])
    out = lm.generate(prompt, stop_token_ids=[stop], strip_prompt=True)
    one_id = lm.generate(prompt, stop_token_ids=stop, strip_prompt=True)
    # Whole numbers in a float dtype and a bool mask read as ints.
    floats = lm.generate({"token_ids": prompt["token_ids"].astype("float32"),
                          "padding_mask": prompt["padding_mask"] == 1},
                         stop_token_ids=[stop], strip_prompt=True)
    for key in out:  # a single id is a list of one
        np.testing.assert_array_equal(one_id[key], out[key])
        np.testing.assert_array_equal(floats[key], out[key])
    first_stop = 2 + list(free[2:]).index(stop)
    expected = np.zeros(8, bool)
    expected[2:first_stop + 1] = True
    np.testing.assert_array_equal(out["padding_mask"][0], expected)
    np.testing.assert_array_equal(out["token_ids"][0, :first_stop + 1],
                                  free[:first_stop + 1])


def test_text_generation_with_the_byte_preprocessor_survives_saving(
        tmp_path):
    backbone = causal_lm(["local", "lsh"], vocabulary=256).backbone
    lm = ReformerCausalLM(backbone, preprocessor=byte_preprocessor(16))
    lm.compile(sampler="greedy")
    text = lm.generate("abc", max_length=12)
    assert isinstance(text, str)
    ids = list(b"abc")
    expected = bytes(greedy_by_recomputing(lm, ids, 12)[3:])
    assert text == "abc" + expected.replace(b"\0", b"").decode(
        "utf-8", "replace")
    assert lm.generate(["abc", "xy"], max_length=12, strip_prompt=True)[
        0] == text[3:]
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.sampler, keras_hub.samplers.GreedySampler)
    assert loaded.generate("abc", max_length=12) == text


@pytest.mark.parametrize("inputs,max_length,message", [
    ({"token_ids": [[1, 2]], "padding_mask": [[0, 0]]}, None,
     "at least one token"),
    ({"token_ids": [[1, 2]], "padding_mask": [[0, 1]]}, None,
     "right-padded"),
    ({"token_ids": [[1, 2]], "padding_mask": [[1, 1]]}, 65, "exceeds"),
    ({"token_ids": [[1, 2]], "padding_mask": [[1, 1]]}, 1, "shorter"),
    ({"token_ids": [[1, 99]], "padding_mask": [[1, 1]]}, None,
     r"\[0, 40\)"),
    ({"token_ids": [[1, 2]]}, None, "exactly the keys"),
    ("some text", None, "no preprocessor"),
    ({"token_ids": [[1, 1.5]], "padding_mask": [[1, 1]]}, None,
     r"token_ids must be whole numbers in the int32 range \[-2\*\*31, "
     r"2\*\*31\) \(received dtype float64\); received values such as "
     r"\[1.5\]"),
    ({"token_ids": np.array([[1, 2**32 + 5]]), "padding_mask": [[1, 1]]},
     None, r"int32 range .* \(received dtype int64\); received values such "
     r"as \[4294967301\]"),
    ({"token_ids": [["a", "b"]], "padding_mask": [[1, 1]]}, None,
     "token_ids must be a tensor of integers or whole numbers in a float "
     "dtype; received dtype <U1"),
    ({"token_ids": [[1, 2]], "padding_mask": [[1, 0.5]]}, None,
     r"padding_mask must hold only 0 and 1 \(or False and True\) "
     r"\(received dtype float64\); received values such as \[0.5\]"),
    ({"token_ids": [[1, 2]], "padding_mask": [[1, 1]]}, 8.0,
     r"max_length must be a positive integer; received max_length=8.0"),
])
def test_bad_generate_inputs_raise(inputs, max_length, message):
    lm = causal_lm(["local"])
    with pytest.raises(ValueError, match=message):
        lm.generate(inputs, max_length=max_length)


def test_bad_stop_token_ids_and_sampler_raise():
    lm = causal_lm(["local"])
    prompt = {"token_ids": [[1, 2]], "padding_mask": [[1, 1]]}
    for stop in ("x", [40], [], 1.0):
        with pytest.raises(ValueError, match=re.escape(
                "stop_token_ids must be None, a token id or a non-empty "
                "list of token ids in [0, 40); received "
                f"stop_token_ids={stop!r}.")):
            lm.generate(prompt, max_length=4, stop_token_ids=stop)
    with pytest.raises(ValueError, match=re.escape(
            "sampler must be one of ('beam', 'contrastive', 'greedy', "
            "'random', 'top_k', 'top_p') or a keras_hub.samplers.Sampler; "
            "received sampler='bogus'.")):
        lm.compile(sampler="bogus")


def test_prompt_longer_than_max_length_raises_in_both_forms():
    backbone = causal_lm(["local"], vocabulary=256).backbone
    lm = ReformerCausalLM(backbone, preprocessor=byte_preprocessor(8))
    message = re.escape(
        "max_length=4 is shorter than the longest prompt (row 1: 10 "
        "tokens); max_length counts the prompt and the generated tokens.")
    with pytest.raises(ValueError, match=message):
        lm.generate(["abc", "abcdefghij"], max_length=4)
    ids = np.zeros((2, 12), "int32")
    ids[1, :10] = list(b"abcdefghij")
    ids[0, :3] = list(b"abc")
    mask = (ids > 0).astype("int32")
    with pytest.raises(ValueError, match=message):
        lm.generate({"token_ids": ids, "padding_mask": mask}, max_length=4)
    # The preprocessor's sequence_length (8) is the default max_length.
    with pytest.raises(ValueError, match="max_length=8 is shorter"):
        lm.generate("abcdefghij")
    with pytest.raises(ValueError, match=re.escape(
            "(row 0: more than 64 tokens)")):
        lm.generate("a" * 100, max_length=64)

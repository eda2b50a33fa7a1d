"""Runs the backend-agnostic layer tests again on the JAX backend.

The backend is fixed when Keras is imported, so the JAX run is a separate
pytest process; there the reversible stack and the chunked feed-forward use
`jax.custom_vjp` instead of `tf.custom_gradient`.
"""

import os
import re
import subprocess
import sys

import keras
import pytest

from tests.processes import fast_compile_xla_flags

BACKEND_AGNOSTIC_TESTS = [
    "tests/test_lsh_self_attention.py",
    "tests/test_chunked_attention.py",
    "tests/test_local_and_linformer_attention.py",
    "tests/test_reversible.py",
    "tests/test_chunked_feed_forward.py",
    "tests/test_axial_position_embedding.py",
    "tests/test_permute.py",
    # The automatic plan's JAX-specific choices (its equality tests' paths
    # are the head groups and runs of chunks covered below).
    "tests/test_memory_plan.py::"
    "test_lsh_auto_plan_follows_the_length_as_documented",
    "tests/test_memory_plan.py::"
    "test_local_auto_plan_follows_the_length_as_documented",
    "tests/test_layer_norm.py",
    "tests/test_philox_dropout.py",
    # bfloat16 products through jax.custom_vjp.
    "tests/test_products.py",
    # Generation: the JAX decoding code paths and jitted generate(); the
    # rest of that file reruns eager per-shape ops, slow on JAX's CPU.
    "tests/test_generation.py::test_greedy_generation_of_right_padded_prompts",
    "tests/test_generation.py::"
    "test_each_decoded_position_equals_the_whole_prefix[lsh]",
    # LoRA adapters' gradients through jax.custom_vjp (reversible stack,
    # head groups).
    "tests/test_lora_and_quantization.py::"
    "test_reversible_adapter_gradients_equal_plain_autodiff",
    # A failed loop keeps the weights (Keras's JAX loops detach them).
    "tests/test_reliability.py::"
    "test_failed_fit_evaluate_or_predict_leaves_the_model_working",
    # The masked LM's gather (and its position check off TensorFlow).
    "tests/test_masked_lm.py::"
    "test_logits_are_the_head_applied_to_the_backbone_at_the_positions",
]
# Slow in JAX's eager mode (a new shape per call) and covered on JAX by
# their siblings; they run on TensorFlow.
DESELECTED_ON_JAX = [
    "tests/test_lsh_self_attention.py::"
    "test_outputs_do_not_depend_on_the_amount_of_padding[True-2-0-1]",
    "tests/test_lsh_self_attention.py::"
    "test_outputs_do_not_depend_on_the_amount_of_padding[False-1-1-2]",
    "tests/test_permute.py::"
    "test_lsh_gradients_equal_full_attention_when_one_chunk_spans",
    "tests/test_permute.py::"
    "test_segments_equal_the_whole_sorted_sequence[4-None]",
    "tests/test_local_and_linformer_attention.py::"
    "test_local_segments_equal_all_chunks_at_once[4-False-0]",
    "tests/test_lsh_self_attention.py::"
    "test_outputs_do_not_depend_on_the_amount_of_padding[False-0-2-3]",
    "tests/test_lsh_self_attention.py::"
    "test_equals_full_shared_qk_attention_when_one_chunk_spans[False-False]",
    # The reversible custom_vjp: its LSH twin covers it (and, through the
    # gradients, the inputs it reconstructs).
    "tests/test_reversible.py::test_inputs_are_reconstructed_from_outputs",
    "tests/test_reversible.py::"
    "test_outputs_and_gradients_equal_plain_residual_stack[full]",
    # `recomputed_loop` on JAX: covered by the LSH segments' twin.
    "tests/test_local_and_linformer_attention.py::"
    "test_local_segments_recomputed_gradient_equals_autodiff_with_dropout",
    "tests/test_lsh_self_attention.py::"
    "test_outputs_do_not_depend_on_the_amount_of_padding[True-1-0-3]",
    "tests/test_permute.py::"
    "test_segments_equal_the_whole_sorted_sequence[16-2]",
    "tests/test_permute.py::test_head_groups_equal_all_heads_at_once",
    "tests/test_reversible.py::"
    "test_forward_matches_plain_residual_and_inference_path",
    "tests/test_lsh_self_attention.py::"
    "test_half_precision_masks_are_finite_and_close[float16]",
    # Configuration and argument checks do not depend on the backend.
    "tests/test_lsh_self_attention.py::test_config_round_trip",
    "tests/test_lsh_self_attention.py::test_bad_inputs_raise_clear_errors",
]


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="this test starts the JAX run itself")
def test_layer_tests_pass_on_jax_backend():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS=fast_compile_xla_flags())
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *BACKEND_AGNOSTIC_TESTS,
         *[f"--deselect={test}" for test in DESELECTED_ON_JAX]],
        cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    summary = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, summary
    # pytest's last line: "N passed[, M skipped ...] in S s" (a test whose
    # name holds "failed" may appear earlier, among the slowest durations).
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", last_line), summary
    assert not re.search(r"\d+ (failed|error)", last_line), summary

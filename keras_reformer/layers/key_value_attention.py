"""Base of the attention layers whose keys are chosen by position."""

from keras import ops

from keras_reformer.layers.chunked_attention import attend
from keras_reformer.layers.chunked_attention import masked_scores
from keras_reformer.layers.seeds import draw_seed
from keras_reformer.layers.self_attention_base import SelfAttentionBase
from keras_reformer.layers.masks import prefix_mask
from keras_reformer.layers.self_attention_base import shared_qk_keys
from keras_reformer.layers.masks import zero_padding


class KeyValueAttention(SelfAttentionBase):
    """Attention whose keys for a query depend only on positions (full and
    local attention): cached decoding keeps every position's key and value
    and reads those of the new position's window.

    Subclasses implement `_attend(inputs, valid, seed)` (`seed`: None, or
    the dropout seed while training) returning the outputs and the inputs
    as attended (padded, for local attention: the cache holds their keys
    and values), and `_decode_positions(index)`, the key positions a query
    at `index` may see.
    """

    def call(self, inputs, padding_mask=None, training=None, seed=None,
             mask=None):
        inputs, valid = self.real_inputs(inputs, padding_mask, mask)
        seed = draw_seed(seed, self.seed_generator) if training else None
        outputs, _ = self._attend(inputs, valid, seed)
        return outputs

    def prefill(self, inputs, prefix_length):
        """See `call_with_cache`; the cache holds keys and values."""
        valid = prefix_mask(inputs, prefix_length)
        outputs, attended = self._attend(zero_padding(inputs, valid), valid,
                                         None)
        _, keys, values = self.project_all(attended,
                                           self.kernels(attended.dtype))
        return outputs, {"keys": keys, "values": values}

    def decode_step(self, inputs, cache, index):
        """See `call_with_cache`: the new position's query attends to the
        cached keys of `_decode_positions(index)`."""
        kernels = self.kernels(inputs.dtype)
        queries, key, value = self.project_all(inputs, kernels)
        keys = ops.slice_update(cache["keys"], [0, 0, index, 0], key)
        values = ops.slice_update(cache["values"], [0, 0, index, 0], value)
        positions = self._decode_positions(index, ops.shape(keys)[2])
        key_valid = ops.logical_and(positions >= 0, positions <= index)
        gather_at = ops.clip(positions, 0, ops.shape(keys)[2] - 1)

        def mask_fn(scores):
            return masked_scores(scores, ops.reshape(index, (1,)), positions,
                                 key_valid, causal=True,
                                 mask_self=self.shared_qk)

        outputs, _ = attend(queries, ops.take(keys, gather_at, axis=2),
                            ops.take(values, gather_at, axis=2), mask_fn)
        valid = ops.ones(ops.shape(inputs)[:2], "bool")
        return self.merge_heads(outputs, valid, kernels[-1]), {
            "keys": keys, "values": values}

    def project_all(self, inputs, kernels):
        """Queries, keys (scaled, or normalised with `shared_qk`) and
        values, each `(batch, heads, length, head_dim)`, by `kernels` (the
        layer's `kernels`)."""
        if self.shared_qk:
            query_key_kernel, value_kernel, _ = kernels
            queries = self.project(inputs, query_key_kernel)
            keys = shared_qk_keys(queries)
        else:
            query_kernel, key_kernel, value_kernel, _ = kernels
            queries = self.project(inputs, query_kernel)
            keys = self.project(inputs, key_kernel) / (self.head_dim**0.5)
        return queries, keys, self.project(inputs, value_kernel)

"""Local self-attention: each chunk attends to itself and its neighbours."""

import keras
from keras import ops

from keras_reformer.layers.attention_registry import register_attention
from keras_reformer.layers.chunked_attention import attention_in_runs
from keras_reformer.layers.chunked_attention import chunked_attention
from keras_reformer.layers.chunked_attention import look_adjacent
from keras_reformer.layers.chunked_attention import run_of
from keras_reformer.layers.key_value_attention import KeyValueAttention
from keras_reformer.layers.memory_plan import AUTO
from keras_reformer.layers.memory_plan import check_plan_option
from keras_reformer.layers.memory_plan import plan
from keras_reformer.layers.seeds import offset_seed
from keras_reformer.layers.masks import pad_to_multiple
from keras_reformer.layers.masks import zero_padding
from keras_reformer.layers.validation import check_chunk_window
from keras_reformer.layers.validation import check_positive_int


@register_attention("local")
@keras.saving.register_keras_serializable(package="keras_reformer")
class LocalSelfAttention(KeyValueAttention):
    """Attention within chunks of consecutive positions and their neighbours.

    The sequence is cut into chunks of `chunk_length`; a query attends to the
    keys of its chunk, of `num_chunks_before` preceding and of
    `num_chunks_after` following chunks (no wrap-around), with the masking
    rules of the LSH layer (causal, padding anywhere). Queries, keys and
    values have separate projections; scores are scaled by `head_dim**-0.5`
    (Hugging Face's local attention). Any length is padded internally.

    Args:
        num_heads: int, number of attention heads.
        head_dim: int, size of each head.
        chunk_length: int, tokens per chunk.
        num_chunks_before: int, preceding chunks attended to.
        num_chunks_after: int, following chunks attended to.
        causal: bool, a token never attends to later tokens.
        dropout: float, dropout on attention weights while training.
        seed: int or None, seeds dropout.
        segments: `"auto"`, None (all chunks at once) or an int: the
            chunks are attended in that many runs, one after another, each
            recomputed in the backward pass, so only one run's scores and
            key windows are alive at once (less memory for very long
            sequences; the same outputs and gradients, dropout aside, which
            is drawn per run). Where it does not divide the number of
            chunks, the largest number of runs below it that does is used
            (1 when the length is unknown while tracing). `"auto"` chooses
            from the padded input length when the layer is traced
            (`memory_plan.plan`): all at once while the scores,
            `num_heads * length * (num_chunks_before + 1 + num_chunks_after)
            * chunk_length`, are at most `2**24` (up to 16,384 tokens with 8
            heads, chunks of 64 and one chunk of look-back), else the fewest
            runs dividing the chunks that keep each run's within `2**24`
            (`2**18` on JAX); all at once when the length is unknown while
            tracing.

    Example:
    >>> layer = LocalSelfAttention(num_heads=2, head_dim=16, chunk_length=8,
    ...                            causal=True)
    >>> layer(keras.random.normal((1, 30, 24))).shape
    (1, 30, 24)
    """

    def __init__(self, num_heads, head_dim, chunk_length=64,
                 num_chunks_before=1, num_chunks_after=0, causal=False,
                 dropout=0.0, seed=None, segments=AUTO,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(num_heads, head_dim, shared_qk=False, causal=causal,
                         dropout=dropout,
                         kernel_initializer=kernel_initializer, seed=seed,
                         **kwargs)
        check_positive_int("chunk_length", chunk_length)
        check_chunk_window(causal, num_chunks_before, num_chunks_after)
        check_plan_option("segments", segments)
        self.chunk_length = chunk_length
        self.num_chunks_before = num_chunks_before
        self.num_chunks_after = num_chunks_after
        self.segments = segments

    def _decode_positions(self, index, capacity):
        """The new position's chunk and the `num_chunks_before` before it."""
        window = (1 + self.num_chunks_before) * self.chunk_length
        first = (index // self.chunk_length - self.num_chunks_before) * (
            self.chunk_length)
        return first + ops.arange(window, dtype="int32")

    def _attend(self, inputs, valid, seed):
        """Outputs `(batch, length, hidden)` and the inputs padded to a
        multiple of `chunk_length`; `seed`: None (no dropout) or the
        dropout seed."""
        batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        inputs, valid = pad_to_multiple(inputs, valid, self.chunk_length)
        padded_length = ops.shape(inputs)[1]
        shape = (batch, self.num_heads, padded_length)
        positions = ops.broadcast_to(
            ops.arange(padded_length, dtype="int32"), shape)
        key_valid = ops.broadcast_to(valid[:, None, :], shape)
        if self.dropout == 0.0:
            seed = None
        kernels = self.kernels(inputs.dtype)
        runs = self.memory_plan(padded_length)
        if runs is None:
            outputs = self.merge_heads(self._attend_whole(
                self.project_all(inputs, kernels), positions, key_valid,
                seed), valid, kernels[-1])
        else:
            outputs = zero_padding(self._attend_segments(
                inputs, kernels, positions, key_valid, seed, runs), valid)
        return outputs[:, :length], inputs

    def memory_plan(self, length):
        """The runs of chunks (None: all at once) attended for inputs padded
        to `length` (an int, or a tensor when unknown while tracing),
        `segments="auto"` resolved (`memory_plan.plan`)."""
        width = self.num_chunks_before + 1 + self.num_chunks_after
        return plan(None, self.segments, self.num_heads,
                    length * width * self.chunk_length,
                    length // self.chunk_length)[1]

    def _attend_whole(self, projections, positions, key_valid, seed):
        """Every chunk at once: `(batch, heads, length, head_dim)`."""
        batch, heads, length = ops.shape(positions)
        num_chunks = length // self.chunk_length

        def windows(x):
            chunks = ops.reshape(x, (batch, heads, num_chunks,
                                     self.chunk_length) + tuple(x.shape[3:]))
            adjacent = look_adjacent(chunks, self.num_chunks_before,
                                     self.num_chunks_after)
            return ops.reshape(adjacent, (batch, heads, -1)
                               + tuple(x.shape[3:]))

        # A neighbour that wrapped around (or repeats, with few chunks) is
        # masked by its exact chunk offset.
        offsets = ops.repeat(ops.arange(
            -self.num_chunks_before, self.num_chunks_after + 1,
            dtype="int32"), self.chunk_length)
        queries, keys, values = projections
        outputs, _ = chunked_attention(
            queries, windows(keys), windows(values), positions,
            windows(positions), windows(key_valid), self.chunk_length,
            self.causal, mask_self=False,
            dropout_fn=self.dropout_fn(seed is not None, seed),
            window=(self.chunk_length, offsets))
        return outputs

    def _attend_segments(self, inputs, kernels, positions, key_valid, seed,
                         runs):
        """`_attend_whole` and the output projection by `kernels` (the
        layer's `kernels`) in `runs` runs of chunks
        (`attention_in_runs`): `(batch, length, hidden)`.

        Each run projects its own queries, keys and values from a slice of
        the inputs, which are padded by the neighbouring chunks' length at
        both ends, so that a run's key windows are one slice: no gathers, no
        whole-sequence projections, and the backward adds each run's input
        gradient into its slice only.
        """
        before = self.num_chunks_before * self.chunk_length
        after = self.num_chunks_after * self.chunk_length

        def pad(x, axis):
            widths = [[0, 0]] * len(x.shape)
            widths[axis] = [before, after]
            return ops.pad(x, widths)

        padded_valid = pad(ops.cast(key_valid, "int32"), 2) > 0
        (outputs,) = attention_in_runs(
            self._attend_run, [pad(inputs, 1), *kernels],
            [positions, padded_valid], runs, self.chunk_length,
            seed, slicing=[(1, before + after)] + [None] * len(kernels),
            result_axes=(1,))
        return outputs

    def _attend_run(self, s, run, inputs, layout, seed):
        """Run `s` (positions `s * run` onwards) of `_attend_segments`:
        `inputs` are its slice of the padded inputs, which starts
        `num_chunks_before` chunks earlier, and the four kernels."""
        window_inputs, *kernels = inputs
        query_kernel, key_kernel, value_kernel, output_kernel = kernels
        positions, padded_valid = layout
        batch, heads = ops.shape(positions)[0], ops.shape(positions)[1]
        before = self.num_chunks_before * self.chunk_length
        width = self.num_chunks_before + 1 + self.num_chunks_after
        size = ops.shape(window_inputs)[1]
        key_positions = ops.broadcast_to(
            s * run - before + ops.arange(size, dtype="int32"),
            (batch, heads, size))

        def windows(x):
            """Chunk `u`'s window: chunks `u` to `u + width - 1` of `x`."""
            tail = tuple(x.shape[3:])
            parts = [ops.reshape(
                ops.slice(x, [0, 0, o * self.chunk_length] + [0] * len(tail),
                          (batch, heads, run) + tail),
                (batch, heads, -1, self.chunk_length) + tail)
                for o in range(width)]
            return ops.reshape(ops.concatenate(parts, axis=3),
                               (batch, heads, run * width) + tail)

        queries = self.project(
            ops.slice(window_inputs, [0, before, 0],
                      (batch, run, ops.shape(window_inputs)[2])),
            query_kernel)
        keys = self.project(window_inputs, key_kernel) / (self.head_dim**0.5)
        outputs, _ = chunked_attention(
            queries, windows(keys),
            windows(self.project(window_inputs, value_kernel)),
            run_of(positions, s, run), windows(key_positions),
            windows(ops.slice(padded_valid, [0, 0, s * run],
                              (batch, heads, size))),
            self.chunk_length, self.causal, mask_self=False,
            dropout_fn=self.dropout_fn(seed is not None,
                                       offset_seed(seed, [s, 0])))
        return (self.project_out(outputs, output_kernel),)

    def get_config(self):
        config = super().get_config()
        config.update({
            "chunk_length": self.chunk_length,
            "num_chunks_before": self.num_chunks_before,
            "num_chunks_after": self.num_chunks_after,
            "segments": self.segments,
        })
        return config

"""LSH self-attention (Reformer): attend only within hash buckets."""

import keras
from keras import ops

from keras_reformer.layers import hashing
from keras_reformer.layers.attention_registry import register_attention
from keras_reformer.layers.chunked_attention import attend
from keras_reformer.layers.chunked_attention import attention_in_runs
from keras_reformer.layers.chunked_attention import chunked_attention
from keras_reformer.layers.chunked_attention import chunked_attention_grads
from keras_reformer.layers.chunked_attention import dividing_runs
from keras_reformer.layers.chunked_attention import masked_scores
from keras_reformer.layers.chunked_attention import run_of
from keras_reformer.layers.custom_gradient import vjp
from keras_reformer.layers.custom_gradient import with_custom_gradient
from keras_reformer.layers.memory_plan import AUTO
from keras_reformer.layers.memory_plan import check_plan_option
from keras_reformer.layers.memory_plan import plan
from keras_reformer.layers.permute import gather_rows
from keras_reformer.layers.permute import gathered_back
from keras_reformer.layers.permute import inverse_permutation
from keras_reformer.layers.permute import order_by_key
from keras_reformer.layers.permute import take_rows
from keras_reformer.layers.recomputed_loop import recomputed_loop
from keras_reformer.layers.self_attention_base import SelfAttentionBase
from keras_reformer.layers.masks import pad_to_multiple
from keras_reformer.layers.masks import prefix_mask
from keras_reformer.layers.self_attention_base import shared_qk_keys
from keras_reformer.layers.masks import zero_padding
from keras_reformer.layers.seeds import draw_seed
from keras_reformer.layers.seeds import fold_seed
from keras_reformer.layers.seeds import offset_seed
from keras_reformer.layers.seeds import random_normal
from keras_reformer.layers.validation import check_chunk_window
from keras_reformer.layers.validation import check_positive_int

DEFAULT_CHUNK_LENGTH = 64


@register_attention("lsh")
@keras.saving.register_keras_serializable(package="keras_reformer")
class LSHSelfAttention(SelfAttentionBase):
    """Locality-sensitive-hashing self-attention with shared queries and keys.

    Tokens are hashed into buckets by random rotations of their shared
    query/key vectors, sorted by (hash round, bucket, position), cut into
    chunks of `chunk_length`, and each chunk attends to itself and its
    `num_chunks_before` / `num_chunks_after` neighbours. The `num_hashes`
    rounds are combined with weights from their logsumexps. Keys are the
    query/key vectors divided by their norm; queries are unscaled (the trax
    and Hugging Face convention). A token attends to itself only when no
    other key is allowed. Inputs of any length are padded internally to a
    multiple of `chunk_length`.

    Hashing is random while training (fresh rotations each call, drawn from
    `seed` or the layer's seed generator) and fixed at inference (the
    non-trainable weight `rotations`, which may be set to port weights).

    Args:
        num_heads: int, number of attention heads.
        head_dim: int, size of each head.
        chunk_length: int, tokens per chunk of the sorted sequence.
        num_hashes: int, hash rounds.
        num_buckets: None (about `2 * length / chunk_length`, from the input
            length known at build time), an even int, or a pair of even ints
            (factorised buckets).
        causal: bool, a token never attends to later tokens.
        num_chunks_before: int, preceding chunks each chunk attends to.
        num_chunks_after: int, following chunks each chunk attends to.
        dropout: float, dropout on attention weights while training.
        seed: int or None, seeds rotations and dropout.
        parallel_heads: `"auto"`, None (all heads at once) or an int
            dividing `num_heads`: project, hash and attend this many heads
            at a time (only every head's integer sort order is kept), and
            recompute each group's projections and attention in the
            backward pass instead of storing them (much less memory for
            long sequences). `"auto"` chooses from the padded input length
            when the layer is traced (`memory_plan.plan`): all heads while
            their chunk scores, `num_heads * num_hashes * length *
            (num_chunks_before + 1 + num_chunks_after) * chunk_length`,
            are at most `2**24` on TensorFlow (up to 4,096 tokens with 8
            heads, 4 rounds, chunks of 64 and one chunk of look-back) and
            `2**18` on JAX, else one head at a time; all heads when the
            length is unknown while tracing.
        segments: `"auto"`, None (the whole sorted sequence at once) or an
            int: attend that many equal runs of chunks one after another,
            and recompute each run's attention in the backward pass; the
            scores and key windows alive at once shrink by this factor.
            Where it does not divide the number of chunks (`num_hashes *
            padded length / chunk_length`), the largest number of runs below
            it that does is used (1 when the length is unknown while
            tracing). `"auto"`: one run while all heads' scores fit `2**24`;
            else the fewest runs dividing the chunks that keep each run's
            scores (of the heads attended at a time) within `2**24` on
            TensorFlow and `2**18` on JAX, where smaller runs measured
            faster (one head at a time in the configuration above: at
            1,024 tokens 2 runs on JAX; 4,096: 8 on JAX; 16,384: one run,
            32 on JAX; 65,536: 2, 128 on JAX; 1,048,576: 32, 2,048 on
            JAX).

    Example:
    >>> layer = LSHSelfAttention(num_heads=2, head_dim=16, chunk_length=8,
    ...                          num_buckets=4)
    >>> layer(keras.random.normal((1, 32, 24))).shape
    (1, 32, 24)
    """

    def __init__(self, num_heads, head_dim, chunk_length=DEFAULT_CHUNK_LENGTH,
                 num_hashes=4,
                 num_buckets=None, causal=False, num_chunks_before=1,
                 num_chunks_after=0, dropout=0.0, seed=None,
                 parallel_heads=AUTO, segments=AUTO,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(num_heads, head_dim, shared_qk=True, causal=causal,
                         dropout=dropout,
                         kernel_initializer=kernel_initializer, seed=seed,
                         **kwargs)
        check_positive_int("chunk_length", chunk_length)
        check_positive_int("num_hashes", num_hashes)
        check_chunk_window(causal, num_chunks_before, num_chunks_after)
        num_buckets = _check_num_buckets(num_buckets)
        check_plan_option("parallel_heads", parallel_heads, num_heads)
        check_plan_option("segments", segments)
        self.parallel_heads = parallel_heads
        self.segments = segments
        self.chunk_length = chunk_length
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        self.num_chunks_before = num_chunks_before
        self.num_chunks_after = num_chunks_after

    @classmethod
    def from_backbone(cls, *, max_length, **kwargs):
        """`AttentionLayer.from_backbone`; `num_buckets=None` becomes the
        default for the backbone's `max_length` (its inputs' length is
        unknown when the layer is built)."""
        if kwargs.get("num_buckets") is None:
            chunk_length = kwargs.get("chunk_length", DEFAULT_CHUNK_LENGTH)
            check_positive_int("chunk_length", chunk_length)
            kwargs["num_buckets"] = _default_num_buckets(max_length,
                                                         chunk_length)
        return super().from_backbone(max_length=max_length, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        self.resolved_num_buckets = self.num_buckets
        if self.resolved_num_buckets is None:
            length = input_shape[1]
            if length is None:
                raise ValueError(
                    "LSHSelfAttention with num_buckets=None takes its bucket "
                    "count from the sequence length, which is unknown at "
                    f"build time (input shape {input_shape}). Pass "
                    "num_buckets (for example "
                    "keras_reformer.layers.hashing.auto_num_buckets("
                    "max_length, chunk_length))."
                )
            self.resolved_num_buckets = _default_num_buckets(
                length, self.chunk_length)
        self.rotations = self.add_weight(
            name="rotations",
            shape=self._rotations_shape(),
            initializer=keras.initializers.RandomNormal(seed=self.seed),
            trainable=False,
        )

    def _rotations_shape(self):
        return (self.num_heads, self.head_dim, self.num_hashes,
                hashing.rotation_columns(self.resolved_num_buckets))

    def call(self, inputs, padding_mask=None, training=None, seed=None,
             mask=None):
        if training:
            seed = draw_seed(seed, self.seed_generator)
            rotations = random_normal(
                self._rotations_shape(), fold_seed(seed, 0))
        else:
            rotations = self.rotations
        dropout_seed = fold_seed(seed, 1) if (
            training and self.dropout > 0) else None
        outputs, _ = self._forward(
            *self.real_inputs(inputs, padding_mask, mask), rotations,
            dropout_seed)
        return outputs

    def prefill(self, inputs, prefix_length):
        """See `call_with_cache`. The cache holds the keys, the values, the
        bucket of every position and each round's positions in sorted
        order (the rotations are the fixed inference ones)."""
        valid = prefix_mask(inputs, prefix_length)
        return self._forward(zero_padding(inputs, valid), valid,
                             self.rotations, None, with_cache=True)

    def _forward(self, inputs, valid, rotations, dropout_seed,
                 with_cache=False):
        """Outputs `(batch, length, hidden)` and the decoding cache (None
        unless `with_cache`)."""
        length = ops.shape(inputs)[1]
        inputs, valid = pad_to_multiple(inputs, valid, self.chunk_length)
        group, runs = self.memory_plan(ops.shape(inputs)[1])
        kernels = self.kernels(inputs.dtype)
        query_key_kernel, value_kernel, output_kernel = kernels
        cache = None
        if group is None or with_cache:
            query_key = self.project(inputs, query_key_kernel)
            values = self.project(inputs, value_kernel)
            buckets, order, indices = self._sort_by_buckets(
                self._hash(lambda g, size: _heads(query_key, g * size, size),
                           rotations, group), valid)
            if with_cache:
                cache = {"keys": shared_qk_keys(query_key), "values": values,
                         "buckets": buckets, "order": order}
        if group is None:
            outputs = self.merge_heads(_combine_rounds(*self._attend_sorted(
                query_key, values, indices, dropout_seed, runs)), valid,
                output_kernel)
        else:
            outputs = zero_padding(self._attend_head_groups(
                inputs, valid, rotations, dropout_seed, kernels, group, runs),
                valid)
        return outputs[:, :length], cache

    def memory_plan(self, length):
        """`(group, runs)`: the heads (None: all) and runs of sorted chunks
        (None: all) attended at a time for inputs padded to `length` (an
        int, or a tensor when unknown while tracing), `parallel_heads` and
        `segments` with `"auto"` resolved (`memory_plan.plan`)."""
        width = self.num_chunks_before + 1 + self.num_chunks_after
        return plan(self.parallel_heads, self.segments, self.num_heads,
                    self.num_hashes * length * width * self.chunk_length,
                    self.num_hashes * length // self.chunk_length)

    def decode_step(self, inputs, cache, index):
        """See `call_with_cache`.

        The new token is hashed, inserted into every round's sorted order
        after the cached tokens of lower or equal bucket, and attends to the
        chunks around its place exactly as the whole sequence's sorted,
        chunked attention would.
        """
        query_key_kernel, value_kernel, output_kernel = self.kernels(
            inputs.dtype)
        query_key = self.project(inputs, query_key_kernel)
        keys = ops.slice_update(cache["keys"], [0, 0, index, 0],
                                shared_qk_keys(query_key))
        values = ops.slice_update(cache["values"], [0, 0, index, 0],
                                  self.project(inputs, value_kernel))
        bucket = hashing.hash_vectors(query_key, self.rotations,
                                      self.resolved_num_buckets)
        capacity = ops.shape(keys)[2]
        slots = ops.arange(capacity, dtype="int32")
        earlier = ops.logical_and(slots < index, cache["buckets"] <= bucket)
        rank = ops.sum(ops.cast(earlier, "int32"), axis=-1, keepdims=True)
        buckets = ops.slice_update(cache["buckets"], [0, 0, 0, index], bucket)
        order = ops.where(
            slots < rank, cache["order"],
            ops.where(slots == rank, index, ops.roll(cache["order"], 1, -1)))
        key_slots = self._window_slots(rank[..., 0], index, capacity)
        batch, heads = ops.shape(keys)[0], ops.shape(keys)[1]
        shape = (batch, heads, self.num_hashes, -1)
        key_positions = ops.reshape(take_rows(
            ops.reshape(order, (batch, heads, -1)),
            ops.reshape(key_slots, (batch, heads, -1))), shape)
        # Slots after the new token's hold no token yet, and a chunk seen
        # twice (a look-back round a ring of few chunks) counts once.
        key_valid = ops.reshape(ops.logical_and(
            key_slots % capacity <= index,
            self._first_copies(index)[:, None]), shape)

        def gather(x):
            return ops.reshape(take_rows(x, ops.reshape(
                key_positions, (batch, heads, -1))), shape + (self.head_dim,))

        def mask_fn(scores):
            return masked_scores(
                scores, ops.reshape(index, (1,)),
                ops.where(key_valid, key_positions, -1), key_valid,
                causal=True, mask_self=True)

        outputs, logsumexp = attend(
            ops.broadcast_to(query_key[:, :, None], (
                batch, heads, self.num_hashes, 1, self.head_dim)),
            gather(keys), gather(values), mask_fn)
        outputs = _combine_rounds(outputs, logsumexp)
        valid = ops.ones(ops.shape(inputs)[:2], "bool")
        return self.merge_heads(outputs, valid, output_kernel), {
            "keys": keys, "values": values, "buckets": buckets,
            "order": order}

    def _window_slots(self, rank, index, capacity):
        """Flat slots `round * capacity + slot` of the keys the token at
        `index` sees in each round, given its `rank` there `(batch, heads,
        num_hashes)`: its chunk and the `num_chunks_before` before it on the
        ring of the `index + 1` tokens' chunks (see `_RealChunksFirst`)."""
        chunk = self.chunk_length
        real_chunks = index // chunk + 1
        ring_position = (ops.arange(self.num_hashes, dtype="int32")[:, None]
                         * real_chunks + rank[..., None] // chunk)
        offsets = ops.arange(-self.num_chunks_before, 1, dtype="int32")
        neighbour = (ring_position + offsets) % (self.num_hashes * real_chunks)
        rounds, within = neighbour // real_chunks, neighbour % real_chunks
        return ((rounds * capacity + within * chunk)[..., None]
                + ops.arange(chunk, dtype="int32"))

    def _first_copies(self, index):
        """`(num_chunks_before + 1,)` bool: whether each part of the window
        `_window_slots` gives the token at `index` holds a chunk that no
        earlier part holds (parts `p` and `q` coincide when the ring's size
        divides `p - q`)."""
        ring = self.num_hashes * (index // self.chunk_length + 1)
        return ops.arange(self.num_chunks_before + 1, dtype="int32") < ring

    def _hash(self, group_query_key, rotations, group):
        """Bucket ids `(batch, heads, num_hashes, length)`, `group` heads at
        a time (all at once when it is None).

        Args:
            group_query_key: `group_query_key(g, group)`, the query-keys
                `(batch, group, length, head_dim)` of heads `g * group` to
                `(g + 1) * group`.
            rotations: the rotations of every head.
            group: None or an int dividing `num_heads`.
        """
        num_buckets = self.resolved_num_buckets
        group = group or self.num_heads
        rotations = ops.convert_to_tensor(rotations)  # not a Keras variable

        def hash_group(g):
            return hashing.hash_vectors(
                group_query_key(g, group),
                _heads(rotations, g * group, group, axis=0), num_buckets)

        if group == self.num_heads:
            return hash_group(0)
        first = hash_group(0)  # shapes the result

        def body(g, buckets):
            return ops.slice_update(buckets, [0, g * group, 0, 0],
                                    hash_group(g))

        return ops.fori_loop(1, self.num_heads // group, body, ops.pad(
            first, [[0, 0], [0, self.num_heads - group], [0, 0], [0, 0]]))

    def _sort_by_buckets(self, buckets, valid):
        """Sorts and lays out every round by bucket; integers only.

        Args:
            buckets: `(batch, heads, num_hashes, length)` bucket ids (see
                `_hash`).
            valid: `(batch, length)` bool.

        Returns:
            `(buckets, sorted_positions, indices)`: the bucket of each
            position (padding in a bucket of its own) and the positions in
            sorted order per round, both `(batch, heads, num_hashes,
            length)`, and the index tensors `_attend_sorted` takes.
        """
        batch, heads, num_hashes, length = ops.shape(buckets)
        # Padding gets a bucket of its own (the last).
        pad_bucket = hashing.total_buckets(self.resolved_num_buckets)
        valid = ops.broadcast_to(valid[:, None, :], (batch, heads, length))
        buckets = ops.where(valid[:, :, None, :], buckets, pad_bucket)
        # One sort per round by (bucket, position).
        sorted_positions = order_by_key(buckets, pad_bucket + 1)
        # Real tokens sort first in every round; lay the rounds' chunks that
        # hold real tokens out first, so padding never enters the ring.
        layout = _RealChunksFirst(
            ops.sum(ops.cast(valid[:, 0], "int32"), axis=-1), num_hashes,
            length, self.chunk_length)
        flat_positions = take_rows(
            ops.reshape(sorted_positions, (batch, heads, num_hashes * length)),
            layout.sources()[:, None, :])
        # Where each (round, position) lands in the new sequence, and which
        # (round, position) each place of it holds: the two permutations
        # and their inverses, for gathers in both directions.
        slots = inverse_permutation(sorted_positions)
        undo = ops.reshape(layout.destinations(slots),
                           (batch, heads, num_hashes * length))
        rounds = (layout.sources() // length)[:, None, :]
        redo = rounds * length + flat_positions
        # Each chunk's window of keys (itself and its neighbours on the
        # ring), to be gathered straight from the unsorted keys and values.
        window, window_inverse, first_copy = layout.windows(
            self.num_chunks_before, self.num_chunks_after)
        key_positions = take_rows(flat_positions, window[:, None, :])
        key_copies = ops.reshape(ops.take_along_axis(
            window_inverse[:, None], undo[:, :, None, :], axis=3),
            (batch, heads, -1))
        key_valid = ops.logical_and(
            take_rows(valid, key_positions),
            first_copy[:, None, :])
        indices = (flat_positions, undo, redo, key_positions, key_copies,
                   key_valid)
        return buckets, sorted_positions, indices

    def _attend_sorted(self, query_key, values, indices, dropout_seed,
                       runs):
        """Chunked attention of every round in sorted order, back in the
        original order.

        Args:
            query_key, values: `(batch, heads, length, head_dim)`.
            indices: from `_sort_by_buckets` (for the same heads).
            dropout_seed: None (no dropout) or a seed tensor.
            runs: None (all chunks at once) or the runs of chunks
                (`_attend_segments`).

        Returns:
            `(outputs, logsumexp)` of every round, `(batch, heads,
            num_hashes, length, head_dim)` and `(batch, heads, num_hashes,
            length)`, for `_combine_rounds`.
        """
        flat_positions, undo, redo, key_positions, key_copies, key_valid = (
            indices)
        batch, heads, length, head_dim = ops.shape(query_key)
        num_hashes = self.num_hashes
        width = self.num_chunks_before + 1 + self.num_chunks_after

        def window_gather(x):
            return gather_rows(x, key_positions, key_copies,
                               copies=width * num_hashes)

        if runs is None:
            outputs, logsumexp = chunked_attention(
                gather_rows(query_key, flat_positions, undo,
                            copies=num_hashes),
                window_gather(shared_qk_keys(query_key)),
                window_gather(values),
                flat_positions,
                key_positions,
                key_valid,
                self.chunk_length,
                self.causal,
                mask_self=True,
                dropout_fn=self.dropout_fn(dropout_seed is not None,
                                           dropout_seed),
            )
        else:
            outputs, logsumexp = self._attend_segments(
                query_key, values, (flat_positions, key_positions, key_valid),
                dropout_seed, runs)
        # Back to the original order.
        outputs = ops.reshape(gather_rows(outputs, undo, redo),
                              (batch, heads, num_hashes, length, head_dim))
        logsumexp = ops.reshape(gather_rows(logsumexp, undo, redo),
                                (batch, heads, num_hashes, length))
        return outputs, logsumexp

    def _attend_segments(self, query_key, values, layout, dropout_seed,
                         runs):
        """The sorted sequence's chunked attention in `runs` runs of chunks
        (`attention_in_runs`), each run's queries and key windows
        gathered from the unsorted `query_key` and `values`
        `(batch, heads, length, head_dim)`; `layout` is `(query_positions,
        key_positions, key_valid)` of the sorted slots and windows. Returns
        `(outputs, logsumexp)` in sorted order. The keys are normalised
        once, before the runs gather their windows."""
        return attention_in_runs(
            self._attend_run,
            [query_key, shared_qk_keys(query_key), values], list(layout),
            runs, self.chunk_length, dropout_seed)

    def _attend_run(self, s, run, inputs, layout, seed):
        """Run `s` (sorted slots `s * run` onwards) of `_attend_segments`;
        dropout (if `seed` is not None) seeded per run."""
        slots = _run_slots(s, run, layout)
        return chunked_attention(
            *_run_rows(inputs, *slots[:2]), *slots, self.chunk_length,
            self.causal, mask_self=True,
            dropout_fn=self.dropout_fn(seed is not None,
                                       offset_seed(seed, [s, 0])))

    def _attend_head_groups(self, inputs, valid, rotations, dropout_seed,
                            kernels, group, runs):
        """`_group_step`'s outputs summed over the groups of `group` heads.

        The heads are hashed and sorted a group at a time, each group's
        query-keys projected for it and dropped (only the integer sort
        indices of every head are kept). Then only one group's projections,
        chunked scores, windows and sorted copies are alive at once. The
        forward pass keeps each group's combined attention outputs and
        round weights; the backward pass (`_group_backward`) recomputes a
        group's projections and scores from them, not its attention.

        Args:
            inputs: `(batch, length, hidden)`, padded to whole chunks.
            valid: `(batch, length)` bool.
            rotations: the hash rotations of every head.
            dropout_seed: None (no dropout) or a seed tensor.
            kernels: the query-key, value and output kernels (`kernels`).
            group: int, heads at a time (dividing `num_heads`).
            runs: None or the runs of chunks of each group's attention.

        Returns:
            `(batch, length, hidden)`, before padded positions are zeroed.
        """
        _, _, indices = self._sort_by_buckets(self._hash(
            lambda g, size: self.project(
                inputs, _heads(kernels[0], g * size, size)),
            rotations, group), valid)
        (outputs,) = recomputed_loop(
            lambda g, views, indices, seed: self._group_step(
                g, views, indices, seed, group, runs),
            [inputs, *kernels], self.num_heads // group, group,
            slicing=[None] + [(axis, 0) for axis in _HEAD_AXES],
            layout=tuple(indices), seed=dropout_seed,
            step_backward=lambda g, views, indices, seed, saved, grads: (
                self._group_backward(g, views, indices, seed, saved,
                                     grads[0], group, runs)),
            saved_axes=(1, 1))
        return outputs

    def _group_step(self, g, views, indices, dropout_seed, group, runs):
        """Head group `g`'s share of the layer's output `(batch, length,
        hidden)`, its combined attention outputs `(batch, group, length,
        head_dim)` and each round's weight in them `(batch, group,
        num_hashes, length)` (float32).

        `views` are the inputs and the group's slices of the query-key,
        value and output kernels; attention (in `runs`, see
        `_attend_sorted`) runs in the order of the group's slices of
        `indices` (of every head, from `_sort_by_buckets`); dropout (if
        `dropout_seed` is not None) is seeded per group.
        """
        inputs, query_key_kernel, value_kernel, output_kernel = views
        outputs, logsumexp = self._attend_sorted(
            self.project(inputs, query_key_kernel),
            self.project(inputs, value_kernel),
            _group_indices(indices, g, group), offset_seed(dropout_seed,
                                                           [0, g]), runs)
        combined = _combine_rounds(outputs, logsumexp)
        return (self.project_out(combined, output_kernel), combined,
                ops.stack(_round_weights(logsumexp), axis=2))

    def _group_backward(self, g, views, indices, dropout_seed, saved,
                        output_grad, group, runs):
        """The gradients of `_group_step`'s output with respect to its
        `views`, given its `saved` combined outputs and round weights.

        The group's projections and chunked scores are recomputed; its
        attention outputs, their gathers and the rounds' combination are
        not (`chunked_attention_grads`).
        """
        inputs, query_key_kernel, value_kernel, output_kernel = views
        outputs, round_weights = saved
        _, pullback = vjp(lambda x, kernel: (self.project_out(x, kernel),),
                          [outputs, output_kernel])
        outputs_grad, output_kernel_grad = pullback((output_grad,))

        def projections(inputs, query_key_kernel, value_kernel):
            query_key = self.project(inputs, query_key_kernel)
            return (query_key, shared_qk_keys(query_key),
                    self.project(inputs, value_kernel))

        projected, pullback = vjp(projections,
                                  [inputs, query_key_kernel, value_kernel])
        grads = pullback(self._sorted_grads(
            *projected, outputs, round_weights, outputs_grad,
            _group_indices(indices, g, group),
            offset_seed(dropout_seed, [0, g]), runs))
        return (*grads, output_kernel_grad)

    def _sorted_grads(self, query_key, keys, values, outputs, round_weights,
                      outputs_grad, indices, dropout_seed, runs):
        """The gradients of `_attend_sorted`'s combined rounds with respect
        to `query_key`, the normalised `keys` and `values` `(batch, heads,
        length, head_dim)`, given the combined `outputs`, their gradient
        `outputs_grad` and the `round_weights` (as `_group_step`); chunk by
        chunk of the sorted rounds, in `runs` as `_attend_sorted`."""
        flat_positions, undo, redo, key_positions, key_copies, key_valid = (
            indices)
        batch, heads, length, _ = ops.shape(query_key)
        copies = self.num_hashes * (
            self.num_chunks_before + 1 + self.num_chunks_after)
        # Each sorted slot's share: the weight of its round.
        slot_weights = take_rows(
            ops.reshape(round_weights, (batch, heads,
                                        self.num_hashes * length)), redo)
        layout = (flat_positions, key_positions, key_valid)

        def slot_grads(s, run, rows, seed):
            slots = _run_slots(s, run, layout)
            return chunked_attention_grads(
                *rows, *slots, self.chunk_length, self.causal, True,
                run_of(slot_weights, s, run), take_rows(outputs, slots[0]),
                take_rows(outputs_grad, slots[0]),
                dropout_fn=self.dropout_fn(seed is not None, seed))

        if runs is None:
            query_grad, key_grad, value_grad = slot_grads(
                0, self.num_hashes * length,
                _run_rows([query_key, keys, values], flat_positions,
                          key_positions), dropout_seed)
            shape = ops.shape(query_key)
            return [gathered_back(query_grad, undo, shape, self.num_hashes),
                    gathered_back(key_grad, key_copies, shape, copies),
                    gathered_back(value_grad, key_copies, shape, copies)]
        slots = self.num_hashes * length
        num_runs = dividing_runs(runs, slots // self.chunk_length)
        run = slots // num_runs

        def body(s, grads):
            slots = _run_slots(s, run, layout)
            rows, pullback = vjp(lambda *x: _run_rows(x, *slots[:2]),
                                 [query_key, keys, values])
            run_grads = pullback(slot_grads(
                s, run, rows, offset_seed(dropout_seed, [s, 0])))
            return [total + grad for total, grad in zip(grads, run_grads)]

        return ops.fori_loop(0, num_runs, body,
                             [x * 0 for x in (query_key, keys, values)])

    def get_config(self):
        config = super().get_config()
        config.update({
            "chunk_length": self.chunk_length,
            "num_hashes": self.num_hashes,
            "num_buckets": self.num_buckets,
            "num_chunks_before": self.num_chunks_before,
            "num_chunks_after": self.num_chunks_after,
            "parallel_heads": self.parallel_heads,
            "segments": self.segments,
        })
        return config


# The heads axis of the query-key, value and output kernels.
_HEAD_AXES = (1, 1, 0)


def _heads(x, start, count, axis=1):
    """Heads `start` to `start + count` of `x`, whose heads are on `axis`
    (`(batch, heads, ...)` by default); `start` may be a tensor."""
    shape = list(ops.shape(x))
    starts = [0] * len(shape)
    starts[axis], shape[axis] = start, count
    return ops.slice(x, starts, tuple(shape))


def _group_indices(indices, g, group):
    """Head group `g`'s slices of the index tensors of every head."""
    return [_heads(index, g * group, group) for index in indices]


def _run_slots(s, run, layout):
    """Run `s` (sorted slots `s * run` to `(s + 1) * run`) of `layout`
    `(query_positions, key_positions, key_valid)`: the run's query
    positions and its key windows' positions and validity."""
    query_positions, key_positions, key_valid = layout
    width = ops.shape(key_positions)[2] // ops.shape(query_positions)[2]
    return (run_of(query_positions, s, run),
            run_of(key_positions, s, run * width),
            run_of(key_valid, s, run * width))


def _run_rows(inputs, query_positions, key_positions):
    """A run's rows of `inputs` `(query_key, keys, values)`: its queries and
    its key windows' keys and values."""
    query_key, keys, values = inputs
    return (take_rows(query_key, query_positions),
            take_rows(keys, key_positions),
            take_rows(values, key_positions))


def _default_num_buckets(length, chunk_length):
    """The bucket count for inputs of `length`, padded to whole chunks."""
    padded = -(-length // chunk_length) * chunk_length
    return hashing.auto_num_buckets(padded, chunk_length)


def _check_num_buckets(num_buckets):
    if num_buckets is None:
        return None
    factors = num_buckets if isinstance(num_buckets, (list, tuple)) else (
        num_buckets,)
    valid = 1 <= len(factors) <= 2 and all(
        isinstance(f, int) and not isinstance(f, bool) and f >= 2 and f % 2 == 0
        for f in factors)
    if not valid:
        raise ValueError(
            "num_buckets must be None, an even integer >= 2, or a pair of "
            f"such integers (factorised buckets); received "
            f"num_buckets={num_buckets!r}."
        )
    return num_buckets if isinstance(num_buckets, int) else tuple(factors)


def _combine_rounds(outputs, logsumexp):
    """Weights each round's outputs by the softmax of its logsumexp.

    Written round by round (elementwise, with a backward pass of its own
    whose sums over the feature dimensions are matrix products): plain
    sums over the round axis and their autodiff are reductions that XLA's
    CPU compiler runs slowly.

    Args:
        outputs: `(..., num_hashes, length, head_dim)`.
        logsumexp: `(..., num_hashes, length)`, float32.

    Returns:
        `(..., length, head_dim)`.
    """
    if outputs.shape[-3] == 1:
        return outputs[..., 0, :, :]
    (combined,) = with_custom_gradient(
        _combine_forward, _combine_backward)(outputs, logsumexp)
    return combined


def _round_weights(logsumexp):
    """The softmax over rounds of `logsumexp` `(..., num_hashes, length)`,
    a list of `(..., length)` per round. It subtracts the maximum first:
    exact even when every round's logsumexp is near the -1e5 self-mask
    score."""
    rounds = [logsumexp[..., r, :] for r in range(logsumexp.shape[-2])]
    maximum = rounds[0]
    for value in rounds[1:]:
        maximum = ops.maximum(maximum, value)
    exponentials = [ops.exp(value - maximum) for value in rounds]
    total = exponentials[0]
    for value in exponentials[1:]:
        total = total + value
    return [value / total for value in exponentials]


def _combine_forward(outputs, logsumexp):
    weights = _round_weights(logsumexp)
    combined = 0
    for r, weight in enumerate(weights):
        combined = combined + outputs[..., r, :, :] * ops.cast(
            weight, outputs.dtype)[..., None]
    return (combined,), (outputs, weights)


def _combine_backward(residuals, output_grads):
    """With weights `w` and `g` the combined output's gradient: round `r`'s
    outputs get `w_r g`, its logsumexp `w_r (s_r - sum_t w_t s_t)` where
    `s_r = <g, outputs_r>` (the sum over features a matrix product)."""
    outputs, weights = residuals
    (grad,) = output_grads
    outputs_grad = ops.stack(
        [grad * ops.cast(weight, grad.dtype)[..., None]
         for weight in weights], axis=-3)
    products = [ops.cast(ops.einsum("...ld,...ld->...l", grad,
                                    outputs[..., r, :, :]), "float32")
                for r in range(len(weights))]
    mean = 0
    for weight, product in zip(weights, products):
        mean = mean + weight * product
    logsumexp_grad = ops.stack(
        [weight * (product - mean)
         for weight, product in zip(weights, products)], axis=-2)
    return outputs_grad, logsumexp_grad


class _RealChunksFirst:
    """Where each round's sorted slots go in the flattened chunk sequence.

    Every round sorts its `num_real` real tokens first and padding last. The
    rounds are concatenated with the chunks holding real tokens first
    (`ring_chunks = num_hashes * ceil(num_real / chunk_length)` of them,
    round by round) and the padding-only chunks after them, so the cyclic
    look-back ring of chunks is the same whatever the amount of padding.

    Args:
        num_real: `(batch,)` int, real tokens per row.
        num_hashes: int, rounds.
        length: int, slots per round (a multiple of `chunk_length`).
        chunk_length: int.
    """

    def __init__(self, num_real, num_hashes, length, chunk_length):
        real_chunks = (num_real + chunk_length - 1) // chunk_length
        self.num_hashes = num_hashes
        self.length = length
        self.chunk_length = chunk_length
        self.real_slots = (real_chunks * chunk_length)[:, None]
        self.ring_chunks = num_hashes * real_chunks

    def sources(self):
        """`(batch, num_hashes * length)`: flat slot `round * length + slot`
        that each position of the new sequence takes."""
        real, length = self.real_slots, self.length
        padding = length - real
        index = ops.arange(self.num_hashes * length, dtype="int32")[None]
        in_real = index < self.num_hashes * real
        beyond = index - self.num_hashes * real
        rounds = ops.where(in_real, index // ops.maximum(real, 1),
                           beyond // ops.maximum(padding, 1))
        slots = ops.where(in_real, index % ops.maximum(real, 1),
                          real + beyond % ops.maximum(padding, 1))
        return rounds * length + slots

    def destinations(self, slots):
        """Position in the new sequence of `slots` `(batch, heads,
        num_hashes, n)` (slots within each round)."""
        real = self.real_slots[:, None, None]
        rounds = ops.arange(self.num_hashes, dtype="int32")[:, None]
        return ops.where(
            slots < real, rounds * real + slots,
            self.num_hashes * real + rounds * (self.length - real)
            + slots - real)

    def windows(self, num_chunks_before, num_chunks_after):
        """The slots each chunk attends to, and where each slot is used.

        Chunk `u` sees the chunks from `u - num_chunks_before` to
        `u + num_chunks_after` on its ring: the `ring_chunks` real chunks
        form one ring, the padding-only chunks another (their queries are
        padding; a ring of their own keeps every slot in every part of the
        windows exactly once, which the gathers' gradients rely on).

        A ring shorter than the window (few chunks: a short input, or a
        look-back reaching round the ring) holds a chunk in several parts of
        a window; only its first copy counts, so each key is attended once.

        Returns:
            `(window, inverse, first_copy)`: `window` `(batch, num_chunks *
            width * chunk_length)` int, the slot at each place of the
            windows (window after window, each `width = 1 + before + after`
            chunks, the earliest first); `inverse` `(batch, width, num_hashes
            * length)` int, the place slot `s` takes in part `p` of a window;
            `first_copy`, bool like `window`, False where the place repeats a
            chunk of an earlier part of its window.
        """
        chunk_length = self.chunk_length
        num_chunks = self.num_hashes * self.length // chunk_length
        ring = self.ring_chunks[:, None]
        padding = num_chunks - ring
        chunks = ops.arange(num_chunks, dtype="int32")[None]

        def neighbours(offset):
            return ops.where(
                chunks < ring, (chunks + offset) % ops.maximum(ring, 1),
                ring + (chunks - ring + offset) % ops.maximum(padding, 1))

        offsets = range(-num_chunks_before, num_chunks_after + 1)
        width = len(offsets)
        within = ops.arange(chunk_length, dtype="int32")
        window = ops.stack([neighbours(o) for o in offsets], axis=-1)
        window = window[..., None] * chunk_length + within
        # Slot s of chunk u is part p of the window of u's neighbour -p.
        users = ops.stack([neighbours(-o) for o in offsets], axis=1)
        parts = ops.arange(width, dtype="int32")[:, None, None]
        inverse = (users[..., None] * width + parts) * chunk_length + within
        # Parts p and q of a window on a ring of n chunks hold the same
        # chunk when n divides p - q: the first copy is the part below n.
        ring_size = ops.where(chunks < ring, ring, padding)[..., None]
        first_copy = ops.arange(width, dtype="int32") < ring_size
        first_copy = ops.broadcast_to(
            first_copy[..., None], ops.shape(first_copy) + (chunk_length,))
        size = num_chunks * width * chunk_length
        return (ops.reshape(window, (-1, size)),
                ops.reshape(inverse, (-1, width, num_chunks * chunk_length)),
                ops.reshape(first_copy, (-1, size)))

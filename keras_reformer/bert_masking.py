"""BERT's masking of token ids for masked-language-model training."""

from keras_reformer.optional_tensorflow import tf


def mask_tokens(token_ids, selectable, mask_rate, width, seed,
                mask_token_id, random_ids=(0, 256),
                mask_token_rate=0.8, random_token_rate=0.1):
    """BERT's masking, as `masked_lm_dataset` and
    `ReformerMaskedLMPreprocessor` do it.

    Each row selects `round(mask_rate * n)` of its `n` selectable positions
    (at least one, at most `width` and `n`) at random; a selected id
    becomes `mask_token_id` with probability `mask_token_rate`, a random id
    from `random_ids` with probability `random_token_rate`, and stays
    otherwise. Random numbers are stateless: the same `seed` gives the
    same masks.

    Args:
        token_ids: int32 tensor `(batch, length)`.
        selectable: bool tensor `(batch, length)`, the positions that may
            be selected (not padding).
        mask_rate: float in (0, 1), the share of selectable positions.
        width: int in [1, length], the number of mask slots per row.
        seed: int64 tensor `(2,)`, the stateless seed.
        mask_token_id: int, the mask id.
        random_ids: pair `(low, high)`, random ids are in `[low, high)`.
        mask_token_rate: float, the share of selections that become the
            mask id.
        random_token_rate: float, the share that become a random id.

    Returns:
        `(masked_ids, positions, labels, weights)`: `masked_ids` like
        `token_ids`; `positions` (int32, the selected positions ascending,
        then 0s), `labels` (the original ids there, then 0s) and `weights`
        (float32, 1 for a selection, 0 for an unused slot), all
        `(batch, width)`.

    Example:
    >>> masked, positions, labels, weights = mask_tokens(
    ...     tf.constant([[5, 6, 7, 8]]), tf.constant([[True] * 3 + [False]]),
    ...     0.5, 3, tf.constant([1, 2], tf.int64), 99, mask_token_rate=1.0)
    >>> masked.numpy(), positions.numpy(), labels.numpy(), weights.numpy()
    (array([[99,  6, 99,  8]], dtype=int32), array([[0, 2, 0]], dtype=int32), array([[5, 7, 0]], dtype=int32), array([[1., 1., 0.]], dtype=float32))
    """
    rows, length = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    scores = tf.where(selectable, tf.random.stateless_uniform(
        tf.shape(token_ids), seeds[0], dtype=tf.float32), -1.0)
    available = tf.reduce_sum(tf.cast(selectable, tf.int32), -1)
    counts = tf.cast(tf.round(mask_rate * tf.cast(available, tf.float64)),
                     tf.int32)
    counts = tf.minimum(tf.clip_by_value(counts, 1, width), available)
    ranked = tf.math.top_k(scores, width).indices
    # Unused slots point one past the end until the scatter is done.
    positions = tf.sort(tf.where(
        tf.range(width)[None, :] < counts[:, None], ranked, length), -1)
    used = positions < length
    padded_ids = tf.pad(token_ids, [[0, 0], [0, 1]])
    originals = tf.gather(padded_ids, positions, batch_dims=1)
    choice = tf.random.stateless_uniform(
        (rows, width), seeds[1], dtype=tf.float32)
    random_tokens = tf.random.stateless_uniform(
        (rows, width), seeds[2], minval=random_ids[0], maxval=random_ids[1],
        dtype=tf.int32)
    replacements = tf.where(
        choice < mask_token_rate, mask_token_id, tf.where(
            choice < mask_token_rate + random_token_rate, random_tokens,
            originals))
    batch_rows = tf.broadcast_to(tf.range(rows)[:, None], tf.shape(positions))
    masked_ids = tf.tensor_scatter_nd_update(
        padded_ids, tf.stack([batch_rows, positions], -1), replacements)
    return (masked_ids[:, :-1], tf.where(used, positions, 0), originals,
            tf.cast(used, tf.float32))

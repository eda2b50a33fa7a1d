"""A loop whose steps are recomputed in the backward pass, not stored.

Chunked feed-forward (chunks of positions), LSH attention by head groups
and attention in runs of chunks all compute a layer as a loop over parts
whose intermediates are large. `recomputed_loop` runs such a loop forward
keeping none of them; its backward pass runs the loop again, recomputing
each step and pulling that step's share of the output gradient back to the
inputs. At most one step's intermediates are alive at a time. A step may
instead keep a few small results of its forward pass and differentiate
itself from them (`step_backward`: LSH head groups keep their attention
outputs and recompute only the scores).
"""

from keras import ops

from keras_reformer.layers.custom_gradient import value_and_vjp
from keras_reformer.layers.custom_gradient import with_custom_gradient


def step_views(inputs, i, size, slicing):
    """Step `i`'s view of `inputs`.

    Args:
        inputs: list of tensors.
        i: int or scalar tensor, the step.
        size: int, entries per step along a sliced axis.
        slicing: None (every input whole), or one entry per input: None (the
            whole input) or `(axis, extra)`, the input's entries `i * size`
            to `(i + 1) * size + extra` along `axis`.

    Returns:
        A list of tensors.
    """
    if slicing is None:
        return list(inputs)
    return [x if how is None else _step_slice(x, i, size, *how)
            for x, how in zip(inputs, slicing)]


def _step_slice(x, i, size, axis, extra=0):
    """Entries `i * size` to `(i + 1) * size + extra` of `x` along `axis`."""
    shape = list(ops.shape(x))
    starts = [0] * len(shape)
    starts[axis], shape[axis] = i * size, size + extra
    return ops.slice(x, starts, tuple(shape))


def _add_to_step_slice(x, update, i, size, axis):
    """`x` with `update` added to its entries from `i * size` on `axis`."""
    starts = [0] * len(update.shape)
    starts[axis] = i * size
    return ops.slice_update(x, starts, ops.slice(x, starts, ops.shape(update))
                            + update)


def recomputed_loop(step_fn, inputs, steps, size, slicing=None,
                    result_axes=(None,), layout=(), seed=None,
                    step_backward=None, saved_axes=()):
    """Runs `step_fn` for each step, recomputing each in the backward pass.

    Args:
        step_fn: `step_fn(i, views, layout, seed)` returning step `i`'s
            results, a tuple of tensors; `views` are its `step_views` of
            `inputs`, `seed` is None or the seed tensor.
        inputs: list of float tensors, the differentiated ones. A whole
            input's gradient is the sum of the steps'; a sliced input's
            adds each step's gradient into its slice.
        steps: int, the number of steps.
        size: int, entries per step along sliced axes and result axes.
        slicing: see `step_views`.
        result_axes: one entry per result: an axis (the steps' results
            laid end to end along it, step `i`'s from entry `i * size`) or
            None (the steps' results summed).
        layout: tuple of tensors the steps read but that take no gradient
            (integer positions, masks).
        seed: None (no randomness) or a seed tensor.
        step_backward: None (each step's gradient is the autodiff of
            `step_fn`, recomputed), or `step_backward(i, views, layout,
            seed, saved, result_grads)` returning the gradients of step
            `i`'s views. `step_fn` then returns its results followed by one
            tensor per entry of `saved_axes`, kept for the backward pass
            (the steps' tensors laid end to end along that axis) and
            passed on as step `i`'s `saved` (slices); `result_grads` are
            its share of the results' gradients.
        saved_axes: the axis of each saved tensor that holds the steps.

    Returns:
        The tuple of results.

    Example:
    >>> import keras
    >>> x = keras.random.normal((2, 8, 4))
    >>> (squares,) = recomputed_loop(
    ...     lambda i, views, layout, seed: (views[0] ** 2,), [x], 4, 2,
    ...     slicing=[(1, 0)], result_axes=(1,))
    >>> tuple(squares.shape)
    (2, 8, 4)
    """
    has_seed = seed is not None
    seed = seed if has_seed else ops.zeros((2,), "int32")
    num_inputs = len(inputs)
    slicing = slicing or [None] * num_inputs
    result_specs = []

    def run_step(i, inputs, layout, seed):
        return step_fn(i, step_views(inputs, i, size, slicing), list(layout),
                       seed if has_seed else None)

    def place(result, axis):
        """Step 0's result as the whole's buffer (computed from data: a
        constant buffer might be allocated at program start)."""
        if axis is None:
            return result
        widths = [[0, 0]] * len(result.shape)
        widths[axis] = [0, (steps - 1) * size]
        return ops.pad(result, widths)

    all_axes = tuple(result_axes) + tuple(saved_axes)
    num_results = len(result_axes)

    def forward(seed, *tensors):
        inputs, layout = list(tensors[:num_inputs]), tensors[num_inputs:]
        results = [place(r, axis) for r, axis in zip(
            run_step(0, inputs, layout, seed), all_axes)]
        result_specs[:] = [(ops.shape(r), r.dtype)
                           for r in results[:num_results]]

        def body(i, results):
            return [total + r if axis is None else ops.slice_update(
                total, [0] * axis + [i * size]
                + [0] * (len(r.shape) - axis - 1), r)
                for total, r, axis in zip(
                    results, run_step(i, inputs, layout, seed), all_axes)]

        results = ops.fori_loop(1, steps, body, results)
        return tuple(results[:num_results]), (
            seed, inputs, layout, results[num_results:])

    def backward(residuals, result_grads):
        seed, inputs, layout, saved = residuals
        # TensorFlow passes None for an unused result.
        result_grads = [ops.zeros(*spec) if g is None else g
                        for g, spec in zip(result_grads, result_specs)]

        def body(i, grads):
            views = step_views(inputs, i, size, slicing)
            step_result_grads = tuple(
                g if axis is None else _step_slice(g, i, size, axis)
                for g, axis in zip(result_grads, result_axes))
            step_seed = seed if has_seed else None
            if step_backward is None:
                _, step_grads = value_and_vjp(
                    lambda *views: step_fn(i, list(views), list(layout),
                                           step_seed),
                    views, step_result_grads)
            else:
                step_grads = step_backward(
                    i, views, list(layout), step_seed,
                    [_step_slice(x, i, size, axis)
                     for x, axis in zip(saved, saved_axes)],
                    step_result_grads)
            return [g + r if how is None else
                    _add_to_step_slice(g, r, i, size, how[0])
                    for g, r, how in zip(grads, step_grads, slicing)]

        # `x * 0`, not `zeros_like`: a constant buffer might be allocated at
        # program start.
        grads = ops.fori_loop(0, steps, body, [x * 0 for x in inputs])
        return (None, *grads) + (None,) * len(layout)

    return with_custom_gradient(forward, backward)(seed, *inputs, *layout)

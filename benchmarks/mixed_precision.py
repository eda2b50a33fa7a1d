"""mixed_bfloat16 against float32 on the CPU: train-step time and bits per
byte after the same steps, and the matrix products behind them.

The example's causal LM (`examples/train_lm.py`'s model and schedule, its
default sizes unless given) trained on the embedded corpus for `--steps`
steps with the same seed and data order, once per (dtype policy, compiler)
variant, all variants in one process taking their steps in turn: the median
train-step time (after the first, compiling step), the process's CPU time
per step, and the held-out bits per byte on the first `--eval-batches`
held-out batches. The same run measures, in separate processes, the three
products of a dense layer's training step (forward, input gradient, weight
gradient) in float32, in bfloat16, and with bfloat16 operands and float32
results (TensorFlow under XLA and with its own oneDNN kernels; JAX), which
says where a bfloat16 product is faster on this CPU at all, and the whole
step of such a layer under XLA on TensorFlow with Keras's product and with
the package's (`keras_reformer.layers.products.matmul`).

    python benchmarks/mixed_precision.py --steps 200
    python benchmarks/mixed_precision.py --steps 30 --hidden-dim 512 \
        --num-heads 8 --variants float32_xla,bfloat16_xla --no-products
"""

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

from isolated import run_single

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                        "examples")
# (dtype policy, XLA) per variant.
VARIANTS = {
    "float32_xla": ("float32", True),
    "bfloat16_xla": ("mixed_bfloat16", True),
    "float32_graph": ("float32", False),
    "bfloat16_graph": ("mixed_bfloat16", False),
}


def train(variants, args):
    """Trains one model per variant in this process, the variants' steps
    interleaved (each takes one step in turn), so that a shared machine's
    load weighs on every variant alike.

    Returns:
        Per variant: the median train-step time (after the first,
        compiling step), the mean CPU time of the process during its steps,
        and the held-out bits per byte after `args.steps` steps.
    """
    import keras

    import train_lm
    from keras_reformer import text_data

    train_data, held_out = text_data.split_corpus(text_data.stdlib_corpus())
    runs = {}
    for variant in variants:
        policy, jit_compile = VARIANTS[variant]
        keras.config.set_dtype_policy(policy)
        example_args = train_lm.parse_args(
            ["--epochs", "1", "--steps-per-epoch", str(args.steps),
             "--sequence-length", str(args.sequence_length),
             "--hidden-dim", str(args.hidden_dim),
             "--num-heads", str(args.num_heads),
             "--batch-size", str(args.batch_size), "--seed", str(args.seed),
             "--learning-rate", str(args.learning_rate),
             "--sample-length", "1",
             "--jit-compile" if jit_compile else "--no-jit-compile"])
        keras.utils.set_random_seed(args.seed)
        model = train_lm.build_model(example_args)
        keras.config.set_dtype_policy("float32")
        batches = iter(text_data.language_model_dataset(
            train_data, args.sequence_length, args.batch_size, shuffle=True,
            seed=args.seed, repeat=True))
        runs[variant] = (model, batches, [], [])
    for _ in range(args.steps):
        for model, batches, times, cpu_times in runs.values():
            inputs, targets = next(batches)
            start, cpu_start = time.perf_counter(), time.process_time()
            model.train_on_batch(inputs, targets)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    evaluation = text_data.language_model_dataset(
        held_out, args.sequence_length, args.batch_size).take(
            args.eval_batches)
    results = {}
    for variant, (model, _, times, cpu_times) in runs.items():
        _, bits_per_byte = model.evaluate(evaluation, verbose=0)
        results[variant] = {"median_step_s": float(np.median(times[1:])),
                            "cpu_s_per_step": float(np.mean(cpu_times[1:])),
                            "held_out_bits_per_byte": float(bits_per_byte)}
    return results


# The three products of a dense layer's training step, rows x inputs times
# inputs x outputs: (name, lhs shape, rhs shape, transpose lhs, transpose rhs).
ROWS, INPUTS, OUTPUTS = 4096, 512, 2048
PRODUCTS = (("forward", (ROWS, INPUTS), (INPUTS, OUTPUTS), False, False),
            ("input_gradient", (ROWS, OUTPUTS), (INPUTS, OUTPUTS), False,
             True),
            ("weight_gradient", (ROWS, INPUTS), (ROWS, OUTPUTS), True,
             False))
# (column, compiler, operand dtype, result dtype) per measured variant.
PRODUCT_VARIANTS = {
    "tensorflow": (("float32_xla", True, "float32", "float32"),
                   ("bfloat16_xla", True, "bfloat16", "bfloat16"),
                   ("bfloat16_to_float32_xla", True, "bfloat16", "float32"),
                   ("float32_onednn", False, "float32", "float32"),
                   ("bfloat16_onednn", False, "bfloat16", "bfloat16")),
    "jax": (("float32_xla", True, "float32", "float32"),
            ("bfloat16_xla", True, "bfloat16", "bfloat16"),
            ("bfloat16_to_float32_xla", True, "bfloat16", "float32")),
}


def interleaved_medians(calls, repeats):
    """The median wall seconds of each of `calls` (a dict of functions),
    called `repeats` times in turn, so that a shared machine's load weighs
    on every call alike."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(seconds)) for name, seconds in
            times.items()}


def product_function(framework, jit_compile, result_dtype, transpose_a,
                     transpose_b):
    """`op(a) @ op(b)` with `result_dtype` results (float32 results of
    bfloat16 operands accumulate and stay in float32)."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        def product(a, b):
            return jnp.matmul(a.T if transpose_a else a,
                              b.T if transpose_b else b,
                              preferred_element_type=result_dtype)

        jitted = jax.jit(product)
        return lambda a, b: jitted(a, b).block_until_ready()
    import tensorflow as tf

    def product(a, b):
        return tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=result_dtype,
                                        adj_x=transpose_a, adj_y=transpose_b)

    compiled = tf.function(product, jit_compile=jit_compile)
    return lambda a, b: compiled(a, b).numpy()


def product_table(framework, repeats=5):
    """GFLOP/s of each of `PRODUCTS` per `PRODUCT_VARIANTS[framework]`
    column: the median of `repeats` calls, the variants' calls interleaved
    (a shared machine's load then weighs on every column alike); a product
    the compiler cannot run reads "error"."""
    random = np.random.RandomState(0)
    table = {}
    for name, lhs_shape, rhs_shape, transpose_a, transpose_b in PRODUCTS:
        lhs = random.randn(*lhs_shape).astype("float32")
        rhs = random.randn(*rhs_shape).astype("float32")
        calls, row = {}, {}
        for column, jit_compile, dtype, result_dtype in PRODUCT_VARIANTS[
                framework]:
            if framework == "jax":
                import jax.numpy as jnp

                a, b = jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)
            else:
                import tensorflow as tf

                a, b = (tf.cast(tf.constant(lhs), dtype),
                        tf.cast(tf.constant(rhs), dtype))
            product = product_function(framework, jit_compile, result_dtype,
                                       transpose_a, transpose_b)
            try:
                product(a, b)  # compiles
            except Exception as error:  # XLA:CPU's unsupported variants
                row[column] = "error: " + str(error).splitlines()[0][:80]
                continue
            calls[column] = functools.partial(product, a, b)
        for column, seconds in interleaved_medians(calls, repeats).items():
            row[column] = round(2 * ROWS * INPUTS * OUTPUTS / seconds / 1e9,
                                1)
        table[name] = {column: row[column] for column, *_ in
                       PRODUCT_VARIANTS[framework]}
    return table


# A dense layer's training step under XLA on TensorFlow (its three
# products: forward and both gradients), per column: (operand dtype,
# product function name).
DENSE_STEP_VARIANTS = (("float32", "ops.matmul"),
                       ("bfloat16", "ops.matmul"),
                       ("bfloat16", "products.matmul"))


def dense_step_table(repeats=7):
    """GFLOP/s of a dense layer's training step, `x @ w` with `x` of
    `ROWS x INPUTS` and `w` of `INPUTS x OUTPUTS`, and the gradients of
    `sum(x @ w * g)` with respect to both, under XLA: with Keras's product
    (bfloat16 results under bfloat16) and with the package's
    (`keras_reformer.layers.products.matmul`: float32 accumulation on the
    CPU's bfloat16 kernels). The variants' calls interleaved."""
    import tensorflow as tf
    from keras import ops

    from keras_reformer.layers import products

    random = np.random.RandomState(0)
    arrays = [random.randn(ROWS, INPUTS), random.randn(INPUTS, OUTPUTS) / 20,
              random.randn(ROWS, OUTPUTS)]
    calls = {}
    for dtype, name in DENSE_STEP_VARIANTS:
        product = products.matmul if name == "products.matmul" else (
            ops.matmul)

        def step(x, w, g, product=product):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                loss = tf.reduce_sum(tf.cast(product(x, w) * g, "float32"))
            return tape.gradient(loss, [x, w])

        compiled = tf.function(step, jit_compile=True)
        tensors = [tf.cast(tf.constant(a, "float32"), dtype) for a in arrays]
        call = functools.partial(
            lambda c, t: [v.numpy() for v in c(*t)], compiled, tensors)
        call()  # compiles
        calls[f"{dtype} {name}"] = call
    return {column: round(3 * 2 * ROWS * INPUTS * OUTPUTS / seconds / 1e9, 1)
            for column, seconds in interleaved_medians(
                calls, repeats).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=3e-3,
                        help="the example's peak learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="the initial weights' and data order's seed")
    parser.add_argument("--variants", default=None,
                        help="comma-separated, of " + ", ".join(VARIANTS)
                        + " (default: all; on JAX the XLA ones)")
    parser.add_argument("--backend", choices=["tensorflow", "jax"],
                        default="tensorflow",
                        help="the Keras backend that trains the models")
    parser.add_argument("--products", action=argparse.BooleanOptionalAction,
                        default=True, help="measure the matrix products")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, EXAMPLES)
    import flag_checks

    flag_checks.check_positive_flags(
        parser, args, ("sequence_length", "hidden_dim", "num_heads",
                       "batch_size", "eval_batches"))
    # The median step leaves out the first, compiling one.
    flag_checks.check_flag_range(parser, args, "steps", 2)
    flag_checks.check_positive_number_flags(parser, args, ("learning_rate",))
    flag_checks.check_flag_range(parser, args, "seed", 0,
                                 flag_checks.MAX_SEED)
    flags = ["--steps", args.steps, "--sequence-length",
             args.sequence_length, "--hidden-dim", args.hidden_dim,
             "--num-heads", args.num_heads,
             "--batch-size", args.batch_size, "--eval-batches",
             args.eval_batches, "--learning-rate", args.learning_rate,
             "--seed", args.seed]
    if args.single in ("products_tensorflow", "products_jax"):
        framework = args.single.split("_")[1]
        table = product_table(framework)
        if framework == "tensorflow":
            table["dense_layer_step"] = dense_step_table()
        print(json.dumps(table))
        return
    if args.single:
        print(json.dumps(train(args.single.split(","), args)))
        return
    for framework in ("tensorflow", "jax") if args.products else ():
        print(json.dumps({
            "benchmark": "mixed_precision", "framework": framework,
            "product_gflops": run_single(__file__, f"products_{framework}",
                                         flags, backend=framework)}),
              flush=True)
    variants = args.variants or ",".join(
        variant for variant, (_, jit_compile) in VARIANTS.items()
        if jit_compile or args.backend == "tensorflow")
    unknown = sorted(set(variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from "
                     + ", ".join(VARIANTS))
    if args.backend == "jax" and "graph" in variants:
        parser.error("--variants: JAX compiles with XLA only (the *_xla "
                     f"variants), not {variants!r}")
    results = run_single(__file__, variants, flags, backend=args.backend)
    if "error" in results:
        print(json.dumps({"benchmark": "mixed_precision", **results}))
        return
    for variant, result in results.items():
        print(json.dumps({"benchmark": "mixed_precision", "variant": variant,
                          "backend": args.backend,
                          "policy": VARIANTS[variant][0],
                          "xla": VARIANTS[variant][1],
                          "hidden_dim": args.hidden_dim,
                          "num_heads": args.num_heads,
                          "learning_rate": args.learning_rate,
                          "seed": args.seed,
                          "steps": args.steps, **{
                              key: round(value, 4)
                              for key, value in result.items()}}),
              flush=True)
    for compiler in ("xla", "graph"):
        full, half = (results.get(f"float32_{compiler}"),
                      results.get(f"bfloat16_{compiler}"))
        if full and half:
            print(json.dumps({
                "benchmark": "mixed_precision", "compiler": compiler,
                "float32_over_bfloat16_step_time": round(
                    full["median_step_s"] / half["median_step_s"], 2),
                "float32_over_bfloat16_cpu_time": round(
                    full["cpu_s_per_step"] / half["cpu_s_per_step"], 2),
                "bits_per_byte_change": round(
                    half["held_out_bits_per_byte"]
                    / full["held_out_bits_per_byte"] - 1, 4)}), flush=True)


if __name__ == "__main__":
    main()

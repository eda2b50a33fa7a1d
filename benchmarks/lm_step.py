"""Whole training steps of the peer configurations in issue #8, ours and
Hugging Face's.

One causal LM training step (Adam, batch 1) per configuration, length and
implementation, each in its own process: median step time after a
compiling step, and the peak memory (weights and optimizer state included,
as the peers' figures are): the device's peak allocation on a GPU, on a CPU
the growth of the process's peak resident set from before the model was
built (compilation included), and the steady peak: the highest resident
set during the timed steps above the one before the model was built
(`isolated.ResidentMemory`: without the compiler's working memory). Every
configuration is a `transformers.ReformerConfig` (dropout 0); our model is
built from it through `convert.convert_backbone_config`, so both
implementations train the same architecture. Implementations:

* `ours_jax`, `ours_tf`: `ReformerCausalLM.train_on_batch` under XLA on the
  JAX or TensorFlow backend;
* `huggingface`: transformers' `ReformerModelWithLMHead` in training mode
  (its reversible backward), `torch.optim.Adam`;
* `ours_jax_bf16`, `ours_tf_bf16`: ours under the `mixed_bfloat16` dtype
  policy (float32 weights, bfloat16 products with float32 accumulation);
* `huggingface_bf16`: Hugging Face's forward pass under
  `torch.autocast("cpu", torch.bfloat16)` (float32 weights).

Configurations:

* `reformer_pytorch`: 12 layers, d_model 1024, d_ff 4096, 8 heads of 128,
  all LSH (4 hashes, chunk 64), causal;
* `enwik8`: the same sizes with local, local, LSH, local repeated (Hugging
  Face's enwik8 pattern), chunk 64;
* `crime_and_punishment`: 6 layers, d_model 256, d_ff 512, 2 heads of 64,
  axial dims (64, 192), buckets (64, 128), chunk 64, one hash round, local
  and LSH alternating, 320 tokens (`google/reformer-crime-and-punishment`).

The axial position grid is near-square for each length (Hugging Face's
training needs its product to equal the length); LSH bucket counts not
given are the length's default.

    KERAS_BACKEND=jax python benchmarks/lm_step.py \\
        --runs reformer_pytorch:16384,reformer_pytorch:65536,enwik8:65536,crime_and_punishment:524288
    python benchmarks/lm_step.py \\
        --runs crime_and_punishment:4096,crime_and_punishment:16384 \\
        --implementations huggingface,ours_tf,ours_jax --repeats 2

`--lsh-parallel-heads 1` hashes and attends one LSH head at a time and
recomputes it in the backward pass (less memory at long lengths);
`--lsh-segments N` attends the sorted sequence in N runs of chunks, each
recomputed in the backward pass (less again); `--local-segments N` does the
same for local attention's chunks (ours only). `--plan` compiles our step
(JAX) without running it and reports XLA's planned memory (gradient buffers
plus Adam's moments), so long lengths can be sized on a CPU.

`--profile` measures, for ours (each backend in its own process), how far
the step is from its matrix-product floor: the gradient of the training
loss (`isolated.lm_loss`, what `train_on_batch` differentiates, without
the optimizer's update) compiled under XLA and timed, the matrix-product
FLOPs it executes (`xla_profile.dot_flops`: the reversible backward pass's
recomputation included) and the CPU's float32 matrix-product throughput
measured in the same process. The floor is the executed FLOPs at that
throughput; each line also gives the profiled time by kind of operation,
the products' own throughput and their 8 costliest source operations
(`xla_profile.profile_by_kind`):

    python benchmarks/lm_step.py --runs crime_and_punishment:16384 \\
        --implementations ours_tf,ours_jax --profile
"""

import argparse
import json
import os

from isolated import ResidentMemory
from isolated import jax_lm_gradient
from isolated import lm_gradient_memory
from isolated import lm_loss
from isolated import timed_calls
from isolated import run_single
from plots import write_plot
from xla_profile import profile_step

BIG = dict(hidden_size=1024, feed_forward_size=4096, num_attention_heads=8,
           attention_head_size=128, num_hashes=4)

CONFIGURATIONS = {
    "reformer_pytorch": dict(BIG, attn_layers=["lsh"] * 12,
                             vocab_size=256),
    "enwik8": dict(BIG, attn_layers=["local", "local", "lsh", "local"] * 3,
                   vocab_size=256),
    "crime_and_punishment": dict(
        hidden_size=256, feed_forward_size=512, num_attention_heads=2,
        attention_head_size=64, attn_layers=["local", "lsh"] * 3,
        num_hashes=1, num_buckets=[64, 128], axial_pos_embds_dim=[64, 192],
        vocab_size=320),
}

IMPLEMENTATIONS = ("ours_jax", "ours_tf", "huggingface", "ours_jax_bf16",
                   "ours_tf_bf16", "huggingface_bf16")
# The suffix of an implementation in mixed precision.
BFLOAT16 = "_bf16"
BACKENDS = {"ours_jax": "jax", "ours_tf": "tensorflow", "huggingface": "jax"}
BACKENDS.update({name + BFLOAT16: backend
                 for name, backend in list(BACKENDS.items())})

# The model's nesting in the source operations XLA records, left out of
# `--profile`'s groups of products.
CONTAINERS = ("reformer_causal_lm", "reformer_backbone", "reversible_stack")
PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots",
                    "lm_step.png")


def is_peer(implementation):
    """Whether `implementation` is Hugging Face's model (either precision)."""
    return implementation.startswith("huggingface")


def axial_shape_for(length):
    rows = 2 ** (length.bit_length() // 2)
    return (rows, max(1, length // rows))


# Command-line flags for the attention layers' memory options (not given:
# the layers' automatic choice; 0: all at once):
# flag -> (attention type, option, help).
MEMORY_OPTIONS = {
    "lsh_parallel_heads": ("lsh", "parallel_heads", "LSH heads at a time, "
                           "recomputed in the backward pass (0: all at once; "
                           "default: the layer's automatic choice)"),
    "lsh_segments": ("lsh", "segments", "runs of sorted chunks each LSH "
                     "layer attends one after another, recomputed in the "
                     "backward pass (0: all at once; default: automatic)"),
    "local_segments": ("local", "segments", "runs of chunks each local "
                       "attention layer attends one after another, "
                       "recomputed in the backward pass (0: all at once; "
                       "default: automatic)"),
}


def reformer_config(name, length, layers):
    """The `ReformerConfig` of configuration `name` at `length` tokens."""
    from transformers import ReformerConfig

    from keras_reformer.layers import hashing

    config = dict(CONFIGURATIONS[name])
    if layers:
        config["attn_layers"] = config["attn_layers"][:layers]
    hidden = config["hidden_size"]
    config.setdefault("axial_pos_embds_dim", [hidden // 4, 3 * hidden // 4])
    buckets = hashing.auto_num_buckets(length, 64)
    config.setdefault("num_buckets", list(buckets) if isinstance(
        buckets, tuple) else buckets)
    return ReformerConfig(
        **config, axial_pos_shape=list(axial_shape_for(length)),
        max_position_embeddings=length, is_decoder=True,
        lsh_attn_chunk_length=64, local_attn_chunk_length=64,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0)


def token_ids(config, length):
    import numpy as np

    return np.random.RandomState(0).randint(
        0, config.vocab_size, (1, length + 1)).astype("int32")


def build_ours(config, memory_options):
    from keras_reformer.convert.huggingface import convert_backbone_config
    from keras_reformer.models import ReformerBackbone
    from keras_reformer.models import ReformerCausalLM

    arguments = convert_backbone_config(config.to_dict())
    for flag, value in memory_options.items():
        kind, option, _ = MEMORY_OPTIONS[flag]
        if value is not None and kind in arguments["attention_options"]:
            arguments["attention_options"][kind][option] = value or None
    return ReformerCausalLM(ReformerBackbone(**arguments))


def ours_step(config, length, memory_options):
    """`train_on_batch` of our model, and its parameter count."""
    import keras

    lm = build_ours(config, memory_options)
    lm.compile(optimizer=keras.optimizers.Adam(1e-4),
               loss=keras.losses.SparseCategoricalCrossentropy(
                   from_logits=True), jit_compile=True)
    ids = token_ids(config, length)
    x = {"token_ids": ids[:, :-1], "padding_mask": (ids[:, :-1] * 0 + 1)}
    y = ids[:, 1:]

    def step():
        import numpy as np

        loss = lm.train_on_batch(x, y)
        return float(np.asarray(loss).ravel()[0])

    return step, lm.count_params()


def gradient_step(config, length, memory_options):
    """The gradient of our model's training loss (`isolated.lm_loss`; the
    optimizer's update left out) under XLA on this process's backend:
    `tf.function(jit_compile=True)` around a `GradientTape`, or `jax.jit`
    of `isolated.jax_lm_gradient`. Returns the step, a function running it
    once, whose `optimized_hlo()` is XLA's optimised program's text."""
    import keras

    lm = build_ours(config, memory_options)
    ids = token_ids(config, length)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    if keras.backend.backend() == "jax":
        import jax

        values = [v.value for v in lm.trainable_variables]
        compiled = jax.jit(jax_lm_gradient(lm)).lower(
            values, inputs, labels).compile()
        step = lambda: jax.block_until_ready(  # noqa: E731
            compiled(values, inputs, labels))
        step.optimized_hlo = compiled.as_text
        return step
    import tensorflow as tf

    inputs, labels = tf.constant(inputs), tf.constant(labels)

    @tf.function(jit_compile=True)
    def gradient(inputs, labels):
        with tf.GradientTape() as tape:
            loss = lm_loss(lm, inputs, labels)
        # The token embedding's gradient is an IndexedSlices.
        return [tf.convert_to_tensor(g) for g in tape.gradient(
            loss, lm.trainable_variables)]

    step = lambda: [g.numpy() for g in gradient(inputs, labels)]  # noqa: E731
    step.optimized_hlo = lambda: gradient.experimental_get_compiler_ir(
        inputs, labels)(stage="optimized_hlo")
    return step


def huggingface_step(config, length, bfloat16=False):
    """One Adam step of transformers' model in training mode, its forward
    pass under bfloat16 autocast if `bfloat16`."""
    import contextlib

    import torch
    from transformers import ReformerModelWithLMHead

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = ReformerModelWithLMHead(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    ids = torch.tensor(token_ids(config, length), dtype=torch.long,
                       device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        with (torch.autocast(device, torch.bfloat16) if bfloat16
              else contextlib.nullcontext()):
            logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, config.vocab_size), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, sum(p.numel() for p in model.parameters())


def measure(implementation, name, length, repeats, layers, memory_options,
            plan=False, profile=False):
    import keras  # noqa: F401 (imports left out of the memory growth)

    import layer_steps
    import keras_reformer.models  # noqa: F401

    config = reformer_config(name, length, layers)
    bfloat16 = implementation.endswith(BFLOAT16)
    implementation = implementation.removesuffix(BFLOAT16)
    if bfloat16 and not is_peer(implementation):
        keras.config.set_dtype_policy("mixed_bfloat16")
    if plan:
        lm = build_ours(config, memory_options)
        return {"planned_mib": planned_mib(lm, length),
                "parameters": lm.count_params()}
    if profile:
        return profile_step(
            lambda: gradient_step(config, length, memory_options),
            BACKENDS[implementation], repeats, containers=CONTAINERS)
    if implementation == "huggingface":
        import torch  # noqa: F401
        import transformers.models.reformer.modeling_reformer  # noqa: F401
    memory = ResidentMemory()
    if implementation == "huggingface":
        step, parameters = huggingface_step(config, length, bfloat16)
        backend = "torch"
    else:
        step, parameters = ours_step(config, length, memory_options)
        backend = BACKENDS[implementation]
    seconds, cpu_seconds = timed_calls(step, repeats, memory.restart_peak)
    loss = step()
    peak = layer_steps.device_peak_mib(backend)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_mib": memory.peak_mib() if peak is None else peak,
            "steady_mib": None if peak is not None else memory.steady_mib(),
            "loss": loss, "parameters": parameters}


def planned_mib(lm, length):
    """XLA's plan for the step, compiled and not run: the gradient
    computation's temporary, argument and output buffers, plus Adam's two
    float32 moments per weight (the update itself runs in place)."""
    import numpy as np

    analysis = lm_gradient_memory(lm, length)
    adam = 2 * 4 * sum(int(np.prod(v.shape))
                       for v in lm.trainable_variables)
    return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes + adam) / 2**20


def profile_line(result):
    """`--profile`'s figures from `xla_profile.profile_step`'s `result`:
    the step time, the executed matrix products, the floor (those products
    at the measured throughput) and the share of it the step reaches, and
    the profile's time by kind and products' own throughput."""
    seconds, throughput = result["seconds"], result["matmul_gflops"]
    floor = result["dot_flops"] / throughput / 1e9
    profile = result["profile"]
    return {"step_s": round(seconds, 3),
            "cpu_s": round(result["cpu_seconds"], 3),
            "executed_gflop": round(result["dot_flops"] / 1e9, 1),
            "unknown_trip_counts": result["unknown_trip_counts"],
            "matmul_gflops": round(throughput, 1),
            "floor_s": round(floor, 3),
            "peak_fraction": round(floor / seconds, 3),
            "products": profile["products"],
            "operations_ms": profile["operations_ms"],
            "by_kind": profile["by_kind"],
            "product_groups": profile["product_groups"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", default="reformer_pytorch:16384,reformer_pytorch:65536,"
        "enwik8:65536,crime_and_punishment:524288",
        help="comma-separated configuration:length pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=0,
                        help="keep only the first N layers (smoke tests)")
    for flag, (_, _, text) in MEMORY_OPTIONS.items():
        parser.add_argument("--" + flag.replace("_", "-"), type=int,
                            help=text)
    parser.add_argument("--plan", action="store_true",
                        help="report XLA's planned memory (compile only, "
                        "nothing runs) instead of timing steps")
    parser.add_argument("--profile", action="store_true",
                        help="time our gradient step against its "
                        "matrix-product floor and profile it (ours only)")
    parser.add_argument("--implementations", default="ours_jax",
                        help="comma-separated, from "
                        + ", ".join(IMPLEMENTATIONS))
    parser.add_argument("--plot", default=PLOT, help="PNG file to write")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    memory_options = {option: getattr(args, option)
                      for option in MEMORY_OPTIONS}
    if args.single:
        implementation, name, length = args.single.split(":")
        print(json.dumps(measure(implementation, name, int(length),
                                 args.repeats, args.layers, memory_options,
                                 args.plan, args.profile)))
        return
    implementations = args.implementations.split(",")
    if args.plan:
        implementations = ["ours_jax"]
    unknown = sorted(set(implementations) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"unknown implementations {unknown}; choose from "
                     f"{list(IMPLEMENTATIONS)}")
    if args.profile and args.plan:
        parser.error("--profile runs the step and --plan does not: give one "
                     "of them")
    if args.profile and any(map(is_peer, implementations)):
        parser.error("--profile profiles ours only; received "
                     f"--implementations {args.implementations}")
    flags = ["--repeats", args.repeats, "--layers", args.layers] + [
        item for option, value in memory_options.items() if value is not None
        for item in ("--" + option.replace("_", "-"), value)] + (
        ["--plan"] if args.plan else []) + (
        ["--profile"] if args.profile else [])
    lines = []
    for run_spec in args.runs.split(","):
        name, length = run_spec.split(":")
        if name not in CONFIGURATIONS:
            parser.error(f"unknown configuration {name!r}; choose from "
                         f"{sorted(CONFIGURATIONS)}")
        seconds = {}
        for implementation in implementations:
            result = run_single(__file__, f"{implementation}:{run_spec}",
                                flags, backend=BACKENDS[implementation])
            line = {"benchmark": "lm_step", "configuration": name,
                    "implementation": implementation,
                    "length": int(length), "layers": args.layers or "all",
                    **memory_options}
            if "error" in result:
                line["error"] = result["error"]
            elif args.profile:
                line.update(profile_line(result))
            elif args.plan:
                line.update(
                    planned_gib=round(result["planned_mib"] / 1024, 2),
                    parameters=result["parameters"])
            else:
                seconds[implementation] = (result["seconds"],
                                           result["cpu_seconds"])
                line.update(step_s=round(result["seconds"], 3),
                            cpu_s=round(result["cpu_seconds"], 3),
                            peak_mib=round(result["peak_mib"], 1),
                            steady_mib=result["steady_mib"] and round(
                                result["steady_mib"], 1),
                            loss=round(result["loss"], 3),
                            parameters=result["parameters"])
            lines.append(line)
            print(json.dumps(line), flush=True)
        peers = {k: v for k, v in seconds.items() if is_peer(k)}
        ours = {k: v for k, v in seconds.items() if k not in peers}
        for peer, (peer_wall, peer_cpu) in peers.items() if ours else ():
            print(json.dumps({
                "benchmark": "lm_step", "configuration": name,
                "length": int(length),
                f"{peer}_time_over": {
                    implementation: round(peer_wall / wall, 2)
                    for implementation, (wall, _) in ours.items()},
                f"{peer}_cpu_time_over": {
                    implementation: round(peer_cpu / cpu, 2)
                    for implementation, (_, cpu) in ours.items()}}),
                flush=True)
    if args.plot and not (args.plan or args.profile):
        write_plot(args.plot, lines, "length",
                   ["step_s", "cpu_s", "peak_mib", "steady_mib"],
                   ["configuration", "implementation"],
                   "whole training step (Adam, batch 1)")


if __name__ == "__main__":
    main()

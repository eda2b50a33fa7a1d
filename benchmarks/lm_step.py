"""Whole training steps of the peer configurations in issue #8 (JAX backend).

One `ReformerCausalLM` training step (Adam, batch 1, `train_on_batch` under
XLA) per configuration and length, each in its own process: median step
time after a compiling step and the device's peak memory (weights and
optimizer state included, as the peers' figures are; on a CPU, where JAX
keeps no device peak, the process's peak resident memory).

Configurations:

* `reformer_pytorch`: 12 layers, d_model 1024, d_ff 4096, 8 heads, all LSH
  (4 hashes, chunk 64), causal, reversible;
* `enwik8`: 12 layers, d_model 1024, d_ff 4096, 8 heads, local, local, LSH,
  local repeated (Hugging Face's enwik8 pattern), chunk 64;
* `crime_and_punishment`: 6 layers, d_model 256, d_ff 512, 2 heads of 64,
  axial shape (512, 1024) of dims (64, 192), buckets (64, 128), chunk 64,
  local and LSH alternating, 320 tokens (Hugging Face's advertised
  half-million-token model, `google/reformer-crime-and-punishment`).

    KERAS_BACKEND=jax python benchmarks/lm_step.py \\
        --runs reformer_pytorch:16384,reformer_pytorch:65536,enwik8:65536,crime_and_punishment:524288

`--lsh-parallel-heads 1` hashes and attends one LSH head at a time and
recomputes it in the backward pass (less memory at long lengths);
`--lsh-segments N` attends the sorted sequence in N runs of chunks, each
recomputed in the backward pass (less again); `--local-segments N` does the
same for local attention's chunks. `--plan`
compiles each step without running it and reports XLA's planned memory
(gradient buffers plus Adam's moments), so long lengths can be sized on a
CPU.
"""

import argparse
import json

from isolated import lm_gradient_memory
from isolated import median_seconds
from isolated import run_single

CONFIGURATIONS = {
    "reformer_pytorch": dict(
        hidden_dim=1024, intermediate_dim=4096, num_heads=8, head_dim=128,
        attention_types=["lsh"] * 12,
        attention_options={"lsh": {"num_hashes": 4}}),
    "enwik8": dict(
        hidden_dim=1024, intermediate_dim=4096, num_heads=8, head_dim=128,
        attention_types=["local", "local", "lsh", "local"] * 3,
        attention_options={"lsh": {"num_hashes": 4}}),
    "crime_and_punishment": dict(
        hidden_dim=256, intermediate_dim=512, num_heads=2, head_dim=64,
        attention_types=["local", "lsh"] * 3,
        attention_options={"lsh": {"num_hashes": 1, "num_buckets": (64, 128)}},
        axial_shape=(512, 1024), axial_dims=(64, 192),
        vocabulary_size=320),
}


def axial_shape_for(length):
    rows = 2 ** (length.bit_length() // 2)
    return (rows, max(1, length // rows))


# Command-line flags for the attention layers' memory options (0: off):
# flag -> (attention type, option, help).
MEMORY_OPTIONS = {
    "lsh_parallel_heads": ("lsh", "parallel_heads", "LSH heads at a time, "
                           "recomputed in the backward pass (0: all at once)"),
    "lsh_segments": ("lsh", "segments", "runs of sorted chunks each LSH "
                     "layer attends one after another, recomputed in the "
                     "backward pass (0: all at once)"),
    "local_segments": ("local", "segments", "runs of chunks each local "
                       "attention layer attends one after another, "
                       "recomputed in the backward pass (0: all at once)"),
}


def measure(name, length, repeats, layers, memory_options, plan=False):
    import keras
    import numpy as np

    from keras_reformer.models import ReformerBackbone
    from keras_reformer.models import ReformerCausalLM

    config = dict(CONFIGURATIONS[name])
    if layers:
        config["attention_types"] = config["attention_types"][:layers]
    config.setdefault("axial_shape", axial_shape_for(length))
    config.setdefault("vocabulary_size", 256)
    options = {"lsh": {"chunk_length": 64}, "local": {"chunk_length": 64}}
    for kind, extra in config.pop("attention_options", {}).items():
        options[kind].update(extra)
    for flag, value in memory_options.items():
        kind, option, _ = MEMORY_OPTIONS[flag]
        options[kind][option] = value or None
    backbone = ReformerBackbone(
        causal=True, feed_forward_chunk_length=64, seed=0,
        attention_options=options, **config)
    lm = ReformerCausalLM(backbone)
    if plan:
        return {"planned_mib": planned_mib(lm, length),
                "parameters": lm.count_params()}
    lm.compile(optimizer=keras.optimizers.Adam(1e-4),
               loss=keras.losses.SparseCategoricalCrossentropy(
                   from_logits=True), jit_compile=True)
    ids = np.random.RandomState(0).randint(
        0, config["vocabulary_size"], (1, length + 1))
    x = {"token_ids": ids[:, :-1].astype("int32"),
         "padding_mask": np.ones((1, length), "int32")}
    y = ids[:, 1:].astype("int32")
    seconds = median_seconds(lambda: lm.train_on_batch(x, y), repeats)
    loss = lm.train_on_batch(x, y)
    return {"seconds": seconds, "peak_mib": _peak_mib(),
            "loss": float(np.asarray(loss).ravel()[0]),
            "parameters": lm.count_params()}


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


def _peak_mib():
    import resource

    import jax

    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
                            default=0, help=text)
    parser.add_argument("--plan", action="store_true",
                        help="report XLA's planned memory (compile only, "
                        "nothing runs) instead of timing steps")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    memory_options = {option: getattr(args, option)
                      for option in MEMORY_OPTIONS}
    if args.single:
        name, length = args.single.split(":")
        print(json.dumps(measure(name, int(length), args.repeats,
                                 args.layers, memory_options, args.plan)))
        return
    for run_spec in args.runs.split(","):
        name, length = run_spec.split(":")
        if name not in CONFIGURATIONS:
            parser.error(f"unknown configuration {name!r}; choose from "
                         f"{sorted(CONFIGURATIONS)}")
        result = run_single(__file__, run_spec,
                            ["--repeats", args.repeats, "--layers",
                             args.layers]
                            + [item for option, value
                               in memory_options.items()
                               for item in ("--" + option.replace("_", "-"),
                                            value)]
                            + (["--plan"] if args.plan else []),
                            backend="jax")
        line = {"benchmark": "lm_step", "configuration": name,
                "length": int(length), "layers": args.layers or "all",
                **memory_options}
        if "error" in result:
            line["error"] = result["error"]
        elif args.plan:
            line.update(planned_gib=round(result["planned_mib"] / 1024, 2),
                        parameters=result["parameters"])
        else:
            line.update(step_s=round(result["seconds"], 3),
                        peak_mib=round(result["peak_mib"], 1),
                        loss=round(result["loss"], 3),
                        parameters=result["parameters"])
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

"""What each attention costs in quality: one causal LM, many attentions.

Trains the example causal LM (`examples/train_lm.py`'s model and optimizer)
once per configuration, with the same seed, data order and number of steps
on the embedded corpus (the Python standard library's sources), and scores
held-out bits per byte every `--eval-every` steps. Configurations:

- `full`: exact attention, separate query and key projections;
- `full_shared_qk`: exact attention with LSH's shared query/key;
- `lsh<N>`: LSH attention with N hash rounds (e.g. `lsh8`);
- `local`: each chunk attends to itself and the chunk before;
- `local+lsh<N>`: local and LSH layers alternating (Hugging Face's
  published Reformers mix them this way).

Each evaluation is one JSON line in `--output` (written as it happens, so a
killed sweep keeps what it measured; a configuration already finished there
with the same settings is skipped when the sweep is started again, an
unfinished one starts over). Every trained shared-QK model (LSH,
`full_shared_qk`, local+LSH) is also scored with the shared-QK attentions
of `--cross` in place of its own, the same weights: exact attention, LSH
with more or fewer rounds than it was trained with, other chunk lengths,
bucket counts or look-backs; LSH models also with fresh rotations drawn
per batch, as in training, instead of the fixed inference ones.
`--cross-only` does this for the weights an earlier sweep saved.

`--time-steps N` measures the train-step time of every configuration side
by side instead: all models built, then N rounds of one step each, the
configurations interleaved, so machine load hits them alike. `--report`
writes the plots and prints the table from the JSON lines.

    python benchmarks/lsh_quality.py                          # the sweep
    python benchmarks/lsh_quality.py --time-steps 20         # step times
    python benchmarks/lsh_quality.py --cross-only --weights-dir w \\
        --configs full_shared_qk --cross lsh8-c128,lsh8-back2
    python benchmarks/lsh_quality.py --report                # table, plots
"""

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import train_lm  # noqa: E402
from keras_reformer import text_data  # noqa: E402
from keras_reformer.metrics import bits_per_byte  # noqa: E402
from keras_reformer.models import ReformerBackbone  # noqa: E402
from keras_reformer.models import ReformerCausalLM  # noqa: E402

DEFAULT_CONFIGS = ("full,full_shared_qk,lsh1,lsh2,lsh4,lsh8,local,"
                   "local+lsh4")
# The settings that decide what a configuration's curve is: a finished
# configuration in --output is reused only when they all match.
RUN_SETTINGS = ("sequence_length", "steps", "eval_every", "eval_batches",
                "num_layers", "hidden_dim", "num_heads", "chunk_length",
                "batch_size", "learning_rate", "seed", "max_corpus_bytes")


def config_layers(name, num_layers):
    """`(attention_types, num_hashes)` of configuration `name`."""
    if name in ("full", "full_shared_qk", "local"):
        return [name] * num_layers, 1
    match = re.fullmatch(r"(local\+)?lsh([1-9][0-9]*)", name)
    if match is None:
        raise ValueError(
            f"Unknown configuration {name!r}: use full, full_shared_qk, "
            "local, lsh<N> or local+lsh<N> (N hash rounds, e.g. lsh8).")
    if match.group(1) is None:
        return ["lsh"] * num_layers, int(match.group(2))
    if num_layers % 2:
        raise ValueError(
            f"{name} alternates local and LSH layers: --num-layers must be "
            f"even; received {num_layers}.")
    return ["local", "lsh"] * (num_layers // 2), int(match.group(2))


def build_model(name, args):
    """The example's compiled causal LM for configuration `name` (its
    learning-rate schedule spans `args.steps`)."""
    types, hashes = config_layers(name, args.num_layers)
    example_args = train_lm.parse_args([
        "--attention", ",".join(types),
        "--sequence-length", str(args.sequence_length),
        "--hidden-dim", str(args.hidden_dim),
        "--num-heads", str(args.num_heads),
        "--chunk-length", str(args.chunk_length),
        "--num-hashes", str(hashes),
        "--epochs", "1", "--steps-per-epoch", str(args.steps),
        "--batch-size", str(args.batch_size),
        "--learning-rate", str(args.learning_rate),
        "--seed", str(args.seed), "--sample-length", "1"])
    keras.utils.set_random_seed(args.seed)
    return train_lm.build_model(example_args)


def corpus(args):
    """`(train_dataset, held_out_batches)`: the shuffled, repeated training
    windows and the first `--eval-batches` held-out batches, as arrays."""
    train, held_out = text_data.split_corpus(
        text_data.stdlib_corpus(args.max_corpus_bytes))
    train_data = text_data.language_model_dataset(
        train, args.sequence_length, args.batch_size, shuffle=True,
        seed=args.seed, repeat=True)
    held_out_data = text_data.language_model_dataset(
        held_out, args.sequence_length, args.batch_size)
    batches = [(keras.tree.map_structure(np.asarray, x), np.asarray(y))
               for x, y in held_out_data.take(args.eval_batches)]
    if len(batches) < args.eval_batches:
        raise ValueError(
            f"The held-out text holds {len(batches)} batches of "
            f"{args.batch_size} x {args.sequence_length} bytes; "
            f"--eval-batches is {args.eval_batches}.")
    return train_data, batches


def held_out_bits(model, batches, training=False):
    """Mean bits per byte of `model` on `batches`; `training=True` draws
    fresh LSH rotations for every batch (as training does; no dropout
    here) instead of using the fixed inference ones."""
    bits = [np.asarray(bits_per_byte(y, model(x, training=training)))
            for x, y in batches]
    return float(np.mean(bits))


def cross_attention(name):
    """`(attention_type, options)` of a shared-QK attention to evaluate a
    model with: `full_shared_qk`, or `lsh<N>` (N rounds) with optional
    `-c<chunk length>`, `-b<buckets>`, `-back<chunks looked back at>`,
    e.g. `lsh8-c128` (other options as trained; buckets follow the chunk
    length unless given)."""
    if name == "full_shared_qk":
        return name, {}
    match = re.fullmatch(r"lsh([1-9][0-9]*)((?:-(?:back|c|b)[0-9]+)*)", name)
    if match is None:
        raise ValueError(
            f"Unknown attention {name!r} to evaluate with: use "
            "full_shared_qk or lsh<N>[-c<chunk>][-b<buckets>][-back<n>], "
            "e.g. lsh8-c128.")
    options = {"num_hashes": int(match.group(1))}
    for key, value in re.findall(r"-(back|c|b)([0-9]+)", match.group(2)):
        options[_CROSS_OPTIONS[key]] = int(value)
    if "chunk_length" in options:
        options.setdefault("num_buckets", None)  # the default for the chunk
    return "lsh", options


_CROSS_OPTIONS = {"c": "chunk_length", "b": "num_buckets",
                  "back": "num_chunks_before"}


def with_attention(model, name, args):
    """A copy of `model` whose shared-QK layers (LSH or `full_shared_qk`)
    use the attention `name` (see `cross_attention`): the same weights, the
    LSH layers' fixed rotations drawn for their new shape."""
    kind, options = cross_attention(name)
    config = model.backbone.get_config()
    config["attention_types"] = [
        kind if t in ("lsh", "full_shared_qk") else t
        for t in config["attention_types"]]
    if kind == "lsh":
        config["attention_options"]["lsh"] = {
            **config["attention_options"].get("lsh", {}), **options}
    other = ReformerCausalLM(ReformerBackbone.from_config(config))
    other(_dummy_inputs(args))
    sources = [w for w in model.weights if not w.path.endswith("rotations")]
    targets = [w for w in other.weights if not w.path.endswith("rotations")]
    for target, source in zip(targets, sources, strict=True):
        target.assign(source)
    return other


def _dummy_inputs(args):
    ids = np.zeros((1, args.sequence_length), "int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


class Progress(keras.callbacks.Callback):
    """Scores the held-out batches after every epoch (`--eval-every`
    steps), writes each score as a JSON line and prints progress; keeps the
    wall time spent in train steps (the first, compiling, step apart)."""

    def __init__(self, name, args, batches, write):
        super().__init__()
        self.name, self.args, self.batches = name, args, batches
        self.write = write
        self.train_seconds = 0.0
        self.compile_seconds = None
        self.started = time.time()

    def on_train_batch_begin(self, batch, logs=None):
        self.step_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        seconds = time.perf_counter() - self.step_start
        if self.compile_seconds is None:
            self.compile_seconds = seconds
        else:
            self.train_seconds += seconds

    def on_epoch_end(self, epoch, logs=None):
        step = (epoch + 1) * self.args.eval_every
        bits = held_out_bits(self.model, self.batches)
        self.write({"kind": "eval", "config": self.name, "step": step,
                    "held_out_bits_per_byte": round(bits, 4),
                    "train_bits_per_byte": round(
                        float(logs["bits_per_byte"]), 4),
                    "train_seconds": round(self.train_seconds, 1)})
        elapsed = time.time() - self.started
        remaining = elapsed / step * (self.args.steps - step)
        print(f"[{self.name}] step {step}/{self.args.steps}: held-out "
              f"{bits:.3f} bits per byte ({elapsed / 60:.1f} min, about "
              f"{remaining / 60:.1f} min left)", flush=True)


def train_config(name, args, train_data, batches, write):
    """Trains configuration `name`, writing its evaluations; then scores a
    shared-QK model with the other shared-QK attentions."""
    model = build_model(name, args)
    progress = Progress(name, args, batches, write)
    model.fit(train_data, epochs=args.steps // args.eval_every,
              steps_per_epoch=args.eval_every, verbose=0,
              callbacks=[progress])
    cross_evaluate(name, model, args, batches, write, done=())
    types, _ = config_layers(name, args.num_layers)
    if "lsh" in types:
        write({"kind": "fresh_rotations", "config": name,
               "held_out_bits_per_byte": round(
                   held_out_bits(model, batches, training=True), 4)})
    if args.weights_dir:
        os.makedirs(args.weights_dir, exist_ok=True)
        model.save_weights(os.path.join(args.weights_dir,
                                        f"{name}.weights.h5"))
    write({"kind": "done", "config": name,
           "compile_seconds": round(progress.compile_seconds, 1),
           "train_seconds": round(progress.train_seconds, 1)})


def cross_evaluate(name, model, args, batches, write, done):
    """Scores the trained model of configuration `name`, if it is a
    shared-QK one (LSH, `full_shared_qk` or mixed with local layers), with
    every attention of `--cross` but those in `done`."""
    types, _ = config_layers(name, args.num_layers)
    if not set(types) & {"lsh", "full_shared_qk"} or "full" in types:
        return
    for other_name in args.cross:
        if other_name in done:
            continue
        other = (model if other_name == name else
                 with_attention(model, other_name, args))
        write({"kind": "cross", "config": name, "eval_config": other_name,
               "held_out_bits_per_byte": round(
                   held_out_bits(other, batches), 4)})


def cross_evaluate_saved(args, write, records):
    """`--cross-only`: cross-evaluates the weights saved in
    `--weights-dir` by an earlier sweep with the same settings."""
    _, batches = corpus(args)
    for name in args.configs:
        path = os.path.join(args.weights_dir, f"{name}.weights.h5")
        if not os.path.exists(path):
            print(f"[{name}] no weights at {path}; skipped", flush=True)
            continue
        model = build_model(name, args)
        model(_dummy_inputs(args))
        model.load_weights(path)
        done = {r["eval_config"] for r in records
                if r["kind"] == "cross" and r["config"] == name}
        cross_evaluate(name, model, args, batches, write, done)
        print(f"[{name}] cross-evaluated", flush=True)


def read_records(path):
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def settings_of(args):
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def sweep(args):
    """Trains every configuration not yet finished in `--output` (or, with
    `--cross-only`, cross-evaluates their saved weights)."""
    settings = settings_of(args)
    records = [r for r in read_records(args.output)
               if r.get("settings") == settings]

    def write(record):
        with open(args.output, "a") as file:
            file.write(json.dumps({**record, "settings": settings}) + "\n")

    if args.cross_only:
        cross_evaluate_saved(args, write, records)
        return
    finished = {r["config"] for r in records if r["kind"] == "done"}
    todo = [c for c in args.configs if c not in finished]
    if not todo:
        print(f"Every configuration is finished in {args.output}.")
        return
    print(f"Skipping {sorted(finished)} (finished in {args.output}); "
          f"training {todo}.", flush=True)
    train_data, batches = corpus(args)
    for name in todo:
        train_config(name, args, train_data, batches, write)


def time_steps(args):
    """Median train-step time of every configuration, measured side by
    side: one step of each in turn, `--time-steps` rounds after a
    compiling step."""
    train_data, _ = corpus(args)
    x, y = next(iter(train_data))
    models = {name: build_model(name, args) for name in args.configs}
    for name, model in models.items():
        model.train_on_batch(x, y)
        print(f"[{name}] compiled", flush=True)
    times = {name: [] for name in models}
    for round_ in range(args.time_steps):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
        print(f"timing round {round_ + 1}/{args.time_steps}", flush=True)
    settings = settings_of(args)
    with open(args.output, "a") as file:
        for name, seconds in times.items():
            record = {"kind": "step_time", "config": name,
                      "median_step_s": round(float(np.median(seconds)), 4),
                      "rounds": args.time_steps, "settings": settings}
            file.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


def summarize(records):
    """Per configuration (in first-seen order): its evaluations, final
    score, rounds and fresh-rotation scores, and step time."""
    table = {}
    for r in records:
        entry = table.setdefault(r["config"], {
            "evals": [], "cross": {}, "fresh": None, "step_s": None,
            "done": None})
        if r["kind"] == "eval":
            entry["evals"].append((r["step"], r["held_out_bits_per_byte"],
                                   r["train_seconds"]))
        elif r["kind"] == "cross":
            entry["cross"][r["eval_config"]] = r["held_out_bits_per_byte"]
        elif r["kind"] == "fresh_rotations":
            entry["fresh"] = r["held_out_bits_per_byte"]
        elif r["kind"] == "step_time":
            entry["step_s"] = r["median_step_s"]
        elif r["kind"] == "done":
            entry["done"] = r
    return table


def markdown_table(table, reference="full_shared_qk"):
    """The final held-out bits per byte, their ratio to `reference`'s, and
    the side-by-side step time of every configuration."""
    base = table.get(reference, {}).get("evals")
    base_bits = base[-1][1] if base else None
    base_step = table.get(reference, {}).get("step_s")
    lines = [f"| configuration | steps | held-out bits per byte | / "
             f"{reference} | step time (s) | / {reference} |",
             "|---|---|---|---|---|---|"]
    for name, entry in table.items():
        if not entry["evals"]:
            continue
        step, bits, _ = entry["evals"][-1]
        ratio = f"{bits / base_bits:.3f}" if base_bits else "-"
        step_s = entry["step_s"]
        time_ratio = (f"{step_s / base_step:.2f}" if step_s and base_step
                      else "-")
        step_s = f"{step_s:.2f}" if step_s else "-"
        lines.append(f"| {name} | {step} | {bits:.3f} | {ratio} | "
                     f"{step_s} | {time_ratio} |")
    return "\n".join(lines)


def cross_table(table):
    """Held-out bits per byte of each shared-QK model (full_shared_qk or
    LSH-trained) evaluated with each shared-QK attention (the same
    weights), and with fresh rotations drawn per batch."""
    columns = list(dict.fromkeys(
        c for e in table.values() for c in e["cross"]))
    if not columns:
        return ""
    lines = ["| trained as \\ evaluated as | " + " | ".join(columns)
             + " | fresh rotations |",
             "|---|" + "---|" * (len(columns) + 1)]
    for name, entry in table.items():
        if entry["cross"]:
            cells = [f"{entry['cross'][c]:.3f}" if c in entry["cross"]
                     else "-" for c in columns]
            fresh = f"{entry['fresh']:.3f}" if entry["fresh"] else "-"
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {fresh} |")
    return "\n".join(lines)


def plot(table, path):
    """Held-out bits per byte against steps and against estimated wall time
    (steps x the side-by-side step time), every configuration on one chart
    each, side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    tops = []
    for name, entry in table.items():
        if not entry["evals"]:
            continue
        steps, bits, _ = zip(*entry["evals"])
        tops.append(bits[min(1, len(bits) - 1)])
        style = {"linewidth": 1.4, "label": name,
                 "linestyle": _line_style(name)}
        line, = by_step.plot(steps, bits, **style)
        if entry["step_s"]:
            minutes = np.array(steps) * entry["step_s"] / 60
            by_time.plot(minutes, bits, color=line.get_color(), **style)
    if tops:  # from the second evaluation on: the first is far above
        bottom = min(b for e in table.values() for _, b, _ in e["evals"])
        for axis in (by_step, by_time):
            axis.set_ylim(bottom - 0.02, max(tops) + 0.02)
    by_step.set_xlabel("train steps")
    by_time.set_xlabel("minutes (steps x side-by-side step time, 2-core "
                       "CPU)")
    for axis in (by_step, by_time):
        axis.set_ylabel("held-out bits per byte")
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def _line_style(name):
    """Solid for exact attention, dashed for LSH, dotted with local."""
    if name.startswith("local"):
        return ":"
    return "--" if name.startswith("lsh") else "-"


def report(args):
    table = summarize(read_records(args.output))
    # In the order of --configs, others after.
    order = {name: i for i, name in enumerate(args.configs)}
    table = dict(sorted(table.items(),
                        key=lambda item: order.get(item[0], len(order))))
    path = plot(table, args.plot)
    print(f"Wrote {path}\n")
    print(markdown_table(table) + "\n")
    print(cross_table(table))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma list: full, full_shared_qk, local, "
                             "lsh<N>, local+lsh<N>")
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=50,
                        help="steps between held-out evaluations")
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="held-out batches per evaluation")
    parser.add_argument("--cross",
                        default="full_shared_qk,lsh1,lsh2,lsh4,lsh8,lsh16",
                        help="attentions to score every trained shared-QK "
                             "model with (the same weights): full_shared_qk "
                             "or lsh<N>[-c<chunk>][-b<buckets>][-back<n>]")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--chunk-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-corpus-bytes", type=int,
                        default=text_data.DEFAULT_MAX_CORPUS_BYTES)
    parser.add_argument("--output", default="lsh_quality.jsonl",
                        help="JSON lines: read to skip finished "
                             "configurations, appended to")
    parser.add_argument("--plot", default="lsh_quality.png")
    parser.add_argument("--weights-dir", default=None,
                        help="save each trained model's weights here")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--time-steps", type=int, default=None, metavar="N",
                      help="measure step times side by side (N rounds) "
                           "instead of training")
    mode.add_argument("--cross-only", action="store_true",
                      help="score the weights an earlier sweep saved in "
                           "--weights-dir with the --cross attentions not "
                           "yet in --output")
    mode.add_argument("--report", action="store_true",
                      help="write the plot and print the tables from "
                           "--output")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        for name in args.configs:
            config_layers(name, args.num_layers)
    except ValueError as error:
        parser.error(str(error))
    args.cross = [c.strip() for c in args.cross.split(",") if c.strip()]
    try:
        for name in args.cross:
            cross_attention(name)
    except ValueError as error:
        parser.error(str(error))
    if args.cross_only and not args.weights_dir:
        parser.error("--cross-only reads the weights of --weights-dir; give "
                     "it.")
    if args.steps % args.eval_every:
        parser.error(f"--steps ({args.steps}) must be a multiple of "
                     f"--eval-every; received --eval-every "
                     f"{args.eval_every}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        report(args)
    elif args.time_steps:
        time_steps(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()

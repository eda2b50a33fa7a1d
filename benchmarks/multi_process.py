"""One JAX process against two data-parallel ones on this machine.

Runs `examples/train_lm.py` on the JAX backend with the same flags and
global batch, first as one process, then as two processes on 127.0.0.1
(`--distribution data_parallel`, one CPU device each, gloo collectives),
and prints one JSON line per run: the step time of the last epoch (Keras's
`ms/step`, after the compiling first epoch) and the held-out bits per byte
of every epoch, which must agree between the runs; then the largest
difference between the trained weights the two runs saved.

    python benchmarks/multi_process.py
    python benchmarks/multi_process.py --steps-per-epoch 50 --batch-size 32
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_LM = os.path.join(ROOT, "examples", "train_lm.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes, flags, directory):
    """Runs `processes` processes of train_lm.py; returns process 0's
    `(last epoch's ms per step, held-out bits per byte by epoch)`."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    export_dir = os.path.join(directory, f"lm{processes}")
    commands = [[sys.executable, TRAIN_LM, *flags, "--export-dir",
                 export_dir]]
    if processes > 1:
        address = f"127.0.0.1:{free_port()}"
        commands = [commands[0] + [
            "--distribution", "data_parallel", "--num-processes",
            str(processes), "--process-id", str(index),
            "--coordinator-address", address] for index in range(processes)]
    running = [subprocess.Popen(command, cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
               for command in commands]
    outputs = [process.communicate()[0] for process in running]
    for process, output in zip(running, outputs):
        if process.returncode:
            sys.exit(output[-4000:])
    value, unit = re.findall(r" - (\d+)(ms|s)/step", outputs[0])[-1]
    bits = re.search(r"by epoch: (.*)", outputs[0]).group(1)
    return int(value) * (1000 if unit == "s" else 1), bits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--directory", default="/tmp/multi_process_benchmark")
    args = parser.parse_args()
    flags = ["--epochs", "2", "--steps-per-epoch", str(args.steps_per_epoch),
             "--batch-size", str(args.batch_size), "--sequence-length",
             str(args.sequence_length), "--sample-length", "8"]
    for processes in (1, 2):
        ms_per_step, bits = run(processes, flags, args.directory)
        print(json.dumps({"processes": processes,
                          "global_batch": args.batch_size,
                          "sequence_length": args.sequence_length,
                          "ms_per_step": ms_per_step,
                          "held_out_bits_per_byte": bits}), flush=True)
    os.environ["KERAS_BACKEND"] = "jax"
    import keras_reformer  # noqa: F401  (registers the saved classes)
    import keras
    import numpy as np

    one, two = (keras.saving.load_model(
        os.path.join(args.directory, f"lm{n}.keras"), compile=False)
        for n in (1, 2))
    print(json.dumps({"max_weight_difference": max(
        float(np.abs(a - b).max())
        for a, b in zip(one.get_weights(), two.get_weights()))}))


if __name__ == "__main__":
    main()

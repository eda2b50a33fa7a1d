"""Starting and reading the test's worker processes (several processes that
train together on 127.0.0.1)."""

import json
import os
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fast_compile_xla_flags():
    """`XLA_FLAGS` for a JAX test process whose small programs compile for
    longer than they run: LLVM's cheapest optimization level (about a
    third off the JAX rerun), after any flags already set."""
    return " ".join([os.environ.get("XLA_FLAGS", ""),
                     "--xla_backend_optimization_level=0",
                     "--xla_llvm_disable_expensive_passes=true"]).strip()


def free_ports(count):
    """`count` TCP ports free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(commands, timeout):
    """Starts one process per `(argv, env)` and waits for all of them.

    Once one fails, the others are killed (they would wait for it in
    their collective operations), as are all on a timeout.

    Returns:
        A list of `(returncode, output)`, stdout and stderr together.
    """
    with tempfile.TemporaryDirectory() as directory:
        paths = [os.path.join(directory, f"{i}.out")
                 for i in range(len(commands))]
        processes = []
        try:
            for (argv, env), path in zip(commands, paths):
                with open(path, "w") as output:
                    processes.append(subprocess.Popen(
                        argv, cwd=ROOT, env=env, text=True, stdout=output,
                        stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout
            while (any(p.poll() is None for p in processes) and
                   not any(p.poll() for p in processes) and
                   time.monotonic() < deadline):
                time.sleep(0.2)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                process.wait()
        outputs = []
        for path in paths:
            with open(path) as output:
                outputs.append(output.read())
    return [(p.returncode, out) for p, out in zip(processes, outputs)]


def cluster_env(ports, index, **extra):
    """The environment of TensorFlow worker `index` of a cluster on
    `ports` (TF_CONFIG), plus `extra` variables."""
    config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
              "task": {"type": "worker", "index": index}}
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                TF_CONFIG=json.dumps(config), **extra)


def result_of(output):
    """The JSON a script printed after `RESULT` on its last such line."""
    line = [l for l in output.splitlines() if l.startswith("RESULT")]
    assert line, output[-3000:]
    return json.loads(line[-1][len("RESULT"):])


def tensorboard_scalars(directory, prefix=""):
    """`{tag: [(step, value), ...]}` of the scalars whose tag starts with
    `prefix` in the TensorBoard event files in `directory`."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = event_accumulator.EventAccumulator(
        str(directory), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    return {tag: [(event.step, float(tensor_util.make_ndarray(
                event.tensor_proto))) for event in events.Tensors(tag)]
            for tag in events.Tags()["tensors"] if tag.startswith(prefix)}

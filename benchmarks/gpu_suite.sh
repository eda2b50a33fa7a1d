#!/usr/bin/env bash
# One run of the GPU benchmarks, in under 9 minutes, each part under its own
# `timeout`: issue #8's layer table (ours on JAX, jax.nn.dot_product_attention
# with cuDNN in bfloat16, Hugging Face's LSH) at 4K, 16K and 64K tokens and
# at 1M (ours one head at a time in runs, and cuDNN), after a check that our
# LSH layer equals exact attention where it should; the crime-and-punishment
# and enwik8 training steps, ours against Hugging Face's; then as many steps
# of the length-1024 duplication task (examples/duplication_task.py) as the
# remaining time allows, resumed from saved_models/duplication_1024 when a
# checkpoint is there. Every line it prints is JSON (the parts' own lines,
# and a {"part": ..., "exit": ...} line after each part).
#
# On the GPU benchmark machine (JAX, PyTorch, transformers; no TensorFlow),
# with the wheels that Keras and keras-hub need there in .whl (sent along),
# downloaded here once with
#     ../shared/tools/gpu-wheels keras-hub==0.32.0 absl-py rich markdown-it-py mdurl pygments
# (every wheel in .whl is installed, without dependencies, into /tmp/site):
#     bash benchmarks/gpu_suite.sh
# Tiny sizes on the CPU, each part's measurements in one process, to check
# the script (tests/test_gpu_suite.py):
#     bash benchmarks/gpu_suite.sh --smoke
set -u
cd "$(dirname "$0")/.."
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
python=${PYTHON:-python3}
budget=510  # seconds for the parts (under 9 minutes with the install); the
# duplication task gets what the others leave
start=$SECONDS

if [ "${1:-}" = "--smoke" ]; then
  export BENCHMARKS_IN_PROCESS=1  # one process per part: quicker
  budget=400
  check=64 layer_lengths=128 long_length=256 heads=2 repeats=1
  lm_runs=crime_and_punishment:256 lm_flags="--layers 2"  # enwik8: same code
  duplication="--length 32 --batch-size 4 --eval-batches 1 --eval-hashes 2"
  duplication_steps=4 granule=1 per_step=1 layer_time=240 long_time=120
  lm_time=300
else
  check=1024 layer_lengths=4096,16384,65536 long_length=1048576 heads=8
  repeats=3 lm_runs=crime_and_punishment:524288,enwik8:65536
  lm_flags="--lsh-parallel-heads 1 --lsh-segments 16 --local-segments 16"
  duplication="--length 1024 --batch-size 32 --checkpoint-dir saved_models/duplication_1024 --checkpoint-every 250"
  duplication_steps=20000 granule=250 per_step=0.05 layer_time=170
  long_time=90
  lm_time=170
fi

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under timeout
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" "$@"
  echo "{\"part\": \"$name\", \"exit\": $?, \"elapsed_s\": $((SECONDS - start))}"
}

part layers "$layer_time" $python benchmarks/attention_gpu.py \
  --check "$check" --lengths "$layer_lengths" --heads "$heads" \
  --repeats "$repeats" --implementations lsh,flash,huggingface --plot ""
part long_layers "$long_time" $python benchmarks/attention_gpu.py \
  --lengths "$long_length" --heads "$heads" --repeats 1 \
  --implementations lsh_by_run,flash --plot ""
# shellcheck disable=SC2086  # lm_flags holds several flags
part lm_steps "$lm_time" $python benchmarks/lm_step.py --runs "$lm_runs" \
  --implementations ours_jax,huggingface --repeats 2 $lm_flags --plot ""

left=$((budget - (SECONDS - start)))
if [ "$left" -gt 30 ]; then
  # Steps that fit, at about per_step seconds each after a minute of start,
  # in whole checkpoint intervals (granule); a run resumed from a checkpoint
  # trains on to this total.
  steps=$(python3 -c "print(min($duplication_steps, max($granule, int(($left - 60) / $per_step) // $granule * $granule)))")
  # shellcheck disable=SC2086
  part duplication "$left" $python examples/duplication_task.py \
    $duplication --steps "$steps" --verbose 0
else
  echo "{\"part\": \"duplication\", \"skipped\": \"no time left\", \"elapsed_s\": $((SECONDS - start))}"
fi

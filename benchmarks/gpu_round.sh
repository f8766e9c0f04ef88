#!/usr/bin/env bash
# One prepared GPU round (issue #14), sized for about 12 minutes of one H200. Run it the first time a GPU is lent.
#
#   bash benchmarks/gpu_wheels.sh                  # here, once: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   device run, carry [".whl"]:  bash benchmarks/gpu_round.sh "$OUT"
#   DRY=1 bash benchmarks/gpu_round.sh OUT         # CPU dry run at tiny sizes (tests/test_benchmarks.py runs it)
#
# In this order, as many as fit; every finished step is packed into OUT/gpu_round.tar.gz at once, so a run cut off
# by the time limit still brings back what it finished:
#   0. in the background: build the recipe datasets hopper-medium-replay and walker2d-medium-expert
#   1. the GPU speed table: IQL with 1, 10 and 100 vmapped seeds (benchmarks/speed.py)
#   2. 1M updates x 5 seeds (vmapped) of IQL and TD3+BC on hopper-medium-replay (recipe), side by side on the GPU
#   3. the same on walker2d-medium-expert (recipe)
# Unpack here with `tar xzf OUT/gpu_round.tar.gz -C benchmarks/`: the runs land in benchmarks/runs/gpu-1M/, the speed
# table in benchmarks/results/speed_h200.md; then `python benchmarks/aggregate.py --label gpu-1M`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_round.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${GPU_ROUND_WORK:-/tmp/gpu_round}
mkdir -p "$work/runs/gpu-1M" "$work/results"
log="$out/gpu_round.log"
py=${PYTHON:-python3}  # the GPU image's python3 holds jax; the dry-run test passes its own interpreter
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # two scripts share the GPU
export OFFRL_DATA_DIR=${OFFRL_DATA_DIR:-$work/data}
if [ -d .whl ] && [ -z "${DRY:-}" ]; then  # the GPU image has jax/flax/optax/chex/h5py/tensorboard, not gymnasium/mujoco/tyro
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -n "${DRY:-}" ]; then  # tiny sizes; DATASET (a D4RL-layout file) and EVAL_ENV stand in for the recipe names
  updates=100; interval=100; episodes=1; seeds=2; speed_seeds="1"; speed_updates=200
  hopper=(--dataset "$DATASET" --eval-env "$EVAL_ENV"); walker=("${hopper[@]}"); small=(--hidden-dim 32)
  speed_extra="--hidden-dim 32"
else
  updates=1000000; interval=50000; episodes=10; seeds=5; speed_seeds="1 10 100"; speed_updates=200000
  hopper=(--env hopper-medium-replay --source recipe); walker=(--env walker2d-medium-expert --source recipe); small=()
  speed_extra=""
fi

say() { echo "[gpu_round $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
pack() { tar czf "$out/gpu_round.tar.gz.tmp" -C "$work" runs results && mv "$out/gpu_round.tar.gz.tmp" "$out/gpu_round.tar.gz"; }
say "start; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU')"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$log" 2>&1

# 0. datasets, in the background (the speed table needs none)
build_pids=()
if [ -z "${DRY:-}" ]; then
  for ds in hopper-medium-replay walker2d-medium-expert; do
    "$py" -m recipe build "$ds" > "$work/build-$ds.log" 2>&1 &
    build_pids+=($!)
  done
fi

# 1. speed table
say "1. speed table: IQL, seeds $speed_seeds"
"$py" benchmarks/speed.py --label h200 --algos iql --seeds $speed_seeds --seed-updates "$speed_updates" \
  --out-dir "$work/results" --note "gpu_round.sh step 1; dataset builds running on the CPU meanwhile" --extra "$speed_extra" \
  >> "$log" 2>&1
say "1. done (rc $?)"; pack

# 2. and 3.: IQL and TD3+BC side by side, each its 5 seeds vmapped in one process
grid() {  # grid STEP DATASET_TAG BUILD_PID ARGS...
  local step=$1 tag=$2 pid=$3; shift 3
  if [ -n "$pid" ]; then wait "$pid"; say "$step. dataset $tag built (rc $?)"; fi
  local pids=()
  for algo in iql td3bc; do
    local cell="$work/runs/gpu-1M/$algo/$tag"
    mkdir -p "$cell"
    "$py" "algorithms/$algo.py" "$@" --num-seeds "$seeds" --num-updates "$updates" --eval-interval "$interval" \
      --eval-episodes "$episodes" --log-dir "$cell" ${small[@]+"${small[@]}"} > "$cell/stdout.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; say "$step. $tag: a run finished (rc $?)"; done
  pack
}
say "2. hopper-medium-replay: IQL and TD3+BC, $updates updates x $seeds seeds"
grid 2 hopper-medium-replay-recipe "${build_pids[0]:-}" "${hopper[@]}"
say "3. walker2d-medium-expert: IQL and TD3+BC, $updates updates x $seeds seeds"
grid 3 walker2d-medium-expert-recipe "${build_pids[1]:-}" "${walker[@]}"
say "all done"; pack

#!/usr/bin/env bash
# Train the SAC behaviour policies of several envs at once (one process per env, sharing one GPU),
# then export each run's medium/expert policies and medium-replay data (python -m recipe export).
#
#   bash recipe/train_policies.sh OUT_DIR MAX_TIME_S ENV_ID...
#   bash recipe/train_policies.sh runs/policies 3600 HalfCheetah-v4 Walker2d-v4
#
# Each run stops at 1M env steps or after MAX_TIME_S seconds, whichever comes first, with a final
# snapshot and checkpoint (resume with `python algorithms/sac.py ... --load OUT_DIR/ENV/checkpoint.msgpack`).
# 8 envs in lockstep, 8 updates per device call (update-to-data ratio 1, as in the SAC paper).
set -euo pipefail
out=$1; max_time=$2; shift 2
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
for env_id in "$@"; do
  python3 algorithms/sac.py --env "$env_id" --num-envs 8 --total-steps 1000000 --max-time-s "$max_time" \
    --checkpoint-interval 1000000 --log-dir "$out/$env_id" > "$out/$env_id.log" 2>&1 &
done
wait
for env_id in "$@"; do
  env=$(echo "${env_id%-v*}" | tr '[:upper:]' '[:lower:]')
  python3 -m recipe export --run "$out/$env_id" --env "$env" --out-dir "$out/export" || echo "export of $env_id failed"
done

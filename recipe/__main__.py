"""Command line of the recipe datasets.

    python -m recipe build hopper-medium            # into $OFFRL_DATA_DIR (default ~/.cache/offrl)
    python -m recipe build hopper-medium --out x.hdf5 --num-transitions 5000 --seed 1
    python -m recipe build halfcheetah-expert --record    # and write its hash into manifest.json
    python -m recipe export --run runs/sac/Hopper-v4/0 --env hopper   # SAC run -> policies/ and data/
    python -m recipe export --run runs/sac/Hopper-v4/0 --env hopper --out-dir /tmp/ship
    python -m recipe list                                # what this checkout can build
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import h5py
import numpy as np

from recipe import build

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common


def cmd_build(a: argparse.Namespace) -> None:
    env, kind = common.parse_name(a.name)
    out = Path(a.out) if a.out else common.recipe_path(env, kind)
    if out.exists() and not a.force and not build.is_stale(out, env, kind):
        print(f"{out} exists (use --force to rebuild)")
    else:
        build.build_dataset(f"{env}-{kind}", out, a.num_transitions, a.seed)
    if a.record:  # recipe/manifest.json: the hash a rebuild must reproduce
        with h5py.File(out, "r") as f:
            entry = {"seed": a.seed, "num_transitions_arg": a.num_transitions, "transitions": len(f["rewards"]),
                     "sha256": f["metadata/sha256"][()].decode(), "build_time_s": float(f["metadata/build_time_s"][()].decode()),
                     "inputs_sha256": f["metadata/inputs_sha256"][()].decode()}
        manifest = json.loads(build.MANIFEST.read_text()) if build.MANIFEST.exists() else {}
        manifest[f"{env}-{kind}"] = entry
        build.MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
        print(f"recorded {env}-{kind} sha256 {entry['sha256'][:16]} in {build.MANIFEST}")


def cmd_list(_: argparse.Namespace) -> None:
    for env in build.ENV_IDS:
        for kind in common.KINDS:
            ok = build.available(env, kind)
            where = common.recipe_path(env, kind)
            print(f"{env}-{kind:14s} {'buildable' if ok else 'missing  '} {'(built: ' + str(where) + ')' if where.exists() else ''}")


def cmd_export(a: argparse.Namespace) -> None:
    """Pick the expert and medium snapshots of a SAC run and ship them (plus medium-replay data)."""
    run = Path(a.run)
    snaps = [json.loads(line) for line in (run / "snapshots.jsonl").read_text().splitlines()]
    by_step = {s["step"]: s for s in snaps}
    expert = by_step[a.expert_step] if a.expert_step else max(snaps, key=lambda s: s["return_stochastic"])
    # D4RL: medium = the policy stopped at about 1/3 of the expert's return (sampled stochastically)
    target = a.medium_fraction * expert["return_stochastic"]
    medium = by_step[a.medium_step] if a.medium_step else min(
        (s for s in snaps if s["step"] <= expert["step"]), key=lambda s: abs(s["return_stochastic"] - target))
    config = json.loads((run / "config.json").read_text())
    training = {"algorithm": "SAC (algorithms/sac.py)", "env_id": config["env"], "seed": config["seed"],
                "hardware": config.pop("hardware", None) or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                "config": config}
    policy_dir, data_dir = (Path(a.out_dir) / "policies", Path(a.out_dir) / "data") if a.out_dir else (build.POLICY_DIR, build.DATA_DIR)
    policy_dir.mkdir(parents=True, exist_ok=True)
    for level, snap in (("expert", expert), ("medium", medium)):
        with np.load(run / "snapshots" / snap["file"]) as z:
            w = {k: z[k] for k in z.files}
        meta = {**training, "level": level, **{k: snap[k] for k in ("step", "return_stochastic", "return_deterministic", "wall_time_s")},
                "expert_return_stochastic": expert["return_stochastic"]}
        out = policy_dir / f"{a.env}-{level}.npz"
        np.savez(out, meta=json.dumps(meta), **w)
        print(f"{out}: step {snap['step']}, stochastic return {snap['return_stochastic']:.1f}")
    # medium-replay: the replay buffer up to the medium policy's step (the buffer never wraps below 1M;
    # a step counts buffer rows, K per iteration when sac.py steps K envs)
    with np.load(run / "checkpoint.buffer.npz") as z:
        if len(z["rewards"]) < medium["step"]:
            sys.exit(f"the saved buffer holds {len(z['rewards'])} steps < the medium step {medium['step']}")
        arrays = {k: z[k][: medium["step"]] for k in z.files}
    arrays["logp"] = arrays.pop("action_log_probs")
    # K envs stepped in lockstep interleave their episodes row by row: a stable sort by env makes each
    # env's transitions one contiguous block in time order, the layout the recipe's own datasets have
    env = arrays.pop("env_index", np.zeros(len(arrays["rewards"]), np.float32))
    order = np.argsort(env, kind="stable")
    arrays, env = {k: v[order] for k, v in arrays.items()}, env[order]
    # each block's last episode is cut off at the medium step: flag it as a timeout (true next state stored)
    block_end = np.append(env[1:] != env[:-1], True)
    arrays["timeouts"][block_end & (arrays["terminals"] == 0)] = 1.0
    meta = {"source": build.SOURCE, "env_id": config["env"], "kind": "medium-replay", "builder_version": build.BUILDER_VERSION,
            "algorithm": "SAC replay buffer (algorithms/sac.py)", "policy_step": medium["step"],
            "num_envs": config.get("num_envs", 1), "training": json.dumps(training)}
    out = data_dir / f"{a.env}-medium-replay.hdf5"
    build.write_replay(out, arrays, meta)  # compact encoding; metadata/sha256 = hash of the decoded arrays
    print(f"{out}: {medium['step']} transitions from {meta['num_envs']} env(s), {out.stat().st_size / 1e6:.1f} MB")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m recipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build one recipe dataset")
    b.add_argument("name", help="e.g. hopper-medium, walker2d-medium-expert")
    b.add_argument("--out", help="output file (default: the cache path that load_dataset reads)")
    b.add_argument("--num-transitions", type=int, default=None, help="per policy (default 1M, as D4RL)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even if the file exists (a stale one is always rebuilt)")
    b.add_argument("--record", action="store_true", help="write the built file's hash into recipe/manifest.json")
    b.set_defaults(fn=cmd_build)
    sub.add_parser("list", help="which datasets this checkout can build").set_defaults(fn=cmd_list)
    e = sub.add_parser("export", help="ship the medium/expert policies and medium-replay data of a SAC run")
    e.add_argument("--run", required=True, help="log_dir of an algorithms/sac.py run")
    e.add_argument("--env", required=True, choices=list(build.ENV_IDS))
    e.add_argument("--expert-step", type=int, default=0, help="snapshot step of the expert (default: best)")
    e.add_argument("--medium-step", type=int, default=0, help="snapshot step of the medium policy (default: closest to 1/3)")
    e.add_argument("--medium-fraction", type=float, default=1 / 3, help="medium return / expert return (D4RL: about 1/3)")
    e.add_argument("--out-dir", help="write policies/ and data/ into this folder (default: the recipe folder)")
    e.set_defaults(fn=cmd_export)
    a = p.parse_args()
    try:
        a.fn(a)
    except (common.DatasetError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()

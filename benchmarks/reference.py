"""Run a public reference implementation, unmodified, on this project's data file and eval env, and score it as
our runs are scored (the parity check beside our ablations).

    python benchmarks/reference.py --impl corl-awac --repo ~/src/CORL --label ref-awac-hmr \
        --dataset hopper-medium-replay --seeds 0 1 2 3 4 --num-updates 30000 --eval-interval 5000

The reference file runs as its authors ship it, with its own per-dataset config; only the budget, the evaluation
interval, the seed and the device are overridden on its command line, plus any flags of --extra (recorded in the
table's commands), e.g. CORL DT's paper-sized batch on the CPU:

    python benchmarks/reference.py --impl corl-dt --repo ~/src/CORL --label reference-corl-dt-hmr --seeds 0 \
        --num-updates 1500 --eval-interval 500 \
        --extra "--batch_size 64 --learning_rate 1e-4 --warmup_steps 150 --eval_episodes 5 --num_workers 0"

What it imports but cannot have here is stood in for by `benchmarks/reference/shim/` (on PYTHONPATH): `gym` (the old
API over gymnasium, building our eval env), `d4rl` (`qlearning_dataset` with d4rl's semantics, over our HDF5 file) and
`wandb` (its logs go to a file).
Each seed lands in benchmarks/runs/<label>/seed<S>/ (wandb.jsonl and reference.log, both git-ignored; result.json, with every evaluation); the table in
benchmarks/results/<label>/reference.md, with the reference's commit, the commands, hardware and date.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from run import hardware

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# impl -> (script in the reference repo, its per-dataset config, its flags for budget / eval interval / seed / device,
#          the logged key of the mean evaluation return: a glob, and the first key it matches is the one followed)
IMPLS = {
    "corl-awac": ("algorithms/offline/awac.py", "configs/offline/awac/{env}/{kind}_v2.yaml",
                  "--num_train_ops {n} --eval_frequency {e} --seed {s} --device cpu", "eval_score"),
    # DT evaluates every target return of its config; the first (3600 hopper, 5000 walker2d) is dt.py's TARGET_RETURNS
    "corl-dt": ("algorithms/offline/dt.py", "configs/offline/dt/{env}/{kind}_v2.yaml",
                "--update_steps {n} --eval_every {e} --train_seed {s} --device cpu", "eval/*_return_mean"),
}


def run_seed(a: argparse.Namespace, seed: int, file: Path, info: dict, cell: Path) -> dict:
    script, config, flags, key = IMPLS[a.impl]
    env, kind = common.parse_name(a.dataset)
    cmd = [sys.executable, str(Path(a.repo) / script), "--config_path",
           str(Path(a.repo) / config.format(env=env, kind=kind.replace("-", "_"))),
           *flags.format(n=a.num_updates, e=a.eval_interval, s=seed).split(), *shlex.split(a.extra)]
    cell.mkdir(parents=True, exist_ok=True)
    log = cell / "wandb.jsonl"
    log.unlink(missing_ok=True)
    env_vars = dict(os.environ, PYTHONPATH=str(ROOT / "benchmarks" / "reference" / "shim"), OFFRL_REF_LOG=str(log),
                    OFFRL_REF_DATASET=str(file), OFFRL_REF_EVAL_ENV=info["eval_env"], OMP_NUM_THREADS="1",
                    OFFRL_REF_SCORE_RANGE=f"{info.get('ref_min_score') or 'nan'},{info.get('ref_max_score') or 'nan'}")
    print(shlex.join(["python", *cmd[1:]]), flush=True)
    t0 = time.time()
    with open(cell / "reference.log", "w") as out:
        rc = subprocess.run(cmd, cwd=a.repo, env=env_vars, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{a.impl} seed {seed} failed (rc {rc}); see {cell / 'reference.log'}")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    followed = next((k for r in rows for k in r if fnmatch.fnmatch(k, key)), key)
    evals = [(r["step"] + 1, r[followed]) for r in rows if followed in r]
    returns = np.array([r for _, r in evals])
    norm = common.normalized_score(info, returns)
    result = {"impl": a.impl, "seed": seed, "dataset": info["dataset"], "dataset_sha256": info.get("dataset_sha256"),
              "command": shlex.join(["python", *cmd[1:]]), "updates": [u for u, _ in evals], "returns": returns.tolist(),
              "normalized": None if norm is None else norm.tolist(), "wall_time_s": round(time.time() - t0, 1)}
    (cell / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", required=True, choices=list(IMPLS))
    p.add_argument("--repo", required=True, help="a checkout of the reference repository (or an export of it with a COMMIT file)")
    p.add_argument("--label", required=True)
    p.add_argument("--dataset", default="hopper-medium-replay")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--num-updates", type=int, default=30_000)
    p.add_argument("--eval-interval", type=int, default=5_000)
    p.add_argument("--extra", default="", help="more flags for the reference script (e.g. a CPU-sized batch), recorded")
    p.add_argument("--runs-dir", default=str(ROOT / "benchmarks" / "runs"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    _, info = common.load_dataset(a.dataset)
    env, kind = common.parse_name(a.dataset)
    file = {"recipe": common.recipe_path, "d4rl": common.d4rl_path}[info["source_kind"]](env, kind)
    commit = subprocess.run(["git", "-C", a.repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not commit:  # an exported tree (git archive) records its commit in a COMMIT file
        commit = (Path(a.repo) / "COMMIT").read_text().strip() if (Path(a.repo) / "COMMIT").exists() else "unknown"
    results = []
    for s in a.seeds:
        cell = Path(a.runs_dir) / a.label / f"seed{s}"
        done = cell / "result.json"
        if done.exists() and json.loads(done.read_text())["updates"][-1:] == [a.num_updates]:
            print(f"skip seed {s}: done")
            results.append(json.loads(done.read_text()))
        else:
            results.append(run_seed(a, s, file, info, cell))
    key = "normalized" if results[0]["normalized"] is not None else "returns"
    curves = np.array([r[key] for r in results])  # [seeds, evals]
    last, best = curves[:, -1], curves.max(1)
    label = "recipe-normalized" if info["source_kind"] == "recipe" else key
    lines = [f"# Reference: {a.impl} on {info['dataset']}", "",
             f"- {a.impl} at commit {commit[:12]} of {Path(a.repo).name}, unmodified, run by `benchmarks/reference.py` "
             "(shims for gym, d4rl and wandb: benchmarks/reference/shim/).",
             f"- {a.num_updates} updates, seeds {' '.join(map(str, a.seeds))}, the reference's own evaluation "
             f"(its episode count and test seed) every {a.eval_interval}; {label} score.",
             *([f"- Flags changed from its config besides the budget, seed and device: `{a.extra}`."] if a.extra else []),
             f"- Data: {info['source']} (sha256 {str(info.get('dataset_sha256'))[:12]}); hardware: {hardware()}; "
             f"date {time.strftime('%Y-%m-%d', time.gmtime())}.",
             f"- Command: `python benchmarks/reference.py {shlex.join(sys.argv[1:])}`", "",
             "| seed | last | best | curve | wall time |", "|---|---|---|---|---|",
             *[f"| {r['seed']} | {c[-1]:.1f} | {c.max():.1f} | {' / '.join(f'{x:.1f}' for x in c)} | {r['wall_time_s']:.0f} s |"
               for r, c in zip(results, curves, strict=True)],
             f"| mean ± std | {last.mean():.1f} ± {last.std():.1f} | {best.mean():.1f} ± {best.std():.1f} | "
             f"{' / '.join(f'{x:.1f}' for x in curves.mean(0))} | |", "",
             f"Collapsed (last below half of the seed's best): {int((last < best / 2).sum())} of {len(last)} seeds.", "",
             "Per-seed commands:", "", *[f"- seed {r['seed']}: `{r['command']}`" for r in results]]
    out = Path(a.out_dir) / a.label
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

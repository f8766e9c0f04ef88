"""Ablation: one algorithm on one dataset, under named flag sets, N seeds each (issue #14: why JAX-CORL's TD3+BC
starts fast). Each variant is one process of the algorithm's script with `--num-seeds N` (jax.vmap).

    python benchmarks/ablation.py --label ablation-td3bc-wme --algo td3bc --dataset walker2d-medium-expert \
        --num-updates 20000 --num-seeds 3 --variants paper lr_1e-3 orthogonal layer_norm subset_1M ends_terminal jax_corl

A variant with a result.json is skipped; an interrupted one resumes from its checkpoint. Runs land in
benchmarks/runs/<label>/<variant>/; the table (last and best normalized score, mean ± std over seeds, and the
curve) in benchmarks/results/<label>/ablation.md, with the commands, hardware and date.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from run import hardware, run_cell

ROOT = Path(__file__).resolve().parents[1]
# JAX-CORL's TD3+BC (algos/td3bc.py) against the TD3+BC paper's and CORL's settings, one difference at a time
VARIANTS = {
    "paper": [],
    "lr_1e-3": ["--actor-lr", "1e-3", "--critic-lr", "1e-3"],
    "orthogonal": ["--orthogonal-init"],
    "layer_norm": ["--critic-layer-norm"],
    "subset_1M": ["--max-transitions", "1000000"],
    "ends_terminal": ["--episode-ends-terminal"],
    "lr_1e-3+layer_norm": ["--actor-lr", "1e-3", "--critic-lr", "1e-3", "--critic-layer-norm"],
    "jax_corl": ["--actor-lr", "1e-3", "--critic-lr", "1e-3", "--orthogonal-init", "--critic-layer-norm",
                 "--max-transitions", "1000000", "--episode-ends-terminal"],
    # AWAC against CORL's awac.py (issue #15): 3 hidden layers, an unsquashed Gaussian mean and PyTorch's initialization
    # (awac.py's defaults since #15). Each variant names all three, so that its command reruns it under any defaults.
    "tanh_mean": ["--tanh-mean", "--num-layers", "2", "--no-torch-init"],  # the default until #15 (first run as "paper")
    "no_tanh": ["--no-tanh-mean", "--num-layers", "2", "--no-torch-init"],
    "layers_3": ["--no-tanh-mean", "--num-layers", "3", "--no-torch-init"],
    "torch_init": ["--no-tanh-mean", "--num-layers", "2", "--torch-init"],
    "layers_3+torch_init": ["--no-tanh-mean", "--num-layers", "3", "--torch-init"],  # = CORL's networks, the default
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--algo", default="td3bc")
    p.add_argument("--dataset", default="walker2d-medium-expert")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--num-seeds", type=int, default=3)
    p.add_argument("--num-updates", type=int, default=20_000)
    p.add_argument("--eval-interval", type=int, default=5_000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--extra", default="", help="flags for every variant, e.g. '--dataset FILE --eval-env ID'")
    p.add_argument("--runs-dir", default=str(ROOT / "benchmarks" / "runs"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    grid = Path(a.runs_dir) / a.label
    # the table shows these variants and every other one this grid already has a result of (same label, same settings)
    shown = [*a.variants, *[v for v in VARIANTS if v not in a.variants and (grid / v / "result.json").exists()]]
    cmds = {v: [sys.executable, f"algorithms/{a.algo}.py", "--env", a.dataset, "--num-seeds", str(a.num_seeds),
                "--num-updates", str(a.num_updates), "--eval-interval", str(a.eval_interval), "--eval-episodes",
                str(a.eval_episodes), "--log-dir", str(grid / v), *VARIANTS[v], *a.extra.split()] for v in shown}
    commands = {v: shlex.join(["python", *c[1:]]).replace(f"{ROOT}/", "") for v, c in cmds.items()}
    for v in a.variants:
        rc = run_cell(cmds[v], grid / v, commands[v])
        if rc is None:
            print(f"skip {v}: done")
        elif rc != 0:
            print(f"  FAILED (rc {rc}); see {grid / v / 'stdout.log'}", flush=True)
    table(a, grid, commands)


def table(a: argparse.Namespace, grid: Path, commands: dict[str, str]) -> None:
    rows, first = [], None
    for v in commands:
        f = grid / v / "result.json"
        if not f.exists():
            rows.append(f"| {v} | not run | | | | |")
            continue
        r = json.loads(f.read_text())
        first = first or r
        key = "normalized" if r["last_normalized"] is not None else "returns"
        last = np.array([s["last_normalized" if key == "normalized" else "last_return"] for s in r["per_seed"]])
        best = np.array([s["best_normalized" if key == "normalized" else "best_return"] for s in r["per_seed"]])
        curve = " / ".join(f"{np.mean(h[key]):.1f}" for h in r["eval_history"])
        collapsed = int((last < best / 2).sum())
        name = f"{v} (interrupted at {r['num_updates']} updates)" if r["interrupted"] else v
        rows.append(f"| {name} | {last.mean():.1f} ± {last.std():.1f} | {best.mean():.1f} ± {best.std():.1f} | {collapsed} of {len(last)} "
                    f"| {' / '.join(f'{x:.1f}' for x in last)} | {curve} |")
    out = Path(a.out_dir) / a.label
    out.mkdir(parents=True, exist_ok=True)
    score = "recipe-normalized score" if first and first["source_kind"] == "recipe" else "score"
    lines = [f"# Ablation: {a.algo} on {first['dataset'] if first else a.dataset}", "",
             f"- {a.num_updates} updates, {a.num_seeds} seeds per variant (vmapped), {a.eval_episodes} evaluation episodes "
             f"every {a.eval_interval}; {score}: mean ± std over seeds.",
             f"- Data: {first['source'] if first else '?'} (sha256 {str(first and first.get('dataset_sha256'))[:12]}); "
             f"hardware: {hardware()}; date {time.strftime('%Y-%m-%d', time.gmtime())}.",
             f"- Command: `python benchmarks/ablation.py {shlex.join(sys.argv[1:])}`", "",
             "- Collapsed: seeds whose last score is below half of their best (issue #15's criterion).", "",
             "| variant | last | best | collapsed | last per seed | curve (mean over seeds, at each evaluation) |",
             "|---|---|---|---|---|---|", *rows, "",
             "Variant commands:", "", *[f"- {v}: `{c}`" for v, c in commands.items()]]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

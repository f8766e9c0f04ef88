"""Offline-to-online fine-tuning (issue #17): each method pre-trains offline, then fine-tunes online, N seeds each.

    python benchmarks/finetune.py --label finetune-cpu-reduced --datasets hopper-medium-replay walker2d-medium-replay \
        --algos iql awac cql calql --num-updates 20000 --online-steps 20000 --num-seeds 2 --eval-interval 1000

One cell = one process of `algorithms/<algo>.py --online-steps N --num-seeds S` (jax.vmap over seeds). A cell with a
finished result.json is skipped, an interrupted one resumes from its checkpoint. Runs land in
benchmarks/runs/<label>/<dataset>/<algo>/; the table (offline score at hand-over, the dip over the first 10% of the
online steps, the final score and the area under the online curve, mean ± std over seeds, and CORL's regret where the
task has a success signal) in benchmarks/results/<label>/finetune.md and finetune.json, with every cell's command,
the hardware and the date. CORL's own offline-to-online table (antmaze and Adroit, another domain) is shown beside it.
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
ALGOS = ("iql", "awac", "cql", "calql")
# CORL README "Offline-to-Online" (github.com/tinkoff-ai/CORL, commit 6afec904): 1M offline updates, then 1M online
# steps, 4 seeds; offline -> online normalized score and regret, averaged over its antmaze (6) and Adroit (4) tasks.
CORL = {"antmaze": {"awac": (18.12, 16.46, 0.82), "cql": (48.38, 95.58, 0.11), "iql": (56.29, 78.50, 0.24), "calql": (53.04, 97.33, 0.07)},
        "adroit": {"awac": (22.84, 21.76, 0.86), "cql": (-0.72, 0.22, 0.99), "iql": (21.69, 44.99, 0.71), "calql": (-0.76, -0.79, 0.99)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--datasets", nargs="+", default=["hopper-medium-replay", "walker2d-medium-replay"])
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--num-seeds", type=int, default=3)
    p.add_argument("--num-updates", type=int, default=1_000_000, help="offline updates before the hand-over")
    p.add_argument("--online-steps", type=int, default=250_000)
    p.add_argument("--eval-interval", type=int, default=10_000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--extra", default="", help="flags for every cell, e.g. '--mixing-ratio 0.5'")
    p.add_argument("--runs-dir", default=str(ROOT / "benchmarks" / "runs"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--table-only", action="store_true", help="render the table from the runs there, run nothing")
    p.add_argument("--notes", help="a markdown file of observations on these runs, written by hand, shown under the claims")
    a = p.parse_args()
    grid = Path(a.runs_dir) / a.label
    for ds in a.datasets:
        for algo in a.algos if not a.table_only else []:
            cell = grid / ds / algo
            cmd = [sys.executable, str(ROOT / "algorithms" / f"{algo}.py"), "--env", ds, "--num-seeds", str(a.num_seeds),
                   "--num-updates", str(a.num_updates), "--online-steps", str(a.online_steps), "--eval-interval",
                   str(a.eval_interval), "--eval-episodes", str(a.eval_episodes), "--log-dir", str(cell), *shlex.split(a.extra)]
            rc = run_cell(cmd, cell, shlex.join(["python", *cmd[1:]]).replace(str(ROOT) + "/", ""))
            if rc:
                print(f"{ds}/{algo}: exit {rc}, see {cell / 'stdout.log'}", flush=True)
    table(a, grid)


def cell_rows(grid: Path, datasets: list[str]) -> list[dict]:
    rows = []
    for ds in datasets:
        for algo in ALGOS:
            f = grid / ds / algo / "result.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            o = r.get("online") or {}
            rows.append({"dataset": ds, "algo": algo, "interrupted": r["interrupted"], "seeds": r["seeds"],
                         "offline_updates": r["config"]["num_updates"], "online_steps": o.get("online_steps", 0),
                         "planned_online_steps": r["config"].get("online_steps", 0),
                         "score": o.get("score"), "per_seed": o.get("per_seed", {}), "regret": o.get("regret"),
                         "dataset_source": r.get("source_kind") or r["source"], "dataset_sha256": r.get("dataset_sha256"),
                         "updates_per_s": r["updates_per_s"], "wall_time_s": r["wall_time_s"],
                         "command": "python " + " ".join(shlex.quote(str(x)) for x in [f"algorithms/{algo}.py", *argv(r)])})
    return rows


def argv(r: dict) -> list[str]:
    """The cell's flags as run (from its config), for the table."""
    c = r["config"]
    keys = ("env", "num_seeds", "num_updates", "online_steps", "eval_interval", "eval_episodes", "mixing_ratio", "num_envs")
    return [x for k in keys if c.get(k) is not None for x in (f"--{k.replace('_', '-')}", str(c[k]))]


def fmt(xs: list | None) -> str:
    if not xs:
        return "–"
    x = np.asarray(xs, float)
    return f"{x.mean():.1f} ± {x.std():.1f}" if len(x) > 1 else f"{x.mean():.1f}"


def table(a: argparse.Namespace, grid: Path) -> None:
    rows = cell_rows(grid, a.datasets)
    out = Path(a.out_dir) / a.label
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps({"label": a.label, "hardware": hardware(), "rows": rows}, indent=2))
    lines = [f"# Offline-to-online fine-tuning: {a.label}", "",
             "Each method pre-trains offline for the row's offline updates, then fine-tunes for its online env steps "
             "(one update per step), its seeds vmapped; each row's command gives its evaluation interval. Scores are recipe-normalized (the recipe data is not D4RL's; "
             "see recipe/README.md). **Dip**: the minimum over the evaluations of the first 10% of the online steps "
             "(at least the first one). **AUC**: the trapezoid mean of the online curve, hand-over included. "
             "Mean ± std over seeds.", "",
             f"hardware: {hardware()}; date {time.strftime('%Y-%m-%d', time.gmtime())}.", "",
             "| dataset | method | budget (offline + online, seeds) | offline (hand-over) | dip | final | AUC | final − offline | regret |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ps = r["per_seed"]
        gain = np.subtract(ps["final"], ps["offline"]).tolist() if ps else None
        note = " (interrupted)" if r["interrupted"] or r["online_steps"] < r["planned_online_steps"] else ""
        budget = f"{r['offline_updates'] // 1000}k + {r['planned_online_steps'] // 1000}k, {len(r['seeds'])}"
        lines.append(f"| {r['dataset']} | {r['algo']}{note} | {budget} | {fmt(ps.get('offline'))} | {fmt(ps.get('dip'))} | "
                     f"{fmt(ps.get('final'))} | {fmt(ps.get('auc'))} | {fmt(gain)} | "
                     f"{'–' if r['regret'] is None else format(r['regret'], '.2f')} |")
    lines += ["", "Regret (CORL's mean of 1 − success over the online episodes) needs a success signal; the locomotion "
              "tasks have none.", "", "## The claims, on this data", ""]
    by = {(r["dataset"], r["algo"]): r["per_seed"] for r in rows if r["per_seed"]}
    for ds in a.datasets:
        for (x, y, key, word) in (("calql", "cql", "dip", "dip"), ("iql", "awac", "final", "final score")):
            if (ds, x) in by and (ds, y) in by:
                if key == "dip":  # the drop from the hand-over score: smaller is better
                    dx, dy = (np.mean(by[(ds, m)]["offline"]) - np.mean(by[(ds, m)]["dip"]) for m in (x, y))
                    lines.append(f"- {ds}: {x}'s drop from hand-over to the dip is {dx:.1f}, {y}'s {dy:.1f}: "
                                 f"{'smaller' if dx < dy else 'not smaller'} (claim: smaller).")
                else:
                    fx, fy = (np.mean(by[(ds, m)][key]) for m in (x, y))
                    lines.append(f"- {ds}: {x}'s {word} {fx:.1f} against {y}'s {fy:.1f}: "
                                 f"{'above' if fx > fy else 'not above'} (claim: above).")
    if a.notes:
        lines += ["", "## Notes", "", Path(a.notes).read_text().strip()]
    lines += ["", "## Beside it: CORL's offline-to-online table (another domain)", "",
              "CORL README, commit 6afec904: 1M offline updates then 1M online steps, 4 seeds, D4RL antmaze (6 tasks) and "
              "Adroit cloned (4 tasks); averages, offline → online normalized score, and regret. Not comparable number "
              "for number with the locomotion recipe data above.", "",
              "| domain | method | offline → online | regret |", "|---|---|---|---|"]
    for dom, t in CORL.items():
        for m, (o, f, g) in t.items():
            lines.append(f"| {dom} | {m} | {o:.1f} → {f:.1f} | {g:.2f} |")
    lines += ["", "## Commands", ""] + [f"- {r['dataset']}/{r['algo']}: `{r['command']}` ({r['dataset_source']}, sha256 "
                                         f"{(r['dataset_sha256'] or '')[:12]}; {r['wall_time_s'] / 60:.0f} min, "
                                         f"{r['updates_per_s'] or 0:.0f} upd/s)" for r in rows]
    lines += ["", "Each row is one `run_cell` of `python benchmarks/finetune.py --label " + a.label + " --datasets <d> --algos <a> "
              "--num-updates <offline> --online-steps <online> ...` with the flags of its command above; "
              f"`--table-only` re-renders this file from benchmarks/runs/{a.label}/."]
    (out / "finetune.md").write_text("\n".join(lines) + "\n")
    print(f"table: {out / 'finetune.md'}")


if __name__ == "__main__":
    main()

"""Dataset table of the D4RL-recipe datasets: size, episode returns, normalized score, behaviour policies.

    python benchmarks/datasets.py                 # the recipe datasets already built (in $OFFRL_DATA_DIR)
    python benchmarks/datasets.py --build         # build every buildable one first
    python benchmarks/datasets.py --envs          # measure nothing: re-render the table from datasets.json

Writes benchmarks/results/datasets.md and datasets.json (read by aggregate.py for "does offline
RL beat the data?").
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common
from recipe import build

KINDS = ("random", "medium", "expert", "medium-replay", "medium-expert")
# D4RL v2's sizes (sourced, see its size_source column) and approximate mean normalized returns (unsourced: a band)
D4RL = {r["dataset"].removesuffix("-v2"): r for r in csv.DictReader(open(ROOT / "benchmarks" / "d4rl_dataset_stats.csv"))}


def d4rl_cells(name: str) -> str:
    r = D4RL.get(name)
    if r is None:
        return "| | "
    approx = f"≈ {r['approx_mean_normalized_return']}" if r["approx_mean_normalized_return"] else ""
    return f"| {int(r['transitions_after_qlearning']):,} | {approx} "


def policy_rows() -> list[str]:
    rows = []
    for f in sorted(build.POLICY_DIR.glob("*.npz")):
        with np.load(f) as z:
            m = json.loads(str(z["meta"]))
        rows.append(f"| {f.stem} | {m['env_id']} | {m['step']} | {m['config']['seed']} | {m['return_stochastic']:.0f} "
                    f"| {float(common.normalized_score(f.stem.split('-')[0] + '-medium', m['return_stochastic'])):.1f} "
                    f"| {m['return_deterministic']:.0f} | {m['wall_time_s'] / 3600:.2f} h | {m['hardware']} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="store_true", help="build the missing buildable datasets first")
    p.add_argument("--envs", nargs="*", default=list(build.ENV_IDS),
                   help="measure these envs; the rows of other envs are kept from the previous datasets.json")
    a = p.parse_args()
    out = ROOT / "benchmarks" / "results"
    old = json.loads((out / "datasets.json").read_text()) if (out / "datasets.json").exists() else {}
    table = {k: v for k, v in old.items() if k.split("-", 1)[0] not in a.envs}
    kept = sorted({k.split("-", 1)[0] for k in table})
    for env in a.envs:
        for kind in KINDS:
            path = common.recipe_path(env, kind)
            if not path.exists():
                if not (a.build and build.available(env, kind)):
                    continue
            data, info = common.load_dataset(f"{env}-{kind}", source="recipe", build=a.build)
            ret = common.episode_returns(data, info)
            full = np.ones(len(ret), bool)
            full[-1] = bool(data["terminals"][-1] or data["timeouts"][-1])
            norm = common.normalized_score(info, ret)
            table[f"{env}-{kind}"] = {
                "transitions": int(len(data["rewards"])), "episodes": int(len(ret)), "mean_return": float(ret.mean()),
                "min_return": float(ret.min()), "max_return": float(ret.max()), "mean_normalized": float(norm.mean()),
                "terminals": int(data["terminals"].sum()), "timeouts": int(data["timeouts"].sum()), "source": info["source"],
                "sha256": info.get("dataset_sha256"), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    table = {f"{e}-{k}": table[f"{e}-{k}"] for e in build.ENV_IDS for k in KINDS if f"{e}-{k}" in table}
    lines = [f"| {name} | {t['transitions']:,} | {t['episodes']:,} | {t['mean_return']:.0f} | {t['min_return']:.0f} "
             f"| {t['max_return']:.0f} | {t['mean_normalized']:.1f} {d4rl_cells(name)}| {t['terminals']:,} | {t['timeouts']:,} "
             f"| {t.get('date', 'unknown')} |" for name, t in table.items()]
    (out / "datasets.json").write_text(json.dumps(table, indent=2))
    md = ["# D4RL-recipe datasets", "",
          "**Self-generated with the D4RL paper's recipe on gymnasium v4 envs. These are NOT the D4RL datasets.**", "",
          f"- Command: `python benchmarks/datasets.py {' '.join(sys.argv[1:])}`; date {time.strftime('%Y-%m-%d', time.gmtime())}"
          + (f"; the {', '.join(kept)} rows are kept from the previous run (date column)" if kept else ""),
          "- Episode returns are undiscounted; every K_ENVS stream's last episode is cut off (a timeout) and still counted.",
          "- Normalized: D4RL's 100 (R - R_random) / (R_expert - R_random) with D4RL's reference returns.",
          "- D4RL v2 beside ours, from benchmarks/d4rl_dataset_stats.csv: its transitions after `d4rl.qlearning_dataset` "
          "(which drops each timed-out episode's last step; ours count every row), sourced from the d4rl-to-minari probe "
          "(WillDudley/d4rl-to-minari, dataset_probing_output.csv); and its mean normalized return, **approximate and unsourced** "
          "(commonly reported values, no sourced copy offline): read it as a band, not a figure.",
          "- SAC wall time: from the start of the run to the snapshot, on the hardware named in the policy table. Hopper: one env on "
          "the 2-core CPU shared with other jobs (about 100 env steps/s). HalfCheetah and Walker2d: 8 envs in lockstep with 8 "
          "updates per device call (`--num-envs 8`), the two runs at the same time on the 2-core CPU (about 100 env steps/s "
          "each, evaluation included), 5400 s each (recipe/logs/).", "",
          "| dataset | transitions | episodes | mean return | min | max | mean normalized | D4RL v2 transitions "
          "| D4RL v2 mean normalized (approx.) | terminals | timeouts | measured |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|", *lines, "",
          "## Behaviour policies (recipe/policies)", "",
          "Returns of the SAC snapshot when it was taken: stochastic (as the data is sampled) and deterministic, "
          "mean of 5 episodes.", "",
          "| policy | env | SAC steps | seed | stochastic return | normalized | deterministic return | SAC wall time at that step | hardware |",
          "|---|---|---|---|---|---|---|---|---|", *policy_rows()]
    (out / "datasets.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

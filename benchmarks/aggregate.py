"""Turn a grid of runs (benchmarks/run.py) into tables and plots in benchmarks/results/<label>/.

    python benchmarks/aggregate.py --label cpu-reduced

Writes scores.md / scores.csv (last and best normalized score, mean ± std over seeds, with the
published numbers beside them; the score at every evaluation, by budget), aggregate rows (mean, and IQM with 95% stratified-bootstrap CIs
as in rliable), beats_data.md (each algorithm against BC and the behaviour data), curves_*.png
(learning curves) and bars.png (final scores).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from run import data_changed
from stats import stratified_bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PUBLISHED_NAMES = {"bc": "BC", "td3bc": "TD3+BC", "iql": "IQL", "cql": "CQL", "awac": "AWAC", "mopo": "MOPO", "combo": "COMBO", "dt": "DT"}
SOURCE_NOTE = {
    "recipe": "self-generated D4RL-recipe data (NOT the D4RL dataset; published D4RL numbers are for orientation only)",
    "d4rl": "the D4RL v2 dataset files",
    "minari": "Minari datasets (not the original D4RL files)",
    "file": "a user-supplied file",
}


def load_runs(grid: Path) -> tuple[list[dict], list[str]]:
    """The grid's finished runs, and the cells left out because their recipe data was rebuilt since."""
    runs, stale = [], []
    for f in sorted(grid.glob("*/*/result.json")):
        r = json.loads(f.read_text())
        if r.get("interrupted"):  # a partial run (Ctrl-C): not at the grid's budget
            print(f"left out {f.parent}: interrupted at update {r['num_updates']}; the grid's run.py command resumes it")
            continue
        if data_changed(r):
            print(f"left out {f.parent}: its recipe dataset was rebuilt since; rerun it with benchmarks/run.py")
            stale.append(f"{r['algorithm']}/{r['dataset']}")
            continue
        r["_dir"] = f.parent
        runs.append(r)
    return runs, stale


def load_published() -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with open(BENCH / "published_d4rl_scores.csv") as f:
        for row in csv.DictReader(f):
            out[(row["algorithm"], row["dataset"])].append(row)
    return out


def ms(x: list[float | None]) -> str:
    x = [v for v in x if v is not None]
    return "n/a" if not x else f"{np.mean(x):.1f} ± {np.std(x):.1f}"


def per_seed(r: dict, key: str) -> list[float | None]:
    return [s[key] for s in r["per_seed"]]


def base_name(dataset: str) -> str:
    """'hopper-medium-recipe' / 'hopper-medium-v2' -> 'hopper-medium'."""
    for suffix in ("-v2", "-recipe", "-minari", "-d4rl"):
        dataset = dataset.removesuffix(suffix)
    return dataset


def published_cell(pub, algo: str, dataset: str) -> str:
    rows = pub.get((PUBLISHED_NAMES.get(algo, algo), base_name(dataset) + "-v2"), [])
    return "; ".join(f"{float(p['normalized_score']):.1f} ({p['source']}, {p['kind']})" for p in rows) or "-"


ALGO_ORDER = ("bc", "td3bc", "iql", "cql", "awac", "mopo", "combo")


def algo_color(algo: str) -> str:
    """One colour per algorithm in every plot (matplotlib's default cycle, in ALGO_ORDER)."""
    i = ALGO_ORDER.index(algo) if algo in ALGO_ORDER else len(ALGO_ORDER) + sum(map(ord, algo))
    return f"C{i % 10}"


def plot_curves(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    by_ds = defaultdict(list)
    for r in runs:
        by_ds[r["dataset"]].append(r)
    for ds, rs in sorted(by_ds.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in sorted(rs, key=lambda r: r["algorithm"]):
            h = [e for e in r.get("eval_history", []) if e.get("normalized") is not None]
            if not h:
                continue
            x = np.array([e["update"] for e in h])
            y = np.array([e["normalized"] for e in h])  # [evals, seeds]
            m, s = y.mean(1), y.std(1)
            c = algo_color(r["algorithm"])
            ax.plot(x, m, label=r["algorithm"], color=c)
            ax.fill_between(x, m - s, m + s, alpha=0.2, color=c)
        ax.set_xlabel("updates")
        ax.set_ylabel("normalized score")
        ax.set_title(f"{ds} ({data_version(rs[0])} data)\n{max(r['num_updates'] for r in rs):,} updates, "
                     f"mean ± std over {len(rs[0]['seeds'])} seeds", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        f = out / f"curves_{ds}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files


def data_version(r: dict) -> str:
    """The source kind and, for hashed files, the first 8 hex digits of the data's sha256 (which build of a recipe file)."""
    return f"{r['source_kind']} {r['dataset_sha256'][:8]}" if r.get("dataset_sha256") else r["source_kind"]


def budget_lines(runs: list[dict], algos: list[str], datasets: list[str]) -> list[str]:
    """The mean normalized score of each cell at every evaluation, and each algorithm's mean over the datasets at the
    updates all of its runs reached: how each score moves with the budget (e.g. 20k against 100k updates)."""
    at = {(r["algorithm"], r["dataset"]): {e["update"]: float(np.mean(e["normalized"])) for e in r.get("eval_history", [])
                                           if e.get("normalized") is not None} for r in runs}
    points = sorted({u for v in at.values() for u in v})
    lines = ["| dataset | algorithm | " + " | ".join(f"{u:,}" for u in points) + " |", "|---|---" + "|---" * len(points) + "|"]
    for d in datasets:
        for al in algos:
            if (al, d) in at:
                lines.append(f"| {d} | {al} | " + " | ".join(f"{at[al, d][u]:.1f}" if u in at[al, d] else "-" for u in points) + " |")
    for al in algos:
        cells = [at[al, d] for d in datasets if (al, d) in at]
        means = [f"{np.mean([c[u] for c in cells]):.1f}" if all(u in c for c in cells) else "-" for u in points]
        lines.append(f"| **mean over {len(cells)}** | {al} | " + " | ".join(means) + " |")
    return lines


def plot_bars(runs: list[dict], algos: list[str], datasets: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(r["algorithm"], r["dataset"]): r for r in runs}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(datasets)), 4))
    width = 0.8 / max(len(algos), 1)
    for i, a in enumerate(algos):
        vals = [cell[(a, d)] for d in datasets if (a, d) in cell]
        xs = [j + i * width for j, d in enumerate(datasets) if (a, d) in cell]
        means = [np.mean([v for v in per_seed(r, "last_normalized") if v is not None]) for r in vals]
        stds = [np.std([v for v in per_seed(r, "last_normalized") if v is not None]) for r in vals]
        ax.bar(xs, means, width, yerr=stds, label=a, capsize=2, color=algo_color(a))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))])
    ax.set_xticklabels([d.replace("-v2", "") for d in datasets], rotation=20, fontsize=8)
    ax.set_ylabel("last normalized score")
    ax.set_title(f"final scores ({runs[0]['source_kind']} data), mean ± std over seeds", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    f = out / "bars.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--datasets-table", default=str(BENCH / "results" / "datasets.json"),
                   help="behaviour-data scores written by benchmarks/datasets.py")
    p.add_argument("--runs-dir", default=str(BENCH / "runs"), help="where benchmarks/run.py put the grids")
    p.add_argument("--out-dir", default=str(BENCH / "results"), help="tables and plots go to <out-dir>/<label>/")
    p.add_argument("--bc-from", default=None,
                   help="another grid's label whose BC runs beats_data.md compares with, for datasets this grid has no BC run "
                        "on (e.g. --label cpu-reduced-mb --bc-from cpu-reduced)")
    a = p.parse_args()
    grid = Path(a.runs_dir) / a.label
    runs, stale = load_runs(grid)
    if not runs:
        raise SystemExit(f"no result.json under {grid}")
    manifest = json.loads((grid / "manifest.json").read_text()) if (grid / "manifest.json").exists() else {}
    out = Path(a.out_dir) / a.label
    out.mkdir(parents=True, exist_ok=True)
    pub = load_published()
    algos = sorted({r["algorithm"] for r in runs}, key=lambda x: list(PUBLISHED_NAMES).index(x) if x in PUBLISHED_NAMES else 99)
    datasets = sorted({r["dataset"] for r in runs})
    kinds = sorted({r["source_kind"] for r in runs})
    cell = {(r["algorithm"], r["dataset"]): r for r in runs}
    behaviour = json.loads(Path(a.datasets_table).read_text()) if Path(a.datasets_table).exists() else {}

    head = [f"# Scores: {a.label}", "",
            f"**Data: {'; '.join(SOURCE_NOTE.get(k, k) for k in kinds)}.**", "",
            f"- Commands: one per cell, listed under 'Runs' below (from {grid.name}/manifest.json), then "
            f"`python benchmarks/aggregate.py --label {a.label}{f' --bc-from {a.bc_from}' if a.bc_from else ''}`",
            f"- Updates: {sorted({r['num_updates'] for r in runs})}; seeds per cell: {sorted({len(r['seeds']) for r in runs})}",
            f"- Hardware: {manifest.get('hardware', 'unknown')}",
            f"- Dates: {', '.join(sorted({c['date'][:10] for c in manifest.get('cells', {}).values()})) or 'unknown'}",
            "- Scores are D4RL normalized scores, 100 (R - R_random) / (R_expert - R_random), with D4RL's reference returns.",
            "- `last`: the final evaluation; `best`: the best evaluation during training (published tables mix the two).", ""]
    lines = [*head, "| dataset | source | algorithm | updates × seeds | last | best | return (last) | published (source, kind) |",
             "|---|---|---|---|---|---|---|---|"]
    rows_csv = []
    for d in datasets:
        for al in algos:
            r = cell.get((al, d))
            if r is None:
                continue
            lines.append(f"| {d} | {data_version(r)} | {al} | {r['num_updates']:,} × {len(r['seeds'])} "
                         f"| {ms(per_seed(r, 'last_normalized'))} | {ms(per_seed(r, 'best_normalized'))} "
                         f"| {ms(per_seed(r, 'last_return'))} | {published_cell(pub, al, d)} |")
            rows_csv.append({"dataset": d, "source_kind": r["source_kind"], "dataset_sha256": r.get("dataset_sha256"), "algorithm": al, "num_updates": r["num_updates"],
                             "seeds": len(r["seeds"]), "last_normalized_mean": np.mean(per_seed(r, "last_normalized")),
                             "last_normalized_std": np.std(per_seed(r, "last_normalized")),
                             "best_normalized_mean": np.mean(per_seed(r, "best_normalized")),
                             "best_normalized_std": np.std(per_seed(r, "best_normalized")),
                             "updates_per_s": r.get("updates_per_s"), "wall_time_s": r.get("wall_time_s")})
    lines += ["", "## Aggregate over datasets", "",
              "Mean: the mean over datasets of the per-dataset mean. IQM: interquartile mean over all runs (datasets × seeds), "
              "95% stratified-bootstrap CI (2000 replicates), as in rliable (Agarwal et al. 2021).", "",
              "| algorithm | datasets | mean (last) | IQM (last) [95% CI] | mean (best) | IQM (best) [95% CI] |", "|---|---|---|---|---|---|"]
    for al in algos:
        rs = [cell[(al, d)] for d in datasets if (al, d) in cell]
        row = [al, str(len(rs))]
        for key in ("last_normalized", "best_normalized"):
            scores = [np.array(per_seed(r, key), float) for r in rs if None not in per_seed(r, key)]
            if not scores:
                row += ["n/a", "n/a"]
                continue
            pt, lo, hi = stratified_bootstrap_ci(scores)
            row += [f"{np.mean([s.mean() for s in scores]):.1f}", f"{pt:.1f} [{lo:.1f}, {hi:.1f}]"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## By budget", "", "Mean normalized score over seeds at each evaluation (the update it followed); the "
              "mean rows average an algorithm's datasets where every one of its runs has that evaluation.", "",
              *budget_lines(runs, algos, datasets)]
    lines += ["", "## Runs", "", "| cell | command | wall time | phases | date |", "|---|---|---|---|---|"]
    left_out = {f"{x.split('/')[0]}/{base_name(x.split('/', 1)[1])}" for x in stale}
    for name, c in sorted(manifest.get("cells", {}).items()):
        if name in left_out:
            continue
        r = cell.get((name.split("/")[0], next((d for d in datasets if base_name(d) == name.split("/")[1]), "")), {})
        phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r.get("phase_times_s", {}).items()) or "-"
        lines.append(f"| {name} | `{c['command']}` | {c['wall_time_s'] / 60:.1f} min | {phases} | {c['date']} |")
    if stale:
        lines += ["", "Left out (trained on recipe data that has been rebuilt since from new behaviour policies; "
                  "rerun with benchmarks/run.py): " + ", ".join(stale)]
    lines += ["", "![final scores](bars.png)", ""] + [f"![{d}](curves_{d}.png)" for d in datasets]
    (out / "scores.md").write_text("\n".join(lines) + "\n")
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_csv[0]))
        w.writeheader()
        w.writerows(rows_csv)

    # Does offline RL beat the data?
    bl = [f"# Does offline RL beat the data? ({a.label})", "", *[h.replace("below", "in scores.md") for h in head[2:8]], "",
          "Last normalized score of each algorithm minus BC's and minus the behaviour data's own mean normalized episode score "
          "(from benchmarks/results/datasets.md). Positive: the algorithm improved on it.", "",
          "| dataset | data score | BC | " + " | ".join(f"{al} (vs BC, vs data)" for al in algos if al != "bc") + " |",
          "|---" * (3 + len([al for al in algos if al != "bc"])) + "|"]
    tally: dict[str, list[int]] = {al: [0, 0, 0, 0] for al in algos}  # beats BC, of, beats data, of
    other_bc = {}
    if a.bc_from:
        other_bc = {r["dataset"]: r for r in load_runs(Path(a.runs_dir) / a.bc_from)[0] if r["algorithm"] == "bc"}
        bl[-2:-2] = [f"BC marked * is from the grid `{a.bc_from}` (its updates × seeds in brackets): this grid has no BC run "
                     "on that dataset.", ""]
    for d in datasets:
        data_score = behaviour.get(base_name(d), {}).get("mean_normalized")
        bc, bc_note = cell.get(("bc", d)), ""
        if bc is None and d in other_bc:
            bc = other_bc[d]
            bc_note = f"* ({bc['num_updates']:,} × {len(bc['seeds'])})"
        bc_m = None if bc is None else float(np.mean(per_seed(bc, "last_normalized")))
        row = [d, "n/a" if data_score is None else f"{data_score:.1f}", "n/a" if bc_m is None else f"{bc_m:.1f}{bc_note}"]
        for al in algos:
            if al == "bc":
                continue
            r = cell.get((al, d))
            if r is None:
                row.append("-")
                continue
            m = float(np.mean(per_seed(r, "last_normalized")))
            vs_bc = "n/a" if bc_m is None else f"{m - bc_m:+.1f}"
            vs_data = "n/a" if data_score is None else f"{m - data_score:+.1f}"
            row.append(f"{m:.1f} ({vs_bc}, {vs_data})")
            t = tally[al]
            if bc_m is not None:
                t[0], t[1] = t[0] + (m > bc_m), t[1] + 1
            if data_score is not None:
                t[2], t[3] = t[2] + (m > data_score), t[3] + 1
        bl.append("| " + " | ".join(row) + " |")
    bl += ["", "In how many datasets each algorithm's mean last score is above BC's and above the data's (a count, not a "
           "significance test: the seed-to-seed spread is in scores.md):", "",
           "| algorithm | above BC | above the data |", "|---|---|---|"]
    for al in algos:
        if al != "bc" and tally[al][1] + tally[al][3]:
            k = tally[al]
            bl.append(f"| {al} | {f'{k[0]} of {k[1]}' if k[1] else 'n/a'} | {f'{k[2]} of {k[3]}' if k[3] else 'n/a'} |")
    (out / "beats_data.md").write_text("\n".join(bl) + "\n")
    plot_curves(runs, out)
    plot_bars(runs, algos, datasets, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

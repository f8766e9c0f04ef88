"""The DOPE report (issue #16): how well each off-policy estimator of algorithms/ope.py ranks a family of policies whose
true values are measured online, and what choosing a checkpoint by an estimate, without the simulator, costs.

    python benchmarks/dope.py --label dope-hmr --dataset hopper-medium-replay --train bc td3bc iql awac \
        --num-updates 20000 --eval-interval 4000 --num-seeds 2 --extra-runs benchmarks/runs/ablation-awac-hmr/*

Stages, each resumable (a finished stage's file is reused):
1. The family (`--train ALGO ...`): each algorithm trains `--num-seeds` seeds (vmapped) with `--keep-checkpoints`, so the
   checkpoint of every evaluation is kept: benchmarks/runs/<label>/<algo>/checkpoints/<update>.msgpack. Every kept
   checkpoint, every seed in it, is a policy. `--extra-runs` adds the checkpoints of other run folders (their kept ones,
   or else their last), and `--recipe-policies` the dataset's shipped medium and expert behaviour policies.
2. The ground truth (truth.json): each policy run online, as ope.py evaluates it -- N(mu(s), sigma^2) in [-1, 1] units,
   clipped by the env -- for `--truth-episodes` episodes in the dataset's eval env: the discounted return (ope.py's
   estimand) with its standard error, and the undiscounted return and normalized score that the benchmark tables report.
3. The estimates (ope-<i>.json): algorithms/ope.py on all policies, one process per `--ope-groups` group of estimators,
   started beside stage 2 (each pinned to its own CPU core when there are several), then merged.
4. The report (benchmarks/results/<label>/dope.md, dope.json, scatter.png): DOPE's metrics per estimator (absolute error of
   range-normalized values, Spearman rank correlation, regret@1 and @5, 1000-resample bootstrap CIs; ope.dope_metrics),
   each estimator's wall time, a scatter of estimate against truth, and the selection regret: per run (algorithm, setting,
   seed), the checkpoint each estimator ranks first against the online-best checkpoint and against the last one; per
   algorithm, the setting (run folder) whose seeds' last checkpoints each estimator ranks first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tyro
from run import hardware, run_cell

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "algorithms")]
import ope  # noqa: E402

import common  # noqa: E402


# ---- 1. The family ----
def data_flag(a: argparse.Namespace) -> list[str]:
    """--dataset FILE for a file or folder, else --env NAME; and --eval-env if given."""
    return (["--dataset", a.dataset] if Path(a.dataset).exists() else ["--env", a.dataset]) + (
        ["--eval-env", a.eval_env] if a.eval_env else [])


def train_family(a: argparse.Namespace, grid: Path) -> dict[str, str]:
    """Each --train algorithm's run with --keep-checkpoints (resumed if interrupted, skipped if done); their commands."""
    commands = {}
    for algo in a.train:
        cell = grid / algo
        cmd = [sys.executable, f"algorithms/{algo}.py", *data_flag(a), "--num-seeds", str(a.num_seeds), "--num-updates",
               str(a.num_updates), "--eval-interval", str(a.eval_interval), "--eval-episodes", str(a.eval_episodes),
               "--log-dir", str(cell), "--keep-checkpoints", *a.train_flags.split()]
        commands[algo] = shlex.join(["python", *cmd[1:]]).replace(f"{ROOT}/", "")
        if run_cell(cmd, cell, commands[algo]) not in (None, 0):
            raise SystemExit(f"{algo} failed; see {cell / 'stdout.log'}")
    return commands


def family(a: argparse.Namespace, grid: Path, task: str) -> list[dict]:
    """Every policy: spec (for ope.py), algorithm, setting (its run folder), seed index and update; recipe policies last."""
    folders = [grid / algo for algo in a.train] + [Path(f) for f in a.extra_runs]
    out = []
    for folder in folders:
        kept = sorted((folder / "checkpoints").glob("*.msgpack"), key=lambda p: int(p.stem))
        files = kept or ([folder / "checkpoint.msgpack"] if (folder / "checkpoint.msgpack").exists() else [])
        if not files:
            raise SystemExit(f"{folder}: no checkpoints (train it with --keep-checkpoints, or give a finished run folder)")
        for f in files:
            ckpt = common.read_checkpoint(str(f))
            for i in range(len(ckpt["meta"]["seeds"])):
                out.append({"spec": f"{f}:{i}", "algorithm": ckpt["meta"]["algorithm"], "setting": str(folder.relative_to(ROOT)
                            if folder.is_absolute() and folder.is_relative_to(ROOT) else folder), "seed": i, "update": ckpt["step"]})
    env = common.parse_name(task)[0] if a.recipe_policies else None
    for level in ("medium", "expert") if a.recipe_policies else ():
        out.append({"spec": f"recipe:{env}-{level}", "algorithm": "recipe-sac", "setting": f"recipe-{level}", "seed": 0, "update": None})
    return out


# ---- 2. The ground truth ----
def rollout_values(env, act, prep: common.Prep, std: float, discount: float, rng: np.random.Generator,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One episode per sub-env of N(act(s), std^2) in [-1, 1] units, clipped by Prep.to_env; discounted and plain returns."""
    obs, _ = env.reset(seed=seed)
    disc, plain = np.zeros(env.num_envs), np.zeros(env.num_envs)
    done, g = np.zeros(env.num_envs, bool), 1.0
    while not done.all():
        mu = prep.to_unit(np.asarray(act(obs.astype(np.float32))))
        obs, r, term, trunc, _ = env.step(prep.to_env(mu + std * rng.standard_normal(mu.shape).astype(np.float32)))
        disc += np.where(done, 0.0, g * r)
        plain += np.where(done, 0.0, r)
        done |= term | trunc
        g *= discount
    return disc, plain


def ground_truth(a: argparse.Namespace, policies: list[dict], info: dict, prep: common.Prep, path: Path) -> dict[str, dict]:
    """Each policy's online values (cached per spec in truth.json, which grows as policies finish)."""
    truth = json.loads(path.read_text()) if path.exists() else {}
    env = common.make_eval_env(info, num_envs=a.truth_episodes, seed=a.seed)
    for i, p in enumerate(policies):
        if p["spec"] in truth:
            continue
        t0 = time.time()
        act = ope.load_act(ope.parse_policy(p["spec"]), info["obs_dim"])
        disc, plain = rollout_values(env, act, prep, a.policy_std, a.discount, np.random.default_rng([a.seed, i]), a.seed)
        norm = common.normalized_score(info, plain)
        truth[p["spec"]] = {"discounted": float(disc.mean()), "discounted_se": float(disc.std(ddof=1) / np.sqrt(len(disc))),
                            "return": float(plain.mean()), "normalized": None if norm is None else float(np.mean(norm)),
                            "episodes": len(disc), "wall_time_s": time.time() - t0}
        path.write_text(json.dumps(truth, indent=1))
        print(f"[dope] truth {len(truth)}/{len(policies)} {p['spec']}: discounted {disc.mean():.1f} ± {truth[p['spec']]['discounted_se']:.1f}"
              f" | return {plain.mean():.0f} ({time.time() - t0:.0f}s)", flush=True)
    env.close()
    return truth


# ---- 3. The estimates ----
# the ope.py settings that only some estimators read (prefixes of Args fields); every other setting matters to all
OWN_SETTINGS = {"is": ("behavior", "bc_"), "pdis": ("behavior", "bc_"), "wis": ("behavior", "bc_"),
                "dr": ("behavior", "bc_", "fqe_", "tau", "num_action_samples"), "fqe": ("fqe_", "tau", "num_action_samples"),
                "dualdice": ("dualdice_", "nu_lr", "zeta_lr"), "mb": ("mb_",)}


def same_run(result: dict, flags: list[str], specs: list[str]) -> bool:
    """Whether an ope.py result file holds these policies, estimated with these settings (those its estimators read)."""
    used = [x for e in result["estimators"] for x in OWN_SETTINGS[e]]
    own = [x for xs in OWN_SETTINGS.values() for x in xs]
    read = lambda k: k not in ("estimators", "out", "policies") and (not k.startswith(tuple(own)) or k.startswith(tuple(used)))
    want = {k: v for k, v in dataclasses.asdict(tyro.cli(ope.Args, args=flags)).items() if read(k)}
    return sorted(r["spec"] for r in result["policies"]) == sorted(specs) and {k: result["config"][k] for k in want} == want


def start_estimates(a: argparse.Namespace, grid: Path, flags: list[str], specs: list[str]) -> tuple[list, list[Path]]:
    """ope.py on every policy: one process per --ope-groups group, all started at once (each pinned to a CPU core when
    there are several), beside the ground truth; a group whose file already holds these policies is reused."""
    procs, files = [], []
    for i, group in enumerate(a.ope_groups):
        f = grid / f"ope-{i}.json"
        files.append(f)
        if f.exists() and same_run(json.loads(f.read_text()), flags, specs):
            continue
        cmd = [sys.executable, "algorithms/ope.py", *flags, "--estimators", *group.split(), "--out", str(f)]
        print(shlex.join(["python", *cmd[1:6], "...", *cmd[-(len(group.split()) + 3):]]), flush=True)
        log = open(grid / f"ope-{i}.log", "w")  # noqa: SIM115 - closed with the process
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        core = {cores[i % len(cores)]} if len(a.ope_groups) > 1 and cores else None
        pin = (lambda c=core: os.sched_setaffinity(0, c)) if core else None
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin), log, f))
    return procs, files


def finish_estimates(procs: list, files: list[Path]) -> dict:
    """Wait for start_estimates' processes; their results merged into one ope.py result."""
    for proc, log, f in procs:
        if proc.wait() != 0:
            raise SystemExit(f"ope.py failed; see {f.with_suffix('.log')}")
        log.close()
    merged: dict | None = None
    for f in files:
        part = json.loads(f.read_text())
        if merged is None:
            merged = part
            continue
        rows = {r["spec"]: r for r in part["policies"]}
        for r in merged["policies"]:
            r["estimates"].update(rows[r["spec"]]["estimates"])
            r["wall_time_s"].update(rows[r["spec"]]["wall_time_s"])
        merged["estimators"] += part["estimators"]
        merged["wall_time_s"].update({k: v for k, v in part["wall_time_s"].items() if k not in ("total", "policy_means")})
        merged["behavior"] = merged["behavior"] or part["behavior"]
        merged["behavior_detail"] = merged["behavior_detail"] or part["behavior_detail"]
        merged["config"] = {**part["config"], **{k: v for k, v in merged["config"].items() if k != "estimators"}}
    return merged


# ---- 4. The report ----
def selection(policies: list[dict], truth: dict, estimates: dict[str, np.ndarray], key: str) -> dict:
    """Regret, in `key` units of the truth, of picking by each estimator: per run, its checkpoint (against the online
    best, and the last checkpoint's regret); per algorithm, its setting by the mean estimate of its seeds' last checkpoints."""
    true = np.array([truth[p["spec"]][key] for p in policies])
    runs: dict[tuple, list[int]] = {}
    for i, p in enumerate(policies):
        if p["update"] is not None:
            runs.setdefault((p["algorithm"], p["setting"], p["seed"]), []).append(i)
    per_run = {}
    for run_key, idx in runs.items():
        idx = sorted(idx, key=lambda i: policies[i]["update"])
        if len(idx) < 2:
            continue
        best = true[idx].max()
        per_run[run_key] = {"last": best - true[idx[-1]], **{e: best - true[idx[int(np.argmax(v[idx]))]] for e, v in estimates.items()}}
    per_algo = {}
    for algo in sorted({k[0] for k in runs}):
        settings = sorted({k[1] for k in runs if k[0] == algo})
        if len(settings) < 2:
            continue
        last = {s: [max(idx, key=lambda i: policies[i]["update"]) for k, idx in runs.items() if k[:2] == (algo, s)] for s in settings}
        true_s = {s: true[ii].mean() for s, ii in last.items()}
        best = max(true_s.values())
        per_algo[algo] = {e: best - true_s[max(settings, key=lambda s: v[last[s]].mean())] for e, v in estimates.items()}
        per_algo[algo]["settings"] = {s: float(t) for s, t in true_s.items()}
    return {"per_run": per_run, "per_algorithm": per_algo}


def scatter(path: Path, policies: list[dict], truth: dict, estimates: dict[str, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true = np.array([truth[p["spec"]]["discounted"] for p in policies])
    algos = sorted({p["algorithm"] for p in policies})
    cols = min(4, len(estimates))
    rows = -(-len(estimates) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (e, v) in zip(axes.flat, estimates.items(), strict=False):
        for j, algo in enumerate(algos):
            m = np.array([p["algorithm"] == algo for p in policies])
            ax.scatter(true[m], v[m], s=12, color=f"C{j}", label=algo)
        lo, hi = true.min(), true.max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(e)
        ax.set_xlabel("true (online, discounted)")
        ax.set_ylabel("estimate")
    for ax in list(axes.flat)[len(estimates):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(a: argparse.Namespace, policies: list[dict], truth: dict, est: dict, commands: dict[str, str], out: Path) -> None:
    info = est["dataset"], est["source"]
    names = [e for e in est["estimators"] if all(r["estimates"].get(e) is not None for r in est["policies"])]
    by_spec = {r["spec"]: r for r in est["policies"]}
    estimates = {e: np.array([by_spec[p["spec"]]["estimates"][e] for p in policies]) for e in names}
    true = np.array([truth[p["spec"]]["discounted"] for p in policies])
    metrics = {e: ope.dope_metrics(true, v, seed=a.seed) for e, v in estimates.items()}
    key = "normalized" if all(truth[p["spec"]]["normalized"] is not None for p in policies) else "return"
    sel = selection(policies, truth, estimates, key)
    wall = est["wall_time_s"]
    cost = {"is": "behavior", "pdis": "behavior", "wis": "behavior", "dr": "fqe", "fqe": "fqe", "dualdice": "dualdice", "mb": "mb"}
    ci = lambda m: f"{m['value']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"
    se = np.array([truth[p["spec"]]["discounted_se"] for p in policies])
    cfg = est["config"]
    unit = "recipe-normalized score" if key == "normalized" and "recipe" in str(info[1]) else key
    lines = [f"# DOPE report: {info[0]} ({info[1]})", "",
             f"- {len(policies)} policies ({', '.join(f'{k} {v}' for k, v in sorted(count(policies).items()))}), each evaluated as "
             f"N(mu(s), {cfg['policy_std']}^2) in [-1, 1] action units. Estimand: E[sum_t {cfg['discount']}^t r_t] from the initial states.",
             f"- Truth: {a.truth_episodes} online episodes per policy in {est['eval_env']}; its standard error is "
             f"{se.mean():.1f} on average, against a family spread (max - min) of {true.max() - true.min():.1f}.",
             f"- Budgets: FQE {cfg['fqe_updates']} updates, DualDICE {cfg['dualdice_updates']}, model {cfg.get('mb_updates')}"
             f" (ope.py defaults: 1M, 1M; {'REDUCED' if cfg['fqe_updates'] < 1_000_000 else 'full'}). "
             f"Behaviour densities for IS: {est['behavior']} ({est['behavior_detail']}).",
             f"- Hardware: {hardware()}; date {time.strftime('%Y-%m-%d', time.gmtime())}.",
             f"- Command: `python benchmarks/dope.py {shlex.join(sys.argv[1:])}`", "",
             "## Estimators (DOPE's metrics on range-normalized values; 95% bootstrap CIs over policies)", "",
             "| estimator | rank correlation | abs. error | regret@1 | regret@5 | wall time (s) |", "|---|---|---|---|---|---|"]
    rho = {e: metrics[e]["rank_correlation"]["value"] for e in names}
    ranked = sorted(names, key=lambda e: -rho[e] if np.isfinite(rho[e]) else np.inf)  # undefined (a constant estimate) last
    for e in ranked:
        m = metrics[e]
        lines.append(f"| {e} | {ci(m['rank_correlation'])} | {ci(m['abs_error'])} | {ci(m['regret@1'])} | {ci(m['regret@5'])} "
                     f"| {wall.get(cost[e], float('nan')):.0f} |")
    best, r = ranked[0], rho[ranked[0]]
    lines += ["", f"The best rank correlation is {best}'s, {r:.2f}: the issue's bar (0.7) is {'met' if r >= 0.7 else 'NOT met'}.",
              "Wall time: the time of the stage the estimator needs (IS/PDIS/WIS share the behaviour densities; DR is FQE's "
              "model plus a pass), for all policies together.", "", "![scatter](scatter.png)", "",
              f"## Choosing a checkpoint without the simulator (regret in {unit}, true values online)", "",
              "Per run: the online-best checkpoint's true value minus that of the checkpoint chosen. `last` takes the last "
              "checkpoint, as a user without OPE would.", "",
              "| algorithm | runs | last | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for algo in sorted({k[0] for k in sel["per_run"]}):
        rr = [v for k, v in sel["per_run"].items() if k[0] == algo]
        lines.append(f"| {algo} | {len(rr)} | {np.mean([x['last'] for x in rr]):.1f} | "
                     + " | ".join(f"{np.mean([x[e] for x in rr]):.1f}" for e in names) + " |")
    if sel["per_algorithm"]:
        lines += ["", "Per algorithm: the setting (run folder) chosen by the mean estimate of its seeds' last checkpoints; "
                  "regret against the best setting's mean true value.", "",
                  "| algorithm | settings (true value) | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for algo, v in sel["per_algorithm"].items():
            lines.append(f"| {algo} | {', '.join(f'{s} ({t:.1f})' for s, t in v['settings'].items())} | "
                         + " | ".join(f"{v[e]:.1f}" for e in names) + " |")
    lines += ["", "Family runs:", "", *[f"- {k}: `{c}`" for k, c in commands.items()],
              *[f"- extra: `{f}`" for f in a.extra_runs]]
    (out / "dope.md").write_text("\n".join(lines) + "\n")
    (out / "dope.json").write_text(json.dumps({"metrics": metrics, "selection": {
        "per_run": {"/".join(map(str, k)): v for k, v in sel["per_run"].items()}, "per_algorithm": sel["per_algorithm"]},
        "policies": [{**p, "truth": truth[p["spec"]], "estimates": by_spec[p["spec"]]["estimates"]} for p in policies],
        "wall_time_s": wall}, indent=1, default=float))
    scatter(out / "scatter.png", policies, truth, estimates, f"{info[0]}: OPE estimate vs online truth")
    print("\n".join(lines))


def count(policies: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in policies:
        out[p["algorithm"]] = out.get(p["algorithm"], 0) + 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--dataset", default="hopper-medium-replay", help="dataset name (as algorithms' --env)")
    p.add_argument("--eval-env", help="gymnasium id, for a file that does not record its env (as algorithms' --eval-env)")
    p.add_argument("--train", nargs="*", default=["bc", "td3bc", "iql", "awac"], help="algorithms trained for the family")
    p.add_argument("--num-seeds", type=int, default=2)
    p.add_argument("--num-updates", type=int, default=20_000)
    p.add_argument("--eval-interval", type=int, default=4_000, help="updates between kept checkpoints")
    p.add_argument("--eval-episodes", type=int, default=5, help="the training runs' own evaluation episodes")
    p.add_argument("--train-flags", default="", help="more flags for every training run, e.g. '--hidden-dim 64'")
    p.add_argument("--train-only", action="store_true", help="stop after training the family (stage 1)")
    p.add_argument("--extra-runs", nargs="*", default=[], help="more run folders whose checkpoints join the family")
    p.add_argument("--recipe-policies", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--truth-episodes", type=int, default=50, help="online episodes per policy for the ground truth")
    p.add_argument("--ope-groups", nargs="+", default=[" ".join(ope.ESTIMATORS)],
                   help="estimator groups, one ope.py process each, run at once, e.g. 'is pdis wis dr fqe' 'dualdice mb'")
    p.add_argument("--ope-flags", default="", help="flags for algorithms/ope.py, e.g. '--fqe-updates 50000'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default=str(ROOT / "benchmarks" / "runs"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    grid, out = Path(a.runs_dir) / a.label, Path(a.out_dir) / a.label
    grid.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    commands = train_family(a, grid)
    if a.train_only:
        return
    data, info = common.load_dataset(a.dataset, eval_env=a.eval_env)
    policies = family(a, grid, info.get("task") or a.dataset)
    flags = [*data_flag(a), "--seed", str(a.seed), "--policies", *[q["spec"] for q in policies], *a.ope_flags.split()]
    ope_args = tyro.cli(ope.Args, args=flags)
    a.policy_std, a.discount = ope_args.policy_std, ope_args.discount
    env = common.make_eval_env(info, num_envs=1)
    prep = common.Prep.fit(data, env.single_action_space, normalize_states=True)  # its action box (to_unit / to_env) only
    env.close()
    print(f"[dope] {len(policies)} policies: {count(policies)}", flush=True)
    started = start_estimates(a, grid, flags, [q["spec"] for q in policies])
    truth = ground_truth(a, policies, info, prep, grid / "truth.json")
    est = finish_estimates(*started)
    report(a, policies, truth, est, commands, out)


if __name__ == "__main__":
    main()

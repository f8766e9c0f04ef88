"""Benchmark statistics and the table/plot aggregation, on small made-up inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from conftest import write_d4rl
from stats import iqm, stratified_bootstrap_ci


def test_iqm_hand_values():
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert iqm([0, 1, 2, 100]) == pytest.approx(1.5)  # the outlier is trimmed
    # n = 5: quantile range [1.25, 3.75] -> weights 0, .75, 1, .75, 0
    assert iqm([5, 1, 4, 2, 3]) == pytest.approx(3.0)
    assert iqm([1, 2, 3, 4, 1000]) == pytest.approx((0.75 * 2 + 3 + 0.75 * 4) / 2.5)


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    scores = [rng.normal(50, 5, 5), rng.normal(80, 5, 5)]
    pt, lo, hi = stratified_bootstrap_ci(scores, reps=500)
    assert lo <= pt <= hi and hi - lo > 1
    assert stratified_bootstrap_ci(scores, reps=500) == (pt, lo, hi)  # seeded
    assert stratified_bootstrap_ci([np.full(3, 7.0)], reps=100) == (7.0, 7.0, 7.0)


def test_aggregate_tables_and_plots(tmp_path):
    grid = tmp_path / "runs" / "t"
    for algo, base in (("bc", 40.0), ("iql", 60.0), ("td3bc", 50.0)):
        d = grid / algo / "hopper-medium"
        d.mkdir(parents=True)
        hist = [{"update": u, "returns": [1.0, 2.0], "normalized": [base * u / 2000, base * u / 2000 + 2]} for u in (1000, 2000)]
        per_seed = [{"seed": i, "last_return": 1.0, "best_return": 2.0, "last_normalized": base + 2 * i,
                     "best_normalized": base + 2 * i + 1} for i in range(2)]
        (d / "result.json").write_text(json.dumps({
            "algorithm": algo, "dataset": "hopper-medium-recipe", "source": "recipe:x", "source_kind": "recipe", "eval_env": "Hopper-v4",
            "num_updates": 2000, "seeds": [0, 1], "per_seed": per_seed, "eval_history": hist,
            **({"dataset_sha256": "0" * 64} if algo == "td3bc" else {})}))  # td3bc: trained on data rebuilt since
    (grid / "manifest.json").write_text(json.dumps({"grid_command": "python benchmarks/run.py --label t", "hardware": "test cpu",
                                                    "cells": {"bc/hopper-medium": {"date": "2026-11-25 12:00 UTC", "wall_time_s": 60.0,
                                                                                        "command": "python algorithms/bc.py --env hopper-medium"}}}))
    r = subprocess.run([sys.executable, "benchmarks/aggregate.py", "--label", "t", "--runs-dir", str(tmp_path / "runs"),
                        "--out-dir", str(tmp_path / "out"), "--datasets-table", str(tmp_path / "none.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OFFRL_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out" / "t" / "scores.md").read_text()
    assert "| td3bc |" not in md and "Left out (trained on recipe data that has been rebuilt since" in md
    assert "NOT the D4RL dataset" in md
    assert "| hopper-medium-recipe | recipe | iql | 2,000 × 2 | 61.0 ± 1.0 | 62.0 ± 1.0 |" in md
    assert "67.5 (CORL README (4 seeds, 1M updates), last)" in md  # published IQL figure beside ours
    assert "| dataset | algorithm | 1,000 | 2,000 |" in md  # by budget: the seed mean at each evaluation
    assert "| hopper-medium-recipe | iql | 31.0 | 61.0 |" in md and "| **mean over 1** | bc | 21.0 | 41.0 |" in md
    assert "test cpu" in md and "| bc/hopper-medium | `python algorithms/bc.py --env hopper-medium` | 1.0 min | - |" in md
    beats = (tmp_path / "out" / "t" / "beats_data.md").read_text()
    assert "61.0 (+20.0, n/a)" in beats
    assert "| iql | 1 of 1 | n/a |" in beats  # no datasets table given: nothing to compare with the data

    # a grid without BC compares with another grid's BC runs when asked (--bc-from)
    (tmp_path / "runs" / "mb" / "iql").mkdir(parents=True)
    os.symlink(grid / "iql" / "hopper-medium", tmp_path / "runs" / "mb" / "iql" / "hopper-medium")
    r = subprocess.run([sys.executable, "benchmarks/aggregate.py", "--label", "mb", "--runs-dir", str(tmp_path / "runs"),
                        "--out-dir", str(tmp_path / "out"), "--datasets-table", str(tmp_path / "none.json"), "--bc-from", "t"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OFFRL_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    beats = (tmp_path / "out" / "mb" / "beats_data.md").read_text()
    assert "| hopper-medium-recipe | n/a | 41.0* (2,000 × 2) | 61.0 (+20.0, n/a) |" in beats and "grid `t`" in beats
    for png in ("bars.png", "curves_hopper-medium-recipe.png"):
        assert (tmp_path / "out" / "t" / png).stat().st_size > 5000


def test_runs_on_rebuilt_recipe_data_are_flagged(tmp_path, monkeypatch):
    """A run records its recipe dataset's sha256; once the dataset is rebuilt, run.py reruns it and aggregate.py leaves it out."""
    from run import data_changed

    monkeypatch.setenv("OFFRL_DATA_DIR", str(tmp_path))  # no cached file: the manifest's hash is the current one
    want = json.loads((ROOT / "recipe" / "manifest.json").read_text())["hopper-medium"]["sha256"]
    r = {"dataset": "hopper-medium-recipe", "source_kind": "recipe"}
    assert not data_changed({**r, "dataset_sha256": want})
    assert data_changed({**r, "dataset_sha256": "0" * 64})
    assert not data_changed(r)  # older runs without the field are taken as they are
    assert not data_changed({**r, "source_kind": "d4rl", "dataset_sha256": "0" * 64})


def test_manifest_keeps_cells_of_concurrent_runners(tmp_path):
    """Two runners on one grid: each one's cells replace only their own entries, never the other's newer ones."""
    from run import update_manifest

    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"grid_command": "python benchmarks/run.py --label old",
                                "cells": {"bc/a": {"date": "old"}, "iql/b": {"date": "old"}}}))
    head = {"label": "t", "hardware": "cpu", "num_seeds": 1, "num_updates": 10}
    update_manifest(path, {**head, "grid_command": "runner 1"}, {"bc/a": {"date": "new 1"}})
    update_manifest(path, {**head, "grid_command": "runner 2"}, {"iql/b": {"date": "new 2"}})
    update_manifest(path, {**head, "grid_command": "runner 1"}, {"bc/a": {"date": "new 1"}, "cql/c": {"date": "new 1"}})
    m = json.loads(path.read_text())
    assert m["cells"] == {"bc/a": {"date": "new 1"}, "iql/b": {"date": "new 2"}, "cql/c": {"date": "new 1"}}
    assert m["grid_commands"] == ["python benchmarks/run.py --label old", "runner 1", "runner 2"]
    assert m["grid_command"] == "runner 1"
    assert not (tmp_path / "manifest.json.tmp").exists()


def test_speed_table(tmp_path):
    """speed.py times a script on synthetic data and writes the table (BC, 500 updates: a few seconds)."""
    r = subprocess.run([sys.executable, "benchmarks/speed.py", "--label", "t", "--algos", "bc", "--seeds", "1",
                        "--seed-updates", "500", "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "speed_t.json").read_text())["rows"][0]
    assert row["algorithm"] == "bc" and row["updates"] == 500 and row["updates_per_s"] > 0 and row["peak_rss_mb"] > 50
    assert "| bc | 1 |" in (tmp_path / "speed_t.md").read_text()


def test_gpu_round_dry_run(tmp_path, tiny_dataset):
    """benchmarks/gpu_round.sh at tiny sizes on the CPU: every step runs, and each finished step is packed into OUT."""
    env = {**os.environ, "DRY": "1", "DATASET": str(tiny_dataset), "EVAL_ENV": "Pendulum-v1", "PYTHON": sys.executable,
           "GPU_ROUND_WORK": str(tmp_path / "work")}
    r = subprocess.run(["bash", "benchmarks/gpu_round.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = (tmp_path / "out" / "gpu_round.log").read_text()
    assert "all done" in log and "(rc 0)" in log and "(rc 1)" not in log, log
    import tarfile
    with tarfile.open(tmp_path / "out" / "gpu_round.tar.gz") as t:
        names = t.getnames()
    assert "results/speed_h200.md" in names
    for algo in ("iql", "td3bc"):
        for tag in ("hopper-medium-replay-recipe", "walker2d-medium-expert-recipe"):
            assert f"runs/gpu-1M/{algo}/{tag}/result.json" in names, names


def test_reference_shims(tmp_path):
    """benchmarks/reference/shim: d4rl.qlearning_dataset drops a timed-out episode's last step (d4rl's semantics),
    the old gym API steps our eval env (rewards transformed, scores normalized), and wandb.log lines land in the log file."""
    obs = np.arange(12, dtype=np.float32).reshape(6, 2)
    term = np.array([0, 1, 0, 0, 0, 0], bool)
    tout = np.array([0, 0, 0, 1, 0, 0], bool)  # episodes: rows 0-1 (terminal), 2-3 (timeout), 4-5 (cut at the end)
    f = write_d4rl(tmp_path / "d.hdf5", {"observations": obs, "actions": np.zeros((6, 3), np.float32),
                                         "rewards": np.arange(6, dtype=np.float32), "terminals": term, "timeouts": tout})
    code = """
import json, os, numpy as np, gym, d4rl, wandb
env = gym.make("hopper-medium-replay-v2")
d = d4rl.qlearning_dataset(env)
assert d["rewards"].tolist() == [0, 1, 2, 4], d["rewards"]
assert d["next_observations"].tolist() == [[2, 3], [4, 5], [6, 7], [10, 11]]
assert d["terminals"].tolist() == [False, True, False, False]
env = gym.wrappers.TransformObservation(env, lambda s: s * 0)
env.seed(3); o1 = env.reset()
assert o1.shape == (11,) and not o1.any()
obs, r, done, info = env.step(np.zeros(3))
assert isinstance(r, float) and isinstance(done, bool)
scaled = gym.wrappers.TransformReward(gym.make("hopper-medium-replay-v2"), lambda r: 1000 * r)
scaled.seed(3); scaled.reset()
assert scaled.step(np.zeros(3))[1] == 1000 * r  # the same start, the same action: the reward, scaled
assert scaled.get_normalized_score(np.array([5.0])).tolist() == [0.5]  # d4rl's (R - min) / (max - min)
wandb.init(config={"a": 1}); wandb.log({"eval_score": np.float32(2.5)}, step=9)
print(open(os.environ["OFFRL_REF_LOG"]).read())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks" / "reference" / "shim"), "OFFRL_REF_DATASET": str(f),
           "OFFRL_REF_EVAL_ENV": "Hopper-v4", "OFFRL_REF_LOG": str(tmp_path / "log.jsonl"), "OFFRL_REF_SCORE_RANGE": "0,10"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[1]) == {"step": 9, "eval_score": 2.5}


def _dope():
    import dope

    return dope


def test_dope_selection_regret_by_hand():
    dope = _dope()
    pol = lambda s, algo, setting, seed, u: {"spec": s, "algorithm": algo, "setting": setting, "seed": seed, "update": u}
    policies = [pol("a1", "x", "s1", 0, 10), pol("a2", "x", "s1", 0, 20), pol("a3", "x", "s1", 0, 30),
                pol("b1", "x", "s2", 0, 10), pol("b2", "x", "s2", 0, 20), pol("r", "recipe-sac", "recipe-medium", 0, None)]
    true = {"a1": 1.0, "a2": 5.0, "a3": 2.0, "b1": 4.0, "b2": 3.0, "r": 9.0}
    truth = {s: {"normalized": v} for s, v in true.items()}
    oracle = np.array([true[p["spec"]] for p in policies])
    sel = dope.selection(policies, truth, {"oracle": oracle, "reversed": -oracle}, "normalized")
    # per run: online best minus the chosen; "last" takes the last checkpoint; the recipe policy is in no run
    assert sel["per_run"][("x", "s1", 0)] == {"last": 3.0, "oracle": 0.0, "reversed": 4.0}
    assert sel["per_run"][("x", "s2", 0)] == {"last": 1.0, "oracle": 0.0, "reversed": 1.0}
    # per algorithm: settings compared by their last checkpoints (s1: 2.0, s2: 3.0)
    assert sel["per_algorithm"]["x"]["settings"] == {"s1": 2.0, "s2": 3.0}
    assert sel["per_algorithm"]["x"]["oracle"] == 0.0 and sel["per_algorithm"]["x"]["reversed"] == 1.0


def test_dope_ground_truth_rollouts_discount_and_stop_at_episode_ends():
    dope = _dope()
    import common

    class Env:  # reward 1 per step; sub-env i terminates after i + 2 steps; records the actions it is given
        num_envs = 2

        def reset(self, seed=None):
            self.t, self.actions = 0, []
            return np.zeros((2, 1), np.float32), {}

        def step(self, action):
            self.t += 1
            self.actions.append(action)
            end = np.array([self.t >= 2, self.t >= 3])
            return np.zeros((2, 1), np.float32), np.ones(2), end, np.zeros(2, bool), {}

    env, prep = Env(), common.Prep(np.zeros(1), np.ones(1), np.array([-2.0]), np.array([2.0]))
    disc, plain = dope.rollout_values(env, lambda o: np.full((len(o), 1), 1.9, np.float32), prep, 0.1, 0.5,
                                      np.random.default_rng(0), 0)
    np.testing.assert_allclose(plain, [2.0, 3.0])
    np.testing.assert_allclose(disc, [1.5, 1.75])  # 1 + 0.5, 1 + 0.5 + 0.25
    a = np.concatenate(env.actions)
    assert a.max() <= 2.0 and a.std() > 0  # the noisy policy, clipped to the box by Prep.to_env


MB_GROUP, ESTIMATORS_RUN = "dualdice mb", ("is", "pdis", "wis", "dr", "fqe", "dualdice", "mb")
MB_FLAGS = "--mb-updates 20 --mb-horizon 5 --mb-hidden-dim 16 --mb-num-layers 2 --mb-ensemble 2"


def test_dope_report_end_to_end(tmp_path):
    """benchmarks/dope.py at tiny sizes: a bc family with kept checkpoints (2 evaluations x 2 seeds), its online truth, two
    ope.py processes at once, and the report; a second call reuses every stage's files."""
    from conftest import random_dataset

    data = random_dataset(tmp_path / "random.hdf5", n=600, max_steps=50)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "dope.py"), "--label", "t", "--dataset", str(data), "--eval-env", "Hopper-v4",
           "--train", "bc", "--train-flags", "--hidden-dim 16 --batch-size 32", "--num-updates", "40", "--eval-interval", "20",
           "--eval-episodes", "1", "--no-recipe-policies", "--truth-episodes", "3", "--ope-groups", "is pdis wis dr fqe", MB_GROUP,
           "--ope-flags", f"--hidden-dim 16 --batch-size 32 --fqe-updates 20 --dualdice-updates 20 "
           f"--bc-updates 20 {MB_FLAGS}", "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "results")]
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "results" / "t" / "dope.md").read_text()
    out = json.loads((tmp_path / "results" / "t" / "dope.json").read_text())
    assert len(out["policies"]) == 4 and {p["update"] for p in out["policies"]} == {20, 40}
    assert set(out["metrics"]) == set(ESTIMATORS_RUN) and (tmp_path / "results" / "t" / "scatter.png").stat().st_size > 0
    assert all(p["truth"]["episodes"] == 3 and p["truth"]["discounted_se"] >= 0 for p in out["policies"])
    assert "| bc | 2 |" in report and "rank correlation" in report  # the selection table: two runs (seeds) of bc
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0 and "[dope] truth" not in proc.stdout and "algorithms/ope.py" not in proc.stdout, proc.stdout[-2000:]


def test_dope_reuses_an_estimate_file_only_if_the_settings_it_read_are_unchanged():
    import dataclasses

    import tyro

    dope = _dope()
    flags = ["--env", "hopper-medium", "--policies", "a.msgpack"]
    config = dataclasses.asdict(tyro.cli(dope.ope.Args, args=flags))
    result = {"estimators": ["dualdice"], "config": config, "policies": [{"spec": "a.msgpack"}]}
    assert dope.same_run(result, flags, ["a.msgpack"])
    assert dope.same_run(result, [*flags, "--tau", "0.05", "--mb-updates", "7"], ["a.msgpack"])  # FQE's and MB's own
    assert not dope.same_run(result, [*flags, "--dualdice-updates", "7"], ["a.msgpack"])
    assert not dope.same_run(result, [*flags, "--discount", "0.9"], ["a.msgpack"])  # shared by every estimator
    assert not dope.same_run(result, flags, ["a.msgpack", "b.msgpack"])
    fqe = {**result, "estimators": ["is", "dr"]}
    assert not dope.same_run(fqe, [*flags, "--tau", "0.05"], ["a.msgpack"]) and dope.same_run(fqe, [*flags, "--nu-lr", "1"], ["a.msgpack"])

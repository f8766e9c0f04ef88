"""End-to-end smoke tests of every model-free script on a tiny Pendulum-v1 dataset (subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ALGORITHMS, RESULT_KEYS, load_script, run_script

SMALL = ["--eval-env", "Pendulum-v1", "--num-seeds", "2", "--eval-episodes", "2", "--hidden-dim", "32",
         "--batch-size", "64"]
# scripts' own small settings: the sequence models' short context and small beam search (planning is tt's
# evaluation), and BEAR's VAE (750 wide by default) and warm start (40k by default: the Q term would never run)
SMALL_MORE = {"dt": ["--seq-len", "5"], "tt": ["--seq-len", "7", "--num-layers", "2", "--horizon", "3", "--beam-width", "8"],
              "bear": ["--vae-hidden-dim", "32", "--warm-start", "30"]}
# updates between evaluations: 100 (so the device calls resize: 20, then the fitted size), but 20 for the scripts whose
# every new call length is a slow compile (20 is the first call's length: one compile per process)
UNIT = {"dt": 20, "tt": 20, "bear": 20, "cemq": 20, "cql": 20, "calql": 20}


def check_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_train_nan_guard_resume_and_evaluate(algo: str, tiny_dataset: Path, tmp_path: Path) -> None:
    run1, ckpt, u = tmp_path / "run1", tmp_path / "ckpt.msgpack", UNIT.get(algo, 100)
    # 1) train 2u updates, 2 vmapped seeds, evaluating every u
    proc = run_script(algo, "--dataset", tiny_dataset, *SMALL, *SMALL_MORE.get(algo, []), "--num-updates", 2 * u,
                      "--eval-interval", u, "--log-dir", run1, "--save-path", ckpt)
    check_ok(proc)
    result = json.loads((run1 / "result.json").read_text())
    assert RESULT_KEYS <= set(result) and result["interrupted"] is False
    assert result["algorithm"] == algo and result["num_updates"] == 2 * u and result["seeds"] == [0, 1]
    assert result["eval_env"] == "Pendulum-v1" and result["last_normalized"] is None  # no reference returns
    assert [s["seed"] for s in result["per_seed"]] == [0, 1]
    assert all(s["best_return"] >= s["last_return"] for s in result["per_seed"])
    assert [e["update"] for e in result["eval_history"]] == [u, 2 * u] and len(result["eval_history"][0]["returns"]) == 2
    assert result["updates_per_s"] > 0 and result["config"]["num_seeds"] == 2
    assert (run1 / "evals.csv").read_text().count("\n") == 1 + 2 * 2
    assert "None" not in proc.stdout and " ± " in proc.stdout  # two seeds: mean ± std; no None printed

    # 2) resume to 4u with a NaN injected at update 3.5u: updates 2u+1..3u are checkpointed, then the run stops with a
    #    one-line error naming the update, keeps that checkpoint, and writes no result for the failed part
    proc = run_script(algo, "--load", ckpt, "--num-updates", 4 * u, "--eval-interval", u,
                      env={"OFFRL_DEBUG_NAN_AT": str(7 * u // 2)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: non-finite") and f"at update {7 * u // 2}" in proc.stderr, proc.stderr[-2000:]
    assert "restored" in proc.stdout and f"update {3 * u}/{4 * u}" in proc.stdout
    assert json.loads((run1 / "result.json").read_text())["num_updates"] == 2 * u  # resumed in the same folder
    assert (run1 / "evals.csv").read_text().count("\n") == 1 + 3 * 2  # one curve: u, 2u, 3u

    # 3) evaluate the surviving checkpoint only, into a new folder
    proc = run_script(algo, "--load", ckpt, "--num-updates", "0", "--log-dir", tmp_path / "run3")
    check_ok(proc)
    result = json.loads((tmp_path / "run3" / "result.json").read_text())
    assert result["num_updates"] == 3 * u and [e["update"] for e in result["eval_history"]] == [3 * u]
    assert result["updates_per_s"] is None

    # 4) the checkpoint as a policy in the user's own code: one state or a batch, env units, the same action twice
    act = load_script(algo).load_policy(str(ckpt), seed=1)
    one, batch = act(np.zeros(3)), act(np.ones((4, 3)))
    assert one.shape == (1,) and batch.shape == (4, 1) and np.all(np.abs(batch) <= 2.0)  # Pendulum's bound
    if hasattr(act, "reset"):  # a policy with a history (dt, tt): told the reward, then started afresh
        act.observe(np.ones(4))
        act(np.ones((4, 3)))
        act.reset()
    np.testing.assert_array_equal(act(np.ones((4, 3))), batch)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_help_lists_choices_and_hides_testing_aids(algo: str) -> None:
    proc = run_script(algo, "--help")
    check_ok(proc)
    for flag in ("--num-seeds", "--eval-interval", "--load", "--dataset", "--save-path"):
        assert flag in proc.stdout
    assert "vmap" in proc.stdout  # field docstrings are shown
    assert "{auto,d4rl,minari,recipe}" in proc.stdout  # --source lists its choices
    assert "debug" not in proc.stdout.lower()

"""Tests of the LSPI tutorial (algorithms/lspi.py): LSTD-Q is exact on a tabular MDP, LSPI converges on the chain walk,
and the script runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script, run_script


@pytest.fixture(scope="module")
def lspi():
    return load_script("lspi")


def test_lstdq_recovers_the_exact_q_of_a_tabular_mdp(lspi):
    """A random deterministic MDP, every (s, a) once in the data, one-hot features: w = Q^pi exactly."""
    rng = np.random.default_rng(0)
    n_s, n_a, gamma = 5, 2, 0.9
    nxt, rew = rng.integers(0, n_s, (n_s, n_a)), rng.normal(size=(n_s, n_a))
    pi = rng.integers(0, n_a, n_s)
    # Q^pi(s, a) = r(s, a) + gamma Q^pi(s', pi(s')): solve the |S||A| linear system directly
    m = np.eye(n_s * n_a)
    for s in range(n_s):
        for a in range(n_a):
            m[s * n_a + a, nxt[s, a] * n_a + pi[nxt[s, a]]] -= gamma
    q_true = np.linalg.solve(m, rew.reshape(-1))
    s, a = np.repeat(np.arange(n_s), n_a), np.tile(np.arange(n_a), n_s)
    one_hot = np.eye(n_s * n_a)
    s2 = nxt[s, a]
    w = lspi.lstdq(one_hot[s * n_a + a], one_hot[s2 * n_a + pi[s2]], rew[s, a], np.zeros(len(s)), gamma, 0.0)
    np.testing.assert_allclose(w, q_true, rtol=1e-10, atol=1e-10)
    # a terminal transition bootstraps nothing
    term = np.zeros(len(s))
    term[0] = 1.0
    w = lspi.lstdq(one_hot[s * n_a + a], one_hot[s2 * n_a + pi[s2]], rew[s, a], term, gamma, 0.0)
    assert w[0] == pytest.approx(rew[0, 0])


def test_lspi_converges_to_the_optimal_policy_on_the_chain_walk(lspi):
    history = lspi.run_chain(lspi.Args(num_iterations=10))  # the switch point moves a state per iteration
    assert history[-1]["policy_changes"] == 0  # a fixed point
    assert history[-1]["true_value"] == pytest.approx(history[-1]["optimal_value"], rel=1e-3)
    assert history[-1]["predicted_q"] == pytest.approx(history[-1]["true_value"], rel=0.05)  # fitted on enough data


def test_script_writes_the_iterations_and_the_figure(tiny_dataset: Path, tmp_path: Path):
    proc = run_script("lspi", "--dataset", tiny_dataset, "--eval-env", "Pendulum-v1", "--num-iterations", "2",
                      "--eval-episodes", "2", "--num-features", "32", "--max-transitions", "2048", "--cem-samples", "8",
                      "--cem-elites", "2", "--chain-samples", "2000", "--log-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert [h["iteration"] for h in result["dataset_iterations"]] == [1, 2]
    assert all(np.isfinite(h["w_norm"]) and np.isfinite(h["predicted_q"]) for h in result["dataset_iterations"])
    assert (tmp_path / "lspi.png").stat().st_size > 0 and "iteration 2/2" in proc.stdout

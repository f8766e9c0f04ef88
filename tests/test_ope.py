"""algorithms/ope.py: the estimators against exact values (tabular MDPs, a linear-Gaussian system), the logged behaviour
densities against the shipped policy, the DOPE metrics against hand computations, and the script end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_script, random_dataset, run_script

import common
from recipe import build

ope = load_script("ope")
# the subprocesses are compile-bound on a small CPU: XLA's backend optimizations off makes them ~2x faster
FAST_COMPILE = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory):
    """The slow subprocesses, started at once and run beside the in-process tests: a 200-transition hopper-medium recipe
    dataset (10 envs x 20 steps), a tiny bc.py checkpoint (50 updates on uniformly random Hopper data), and ope.py given
    a policy file that does not exist."""
    d = tmp_path_factory.mktemp("ope")
    random_dataset(d / "random.hdf5", n=600, max_steps=100)
    cmds = {"recipe": [sys.executable, "-m", "recipe", "build", "hopper-medium", "--out", d / "recipe.hdf5", "--num-transitions", "200", "--seed", "0"],
            "bc": [sys.executable, ROOT / "algorithms" / "bc.py", "--dataset", d / "random.hdf5", "--eval-env", "Hopper-v4", "--num-updates", "50",
                   "--eval-interval", "50", "--eval-episodes", "1", "--hidden-dim", "32", "--batch-size", "64", "--log-dir", d / "bc",
                   "--save-path", d / "bc.msgpack"],
            "missing": [sys.executable, ROOT / "algorithms" / "ope.py", "--dataset", d / "random.hdf5", "--eval-env", "Hopper-v4",
                        "--policies", d / "missing.msgpack"]}
    files = {k: ((d / f"{k}.out").open("w"), (d / f"{k}.err").open("w")) for k in cmds}
    procs = {k: subprocess.Popen(list(map(str, c)), cwd=ROOT, env={**os.environ, **FAST_COMPILE}, stdout=files[k][0], stderr=files[k][1])
             for k, c in cmds.items()}
    yield {"dir": d, "procs": procs}
    for k, p in procs.items():
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in files[k]:
            f.close()


def finished(bg: dict, name: str, ok: bool = True) -> tuple[int, str]:
    """Wait for background process `name` (it must have succeeded if ok); its return code and stderr."""
    rc = bg["procs"][name].wait(timeout=300)
    err = (bg["dir"] / f"{name}.err").read_text()
    assert rc == 0 or not ok, f"{name}: exit {rc}\n{(bg['dir'] / f'{name}.out').read_text()[-2000:]}\n{err[-2000:]}"
    return rc, err


# ---- A small tabular MDP, every trajectory enumerated ----
def tabular_mdp(deterministic: bool) -> dict:
    """3 states, 2 actions, rewards R[s, a]; behaviour mu and target pi; stochastic transitions into a terminal state 2,
    or deterministic ones from a single initial state (no terminal)."""
    rng = np.random.default_rng(0)
    n_s, n_a = 3, 2
    if deterministic:
        nxt = np.array([[1, 2], [2, 0], [0, 1]])
        P, d0, terminal = np.eye(n_s)[nxt], np.array([1.0, 0.0, 0.0]), None
    else:
        P, d0, terminal = rng.dirichlet(np.ones(n_s), (n_s, n_a)), np.array([0.6, 0.4, 0.0]), 2
    return {"P": P, "R": rng.uniform(-1, 1, (n_s, n_a)), "d0": d0, "terminal": terminal, "horizon": 3, "gamma": 0.9,
            "mu": np.array([[0.5, 0.5], [0.3, 0.7], [0.6, 0.4]]), "pi": np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]])}


def exact_values(m: dict) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """J(pi) and the time-dependent Q_t, V_t of pi by backward recursion (the terminal state is worth 0)."""
    V, Qs, Vs = np.zeros(len(m["d0"])), [], []
    for _ in range(m["horizon"]):
        Vn = V.copy()
        if m["terminal"] is not None:
            Vn[m["terminal"]] = 0.0
        Q = m["R"] + m["gamma"] * m["P"] @ Vn
        V = (m["pi"] * Q).sum(1)
        Qs.insert(0, Q)
        Vs.insert(0, V)
    return float(m["d0"] @ Vs[0]), Qs, Vs


def enumerate_episodes(m: dict) -> list[tuple[list[int], list[int], float, bool]]:
    """Every episode (states, actions, behaviour probability, ended in the terminal state) of horizon <= H."""
    out = []

    def rec(states: list[int], actions: list[int], prob: float) -> None:
        s, t = states[-1], len(actions)
        for a in range(m["P"].shape[1]):
            for s2 in range(m["P"].shape[0]):
                p = prob * m["mu"][s, a] * m["P"][s, a, s2]
                if p == 0:
                    continue
                if s2 == m["terminal"] or t + 1 == m["horizon"]:
                    out.append((states, actions + [a], p, s2 == m["terminal"]))
                else:
                    rec(states + [s2], actions + [a], p)

    for s0 in np.flatnonzero(m["d0"]):
        rec([int(s0)], [], float(m["d0"][s0]))
    return out


def episodes_as_trajectories(m: dict, episodes: list) -> dict[str, np.ndarray]:
    """The episodes as a flat dataset (rewards, log-ratios, terminals, exact Q and V per row, episode ends), padded the way
    ope.py pads a dataset."""
    _, Qs, Vs = exact_values(m)
    rows = {k: [] for k in ("rewards", "log_ratios", "terminals", "q", "v")}
    for states, actions, _, term in episodes:
        for t, (s, a) in enumerate(zip(states, actions, strict=True)):
            rows["rewards"].append(m["R"][s, a])
            rows["log_ratios"].append(np.log(m["pi"][s, a]) - np.log(m["mu"][s, a]))
            rows["terminals"].append(float(term and t == len(actions) - 1))
            rows["q"].append(Qs[t][s, a])
            rows["v"].append(Vs[t][s])
    ends = np.cumsum([len(e[1]) for e in episodes])
    idx, mask = ope.trajectory_index(ends)
    out = {k: ope.to_trajectories(np.array(v), idx, mask) for k, v in rows.items()}
    terminals = np.array(rows["terminals"])
    return {**out, "mask": mask, "absorbing": terminals[ends - 1] > 0, "probs": np.array([e[2] for e in episodes])}


def test_is_pdis_wis_dr_are_exact_on_an_enumerated_mdp() -> None:
    m = tabular_mdp(deterministic=False)
    J, _, _ = exact_values(m)
    episodes = enumerate_episodes(m)
    tr = episodes_as_trajectories(m, episodes)
    assert np.isclose(tr["probs"].sum(), 1.0) and tr["absorbing"].any() and not tr["absorbing"].all()
    assert tr["mask"].sum(1).min() < tr["mask"].shape[1]  # episodes of different lengths
    res = ope.importance_sampling(tr["rewards"], tr["log_ratios"], tr["mask"], m["gamma"], sample_weights=tr["probs"],
                                  q_hat=tr["q"], v_hat=tr["v"], absorbing=tr["absorbing"])
    for name in ("is", "pdis", "wis", "dr"):
        assert np.isclose(res[name], J, rtol=1e-12, atol=1e-12), (name, float(res[name]), J)
    # WIS's normalizer must keep the terminated trajectories (absorbing: ratio 1, reward 0); leaving them out biases it
    res_cut = ope.importance_sampling(tr["rewards"], tr["log_ratios"], tr["mask"], m["gamma"], sample_weights=tr["probs"])
    assert abs(res_cut["wis"] - J) > 1e-3 and np.isclose(res_cut["pdis"], J, rtol=1e-12)
    # a zero model makes DR per-decision IS; the diagnostics are the trajectory weights' extremes and ESS
    res_zero = ope.importance_sampling(tr["rewards"], tr["log_ratios"], tr["mask"], m["gamma"], sample_weights=tr["probs"],
                                       q_hat=0 * tr["q"], v_hat=0 * tr["v"])
    assert np.isclose(res_zero["dr"], res_zero["pdis"], rtol=1e-12)
    w = np.exp(tr["log_ratios"].sum(1)) * tr["probs"] / tr["probs"].sum()
    assert np.isclose(res["ess"], w.sum() ** 2 / (w**2).sum())
    assert np.isclose(res["log_max_weight"], tr["log_ratios"].sum(1).max()) and np.isclose(res["log_min_weight"], tr["log_ratios"].sum(1).min())


def test_dr_with_the_exact_model_is_exact_for_every_single_trajectory() -> None:
    m = tabular_mdp(deterministic=True)
    J, _, _ = exact_values(m)
    episodes = enumerate_episodes(m)
    assert len(episodes) == 2 ** m["horizon"]  # only the actions branch
    tr = episodes_as_trajectories(m, episodes)
    is_values = []
    for i in range(len(episodes)):
        one = {k: tr[k][i:i + 1] for k in ("rewards", "log_ratios", "mask", "q", "v")}
        res = ope.importance_sampling(one["rewards"], one["log_ratios"], one["mask"], m["gamma"], q_hat=one["q"], v_hat=one["v"])
        assert np.isclose(res["dr"], J, rtol=1e-12), (i, float(res["dr"]), J)  # zero variance
        is_values.append(float(res["is"]))
    assert np.ptp(is_values) > 0.1  # while a single trajectory's IS estimate varies


def test_on_policy_data_gives_the_monte_carlo_return_and_weights_survive_huge_log_ratios() -> None:
    rng = np.random.default_rng(1)
    ends = np.cumsum(rng.integers(1, 30, 20))
    rewards = rng.normal(size=ends[-1])
    idx, mask = ope.trajectory_index(ends)
    r = ope.to_trajectories(rewards, idx, mask)
    for gamma in (0.9, 1.0):
        mc = ope.discounted_returns(rewards, ends, gamma).mean()
        res = ope.importance_sampling(r, np.zeros_like(r), mask, gamma)
        assert np.isclose(res["is"], mc) and np.isclose(res["pdis"], mc) and np.isclose(res["ess"], len(ends))
    np.testing.assert_allclose(ope.discounted_returns(rewards, ends, 1.0), common.episode_returns({"rewards": rewards}, {"episode_ends": ends}))
    # WIS of two one-step trajectories with log weights 1000 and 1000 + log 3: normalized weights 1/4 and 3/4, no overflow
    res = ope.importance_sampling(np.array([[1.0], [5.0]]), np.array([[1000.0], [1000.0 + np.log(3.0)]]), np.ones((2, 1), bool), 0.99)
    assert np.isclose(res["wis"], 0.25 * 1 + 0.75 * 5) and np.isclose(res["ess"], 16 / 10) and np.isinf(res["is"])


# ---- FQE and MB on a linear-Gaussian system ----
def linear_gaussian_system(n: int = 20000) -> dict:
    """s' = A s + B a + w, r = -(q s^2 + rho a^2), pi: a = K s + sigma eps. V^pi(s) = p s^2 + c with
    p = -(q + rho K^2) / (1 - gamma (A + B K)^2) and c = (-rho sigma^2 + gamma p (B^2 sigma^2 + W)) / (1 - gamma).
    Two policies (gains K); n transitions of a uniform behaviour, 500 initial states, and J of each policy."""
    rng = np.random.default_rng(0)
    A, B, noise, q, rho, gamma, sigma = 0.9, 0.5, 0.1, 1.0, 0.5, 0.8, 0.1
    s, a = rng.uniform(-1.2, 1.2, n), rng.uniform(-1, 1, n)  # behaviour: uniform actions, states around pi's
    s2 = A * s + B * a + noise * rng.standard_normal(n)
    s0 = rng.uniform(-1, 1, 500)
    gains = np.array([-0.4, 0.0])  # two policies, vmapped
    p = -(q + rho * gains**2) / (1 - gamma * (A + B * gains) ** 2)
    c = (-rho * sigma**2 + gamma * p * (B**2 * sigma**2 + noise**2)) / (1 - gamma)
    f32 = lambda x: np.asarray(x, np.float32)
    data = {"observations": f32(s[:, None]), "actions": f32(a[:, None]), "rewards": f32(-(q * s**2 + rho * a**2)),
            "next_observations": f32(s2[:, None]), "terminals": np.zeros(n, np.float32), "init_observations": f32(s0[:, None])}
    return {"A": A, "B": B, "noise": noise, "q": q, "rho": rho, "gamma": gamma, "sigma": sigma, "gains": gains, "s0": s0,
            "s2": s2, "true": p * np.mean(s0**2) + c, "data": data}


def test_fqe_matches_the_closed_form_value_of_a_linear_gaussian_system() -> None:
    m = linear_gaussian_system()
    f32 = lambda x: np.asarray(x, np.float32)
    gains = m["gains"]
    means = {"next": f32(gains[:, None, None] * m["s2"][None, :, None]), "init": f32(gains[:, None, None] * m["s0"][None, :, None])}
    args = ope.Args(discount=m["gamma"], policy_std=m["sigma"], hidden_dim=64, fqe_updates=2000, fqe_lr=1e-3, tau=0.05)
    out = ope.run_fqe(args, m["data"], means, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out["values"], m["true"], rtol=0.08)  # seeds 0-3 of this setup: within 4.2%


def test_model_rollout_with_the_exact_model_gives_the_closed_form_value() -> None:
    m = linear_gaussian_system(n=10)
    A, B, noise, q, rho = m["A"], m["B"], m["noise"], m["q"], m["rho"]

    def exact(params, key, obs, action):  # the true system as a model step
        nxt = A * obs + B * action + noise * jax.random.normal(key, obs.shape)
        return nxt, -(q * obs[:, 0] ** 2 + rho * action[:, 0] ** 2), jnp.zeros(len(obs), bool)

    obs0 = np.repeat(m["s0"][:, None], 8, 0)  # 8 rollouts per initial state
    for K, true in zip(m["gains"], m["true"], strict=True):
        ret, length = ope.model_rollout(exact, None, lambda o, K=K: K * o, obs0, 40, m["gamma"], m["sigma"], jax.random.PRNGKey(0))
        assert ret.shape == (len(obs0),) and (length == 40).all()
        # Monte-Carlo error (seeds 0-2) within 0.5%, the truncation gamma^40 = 1e-4 of the value; the deterministic
        # action mu(s) (no sigma eps) is 6% (K = -0.4) and 5% (K = 0) off
        np.testing.assert_allclose(ret.mean(), true, rtol=0.01)


def test_model_rollout_stops_accumulating_at_a_predicted_terminal() -> None:
    """A counter s' = s + 1 with reward 1 that terminates on its step from s = k - 1; from s = j the return is
    sum_{t <= k-1-j} gamma^t, or its first H terms if the horizon H comes first. Past the terminal the model's reward is NaN."""
    k, gamma, horizon = 5, 0.9, 12
    calls = []

    def counter(params, key, obs, action):
        s = obs[:, 0]
        return obs + 1.0, jnp.where(s < k, 1.0, jnp.nan), s >= k - 1

    def act(obs):
        calls.append(len(obs))
        return np.zeros((len(obs), 1))

    starts = np.array([0.0, 1.0, 3.0, 4.0, -10.0])  # the last one outlives the horizon
    ret, length = ope.model_rollout(counter, None, act, starts[:, None], horizon, gamma, 0.1, jax.random.PRNGKey(0))
    expected_length = np.minimum(k - starts, horizon)
    np.testing.assert_array_equal(length, expected_length)
    np.testing.assert_allclose(ret, (1 - gamma**expected_length) / (1 - gamma), rtol=1e-6)
    assert len(calls) == horizon
    calls.clear()  # all terminated after k steps: the rollout stops there, however long its horizon
    ret, length = ope.model_rollout(counter, None, act, starts[:4, None], 1000, gamma, 0.1, jax.random.PRNGKey(0))
    assert len(calls) == k and np.isfinite(ret).all() and np.allclose(ret, (1 - gamma ** (k - starts[:4])) / (1 - gamma))


def test_mb_model_recovers_deterministic_linear_dynamics_and_a_termination_rule() -> None:
    rng = np.random.default_rng(0)
    n, A, B, w = 5000, np.array([[0.9, 0.2], [-0.1, 0.8]]), np.array([0.5, -0.3]), np.array([1.0, -0.5])
    data_of = lambda s, a: {"observations": s, "actions": a, "next_observations": s @ A.T + a * B, "rewards": s @ w + 0.3 * a[:, 0],
                            "terminals": ((s @ A.T + a * B)[:, 0] > 0.5).astype(np.float32)}  # done: s'_0 > 0.5, a quarter of the rows
    data = data_of(rng.uniform(-1, 1, (n, 2)).astype(np.float32), rng.uniform(-1, 1, (n, 1)).astype(np.float32))
    args = ope.Args(mb_ensemble=2, mb_hidden_dim=32, mb_num_layers=2, mb_updates=2000, mb_holdout_ratio=0.1)
    model = ope.fit_dynamics(args, data, jax.random.PRNGKey(0))
    hold, var = model["holdout"], (data["next_observations"] - data["observations"]).var(0).mean()
    assert hold["num_rows"] == n // 10 and 0.15 < hold["terminal_rate"] < 0.35
    assert max(hold["obs_mse"]) < 1e-3 * var and max(hold["reward_mse"]) < 1e-3 * data["rewards"].var()
    assert max(hold["done_error"]) < 0.05  # seeds 0-2: at most 3.2% (a quarter of the rows are terminals)
    # the model step on new states: s' and r as the system's, done as the rule's away from its boundary
    new = data_of(rng.uniform(-1, 1, (1000, 2)).astype(np.float32), rng.uniform(-1, 1, (1000, 1)).astype(np.float32))
    nxt, rew, done = (np.asarray(x) for x in jax.jit(model["step"])(model["params"], jax.random.PRNGKey(1), new["observations"], new["actions"]))
    np.testing.assert_allclose(nxt, new["next_observations"], atol=0.05)
    np.testing.assert_allclose(rew, new["rewards"], atol=0.05)
    clear = np.abs(new["next_observations"][:, 0] - 0.5) > 0.05
    assert clear.sum() > 800 and (done == (new["terminals"] > 0))[clear].mean() > 0.99


def test_mb_learns_the_linear_gaussian_system_and_matches_the_closed_form_value() -> None:
    m = linear_gaussian_system(n=10000)
    args = ope.Args(discount=m["gamma"], policy_std=m["sigma"], mb_ensemble=3, mb_hidden_dim=32, mb_num_layers=2, mb_updates=2000,
                    mb_rollouts=4, batch_size=256)
    acts = [lambda o, K=K: K * o for K in m["gains"]]
    out = ope.run_mb(args, m["data"], acts, 40, jax.random.PRNGKey(0))
    hold = out["holdout"]
    assert hold["num_rows"] == 500 and np.all(np.array(hold["obs_mse"]) < 1.5 * m["noise"] ** 2)  # the noise's variance: 0.01
    assert (out["mean_length"] == 40).all() and np.all(np.array(hold["done_error"]) == 0)
    np.testing.assert_allclose(out["values"], m["true"], rtol=0.05)


# ---- DualDICE on a tabular MDP (infinite horizon, one-hot features: a tabular nu and zeta) ----
def test_dualdice_recovers_the_discounted_occupancy_ratio() -> None:
    rng = np.random.default_rng(0)
    n_s, n_a, gamma = 3, 2, 0.8
    P = rng.dirichlet(np.ones(n_s), (n_s, n_a))
    term = np.zeros((n_s, n_a))
    term[2, 1] = 0.5  # (s=2, a=1) ends the episode half the time: an absorbing state with nu = 0
    pi = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]])
    beta = np.array([0.5, 0.3, 0.2])
    d_data = rng.dirichlet(np.ones(n_s * n_a)).reshape(n_s, n_a)  # any data distribution with full support
    R = rng.uniform(-1, 1, (n_s, n_a))
    # exact: d^pi = (1 - gamma) (I - gamma P_pi^T)^-1 beta_pi over (s, a), P_pi sub-stochastic where episodes end
    P_pi = ((1 - term)[:, :, None, None] * P[:, :, :, None] * pi[None, None]).reshape(n_s * n_a, -1)
    beta_pi = (beta[:, None] * pi).ravel()
    d_pi = (1 - gamma) * np.linalg.solve(np.eye(n_s * n_a) - gamma * P_pi.T, beta_pi)
    ratio, J = d_pi / d_data.ravel(), beta_pi @ np.linalg.solve(np.eye(n_s * n_a) - gamma * P_pi, R.ravel())
    # the loss as an exact expectation: every (s, a, s', a', done) with its probability
    rows = []
    for s in range(n_s):
        for a in range(n_a):
            if term[s, a]:
                rows.append((s, a, 0, 0, 1.0, d_data[s, a] * term[s, a]))
            rows += [(s, a, s2, a2, 0.0, d_data[s, a] * (1 - term[s, a]) * P[s, a, s2] * pi[s2, a2]) for s2 in range(n_s) for a2 in range(n_a)]
    rows = np.array(rows)
    S, Ac = np.eye(n_s), np.eye(n_a)
    si, ai, s2i, a2i = (rows[:, i].astype(int) for i in range(4))
    batch = jax.tree.map(jnp.asarray, {"observations": S[si], "actions": Ac[ai], "next_observations": S[s2i], "next_actions": Ac[a2i],
                                       "terminals": rows[:, 4], "init_observations": np.repeat(S, n_a, 0), "init_actions": np.tile(Ac, (n_s, 1))})
    weights, init_weights = jnp.asarray(rows[:, 5]), jnp.asarray(beta_pi)
    table = lambda W: (lambda o, a: jnp.einsum("bs,sa,ba->b", o, W, a))

    def step(params, _):  # gradient descent on nu, ascent on zeta, on the same objective
        grads = jax.grad(lambda nu, zeta: ope.dualdice_loss(table(nu), table(zeta), batch, gamma, weights, init_weights), argnums=(0, 1))(*params)
        return (params[0] - 1.0 * grads[0], params[1] + 1.0 * grads[1]), None

    (_, zeta), _ = jax.jit(lambda p: jax.lax.scan(step, p, None, length=5000))((jnp.zeros((n_s, n_a)), jnp.zeros((n_s, n_a))))
    zeta = np.asarray(zeta).ravel()
    np.testing.assert_allclose(zeta, ratio, rtol=1e-3, atol=1e-3)
    assert np.isclose((d_data.ravel() * zeta) @ R.ravel() / (1 - gamma), J, rtol=1e-3)  # the value estimate E_D[w r] / (1 - gamma)
    assert (d_data.ravel() * zeta).sum() < 0.99  # E_D[w] < 1: the absorbing state's occupancy is not in the data


# ---- Behaviour densities ----
@pytest.fixture(scope="module")
def recipe_file(background: dict) -> Path:
    """The 200-transition hopper-medium recipe dataset (10 envs x 20 steps)."""
    finished(background, "recipe")
    return background["dir"] / "recipe.hdf5"


def test_logged_log_probs_are_the_shipped_policys(recipe_file: Path) -> None:
    data, info = common.load_dataset(str(recipe_file))
    assert info["source_kind"] == "recipe"
    logp = ope.logged_log_probs(info, len(data["rewards"]))
    # recompute with recipe/build.py's NumpyPolicy: its noise is redrawn as build.collect draws it (generator [seed, env],
    # one standard-normal vector per env and step; env i's 20 transitions are rows 20 i .. 20 i + 19)
    policy = build.NumpyPolicy(build.policy_path("hopper", "medium"))
    per_env, act_dim = 200 // build.K_ENVS, data["actions"].shape[1]
    eps = np.concatenate([np.stack([g.standard_normal(act_dim, dtype=np.float32) for _ in range(per_env)])
                          for g in (np.random.default_rng([0, i]) for i in range(build.K_ENVS))])
    actions, expected = policy(data["observations"], eps)
    np.testing.assert_allclose(actions, data["actions"], atol=1e-5)  # the same noise, so the same actions (up to BLAS batching)
    np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-4)
    # hopper's box is [-1, 1]: the unit-space density is the env-unit one
    prep = common.Prep.fit(data, common.make_eval_env(info, 1).single_action_space, True)
    np.testing.assert_allclose(ope.unit_log_prob(logp, prep.act_low, prep.act_high), logp)


def test_unit_log_prob_is_the_density_of_the_affine_map() -> None:
    low, high = np.array([0.0, -2.0]), np.array([4.0, 2.0])
    mean, std, a_unit = np.array([0.1, -0.3]), np.array([0.2, 0.5]), np.array([[0.3, 0.1], [-0.5, 0.9]])
    a_env = low + (a_unit + 1) * (high - low) / 2
    scale = (high - low) / 2  # a_env ~ N(low + (mean + 1) scale, (std scale)^2)
    log_env = np.asarray(ope.gaussian_log_prob(low + (mean + 1) * scale, np.log(std * scale), a_env))
    np.testing.assert_allclose(ope.unit_log_prob(log_env, low, high), np.asarray(ope.gaussian_log_prob(mean, np.log(std), a_unit)), rtol=1e-5)


def test_behaviour_cloning_recovers_a_gaussian_behaviour() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    obs = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    mean, std = np.tanh(obs @ np.array([[0.8], [-0.5]])), 0.2 + 0.1 * (obs[:, :1] > 0)
    act = (mean + std * rng.standard_normal((n, 1))).astype(np.float32)
    true = np.asarray(ope.gaussian_log_prob(mean, np.log(std), act))
    args = ope.Args(hidden_dim=32, bc_updates=2000, batch_size=256)
    logp, nll = ope.fit_behavior(args, {"observations": obs, "actions": act}, jax.random.PRNGKey(0))
    assert logp.shape == (n,) and np.isclose(nll, -logp.mean(), atol=0.1)
    assert abs(logp.mean() - true.mean()) < 0.05  # nats per action: the fitted density is the behaviour's


# ---- DOPE metrics ----
def test_dope_metrics_against_hand_computation() -> None:
    true = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]  # normalized: 0, .2, .4, .6, .8, 1
    est = [15.0, 12.0, 35.0, 200.0, 45.0, 10.0]  # normalized: .1, .04, .5, 3.8 -> clipped to 2, .7, 0
    m = ope.dope_metrics(true, est, n_boot=200, seed=0)
    np.testing.assert_allclose(m["normalized_estimates"], [0.1, 0.04, 0.5, 2.0, 0.7, 0.0], atol=1e-12)
    assert np.isclose(m["abs_error"]["value"], (0.1 + 0.16 + 0.1 + 1.4 + 0.1 + 1.0) / 6)
    # ranks of est: 3 2 4 6 5 1; d = -2 0 -1 -2 0 5; rho = 1 - 6 * 34 / (6 * 35)
    assert np.isclose(m["rank_correlation"]["value"], 1 - 6 * 34 / 210)
    assert np.isclose(m["regret@1"]["value"], 0.4)  # picks policy 4 (normalized .6)
    assert np.isclose(m["regret@5"]["value"], 0.2)  # the top 5 miss only the best policy; best among them: .8
    for name in ("abs_error", "rank_correlation", "regret@1", "regret@5"):
        assert m[name]["ci_low"] <= m[name]["boot_mean"] <= m[name]["ci_high"]
    assert ope.dope_metrics(true, est, n_boot=200, seed=0) == m  # seeded
    perfect = ope.dope_metrics(true, true, n_boot=100)
    assert perfect["abs_error"]["ci_high"] == 0.0 and perfect["regret@1"]["ci_high"] == 0.0 and perfect["rank_correlation"]["ci_low"] == 1.0
    np.testing.assert_allclose(ope.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert np.isclose(ope.spearman([1, 2, 2, 3], [1, 3, 2, 4]), np.corrcoef([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0, 1])


# ---- The script ----
def test_policy_specs() -> None:
    assert ope.parse_policy("recipe:hopper-medium").algorithm == "recipe-sac"
    for bad, msg in (("recipe:hopper-random", "no shipped behaviour policy"), ("/nonexistent/ckpt.msgpack:2", "/nonexistent/ckpt.msgpack does not exist")):
        with pytest.raises(common.RunError, match=msg):
            ope.parse_policy(bad)


def test_script_evaluates_checkpoints_and_shipped_policies(recipe_file: Path, background: dict, tmp_path: Path) -> None:
    finished(background, "bc")
    ckpt = background["dir"] / "bc.msgpack"
    out = tmp_path / "ope.json"
    proc = run_script("ope", "--dataset", recipe_file, "--eval-env", "Hopper-v4", "--policies", ckpt, f"{ckpt}:0", "recipe:hopper-medium",
                      "--fqe-updates", "200", "--dualdice-updates", "200", "--hidden-dim", "32", "--mb-updates", "20", "--mb-horizon", "5",
                      "--mb-hidden-dim", "16", "--mb-num-layers", "2", "--out", out, env=FAST_COMPILE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["behavior"] == "logged" and result["estimators"] == list(ope.ESTIMATORS) and result["source_kind"] == "recipe"
    assert [p["algorithm"] for p in result["policies"]] == ["bc", "bc", "recipe-sac"]
    for p in result["policies"]:
        assert set(p["estimates"]) == set(ope.ESTIMATORS) and all(np.isfinite(v) for v in p["estimates"].values()), p
        assert set(p["wall_time_s"]) == set(ope.ESTIMATORS) and p["is_weights"]["num_trajectories"] == 10
        assert 1.0 <= p["is_weights"]["ess"] <= 10.0 and p["is_weights"]["log_max_weight"] >= p["is_weights"]["log_min_weight"]
        assert 1.0 <= p["mb_mean_rollout_length"] <= 5.0
    mb = result["mb_model"]
    assert mb["horizon"] == 5 and len(mb["final_loss"]) == 5 and mb["holdout"]["num_rows"] == 10  # 5% of 200 transitions
    assert all(np.isfinite(mb["holdout"][k]).all() for k in ("nll", "obs_mse", "reward_mse", "done_error"))
    same = [{k: p["estimates"][k] for k in ("is", "pdis", "wis")} for p in result["policies"][:2]]
    assert same[0] == same[1]  # PATH and PATH:0 are the same run (FQE and DualDICE differ by their seeds)
    assert sum(line.startswith("[ope] ") and line.split()[3] in ope.ESTIMATORS for line in proc.stdout.splitlines()) == 3 * len(ope.ESTIMATORS)


def test_missing_policy_is_a_one_line_error(background: dict) -> None:
    rc, err = finished(background, "missing", ok=False)
    assert rc != 0 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("error: policy checkpoint") and "missing.msgpack does not exist" in err


def test_one_member_per_row_routes_each_row_through_one_random_member_in_equal_shares() -> None:
    members = {"w": jnp.array([1.0, 2.0, 3.0])}  # member i multiplies by i + 1
    x = jnp.arange(1.0, 11.0)[:, None]  # 10 rows: padded to 12, 4 per member, 2 of them repeats
    seen = []
    for k in range(20):
        y = np.asarray(ope.one_member_per_row(lambda p, r: r * p["w"], members, x, jax.random.PRNGKey(k)))[:, 0]
        factor = y / np.arange(1.0, 11.0)  # each row's own input, times one member's factor
        assert set(np.round(factor, 6)) <= {1.0, 2.0, 3.0}
        assert all(2 <= np.sum(factor == f) <= 4 for f in (1.0, 2.0, 3.0))  # equal groups, less the padding
        seen.append(factor)
    assert len({tuple(f) for f in seen}) > 1  # a fresh assignment per key

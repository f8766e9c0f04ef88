"""LSPI -- a tutorial: least-squares policy iteration offline, and why even a linear Q-function collapses there.

Lagoudakis & Parr, "Least-Squares Policy Iteration", JMLR 2003 (LSTD-Q: Sec. 5, Fig. 5; LSPI: Sec. 6, Fig. 8).
Random Fourier features: Rahimi & Recht, "Random Features for Large-Scale Kernel Machines", NeurIPS 2007.

    python algorithms/lspi.py --env halfcheetah-medium          # the collapse on a continuous-action dataset, and the control
    python algorithms/lspi.py --env hopper-medium-replay --num-iterations 8 --eval-episodes 5

CS285's offline RL lecture brings in linear fitted value functions to make one point: the trouble offline is not the
network. LSTD-Q solves for the Q-function of a policy pi in closed form from a fixed dataset,

    Q(s, a) = w^T phi(s, a),   A w = b,   A = sum_i phi_i (phi_i - gamma (1 - d_i) phi(s'_i, pi(s'_i)))^T,   b = sum_i phi_i r_i,

and LSPI alternates that with greedy improvement, pi(s) = argmax_a w^T phi(s, a). With continuous actions the argmax
is a search over the whole action box (here CEM, as QT-Opt does), and it lands on actions the data never shows, where
w^T phi is extrapolated, not fitted. The next LSTD-Q then bootstraps from those values: |w| and the predicted
Q(s0, pi(s0)) grow from one iteration to the next while the policy's true return does not. The control is a small
discrete chain MDP with data on every state-action pair: the argmax only ever queries what the data covers, and LSPI
converges to the optimal policy in a few iterations (Lagoudakis & Parr's chain walk, Sec. 9.1).

The file writes result.json (every iteration of both runs) and lspi.png (the two side by side) into --log-dir.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # common.py beside me first
import common  # noqa: E402

ALGORITHM = "lspi"


# ---- Config ----
@dataclass
class Args:
    env: str = "halfcheetah-medium"
    """Dataset name <env>-<kind>[-v2]: env hopper/halfcheetah/walker2d/ant, kind random/medium/expert/medium-replay/medium-expert/full-replay."""
    dataset: str | None = None
    """A D4RL-layout HDF5 file, a Minari dataset folder or a Minari dataset id, instead of --env."""
    eval_env: str | None = None
    """Gymnasium id to evaluate in, e.g. Hopper-v4. Default: the env the dataset names or records."""
    source: Literal["auto", "d4rl", "minari", "recipe"] = "auto"
    """Where a named dataset is looked up: auto tries d4rl, minari, then recipe (this project's D4RL-recipe data)."""
    seed: int = 0
    """Random seed of the features, the transition subset, CEM and the evaluation episodes."""
    eval_episodes: int = 10
    """Episodes of the greedy policy in the eval env after every iteration (its true return)."""
    log_dir: str | None = None
    """Folder of result.json and lspi.png. Default: runs/<algorithm>/<dataset>/<seed>-<time>."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std before the features."""
    num_iterations: int = 10
    """LSPI iterations (policy evaluation by LSTD-Q, then greedy improvement)."""
    num_features: int = 512
    """Random Fourier features of (s, a): phi = sqrt(2 / D) cos(W [s; a] + b), W ~ N(0, 1 / lengthscale^2), b ~ U(0, 2 pi)."""
    lengthscale: float = 1.0
    """Lengthscale of the features' Gaussian kernel, on standardized states and [-1, 1] actions."""
    ridge: float = 1e-3
    """Ridge term: A + ridge * N * I, N the number of transitions (keeps the solve well posed)."""
    max_transitions: int = 100_000
    """Transitions used, a random subset (the argmax over actions at every s' is the cost of an iteration)."""
    discount: float = 0.99
    """Discount gamma of LSTD-Q and of the predicted and true discounted values."""
    cem_iterations: int = 2
    """CEM rounds of the greedy argmax_a w^T phi(s, a) (QT-Opt's value, as in cemq.py)."""
    cem_samples: int = 64
    """Actions sampled per state in each CEM round (QT-Opt: 64)."""
    cem_elites: int = 6
    """Elites the next CEM round is fitted to (QT-Opt: 6)."""
    chain_states: int = 20
    """States of the discrete control task (a chain walk: reward 1 at either end, moves succeed with p = 0.9)."""
    chain_samples: int = 10_000
    """Uniformly random transitions of the chain walk in its dataset (every state-action pair many times)."""
    chain_discount: float = 0.9
    """Discount of the chain walk (Lagoudakis & Parr Sec. 9.1: 0.9)."""


# ---- LSTD-Q: the closed-form policy evaluation ----
def lstdq(phi: np.ndarray, phi_next: np.ndarray, rewards: np.ndarray, terminals: np.ndarray, discount: float,
          ridge: float) -> np.ndarray:
    """w solving A w = b (Lagoudakis & Parr Fig. 5) in float64: phi [N, D] at (s, a), phi_next [N, D] at (s', pi(s'))."""
    phi, phi_next = np.asarray(phi, np.float64), np.asarray(phi_next, np.float64)
    a = phi.T @ (phi - discount * (1.0 - np.asarray(terminals, np.float64))[:, None] * phi_next)
    b = phi.T @ np.asarray(rewards, np.float64)
    return np.linalg.solve(a + ridge * len(phi) * np.eye(phi.shape[1]), b)


# ---- The discrete control: a chain walk, tabular features ----
def chain_mdp(n: int, p: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Transition tensor P [n, 2, n] (action 0 left, 1 right; the move succeeds with p, else goes the other way;
    the ends reflect) and reward R [n] for being in a state: 1 at both ends, else 0."""
    P = np.zeros((n, 2, n))
    for s in range(n):
        left, right = max(s - 1, 0), min(s + 1, n - 1)
        P[s, 0, left] += p
        P[s, 0, right] += 1 - p
        P[s, 1, right] += p
        P[s, 1, left] += 1 - p
    R = np.zeros(n)
    R[[0, n - 1]] = 1.0
    return P, R


def policy_values(P: np.ndarray, R: np.ndarray, policy: np.ndarray, discount: float) -> np.ndarray:
    """Exact V^pi [n] of a deterministic policy [n] -> {0, 1}, rewards r(s, a, s') = R[s']: (I - gamma P_pi)^-1 P_pi R."""
    P_pi = P[np.arange(len(policy)), policy]
    return np.linalg.solve(np.eye(len(policy)) - discount * P_pi, P_pi @ R)


def run_chain(args: Args) -> list[dict]:
    """LSPI on the chain walk from uniformly random data with one-hot (s, a) features: it converges."""
    rng = np.random.default_rng(args.seed)
    n = args.chain_states
    P, R = chain_mdp(n)
    s = rng.integers(0, n, args.chain_samples)
    a = rng.integers(0, 2, args.chain_samples)
    s_next = (P[s, a].cumsum(-1) > rng.random(len(s))[:, None]).argmax(-1)  # one draw from P(.|s, a) per row
    one_hot = lambda s_, a_: np.eye(2 * n)[2 * s_ + a_]  # noqa: E731 - tabular features
    optimal = optimal_values(P, R, args.chain_discount)
    policy, history = np.zeros(n, int), []
    for k in range(args.num_iterations):
        w = lstdq(one_hot(s, a), one_hot(s_next, policy[s_next]), R[s_next], np.zeros(len(s)), args.chain_discount, 1e-9)
        q = w.reshape(n, 2)
        policy_new = q.argmax(1)
        v_true = policy_values(P, R, policy_new, args.chain_discount)
        history.append({"iteration": k + 1, "w_norm": float(np.linalg.norm(w)),
                        "predicted_q": float(q.max(1).mean()), "true_value": float(v_true.mean()),
                        "optimal_value": float(optimal.mean()), "policy_changes": int((policy_new != policy).sum())})
        policy = policy_new
    return history


def optimal_values(P: np.ndarray, R: np.ndarray, discount: float, sweeps: int = 2000) -> np.ndarray:
    """V* [n] of the true chain by value iteration, V(s) = max_a sum_s' P(s'|s, a) (R[s'] + gamma V(s'))."""
    v = np.zeros(len(R))
    for _ in range(sweeps):
        v = (P @ (R + discount * v)).max(1)
    return v


# ---- The continuous collapse: random Fourier features and a CEM argmax ----
def make_features(key: jax.Array, obs_dim: int, act_dim: int, num_features: int, lengthscale: float) -> dict:
    k_w, k_b = jax.random.split(key)
    w = jax.random.normal(k_w, (obs_dim + act_dim, num_features)) / lengthscale
    return {"w_s": w[:obs_dim], "w_a": w[obs_dim:], "b": jax.random.uniform(k_b, (num_features,), maxval=2 * jnp.pi)}


def features(f: dict, obs: jax.Array, act: jax.Array) -> jax.Array:
    """phi(s, a) [..., D] for obs [..., obs] and act [..., act] (broadcasting), sqrt(2 / D) cos(W [s; a] + b)."""
    return jnp.sqrt(2.0 / f["b"].shape[0]) * jnp.cos(obs @ f["w_s"] + act @ f["w_a"] + f["b"])


def cem_argmax(key: jax.Array, score_fn: Callable[[jax.Array], jax.Array], batch: int, act_dim: int,
               iterations: int, samples: int, elites: int) -> tuple[jax.Array, jax.Array]:
    """The cross-entropy method on [-1, 1]^act_dim for a batch of states (as in cemq.py): a uniform first round, then
    Gaussians fitted to each round's elites (jax.lax.top_k). score_fn: [batch, n, act] -> [batch, n]. Returns the best
    sample of all rounds and its score."""
    keys = jax.random.split(key, iterations)
    cand = jax.random.uniform(keys[0], (batch, samples, act_dim), minval=-1.0, maxval=1.0)
    best_a, best_q = jnp.zeros((batch, act_dim)), jnp.full((batch,), -jnp.inf)
    for i in range(iterations):
        q = score_fn(cand)
        top_q, top_i = jax.lax.top_k(q, elites)
        elite = jnp.take_along_axis(cand, top_i[..., None], axis=1)
        better = top_q[:, 0] > best_q
        best_a, best_q = jnp.where(better[:, None], elite[:, 0], best_a), jnp.where(better, top_q[:, 0], best_q)
        if i + 1 < iterations:
            eps = jax.random.normal(keys[i + 1], (batch, samples, act_dim))
            cand = jnp.clip(elite.mean(1)[:, None, :] + (elite.std(1)[:, None, :] + 1e-6) * eps, -1.0, 1.0)
    return best_a, best_q


def make_greedy(args: Args, f: dict, act_dim: int, chunk: int = 1024) -> Callable:
    """greedy(key, w, obs [N, obs]) -> (argmax actions [N, act], their w^T phi [N]), N a multiple of chunk, in one jitted
    call (lax.map over chunks keeps the [chunk, samples, D] features small)."""

    @jax.jit
    def greedy(key: jax.Array, w: jax.Array, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        def one_chunk(key_obs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            k, o = key_obs
            return cem_argmax(k, lambda a: features(f, o[:, None, :], a) @ w, o.shape[0], act_dim,
                              args.cem_iterations, args.cem_samples, args.cem_elites)

        obs_chunks = obs.reshape(-1, chunk, obs.shape[-1])
        a, q = jax.lax.map(one_chunk, (jax.random.split(key, obs_chunks.shape[0]), obs_chunks))
        return a.reshape(-1, act_dim), q.reshape(-1)

    return greedy


def greedy_policy(greedy: Callable, key: jax.Array, w: np.ndarray, prep: common.Prep, chunk: int) -> tuple[Callable, Callable]:
    """(act(obs) -> env actions, q(obs) -> max_a w^T phi) of the greedy policy of w, for raw env states [E, obs]."""
    w32 = jnp.asarray(w, jnp.float32)

    def run(o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        o = (np.asarray(o, np.float32) - prep.obs_mean) / prep.obs_std
        a, q = greedy(key, w32, jnp.asarray(np.concatenate([o, np.zeros(((-len(o)) % chunk, o.shape[1]), np.float32)])))
        return np.asarray(a)[: len(o)], np.asarray(q)[: len(o)]

    return (lambda o: prep.to_env(run(o)[0])), (lambda o: run(o)[1])


def rollout(env, act_fn: Callable[[np.ndarray], np.ndarray], seed: int, discount: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One episode per sub-env: (initial states, undiscounted returns, discounted returns)."""
    obs, _ = env.reset(seed=seed)
    obs0, ret, disc, done, t = obs.copy(), np.zeros(env.num_envs), np.zeros(env.num_envs), np.zeros(env.num_envs, bool), 0
    while not done.all():
        obs, r, term, trunc, _ = env.step(act_fn(obs.astype(np.float32)))
        ret += np.where(done, 0.0, r)
        disc += np.where(done, 0.0, discount**t * r)
        done |= term | trunc
        t += 1
    return obs0, ret, disc


def run_dataset(args: Args, data: dict, info: dict) -> list[dict]:
    """LSPI on a continuous-action dataset: logs |w|, the predicted Q(s0, pi(s0)) and the true return per iteration."""
    env = common.make_eval_env(info, args.eval_episodes, args.seed)
    prep = common.Prep.fit(data, env.single_action_space, args.normalize_states)
    arrays = prep.arrays(data)
    rng = np.random.default_rng(args.seed)
    chunk = 1024
    n = min(args.max_transitions, len(arrays["rewards"])) // chunk * chunk
    idx = rng.choice(len(arrays["rewards"]), n, replace=False)
    obs, act, next_obs = (jnp.asarray(arrays[k][idx]) for k in ("observations", "actions", "next_observations"))
    rewards, terminals = arrays["rewards"][idx], arrays["terminals"][idx]
    key = jax.random.PRNGKey(args.seed)
    key, k_f = jax.random.split(key)
    f = make_features(k_f, prep.obs_dim, prep.act_dim, args.num_features, args.lengthscale)
    greedy = make_greedy(args, f, prep.act_dim, chunk)
    phi = np.asarray(features(f, obs, act))
    w = np.zeros(args.num_features)  # pi_0 = the greedy policy of Q = 0: CEM's first uniform sample
    history = []
    for k in range(args.num_iterations):
        t0 = time.perf_counter()
        key, k_next, k_eval = jax.random.split(key, 3)
        next_act, _ = greedy(k_next, jnp.asarray(w, jnp.float32), next_obs)  # pi_k(s') for every s'
        w = lstdq(phi, np.asarray(features(f, next_obs, next_act)), rewards, terminals, args.discount, args.ridge)
        act_fn, q_at = greedy_policy(greedy, k_eval, w, prep, chunk)  # the new greedy policy pi_{k+1}
        obs0, ret, disc = rollout(env, act_fn, args.seed + 10_000, args.discount)
        q0 = q_at(obs0)
        history.append({"iteration": k + 1, "w_norm": float(np.linalg.norm(w)), "predicted_q": float(q0.mean()),
                        "true_discounted": float(disc.mean()), "true_return": float(ret.mean()),
                        "normalized": None if (s := common.normalized_score(info, ret)) is None else float(np.mean(s)),
                        "q_data": float((phi @ w).mean()), "seconds": time.perf_counter() - t0})
        h = history[-1]
        print(f"[lspi] iteration {k + 1}/{args.num_iterations} | |w| {h['w_norm']:.3g} | predicted Q(s0, pi(s0)) "
              f"{h['predicted_q']:.4g} | true discounted {h['true_discounted']:.4g} | return {h['true_return']:.1f} | "
              f"Q on data {h['q_data']:.4g} | {h['seconds']:.0f}s", flush=True)
    return history


def plot(path: Path, dataset: list[dict], chain: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    it = [h["iteration"] for h in dataset]
    a1.plot(it, [abs(h["predicted_q"]) for h in dataset], "o-", label="|predicted Q(s0, pi(s0))|")
    a1.plot(it, [abs(h["true_discounted"]) for h in dataset], "s-", label="|true discounted return|")
    a1.plot(it, [h["w_norm"] for h in dataset], "^--", label="|w|")
    a1.set(yscale="log", xlabel="LSPI iteration", title=f"{name}: continuous actions, CEM argmax")
    a1.legend()
    it = [h["iteration"] for h in chain]
    a2.plot(it, [h["predicted_q"] for h in chain], "o-", label="predicted max_a Q (mean over states)")
    a2.plot(it, [h["true_value"] for h in chain], "s-", label="true V of the greedy policy")
    a2.axhline(chain[0]["optimal_value"], color="k", ls=":", label="optimal V")
    a2.set(xlabel="LSPI iteration", title="control: chain walk, data on every (s, a)")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- Main ----
def main(args: Args) -> dict:
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    log_dir = Path(args.log_dir or f"runs/{ALGORITHM}/{info['dataset']}/{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[lspi] {info['dataset']} ({info['source']}): {args.num_iterations} iterations on "
          f"{min(args.max_transitions, len(data['rewards']))} transitions; logs in {log_dir}", flush=True)
    chain = run_chain(args)
    print(f"[lspi] control (chain walk): true V {chain[0]['true_value']:.3f} -> {chain[-1]['true_value']:.3f} "
          f"(optimal {chain[-1]['optimal_value']:.3f}); policy changes {[h['policy_changes'] for h in chain]}", flush=True)
    dataset = run_dataset(args, data, info)
    result = {"algorithm": ALGORITHM, "dataset": info["dataset"], "source": info["source"], "config": asdict(args),
              "dataset_iterations": dataset, "chain_iterations": chain}
    (log_dir / "result.json").write_text(json.dumps(result, indent=2))
    plot(log_dir / "lspi.png", dataset, chain, info["dataset"])
    print(f"[lspi] result.json and lspi.png in {log_dir}", flush=True)
    return result


if __name__ == "__main__":
    common.cli(Args, main)

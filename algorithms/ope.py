"""Off-policy evaluation (OPE) -- single-file JAX/Flax implementation: the value of saved policies from a dataset alone.

    python algorithms/ope.py --env hopper-medium --policies runs/iql/.../checkpoint.msgpack runs/cql/.../checkpoint.msgpack:1
    python algorithms/ope.py --env hopper-medium --policies recipe:hopper-medium recipe:hopper-expert --estimators fqe dr
    python algorithms/ope.py --dataset my.hdf5 --eval-env Hopper-v4 --policies ckpt.msgpack --behavior bc --out ope.json
    python algorithms/ope.py --env hopper-medium --policies ckpt.msgpack --estimators is pdis wis --discount 1.0  # undiscounted

    from ope import dope_metrics; dope_metrics(true_values, estimates)   # DOPE's metrics of a family of policies

Estimators (`--estimators`, default all), every one of the SAME quantity, defined once:

    J(pi) = E[ sum_t gamma^t r_t ],  s_0 ~ the dataset's initial states, a_t ~ pi(.|s_t)     (--discount gamma, default 0.99)

    is        trajectory-wise importance sampling (Precup, Sutton & Singh 2000)
    pdis      per-decision importance sampling (Precup et al. 2000)
    wis       self-normalized per-decision IS: the cumulative ratios normalized over trajectories at each step
              (Thomas 2015, PhD thesis: CWPDIS)
    dr        doubly robust, per-decision form (Jiang & Li 2016; Thomas & Brunskill 2016), with FQE's Q as its model
    fqe       fitted Q evaluation (Le, Voloshin & Yue 2019): the mean over the initial states of E_{a~pi} Q(s_0, a)
    dualdice  DualDICE (Nachum, Chow, Dai & Li 2019): J = E_D[w(s,a) r] / (1 - gamma), w = d^pi / d^D
    mb        model-based (DOPE's "MB", Fu et al. 2021; Paduraru 2007): a learned ensemble of Gaussian dynamics/reward models
              and a termination classifier, rolled out from the initial states under pi

The IS family weighs each recorded episode as it is, so it estimates the return up to the episode's end: a terminal ends it
(absorbing, zero reward after), and a timeout-cut episode, like the file's cut-off last one, simply ends there. FQE and
DualDICE bootstrap through timeouts and estimate the infinite-horizon value; with gamma = 0.99 and 1000-step episodes the
difference, gamma^1000 = 4e-5 of the value, is negligible. MB rolls the model out for --mb-horizon steps (default: the eval
env's time limit, the online episode's length) and ends a rollout where its termination head predicts a terminal
(probability > 1/2), so it estimates the return up to the time limit or termination, as online evaluation does. FQE and DualDICE need gamma < 1
(`--discount 1.0`, the undiscounted return that online evaluation reports, is for is/pdis/wis/mb only).
`discounted_returns` computes the same quantity from episodes, for the online ground truth.

Which policy is evaluated. A deterministic policy has no density, so importance sampling cannot weigh it. Every policy is
therefore evaluated as the Gaussian pi(a|s) = N(mu(s), sigma^2 I) in the normalized action box [-1, 1] (the units every
algorithm trains in, common.Prep.to_unit), mu(s) the checkpoint's deterministic action and sigma = --policy-std (0.1, as
DOPE's reference code, google-research/policy_eval, --target_policy_std). The env clips actions to its box; the densities
here do not model that (IS weighs the data's in-box actions by the unclipped Gaussian density), while FQE and DualDICE
sample the executed action clip(mu + sigma eps, -1, 1). THE ONLINE GROUND TRUTH MUST RUN THIS SAME NOISY POLICY, clipped
by the env, not the deterministic one: `Prep.to_env(mu + sigma * eps)`. MB's rollouts execute the same clipped action.

Behaviour policy (for is/pdis/wis/dr). Recipe datasets (recipe/) store the exact log-density of every action under the SAC
behaviour policy that took it (`infos/action_log_probs`); `--behavior auto` uses those for recipe files and otherwise fits a
state-conditioned diagonal Gaussian by maximum likelihood (behaviour cloning, --bc-updates); `logged`/`bc` force one. The
output records which (`"behavior"`). Both are turned into [-1, 1] units, the units of pi's density.

Policies (`--policies`): `PATH` or `PATH:SEED` (a checkpoint of any algorithms/<name>.py with a `load_policy`; SEED is the
run within a --num-seeds checkpoint, default 0) or `recipe:<env>-<medium|expert>` (a shipped behaviour policy; its
deterministic action is tanh(mean)). Each policy's mean action is computed once, on the host, on every observation and next
observation; FQE and DualDICE then train all policies in one jitted program, vmapped over policies (`jax.lax.scan` chunks,
minibatches sampled on the device), whichever algorithm the policies come from. MB trains its one model the same way
(vmapped over ensemble members) and then calls each policy on the host once per rollout step, on all rollouts at once.

Output: one console line per policy and estimator, and a JSON file (--out; default runs/ope/<dataset>/<time>.json) with,
per policy, the spec, algorithm, each estimate and its wall time, the IS weight diagnostics (the largest and smallest
trajectory weight, in log space too, and the effective sample size (sum w)^2 / sum w^2 of the trajectory weights), the
behaviour source, and MB's mean rollout length; and MB's model (held-out NLL, MSE and termination error per member).

Not in this file (issue #16): the benchmark report -- the online ground truth of the same noisy policies and the DOPE
metrics per task and estimator -- is benchmarks/dope.py's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import flax
import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # common.py beside me first
import common  # noqa: E402

ALGORITHM = "ope"
ESTIMATORS = ("is", "pdis", "wis", "dr", "fqe", "dualdice", "mb")
IS_FAMILY = ("is", "pdis", "wis", "dr")
UPDATES_PER_CALL = 1000  # FQE/DualDICE/BC/MB-model updates per device call (one jax.lax.scan)
ROWS_PER_BATCH = 1024  # rows per vmapped batch when a network is evaluated on the whole dataset (jax.lax.map)


# ---- Config ----
@dataclass
class Args:
    env: str = "hopper-medium-v2"
    """Dataset name <env>-<kind>[-v2]: env hopper/halfcheetah/walker2d/ant, kind random/medium/expert/medium-replay/medium-expert/full-replay."""
    dataset: str | None = None
    """A D4RL-layout HDF5 file, a Minari dataset folder or a Minari dataset id, instead of --env."""
    eval_env: str | None = None
    """Gymnasium id to evaluate in, e.g. Hopper-v4. Default: the env the dataset names or records."""
    source: Literal["auto", "d4rl", "minari", "recipe"] = "auto"
    """Where a named dataset is looked up: auto tries d4rl, minari, then recipe (this project's D4RL-recipe data)."""
    policies: list[str] = dataclasses.field(default_factory=list)
    """Policies to evaluate: PATH or PATH:SEED (a checkpoint of any algorithm; SEED: which of its --num-seeds runs, default 0),
    or recipe:<env>-<medium|expert> (a shipped behaviour policy)."""
    estimators: list[Literal["is", "pdis", "wis", "dr", "fqe", "dualdice", "mb"]] = dataclasses.field(default_factory=lambda: list(ESTIMATORS))
    """Estimators to run (dr trains FQE as its model)."""
    seed: int = 0
    """Random seed of the networks (FQE, DualDICE, behaviour cloning, MB's model), their minibatches, the sampled policy
    actions and MB's rollouts."""
    policy_std: float = 0.1
    """sigma of the evaluated policy N(mu(s), sigma^2) in [-1, 1] action units (DOPE's policy_eval: target_policy_std 0.1)."""
    behavior: Literal["auto", "logged", "bc"] = "auto"
    """Behaviour log-densities for the IS family: logged (the file's infos/action_log_probs), bc (a fitted diagonal Gaussian),
    or auto (logged for recipe datasets, else bc)."""
    discount: float = 0.99
    """Discount gamma of the estimated return E[sum_t gamma^t r_t] (Le et al. 2019 and DOPE: 0.99); 1.0 only for is/pdis/wis/mb."""
    hidden_dim: int = 256
    """Width of every hidden layer (DOPE's policy_eval: 2x256 MLPs)."""
    num_layers: int = 2
    """Number of hidden layers (DOPE's policy_eval: 2)."""
    batch_size: int = 256
    """Minibatch size, of MB's model too (DOPE's policy_eval: 256; MBPO's model: 256)."""
    fqe_updates: int = 1_000_000
    """FQE gradient updates (DOPE's policy_eval: 1M; a short run: 100000)."""
    fqe_lr: float = 3e-4
    """FQE Adam learning rate (DOPE's policy_eval: 3e-4)."""
    tau: float = 0.005
    """Polyak rate of FQE's target network (DOPE's policy_eval: 0.005)."""
    dualdice_updates: int = 1_000_000
    """DualDICE gradient updates (DOPE's policy_eval: 1M; a short run: 100000)."""
    nu_lr: float = 1e-4
    """DualDICE nu learning rate (Adam, beta1 0, beta2 0.99; DOPE's policy_eval: 1e-4)."""
    zeta_lr: float = 1e-3
    """DualDICE zeta learning rate (Adam, beta1 0, beta2 0.99; DOPE's policy_eval: 1e-3)."""
    bc_updates: int = 10_000
    """Gradient updates of the behaviour-cloning Gaussian (used with --behavior bc, or auto without logged log-densities)."""
    num_action_samples: int = 10
    """Actions sampled from pi per state for E_{a~pi} Q(s, a) (FQE's estimate and DR's V)."""
    mb_ensemble: int = 5
    """Members of MB's ensemble; each rollout step samples from a random one (MOPO/MBPO roll out with a random one of their
    5 elites of 7; here every member is used)."""
    mb_hidden_dim: int = 200
    """Width of MB's model MLPs (MBPO/MOPO: 200)."""
    mb_num_layers: int = 4
    """Hidden (swish) layers of MB's model MLPs (MBPO/MOPO: 4)."""
    mb_updates: int = 100_000
    """Gradient updates of MB's model, every member (this project's choice: about 25 passes over 1M transitions at batch
    256; MOPO/MBPO train to early stopping on a held-out split instead)."""
    mb_lr: float = 1e-3
    """Adam learning rate of MB's model (MBPO/MOPO: 1e-3)."""
    mb_weight_decay: float = 1.0
    """Multiplier of MBPO's per-layer L2 weight decays (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4) in MB's model loss; 0 disables them."""
    mb_holdout_ratio: float = 0.05
    """Fraction of the transitions held out of MB's model training, for its reported held-out NLL, MSE and termination
    error (0: none held out, nothing reported)."""
    mb_horizon: int | None = None
    """MB's rollout length H. Default: the eval env's time limit (1000 for the MuJoCo tasks, as the online episodes;
    gamma^1000 = 4e-5 at gamma 0.99), or 1000 if it has none. Cost: H policy calls and model steps per policy."""
    mb_rollouts: int = 1
    """MB's rollouts per initial state (the estimate averages all of them)."""
    out: str | None = None
    """JSON file of the results. Default: runs/ope/<dataset>/<time>.json."""


# ---- Trajectories ----
def trajectory_index(episode_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices [N_traj, T] of each episode's steps (0 past its end) and the mask of real steps.

    episode_ends: the exclusive end row of each episode (common.load_dataset's info["episode_ends"]; the last is N).
    """
    ends = np.asarray(episode_ends, np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    lengths = ends - starts
    t = np.arange(lengths.max())
    mask = t[None, :] < lengths[:, None]
    return np.where(mask, starts[:, None] + t[None, :], 0), mask


def to_trajectories(x: np.ndarray, idx: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-row values [..., N] as padded trajectories [..., N_traj, T] (0 past each end)."""
    return np.where(mask, np.take(np.asarray(x, np.float64), idx, axis=-1), 0.0)


def initial_rows(episode_ends: np.ndarray) -> np.ndarray:
    """The first row of every episode: the dataset's initial states."""
    return np.concatenate([[0], np.asarray(episode_ends, np.int64)[:-1]])


def discounted_returns(rewards: np.ndarray, episode_ends: np.ndarray, discount: float) -> np.ndarray:
    """sum_t gamma^t r_t of each episode [num_episodes] (float64; discount 1: the undiscounted return)."""
    rewards = np.asarray(rewards, np.float64).reshape(-1)
    starts = initial_rows(episode_ends)
    t = np.arange(len(rewards)) - np.repeat(starts, np.diff(np.append(starts, len(rewards))))
    return np.add.reduceat(discount**t * rewards, starts)


# ---- The importance-sampling family (numpy, float64; any leading axes, e.g. policies) ----
def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _weighted_sum(log_w: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """sum exp(log_w) x along axis, exact for weights far outside float64's range (the result is +-inf only if it is)."""
    m = np.max(log_w, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    s = np.sum(np.where(np.isfinite(log_w), np.exp(log_w - m), 0.0) * x, axis=axis)
    with np.errstate(over="ignore", divide="ignore"):
        return np.where(s == 0, 0.0, np.sign(s) * np.exp(np.squeeze(m, axis) + np.log(np.abs(s))))


def importance_sampling(rewards: np.ndarray, log_ratios: np.ndarray, mask: np.ndarray, discount: float,
                        sample_weights: np.ndarray | None = None, q_hat: np.ndarray | None = None,
                        v_hat: np.ndarray | None = None, absorbing: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """IS, PDIS, WIS (and DR given a model) of J = E[sum_t gamma^t r_t], and the weights' diagnostics.

    rewards, log_ratios (log pi(a_t|s_t) - log mu(a_t|s_t)), mask (real steps), q_hat (Q(s_t, a_t)), v_hat
    (E_{a~pi} Q(s_t, a)): [..., N_traj, T]. sample_weights [N_traj]: the weight of each trajectory in the average
    (default uniform; exact enumeration passes each trajectory's behaviour probability). absorbing [N_traj]: the
    trajectory ended in a terminal state, so after its end every action has ratio 1 and reward 0 and its weight stays in
    WIS's normalizer (a truncated one leaves it); default: none.
    rho_{0:t} = prod_{t' <= t} pi/mu is computed as exp(cumulative sum of log-ratios), in float64.
    """
    r, lr, mask = np.asarray(rewards, np.float64), np.asarray(log_ratios, np.float64), np.asarray(mask, bool)
    n, horizon = mask.shape[-2:]
    p = np.full(n, 1.0 / n) if sample_weights is None else np.asarray(sample_weights, np.float64) / np.sum(sample_weights)
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    lr, r = np.where(mask, lr, 0.0), np.where(mask, r, 0.0)
    c = np.cumsum(lr, axis=-1)  # log rho_{0:t}; constant past the end (the ratio of an absorbing state's actions is 1)
    disc = discount ** np.arange(horizon)
    log_w = log_p + c[..., -1]  # log(p_i rho_{0:T-1}): the trajectory weights
    out: dict[str, np.ndarray] = {}
    # IS: sum_i p_i rho_{0:T-1} sum_t gamma^t r_t (Precup et al. 2000)
    out["is"] = _weighted_sum(log_w, np.sum(disc * r, axis=-1), axis=-1)
    # PDIS: sum_t gamma^t sum_i p_i rho_{0:t} r_t -- a reward is weighted only by the actions before it (Precup et al. 2000)
    log_pc = np.where(mask, log_p[:, None] + c, -np.inf)
    out["pdis"] = np.sum(disc * _weighted_sum(log_pc, r, axis=-2), axis=-1)
    # WIS: sum_t gamma^t sum_i w_it r_it, w_it = p_i rho_{0:t,i} / sum_j p_j rho_{0:t,j} (Thomas 2015, CWPDIS)
    alive = mask | (np.zeros(n, bool) if absorbing is None else np.asarray(absorbing, bool))[:, None]
    log_pa = np.where(alive, log_p[:, None] + c, -np.inf)
    with np.errstate(invalid="ignore"):  # a step no trajectory reaches (weights all 0) contributes 0
        log_norm = log_pa - _logsumexp(log_pa, axis=-2)[..., None, :]
    out["wis"] = np.sum(disc * np.sum(np.where(np.isfinite(log_norm), np.exp(log_norm), 0.0) * r, axis=-2), axis=-1)
    if q_hat is not None and v_hat is not None:
        # DR, per-decision: sum_t gamma^t sum_i p_i [rho_{0:t} (r_t - Q(s_t, a_t)) + rho_{0:t-1} V(s_t)], rho_{0:-1} = 1
        # (Jiang & Li 2016's recursive estimator, unrolled as in Thomas & Brunskill 2016); both terms in one stable sum over trajectories
        q, v = np.where(mask, q_hat, 0.0), np.where(mask, v_hat, 0.0)
        log_prev = np.where(mask, log_p[:, None] + c - lr, -np.inf)
        terms = _weighted_sum(np.concatenate([log_pc, log_prev], -2), np.concatenate([r - q, v], -2), axis=-2)
        out["dr"] = np.sum(disc * terms, axis=-1)
    # the lecture's point: a few trajectories carry all the weight
    log_traj = np.where(p > 0, c[..., -1], np.nan)
    out["log_max_weight"], out["log_min_weight"] = np.nanmax(log_traj, axis=-1), np.nanmin(log_traj, axis=-1)
    out["ess"] = np.exp(2.0 * _logsumexp(log_w, axis=-1) - _logsumexp(2.0 * log_w, axis=-1))  # (sum p w)^2 / sum (p w)^2
    return out


# ---- Densities ----
def gaussian_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """log N(action; mean, diag(exp(log_std))^2), summed over the action axis."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def unit_log_prob(log_prob_env: np.ndarray, act_low: np.ndarray, act_high: np.ndarray) -> np.ndarray:
    """A log-density of env-unit actions as one of [-1, 1] actions: u = 2 (a - low) / (high - low) - 1 has the constant
    Jacobian du/da = 2 / (high - low), so log p_u(u) = log p_a(a) + sum_d log((high - low) / 2)."""
    return np.asarray(log_prob_env, np.float64) + float(np.sum(np.log((np.asarray(act_high, np.float64) - act_low) / 2.0)))


def logged_log_probs(info: dict, num_rows: int) -> np.ndarray | None:
    """The file's infos/action_log_probs (env-unit log-densities of the behaviour actions), aligned with the rows that
    common.load_dataset returns; None if the dataset has none."""
    kind, _, path = str(info.get("source", "")).partition(":")
    if kind == "minari" or not path or not Path(path).is_file():
        return None
    with h5py.File(path, "r") as f:
        if "infos/action_log_probs" not in f:
            return None
        logp = f["infos/action_log_probs"][()].reshape(-1)
        if "next_observations" not in f:  # common.read_d4rl_hdf5 drops each timeout row and a cut-off last row: the same here
            term = f["terminals"][()].reshape(-1) > 0
            tout = f["timeouts"][()].reshape(-1) > 0 if "timeouts" in f else np.zeros(len(term), bool)
            logp = logp[np.append(~tout[:-1], term[-1])]
    if len(logp) != num_rows:
        raise common.DatasetError(f"{path}: infos/action_log_probs has {len(logp)} rows but the dataset has {num_rows}")
    if not np.isfinite(logp).all():
        raise common.DatasetError(f"{path}: infos/action_log_probs holds NaN/Inf")
    return logp.astype(np.float64)


# ---- Networks ----
class MLP(nn.Module):
    """num_layers ReLU layers of hidden_dim, then a linear output; optionally LayerNorm before each ReLU
    (Ball et al. 2023; JAX-CORL's TD3+BC critic) and orthogonal(sqrt 2) kernels (JAX-CORL) instead of lecun_normal."""

    hidden_dim: int
    num_layers: int
    out_dim: int
    layer_norm: bool = False
    orthogonal_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.orthogonal(jnp.sqrt(2.0)) if self.orthogonal_init else nn.initializers.lecun_normal()
        for _ in range(self.num_layers):
            x = nn.Dense(self.hidden_dim, kernel_init=init)(x)
            x = nn.relu(nn.LayerNorm()(x) if self.layer_norm else x)
        return nn.Dense(self.out_dim, kernel_init=init)(x)


class StateActionNet(nn.Module):
    """f(s, a) -> [batch] = scale * MLP([s, a]): FQE's Q (scale 1 / (1 - gamma), as in DOPE's policy_eval q_fitter, so the
    network outputs per-step reward sizes), DualDICE's nu and zeta (scale 1)."""

    hidden_dim: int
    num_layers: int
    scale: float = 1.0

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        return self.scale * MLP(self.hidden_dim, self.num_layers, 1)(jnp.concatenate([obs, action], axis=-1))[..., 0]


class GaussianBehavior(nn.Module):
    """mu(a|s) = N(tanh(m(s)), diag(exp(l(s)))^2) in [-1, 1] action units, state-dependent mean and log-std."""

    action_dim: int
    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = MLP(self.hidden_dim, self.num_layers, 2 * self.action_dim)(obs)
        return jnp.tanh(out[..., : self.action_dim]), jnp.clip(out[..., self.action_dim :], -5.0, 2.0)


def sample_actions(key: jax.Array, mean: jax.Array, std: float) -> jax.Array:
    """The executed action of the evaluated policy: clip(mu + sigma eps, -1, 1) (the env clips; see the module doc)."""
    return jnp.clip(mean + std * jax.random.normal(key, mean.shape), -1.0, 1.0)


# ---- Training loop shared by FQE, DualDICE, BC and MB's model: jit(scan(vmap over policies, or ensemble members)) ----
def make_train_chunk(update: Callable) -> Callable:
    """`num_steps` updates of every policy's (or ensemble member's) state in one device call; returns the mean loss and
    whether all were finite."""

    def chunk(states: Any, data: dict[str, jax.Array], per_policy: dict[str, jax.Array], num_steps: int):
        def body(carry, _):
            return jax.vmap(update, in_axes=(0, None, 0))(carry, data, per_policy)

        states, losses = jax.lax.scan(body, states, None, length=num_steps)  # losses [num_steps, P]
        return states, losses.mean(0), jnp.all(jnp.isfinite(losses), axis=0)

    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=0)


def train(name: str, chunk: Callable, states: Any, data: dict, per_policy: dict, num_updates: int,
          unit: str = "policy") -> tuple[Any, np.ndarray]:
    """Run num_updates updates in device calls of UPDATES_PER_CALL; a non-finite loss stops with a one-line error naming
    the `unit` (policy, or ensemble member) whose loss it was."""
    done, last_line, t0 = 0, time.time(), time.time()
    loss = np.full(1, np.nan)
    while done < num_updates:
        n = min(UPDATES_PER_CALL, num_updates - done)
        states, loss, finite = chunk(states, data, per_policy, num_steps=n)
        loss, finite = jax.device_get((loss, finite))
        if not finite.all():
            raise common.RunError(f"{name}: non-finite loss in updates {done + 1}-{done + n} ({unit} {int(np.flatnonzero(~finite)[0])})")
        done += n
        if time.time() - last_line >= 10 and done < num_updates:
            print(f"[{ALGORITHM}] {name}: update {done}/{num_updates} | {done / (time.time() - t0):.0f} upd/s", flush=True)
            last_line = time.time()
    return states, np.asarray(loss)


def over_rows(fn: Callable, *rows: jax.Array) -> jax.Array:
    """fn applied to every row of `rows` (leading axis N), ROWS_PER_BATCH rows at a time: bounded memory on 1M rows."""
    if rows[0].shape[0] <= ROWS_PER_BATCH:
        return jax.vmap(fn)(*rows)
    return jax.lax.map(lambda x: fn(*x), rows, batch_size=ROWS_PER_BATCH)


# ---- Behaviour cloning (the behaviour density where the data has none) ----
@flax.struct.dataclass
class BCState:
    actor: TrainState
    key: jax.Array


def fit_behavior(args: Args, data: dict[str, np.ndarray], key: jax.Array) -> tuple[np.ndarray, float]:
    """Maximum-likelihood diagonal Gaussian mu(a|s) in [-1, 1] units; returns log mu(a_t|s_t) of every row and the final NLL."""
    net = GaussianBehavior(data["actions"].shape[1], args.hidden_dim, args.num_layers)
    dev = {k: jnp.asarray(data[k]) for k in ("observations", "actions")}

    def init(k: jax.Array) -> BCState:
        k, k_net = jax.random.split(k)
        params = net.init(k_net, dev["observations"][:1])
        return BCState(actor=TrainState.create(apply_fn=net.apply, params=params, tx=optax.adam(3e-4)), key=k)

    def update(state: BCState, d: dict, _: dict) -> tuple[BCState, jax.Array]:
        key, k_idx = jax.random.split(state.key)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, d["observations"].shape[0])

        def loss_fn(params):
            return -gaussian_log_prob(*net.apply(params, d["observations"][idx]), d["actions"][idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.actor.params)
        return BCState(actor=state.actor.apply_gradients(grads=grads), key=key), loss

    states = jax.jit(jax.vmap(init))(key[None])  # jitted: one compile, and distinct buffers to donate
    states, loss = train("bc", make_train_chunk(update), states, dev, {}, args.bc_updates)
    logp = jax.jit(lambda p, o, a: over_rows(lambda oi, ai: gaussian_log_prob(*net.apply(jax.tree.map(lambda x: x[0], p), oi), ai), o, a))
    return np.asarray(logp(states.actor.params, dev["observations"], dev["actions"]), np.float64), float(loss[0])


# ---- FQE (Le, Voloshin & Yue 2019) ----
@flax.struct.dataclass
class FQEState:
    critic: TrainState
    target_params: Any
    key: jax.Array


def reward_scale(rewards: np.ndarray) -> float:
    """Rewards are divided by their std for FQE (Le et al. 2019 / DOPE normalize rewards); a scale, no shift, so that a
    terminal's zero future stays zero. The estimate is multiplied back."""
    std = float(np.std(rewards))
    return std if std > 1e-8 else 1.0


def run_fqe(args: Args, data: dict[str, np.ndarray], means: dict[str, np.ndarray], key: jax.Array,
            model_on_rows: bool = False) -> dict[str, np.ndarray]:
    """FQE of every policy at once (vmapped); values and Q, V in the data's reward units.

    data: observations, actions ([-1, 1]), rewards, next_observations, terminals [N, ...] and init_observations [N0, obs].
    means: the policies' mean actions in [-1, 1]: next [P, N, act] (at next_observations), init [P, N0, act], and, with
    model_on_rows, obs [P, N, act] (at observations). Returns values [P] = mean over s_0 of E_{a~pi} Q(s_0, a), the final
    losses [P], and with model_on_rows also q [P, N] = Q(s_t, a_t) and v [P, N] = E_{a~pi} Q(s_t, a) for DR.
    """
    gamma, std, k_samples = args.discount, args.policy_std, args.num_action_samples
    scale = reward_scale(data["rewards"])
    r = np.asarray(data["rewards"], np.float64) / scale
    # targets clipped to the range of discounted returns (Le et al. 2019 / DOPE's q_fitter: [r_min, r_max] / (1 - gamma));
    # 0 joins the range when episodes terminate (a terminal's value is its last reward alone)
    has_terminals = bool(np.any(data["terminals"] > 0))
    lo = (min(r.min(), 0.0) if has_terminals else r.min()) / (1 - gamma)
    hi = (max(r.max(), 0.0) if has_terminals else r.max()) / (1 - gamma)
    qnet = StateActionNet(args.hidden_dim, args.num_layers, 1.0 / (1.0 - gamma))
    dev = {k: jnp.asarray(data[k], jnp.float32) for k in ("observations", "actions", "next_observations", "terminals")}
    dev["rewards"] = jnp.asarray(r, jnp.float32)
    obs_dim, act_dim = dev["observations"].shape[1], dev["actions"].shape[1]

    def init(k: jax.Array) -> FQEState:
        k, k_net = jax.random.split(k)
        params = qnet.init(k_net, jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)))
        return FQEState(critic=TrainState.create(apply_fn=qnet.apply, params=params, tx=optax.adam(args.fqe_lr)),
                        target_params=params, key=k)

    def update(state: FQEState, d: dict, pol: dict) -> tuple[FQEState, jax.Array]:
        key, k_idx, k_act = jax.random.split(state.key, 3)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, d["observations"].shape[0])
        # FQE iteration (Le et al. 2019): regress Q(s, a) onto r + gamma (1 - done) Q_target(s', a'), a' ~ pi(s')
        next_a = sample_actions(k_act, pol["next"][idx], std)
        target = d["rewards"][idx] + gamma * (1.0 - d["terminals"][idx]) * qnet.apply(state.target_params, d["next_observations"][idx], next_a)
        target = jnp.clip(target, lo, hi)

        def loss_fn(params):
            return jnp.mean((qnet.apply(params, d["observations"][idx], d["actions"][idx]) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)
        target_params = optax.incremental_update(critic.params, state.target_params, args.tau)
        return FQEState(critic=critic, target_params=target_params, key=key), loss

    k_init, k_eval = jax.random.split(key)
    num_policies = means["next"].shape[0]
    # jitted: one compile, and distinct buffers for the target network and the network it starts equal to (both donated)
    states = jax.jit(jax.vmap(init))(jax.random.split(k_init, num_policies))
    states, loss = train("fqe", make_train_chunk(update), states, dev, {"next": jnp.asarray(means["next"])}, args.fqe_updates)

    def v_fn(params, k, obs, mean):  # E_{a~pi} Q(s, a), k_samples actions per state; with the target network (as DOPE's code)
        def row(o, m, i):
            a = sample_actions(jax.random.fold_in(k, i), jnp.broadcast_to(m, (k_samples, act_dim)), std)
            return qnet.apply(params, jnp.broadcast_to(o, (k_samples, obs_dim)), a).mean()

        return over_rows(row, obs, mean, jnp.arange(obs.shape[0]))

    @jax.jit
    def evaluate(params, keys, v_obs, v_mean, q_obs, q_act):  # one compile: V at v_obs, and Q(s_t, a_t) unless q_obs is None
        v = jax.vmap(v_fn, in_axes=(0, 0, None, 0))(params, keys, v_obs, v_mean)
        q = None if q_obs is None else jax.vmap(lambda p: over_rows(lambda o, a: qnet.apply(p, o, a), q_obs, q_act))(params)
        return v, q

    n0 = data["init_observations"].shape[0]
    v_obs, v_mean, q_obs, q_act = data["init_observations"], means["init"], None, None
    if model_on_rows:  # DR's model on every row too
        v_obs, v_mean = np.concatenate([v_obs, data["observations"]]), np.concatenate([v_mean, means["obs"]], axis=1)
        q_obs, q_act = dev["observations"], dev["actions"]
    v, q = evaluate(states.target_params, jax.random.split(k_eval, num_policies), jnp.asarray(v_obs, jnp.float32),
                    jnp.asarray(v_mean, jnp.float32), q_obs, q_act)
    v = scale * np.asarray(v, np.float64)
    out = {"values": v[:, :n0].mean(1), "loss": loss}
    if model_on_rows:
        out["q"], out["v"] = scale * np.asarray(q, np.float64), v[:, n0:]
    return out


# ---- DualDICE (Nachum, Chow, Dai & Li 2019) ----
def dualdice_loss(nu: Callable, zeta: Callable, batch: dict[str, jax.Array], discount: float,
                  weights: jax.Array | None = None, init_weights: jax.Array | None = None) -> jax.Array:
    """The DualDICE saddle-point objective with f(x) = x^2 / 2 (Nachum et al. 2019; its Fenchel-dual form, no double sampling):

        L(nu, zeta) = E_D[(nu(s,a) - gamma (1 - done) nu(s',a')) zeta(s,a) - zeta(s,a)^2 / 2] - (1 - gamma) E_{s0, a0~pi}[nu(s0,a0)]

    nu minimizes, zeta maximizes; at the saddle point zeta(s,a) = nu(s,a) - gamma E[nu(s',a')] = d^pi(s,a) / d^D(s,a), d^pi
    the normalized discounted occupancy (1 - gamma) sum_t gamma^t P(s_t = s, a_t = a). A terminal leads to an absorbing
    state with nu = 0 and reward 0 (the (1 - done) factor), so E_D[zeta] = 1 minus the occupancy of the absorbing state.
    nu, zeta: (obs, act) -> [B], any function approximator. batch: observations, actions, next_observations, next_actions
    (a' ~ pi(s')), terminals [B, ...]; init_observations, init_actions (a0 ~ pi(s0)) [B0, ...]. weights [B], init_weights
    [B0]: probabilities of the samples (default uniform; exact expectations in the tests).
    """
    mean = lambda x, w: jnp.mean(x) if w is None else jnp.sum(w * x) / jnp.sum(w)
    z = zeta(batch["observations"], batch["actions"])
    residual = nu(batch["observations"], batch["actions"]) - discount * (1.0 - batch["terminals"]) * nu(
        batch["next_observations"], batch["next_actions"])
    return mean(residual * z - 0.5 * z**2, weights) - (1.0 - discount) * mean(nu(batch["init_observations"], batch["init_actions"]), init_weights)


@flax.struct.dataclass
class DiceState:
    nu: TrainState
    zeta: TrainState
    key: jax.Array


def run_dualdice(args: Args, data: dict[str, np.ndarray], means: dict[str, np.ndarray], key: jax.Array) -> dict[str, np.ndarray]:
    """DualDICE of every policy at once (vmapped). data and means as in run_fqe (means: next, init). Returns values [P] =
    E_D[zeta(s,a) r] / (1 - gamma) (the discounted return, not DOPE's per-step (1 - gamma)-scaled one), mean_ratio [P] =
    E_D[zeta] and the final losses [P]. The ratios are not self-normalized: with terminals E_D[w] < 1 is correct (see
    dualdice_loss)."""
    gamma, std = args.discount, args.policy_std
    net = StateActionNet(args.hidden_dim, args.num_layers)
    dev = {k: jnp.asarray(data[k], jnp.float32) for k in ("observations", "actions", "next_observations", "terminals", "init_observations")}
    obs_dim, act_dim = dev["observations"].shape[1], dev["actions"].shape[1]
    # Adam with beta1 = 0, beta2 = 0.99 for both players (DOPE's policy_eval dual_dice.py)
    nu_tx, zeta_tx = optax.adam(args.nu_lr, b1=0.0, b2=0.99), optax.adam(args.zeta_lr, b1=0.0, b2=0.99)

    def init(k: jax.Array) -> DiceState:
        k, k_nu, k_zeta = jax.random.split(k, 3)
        x = (jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)))
        return DiceState(nu=TrainState.create(apply_fn=net.apply, params=net.init(k_nu, *x), tx=nu_tx),
                         zeta=TrainState.create(apply_fn=net.apply, params=net.init(k_zeta, *x), tx=zeta_tx), key=k)

    def update(state: DiceState, d: dict, pol: dict) -> tuple[DiceState, jax.Array]:
        key, k_idx, k_init, k_next, k_a0 = jax.random.split(state.key, 5)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, d["observations"].shape[0])
        idx0 = jax.random.randint(k_init, (args.batch_size,), 0, d["init_observations"].shape[0])
        batch = {k: d[k][idx] for k in ("observations", "actions", "next_observations", "terminals")}
        batch.update(next_actions=sample_actions(k_next, pol["next"][idx], std), init_observations=d["init_observations"][idx0],
                     init_actions=sample_actions(k_a0, pol["init"][idx0], std))

        def loss_fn(nu_params, zeta_params):
            return dualdice_loss(lambda o, a: net.apply(nu_params, o, a), lambda o, a: net.apply(zeta_params, o, a), batch, gamma)

        loss, (g_nu, g_zeta) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state.nu.params, state.zeta.params)
        g_zeta = jax.tree.map(lambda g: -g, g_zeta)  # gradient ascent for zeta
        return DiceState(nu=state.nu.apply_gradients(grads=g_nu), zeta=state.zeta.apply_gradients(grads=g_zeta), key=key), loss

    num_policies = means["next"].shape[0]
    states = jax.jit(jax.vmap(init))(jax.random.split(key, num_policies))
    per_policy = {"next": jnp.asarray(means["next"]), "init": jnp.asarray(means["init"])}
    states, loss = train("dualdice", make_train_chunk(update), states, dev, per_policy, args.dualdice_updates)
    w_all = jax.jit(jax.vmap(lambda p, o, a: over_rows(lambda oi, ai: net.apply(p, oi, ai), o, a), in_axes=(0, None, None)))
    w = np.asarray(w_all(states.zeta.params, dev["observations"], dev["actions"]), np.float64)  # [P, N]
    r = np.asarray(data["rewards"], np.float64)
    return {"values": (w * r).mean(1) / (1.0 - gamma), "mean_ratio": w.mean(1), "loss": loss}


# ---- MB: a learned model rolled out (DOPE's "MB", Fu et al. 2021; Paduraru 2007) ----
class GaussianDynamics(nn.Module):
    """One ensemble member: (s, a) -> mean and bounded log-variance of the standardized (s' - s, r), and the logit of
    `done` (MOPO's GaussianDynamics, after MBPO/PETS, plus a termination head on the same trunk).

    Soft bounds as in PETS/MBPO: logvar = max - softplus(max - x), then min + softplus(logvar - min), with learned
    max_logvar (init 0.5) and min_logvar (init -10) that mb_loss regularizes.
    """

    out_dim: int
    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        for i in range(self.num_layers):
            x = nn.swish(nn.Dense(self.hidden_dim, name=f"hidden_{i}")(x))
        out = nn.Dense(2 * self.out_dim + 1, name="out")(x)
        d = self.out_dim
        mean, logvar, logit = out[..., :d], out[..., d:2 * d], out[..., 2 * d]
        max_logvar = self.param("max_logvar", nn.initializers.constant(0.5), (d,))
        min_logvar = self.param("min_logvar", nn.initializers.constant(-10.0), (d,))
        logvar = max_logvar - jax.nn.softplus(max_logvar - logvar)
        return mean, min_logvar + jax.nn.softplus(logvar - min_logvar), logit


MBPO_WEIGHT_DECAYS = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)  # hidden layers..., output layer (MBPO's bnn; mopo.py)


def mb_loss(model_def: nn.Module, params: Any, x: jax.Array, y: jax.Array, done: jax.Array, decay_scale: float) -> jax.Array:
    """One member's loss on a batch: the Gaussian NLL (up to constants, mean over the target dims; MBPO/MOPO), the sigmoid
    cross-entropy of `done`, MBPO's logvar-bound term 0.01 (sum max_logvar - sum min_logvar) and its L2 weight decays."""
    mean, logvar, logit = model_def.apply(params, x)
    nll = (((mean - y) ** 2) * jnp.exp(-logvar) + logvar).mean()
    p = params["params"]
    bounds = 0.01 * (p["max_logvar"].sum() - p["min_logvar"].sum())
    decays = {f"hidden_{i}": MBPO_WEIGHT_DECAYS[min(i, 3)] for i in range(model_def.num_layers)} | {"out": MBPO_WEIGHT_DECAYS[4]}
    l2 = sum(d * 0.5 * (p[name]["kernel"] ** 2).sum() for name, d in decays.items())
    return nll + optax.sigmoid_binary_cross_entropy(logit, done).mean() + bounds + decay_scale * l2


@flax.struct.dataclass
class ModelState:
    model: TrainState
    key: jax.Array


# step(params, key, obs [B, obs], action [B, act]) -> (next_obs [B, obs], reward [B], done [B] bool): one model transition
ModelStep = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def one_member_per_row(apply: Callable, members: Any, x: jax.Array, key: jax.Array) -> Any:
    """apply(member params, rows) of a random member per row of x [B, ...], at the cost of one member's pass over B rows:
    the rows (padded to a multiple of the M members by repeats) are shuffled into M equal groups, group i through member
    i (members: params stacked on axis 0); row r's output is taken where the shuffle put it."""
    b, m = x.shape[0], jax.tree.leaves(members)[0].shape[0]
    perm = jax.random.permutation(key, -(-b // m) * m)
    out = jax.vmap(apply)(members, x[perm % b].reshape(m, -1, *x.shape[1:]))
    at = jnp.argsort(perm)[:b]
    return jax.tree.map(lambda z: z.reshape(len(perm), *z.shape[2:])[at], out)


def learned_step(model_def: nn.Module) -> ModelStep:
    """The learned ensemble as a model step: each row samples (s' - s, r) from a random member's Gaussian (MOPO/MBPO's
    rollouts) and ends where that member's termination probability exceeds 1/2. params: net (the members' parameters,
    stacked), y_mean / y_std (the targets' standardization), and the data's box of states and range of rewards, to which
    s' and r are clipped (the model's extrapolation stays in the data's range, as FQE's targets are clipped to it)."""

    def step(params: dict, key: jax.Array, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        k_member, k_noise = jax.random.split(key)
        b, d = obs.shape
        mean, logvar, logit = one_member_per_row(model_def.apply, params["net"], jnp.concatenate([obs, action], -1), k_member)
        y = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_noise, (b, d + 1))
        y = params["y_mean"] + params["y_std"] * y
        next_obs = jnp.clip(obs + y[:, :d], params["obs_low"], params["obs_high"])
        # a threshold, not a sampled Bernoulli: the classifier learns terminals from rare rows, and a small false hazard
        # per step (p = 1e-3) would, sampled over 1000 steps, end most rollouts; MuJoCo terminations are deterministic
        return next_obs, jnp.clip(y[:, d], params["reward_low"], params["reward_high"]), logit.reshape(b) > 0.0

    return step


def fit_dynamics(args: Args, data: dict[str, np.ndarray], key: jax.Array) -> dict[str, Any]:
    """MB's model: an ensemble of --mb-ensemble GaussianDynamics fit to (s, a) -> (s' - s, r) and `done` by mb_loss, all
    members vmapped, each sampling its own minibatches. data: observations, actions, rewards, next_observations,
    terminals [N, ...], in the networks' units (normalized states, [-1, 1] actions). Returns step (learned_step) and its
    params, the final training loss [members] and, with a held-out split, per member its NLL per target dim (standardized
    units, with the 0.5 log 2 pi), MSE of s' (normalized-state units, mean over dims) and of r (reward units) and error
    rate of done (the terminal rate beside it)."""
    x = np.concatenate([data["observations"], data["actions"]], 1).astype(np.float32)
    y = np.concatenate([data["next_observations"] - data["observations"], np.asarray(data["rewards"])[:, None]], 1).astype(np.float32)
    done = np.asarray(data["terminals"], np.float32)
    n, obs_dim = len(x), data["observations"].shape[1]
    perm = np.random.default_rng(np.asarray(jax.random.key_data(key))).permutation(n)  # on the host: no compile
    n_hold = min(int(n * args.mb_holdout_ratio), n - 1)
    hold, fit = perm[:n_hold], perm[n_hold:]
    y_mean, y_std = y[fit].mean(0), y[fit].std(0)
    y_std = np.where(y_std < 1e-8, 1.0, y_std).astype(np.float32)  # targets standardized (MOPO standardizes the inputs
    # only; the networks' inputs here are already normalized states and [-1, 1] actions): the logvar bounds fit every dim
    dev = {"x": jnp.asarray(x[fit]), "y": jnp.asarray((y[fit] - y_mean) / y_std), "done": jnp.asarray(done[fit])}
    model_def = GaussianDynamics(obs_dim + 1, args.mb_hidden_dim, args.mb_num_layers)
    tx = optax.adam(args.mb_lr)

    def init(k: jax.Array) -> ModelState:
        k, k_net = jax.random.split(k)
        return ModelState(model=TrainState.create(apply_fn=model_def.apply, params=model_def.init(k_net, jnp.zeros((1, x.shape[1]))), tx=tx), key=k)

    def update(state: ModelState, d: dict, _: dict) -> tuple[ModelState, jax.Array]:
        key, k_idx = jax.random.split(state.key)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, d["x"].shape[0])
        loss, grads = jax.value_and_grad(lambda p: mb_loss(model_def, p, d["x"][idx], d["y"][idx], d["done"][idx],
                                                           args.mb_weight_decay))(state.model.params)
        return ModelState(model=state.model.apply_gradients(grads=grads), key=key), loss

    states = jax.jit(lambda k: jax.vmap(init)(jax.random.split(k, args.mb_ensemble)))(key)
    states, loss = train("mb", make_train_chunk(update), states, dev, {}, args.mb_updates, unit="ensemble member")
    states = jax.device_get(states)  # out of the donated buffers

    holdout = None
    if n_hold:
        @jax.jit
        def metrics(net, xh, yh, dh):
            def row(xi, yi, di):  # every member at one held-out row: [members] each
                mean, logvar, logit = jax.vmap(lambda p: model_def.apply(p, xi))(net)
                z = (yi - y_mean) / y_std
                err = (y_std * (mean - z)) ** 2
                return {"nll": (0.5 * ((mean - z) ** 2 * jnp.exp(-logvar) + logvar + jnp.log(2 * jnp.pi))).mean(-1),
                        "obs_mse": err[:, :obs_dim].mean(-1), "reward_mse": err[:, obs_dim], "done_error": ((logit > 0) != (di > 0.5)) * 1.0}

            return jax.tree.map(lambda v: v.mean(0), over_rows(row, xh, yh, dh))

        holdout = {k: np.asarray(v, np.float64).tolist() for k, v in metrics(states.model.params, x[hold], y[hold], done[hold]).items()}
        holdout.update(num_rows=int(n_hold), terminal_rate=float(done[hold].mean()))
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    both = np.concatenate([data["observations"], data["next_observations"]])
    params = {"net": states.model.params, "y_mean": f32(y_mean), "y_std": f32(y_std), "obs_low": f32(both.min(0)),
              "obs_high": f32(both.max(0)), "reward_low": f32(y[:, obs_dim].min()), "reward_high": f32(y[:, obs_dim].max())}
    return {"step": learned_step(model_def), "params": params, "loss": np.asarray(loss, np.float64), "holdout": holdout}


def _rollout_step(step: ModelStep, params: Any, carry: dict, mean_action: jax.Array, key: jax.Array, t: jax.Array,
                  discount: float, policy_std: float) -> tuple[dict, jax.Array]:
    """Step t of every rollout: a ~ clip(mu(s) + sigma eps, -1, 1), (s', r, done) from the model; r counts while alive.
    Returns the carry and whether any rollout is still alive."""
    k_act, k_model = jax.random.split(jax.random.fold_in(key, t))
    next_obs, reward, done = step(params, k_model, carry["obs"], sample_actions(k_act, mean_action, policy_std))
    alive = carry["alive"]
    ret = carry["ret"] + jnp.where(alive, carry["discount"] * reward, 0.0)  # where, not *: a dead row's garbage (NaN) stays out
    still = alive & ~done.astype(bool)
    return {"obs": jnp.where(still[:, None], next_obs, carry["obs"]), "alive": still, "ret": ret,
            "length": carry["length"] + alive, "discount": carry["discount"] * discount}, still.any()


rollout_step = jax.jit(_rollout_step, static_argnums=0)  # one compile per model step function (all policies share it)


def model_rollout(step: ModelStep, params: Any, act: Callable[[np.ndarray], np.ndarray], obs0: np.ndarray, horizon: int,
                  discount: float, policy_std: float, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """One rollout of pi in a model from every row of obs0 [B, obs]: the returns sum_{t < H} gamma^t r_t up to the first
    predicted terminal (its reward included; absorbing after, as in the IS family) [B], and the rollout lengths [B].

    step: the model (ModelStep; learned_step, or an exact one in the tests) with its params; act: the policy's mean action
    in [-1, 1] at states in the model's units (obs [B, obs] -> [B, act], a host function: a checkpoint of any algorithm),
    called once per step on all rows; the executed action is clip(mu + sigma eps, -1, 1) (sample_actions). Stops early
    when every rollout has ended."""
    b = len(obs0)  # the carry starts as numpy arrays: no eager device op, nothing compiled but rollout_step
    carry = {"obs": np.asarray(obs0, np.float32), "alive": np.ones(b, bool), "ret": np.zeros(b, np.float32),
             "length": np.zeros(b, np.int32), "discount": np.ones((), np.float32)}
    for t in range(horizon):
        mean_action = np.asarray(act(np.asarray(carry["obs"])), np.float32)
        carry, any_alive = rollout_step(step, params, carry, mean_action, key, t, discount, policy_std)
        if not bool(any_alive):
            break
    return np.asarray(carry["ret"], np.float64), np.asarray(carry["length"])


def run_mb(args: Args, data: dict[str, np.ndarray], acts: Sequence[Callable[[np.ndarray], np.ndarray]], horizon: int,
           key: jax.Array) -> dict[str, Any]:
    """MB of every policy: one model (fit_dynamics), then per policy --mb-rollouts model_rollout's of `horizon` steps from
    every initial state. data as in run_fqe (init_observations: the rollouts' starts); acts: each policy's mean action
    in [-1, 1] at normalized states (model_units_act). Returns values [P] (the mean return, in the data's reward units),
    mean_length [P] (of the rollouts), rollout_time_s [P], train_time_s and the model's metrics (fit_dynamics')."""
    keys = np.asarray(jax.random.split(key, len(acts) + 1))  # the model's, then each policy's rollouts'
    t0 = time.time()
    model = fit_dynamics(args, data, keys[0])
    train_time = time.time() - t0
    obs0 = np.repeat(np.asarray(data["init_observations"], np.float32), args.mb_rollouts, axis=0)
    values, lengths, rollout_times = [], [], []
    for i, act in enumerate(acts):
        t0 = time.time()
        ret, length = model_rollout(model["step"], model["params"], act, obs0, horizon, args.discount, args.policy_std, keys[i + 1])
        values.append(ret.mean())
        lengths.append(length.mean())
        rollout_times.append(time.time() - t0)
        print(f"[{ALGORITHM}] mb: policy {i + 1}/{len(acts)} rolled out from {len(obs0)} states, mean length {lengths[-1]:.1f} "
              f"of {horizon} ({rollout_times[-1]:.1f}s)", flush=True)
    return {"values": np.array(values), "mean_length": np.array(lengths), "rollout_time_s": np.array(rollout_times),
            "train_time_s": train_time, "loss": model["loss"], "holdout": model["holdout"]}


# ---- DOPE metrics (Fu et al. 2021) ----
def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    x = np.asarray(x)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="mergesort")] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, ranks) / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (average-tie) ranks; nan if either is constant."""
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    den = np.sqrt(np.sum(ra**2) * np.sum(rb**2))
    return float(np.sum(ra * rb) / den) if den > 0 else float("nan")


def regret_at_k(true_values: np.ndarray, estimates: np.ndarray, k: int) -> float:
    """(best true value - best true value among the k policies estimated best) / best true value (DOPE's normalized
    regret, applied to normalized values, where it equals (V_max - V_top-k) / (V_max - V_min)). Ties in the estimates
    keep the earlier policy."""
    top = np.argsort(-np.asarray(estimates, np.float64), kind="stable")[:k]
    best = float(np.max(true_values))
    return (best - float(np.max(np.asarray(true_values)[top]))) / best if best != 0 else float("nan")


def dope_metrics(true_values: Sequence[float], estimates: Sequence[float], k: Sequence[int] = (1, 5), n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """DOPE's metrics of one task's family of policies (Fu et al. 2021, Sec. on metrics; reference: google-research/deep_ope
    plots.ipynb), each with a bootstrap 95% CI over policies.

    Values are normalized by the family's worst and best TRUE values, v' = (v - V_min) / (V_max - V_min), for the truth
    and the estimates alike; normalized estimates are clipped at 2 from above (not below, as in DOPE's code). Then
    abs_error = mean |est' - true'|, rank_correlation = Spearman(true', est'), regret@k = regret_at_k(true', est', k).
    CI: n_boot resamples of the policies with replacement (normalization kept from the full family, as DOPE's code),
    2.5/97.5 percentiles of each metric, ignoring resamples where it is undefined (e.g. a constant resample's Spearman).
    """
    v, e = np.asarray(true_values, np.float64), np.asarray(estimates, np.float64)
    if v.shape != e.shape or v.ndim != 1 or len(v) < 2:
        raise ValueError(f"dope_metrics: need two equal 1-D arrays of >= 2 policies, got {v.shape} and {e.shape}")
    worst, best = v.min(), v.max()
    if best == worst:
        raise ValueError("dope_metrics: all true values are equal; nothing to normalize by")
    vn, en = (v - worst) / (best - worst), np.minimum((e - worst) / (best - worst), 2.0)
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "abs_error": lambda t, p: float(np.mean(np.abs(p - t))), "rank_correlation": spearman,
        **{f"regret@{kk}": (lambda t, p, kk=kk: regret_at_k(t, p, kk)) for kk in k}}
    idx = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    out: dict[str, Any] = {"num_policies": len(v), "true_min": worst, "true_max": best,
                           "normalized_true": vn.tolist(), "normalized_estimates": en.tolist()}
    for name, fn in fns.items():
        boot = np.array([fn(vn[i], en[i]) for i in idx])
        ok = boot[np.isfinite(boot)]
        lo, hi = (np.percentile(ok, [2.5, 97.5]) if len(ok) else (np.nan, np.nan))
        out[name] = {"value": fn(vn, en), "ci_low": float(lo), "ci_high": float(hi), "boot_mean": float(ok.mean()) if len(ok) else np.nan}
    return out


# ---- Policies ----
@dataclass
class Policy:
    spec: str
    path: Path
    seed: int
    algorithm: str  # the checkpoint's algorithm, or "recipe-sac" for a shipped behaviour policy


def parse_policy(spec: str) -> Policy:
    """PATH, PATH:SEED or recipe:<env>-<medium|expert>; a missing file or unknown algorithm is a one-line RunError."""
    if spec.startswith("recipe:"):
        from recipe import build

        env, _, level = spec.removeprefix("recipe:").rpartition("-")
        path = build.policy_path(env, level)
        if env not in build.ENV_IDS or level not in ("medium", "expert") or not path.exists():
            raise common.RunError(f"policy {spec!r}: no shipped behaviour policy {path} (recipe policies are "
                                  f"recipe:<env>-<medium|expert>, env in {'/'.join(build.ENV_IDS)})")
        return Policy(spec, path, 0, "recipe-sac")
    path, seed = spec, 0
    m = re.fullmatch(r"(.+):(\d+)", spec)
    if m and not Path(spec).exists():
        path, seed = m.group(1), int(m.group(2))
    if not Path(path).is_file():
        raise common.RunError(f"policy checkpoint {path} does not exist (a policy is PATH, PATH:SEED or recipe:<env>-<medium|expert>)")
    meta = common.read_checkpoint(path)["meta"]
    algorithm, num_seeds = meta.get("algorithm"), len(meta.get("seeds") or [0])
    if not isinstance(algorithm, str) or not (HERE / f"{algorithm}.py").exists():
        raise common.RunError(f"{path}: checkpoint of algorithm {algorithm!r}, which has no file algorithms/{algorithm}.py")
    if seed >= num_seeds:
        raise common.RunError(f"{spec}: seed index {seed}, but the checkpoint holds {num_seeds} run(s) (0-{num_seeds - 1})")
    return Policy(spec, Path(path), seed, algorithm)


_modules: dict[str, Any] = {}


def algorithm_module(name: str) -> Any:
    """algorithms/<name>.py beside this file, imported once (registered in sys.modules before it runs, for its dataclasses)."""
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"offrl_{name}", HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


def load_act(policy: Policy, obs_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """The policy's deterministic act(obs [B, obs]) -> action [B, act] in env units."""
    if policy.algorithm == "recipe-sac":
        from recipe import build

        pol = build.NumpyPolicy(policy.path)
        width = pol.w["l0/kernel"].shape[0]
        if width != obs_dim:
            raise common.RunError(f"{policy.spec} takes {width}-dim observations, the dataset has {obs_dim}")
        return lambda o: pol(o, np.zeros((len(o), pol.w["mean/bias"].shape[-1]), np.float32))[0]  # tanh(mean)
    width = len(common.read_checkpoint(str(policy.path))["meta"]["prep"]["obs_mean"])
    if width != obs_dim:
        raise common.RunError(f"{policy.spec} takes {width}-dim observations, the dataset has {obs_dim}")
    module = algorithm_module(policy.algorithm)
    if not hasattr(module, "load_policy"):
        raise common.RunError(f"{policy.spec}: algorithms/{policy.algorithm}.py has no load_policy")
    return module.load_policy(str(policy.path), policy.seed)


def apply_in_chunks(act: Callable[[np.ndarray], np.ndarray], x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """act on every row of x, `chunk` rows per call (the last call padded to the same size: one compile)."""
    if len(x) <= chunk:
        return np.asarray(act(x), np.float32)
    out = []
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        pad = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)]) if len(part) < chunk else part
        out.append(np.asarray(act(pad), np.float32)[:len(part)])
    return np.concatenate(out)


def model_units_act(act: Callable[[np.ndarray], np.ndarray], prep: common.Prep) -> Callable[[np.ndarray], np.ndarray]:
    """act(raw obs) -> env action (load_act) as normalized obs -> mean action in [-1, 1]: the policy in MB's model units."""
    return lambda obs: prep.to_unit(apply_in_chunks(act, np.asarray(obs, np.float32) * prep.obs_std + prep.obs_mean))


# ---- Main ----
def check_args(args: Args) -> list[Policy]:
    if not args.policies:
        raise common.RunError("--policies: give at least one policy (PATH, PATH:SEED or recipe:<env>-<medium|expert>)")
    if not args.estimators:
        raise common.RunError("--estimators: give at least one of " + ", ".join(ESTIMATORS))
    if not 0.0 < args.discount <= 1.0:
        raise common.RunError("--discount must be in (0, 1]")
    if args.discount >= 1.0 and set(args.estimators) & {"dr", "fqe", "dualdice"}:
        raise common.RunError("--discount 1 is only for is/pdis/wis/mb; dr, fqe and dualdice need a discount < 1")
    if args.policy_std <= 0:
        raise common.RunError("--policy-std must be > 0 (a deterministic policy has no density)")
    for name in ("batch_size", "fqe_updates", "dualdice_updates", "bc_updates", "num_action_samples", "hidden_dim",
                 "mb_ensemble", "mb_hidden_dim", "mb_updates", "mb_rollouts"):
        if getattr(args, name) < 1:
            raise common.RunError(f"--{name.replace('_', '-')} must be >= 1")
    if args.mb_horizon is not None and args.mb_horizon < 1:
        raise common.RunError("--mb-horizon must be >= 1")
    if not 0.0 <= args.mb_holdout_ratio < 1.0:
        raise common.RunError("--mb-holdout-ratio must be in [0, 1)")
    return [parse_policy(s) for s in args.policies]


def _num(x: Any) -> float | None:
    """A JSON-safe float: None for NaN/Inf (e.g. an IS weight beyond float64)."""
    x = float(x)
    return x if np.isfinite(x) else None


def policy_means(policies: list[Policy], prep: common.Prep, data: dict, obs_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Each policy's mean action, once, on the host: [P, N, act] in [-1, 1] at the observations and next observations."""
    mu_obs, mu_next = [], []
    for p in policies:
        act = load_act(p, obs_dim)
        mu_obs.append(prep.to_unit(apply_in_chunks(act, data["observations"])))
        mu_next.append(prep.to_unit(apply_in_chunks(act, data["next_observations"])))
    return np.stack(mu_obs).astype(np.float32), np.stack(mu_next).astype(np.float32)


def behavior_log_ratios(args: Args, info: dict, prep: common.Prep, arrays: dict, mu_obs: np.ndarray,
                        key: jax.Array) -> tuple[np.ndarray, str, str]:
    """log pi(a|s) - log mu(a|s) per policy and row [P, N], with mu logged (recipe files) or fitted by BC; and which."""
    n = len(arrays["rewards"])
    logged = logged_log_probs(info, n) if args.behavior != "bc" else None
    if args.behavior == "logged" and logged is None:
        raise common.RunError(f"--behavior logged: {info['source']} stores no infos/action_log_probs; use --behavior bc")
    if logged is not None and (args.behavior == "logged" or info["source_kind"] == "recipe"):
        log_mu = unit_log_prob(logged, prep.act_low, prep.act_high)
        behavior, detail = "logged", f"infos/action_log_probs of {info['source'].partition(':')[2]}"
    else:
        log_mu, nll = fit_behavior(args, arrays, key)
        behavior, detail = "bc", f"diagonal Gaussian, {args.bc_updates} updates, final NLL {nll:.3f}"
    log_pi = jax.jit(jax.vmap(lambda m, a: gaussian_log_prob(m, jnp.log(args.policy_std), a), in_axes=(0, None)))
    return np.asarray(log_pi(jnp.asarray(mu_obs), jnp.asarray(arrays["actions"])), np.float64) - log_mu, behavior, detail


def policy_rows(args: Args, policies: list[Policy], estimators: list[str], data: dict, ends: np.ndarray,
                log_ratios: np.ndarray | None, results: dict, times: dict, behavior: str | None) -> list[dict]:
    """Every policy's estimates (the IS family computed here, per policy), wall times and IS weight diagnostics; printed."""
    idx, mask = trajectory_index(ends)
    rewards_traj = to_trajectories(data["rewards"], idx, mask)
    absorbing = data["terminals"][ends - 1] > 0
    rows = []
    for i, p in enumerate(policies):
        est, wall, diag = {}, {}, None
        if log_ratios is not None:
            t0 = time.time()
            model = {"q_hat": to_trajectories(results["fqe"]["q"][i], idx, mask),
                     "v_hat": to_trajectories(results["fqe"]["v"][i], idx, mask)} if "dr" in estimators else {}
            res = importance_sampling(rewards_traj, to_trajectories(log_ratios[i], idx, mask), mask, args.discount,
                                      absorbing=absorbing, **model)
            dt = time.time() - t0
            for e in estimators:
                if e in IS_FAMILY:  # one call computes them together
                    est[e], wall[e] = float(res[e]), dt + (times["fqe"] / len(policies) if e == "dr" else 0.0)
            lmax, lmin = float(res["log_max_weight"]), float(res["log_min_weight"])
            with np.errstate(over="ignore"):
                diag = {"log_max_weight": lmax, "log_min_weight": lmin, "max_weight": _num(np.exp(lmax)), "min_weight": _num(np.exp(lmin)),
                        "ess": float(res["ess"]), "num_trajectories": len(ends)}
        for e in ("fqe", "dualdice"):
            if e in estimators:
                est[e], wall[e] = float(results[e]["values"][i]), times[e] / len(policies)
        if "mb" in estimators:  # the one model's training shared, and this policy's rollouts
            est["mb"] = float(results["mb"]["values"][i])
            wall["mb"] = results["mb"]["train_time_s"] / len(policies) + float(results["mb"]["rollout_time_s"][i])
        for e in estimators:
            print(f"[{ALGORITHM}] {p.spec} ({p.algorithm}) {e:<8s} {est[e]:12.3f}  ({wall[e]:.1f}s)", flush=True)
        if diag:
            print(f"[{ALGORITHM}] {p.spec} IS weights: log max {diag['log_max_weight']:.1f}, log min {diag['log_min_weight']:.1f}, "
                  f"effective sample size {diag['ess']:.2f} of {len(ends)} trajectories", flush=True)
        rows.append({"spec": p.spec, "path": str(p.path), "seed": p.seed, "algorithm": p.algorithm, "estimates": {k: _num(v) for k, v in est.items()},
                     "wall_time_s": wall, "is_weights": diag, "behavior": behavior,
                     **({"fqe_loss": float(results["fqe"]["loss"][i])} if "fqe" in results else {}),
                     **({"dualdice_mean_ratio": float(results["dualdice"]["mean_ratio"][i])} if "dualdice" in results else {}),
                     **({"mb_mean_rollout_length": float(results["mb"]["mean_length"][i])} if "mb" in results else {})})
    return rows


def model_record(args: Args, mb: dict, horizon: int) -> dict:
    """MB's model, printed in one line and recorded: members, updates, training time, losses, held-out metrics, horizon."""
    hold = mb["holdout"]
    print(f"[{ALGORITHM}] mb model: {args.mb_ensemble} members, {args.mb_updates} updates ({mb['train_time_s']:.1f}s), "
          f"final loss {np.mean(mb['loss']):.3f}" + (f"; held out ({hold['num_rows']} rows): NLL/dim {np.mean(hold['nll']):.3f}, "
          f"state MSE {np.mean(hold['obs_mse']):.4f}, reward MSE {np.mean(hold['reward_mse']):.4f}, done error "
          f"{np.mean(hold['done_error']):.4f} (terminal rate {hold['terminal_rate']:.4f})" if hold else "")
          + f"; rollouts of {horizon} steps", flush=True)
    return {"horizon": horizon, "rollouts_per_initial_state": args.mb_rollouts, "train_time_s": mb["train_time_s"],
            "final_loss": mb["loss"].tolist(), "holdout": hold}


def main(args: Args) -> dict:
    t_start = time.time()
    policies = check_args(args)  # before any data is read: a typo is an error at once
    estimators = [e for e in ESTIMATORS if e in args.estimators]
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    env = common.make_eval_env(info, num_envs=1, seed=args.seed)  # the action box, checked against the data
    prep = common.Prep.fit(data, env.single_action_space, normalize_states=True)
    time_limit = getattr(env.envs[0].spec, "max_episode_steps", None)
    env.close()
    arrays = prep.arrays(data)  # normalized states, [-1, 1] actions: the networks' inputs
    ends, n = info["episode_ends"], len(data["rewards"])
    init = initial_rows(ends)
    label = ", recipe data: not D4RL" if info["source_kind"] == "recipe" else ""
    print(f"[{ALGORITHM}] {info['dataset']} ({info['source']}{label}): {n} transitions, {len(ends)} episodes; "
          f"{len(policies)} policies as N(mu(s), {args.policy_std}^2) in [-1, 1]; discount {args.discount}", flush=True)
    t0 = time.time()
    mu_obs, mu_next = policy_means(policies, prep, data, info["obs_dim"])
    times: dict[str, float] = {"policy_means": time.time() - t0}
    k_bc, k_fqe, k_dice = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    k_mb = jax.random.fold_in(jax.random.PRNGKey(args.seed), 3)  # beside the split: the others' keys stay as they were
    horizon = args.mb_horizon or time_limit or 1000
    log_ratios, behavior, behavior_detail, results = None, None, None, {}
    if set(estimators) & set(IS_FAMILY):
        t0 = time.time()
        log_ratios, behavior, behavior_detail = behavior_log_ratios(args, info, prep, arrays, mu_obs, k_bc)
        times["behavior"] = time.time() - t0
        print(f"[{ALGORITHM}] behaviour log-densities: {behavior} ({behavior_detail}; {times['behavior']:.1f}s)", flush=True)
    fqe_data = {**{k: arrays[k] for k in ("observations", "actions", "rewards", "next_observations", "terminals")},
                "init_observations": arrays["observations"][init]}
    means = {"next": mu_next, "init": mu_obs[:, init], "obs": mu_obs}
    for name, wanted, run_fn in (("fqe", "fqe" in estimators or "dr" in estimators,
                                  lambda: run_fqe(args, fqe_data, means, k_fqe, model_on_rows="dr" in estimators)),
                                 ("dualdice", "dualdice" in estimators, lambda: run_dualdice(args, fqe_data, means, k_dice)),
                                 ("mb", "mb" in estimators, lambda: run_mb(
                                     args, fqe_data, [model_units_act(load_act(p, info["obs_dim"]), prep) for p in policies], horizon, k_mb))):
        if wanted:
            t0 = time.time()
            results[name] = run_fn()
            times[name] = time.time() - t0
    mb_model = model_record(args, results["mb"], horizon) if "mb" in results else None
    rows = policy_rows(args, policies, estimators, data, ends, log_ratios, results, times, behavior)
    times["total"] = time.time() - t_start
    result = {"algorithm": ALGORITHM, **{k: info.get(k) for k in common.RESULT_KEYS[1:6]}, "num_transitions": n, "num_episodes": len(ends),
              "estimand": f"E[sum_t gamma^t r_t] from the dataset's initial states, gamma = {args.discount}",
              "evaluated_policy": f"N(mu(s), {args.policy_std}^2 I) in [-1, 1] action units, executed clipped to the box",
              "behavior": behavior, "behavior_detail": behavior_detail, "estimators": estimators, "policies": rows,
              "mb_model": mb_model,
              "wall_time_s": times, "wall_time_note": "fqe/dualdice train all policies in one vmapped call: per policy is that "
              "call's time / number of policies; is/pdis/wis/dr per policy is one call computing them together (dr adds fqe's share); "
              "mb per policy is its model's training time / number of policies + that policy's rollouts",
              "config": dataclasses.asdict(args)}
    tag = Path(str(info["dataset"])).stem if args.dataset else info["dataset"]
    out = Path(args.out or f"runs/ope/{tag}/{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"[{ALGORITHM}] done in {times['total']:.0f}s; results in {out}", flush=True)
    return result


if __name__ == "__main__":
    common.cli(Args, main)

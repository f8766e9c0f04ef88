"""Conservative Q-Learning (CQL) -- single-file JAX/Flax implementation (SAC-based CQL(H)).

Kumar, Zhou, Tucker & Levine, "Conservative Q-Learning for Offline Reinforcement Learning", NeurIPS 2020.
https://arxiv.org/abs/2006.04779  (reference code: github.com/aviralkumar2907/CQL; settings also follow CORL's cql.py)

    python algorithms/cql.py --env hopper-medium-v2
    python algorithms/cql.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/cql.py --env hopper-medium-v2 --cql-lagrange --cql-target-gap 10
    python algorithms/cql.py --load runs/.../checkpoint.msgpack --num-updates 0   # evaluate a checkpoint

The whole training loop runs on the device: every jitted call performs `eval_interval` updates in one
`jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process with `jax.vmap`.
All sampled-action arrays are kept as [batch, n_samples, ...] (Q values as [2, batch, n_samples]).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from tensorboard.summary import Writer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

ALGORITHM = "cql"


# ---- Config ----
@dataclass
class Args:
    env: str = "hopper-medium-v2"
    """D4RL-style dataset name `<env>-<kind>[-v2]` (env: hopper/halfcheetah/walker2d/ant). Ignored with --dataset."""
    dataset: str | None = None
    """Path to a D4RL-layout HDF5 file or a Minari dataset folder (needs --eval-env)."""
    eval_env: str | None = None
    """Gymnasium id of the evaluation environment (required with --dataset), e.g. Hopper-v4."""
    source: str = "auto"
    """Where common.load_dataset looks for a named dataset (see common.py)."""
    seed: int = 0
    """Random seed of the first run; run i of --num-seeds uses seed+i."""
    num_seeds: int = 1
    """Number of independent seeds trained in parallel (jax.vmap over the whole train state)."""
    num_updates: int = 1_000_000
    """Total gradient updates (CQL paper, App. F; CORL: 1M)."""
    batch_size: int = 256
    """Minibatch size (CQL paper, App. F; CORL: 256)."""
    eval_interval: int = 5000
    """Updates between evaluations; also the length of one on-device lax.scan chunk."""
    eval_episodes: int = 10
    """Evaluation episodes per seed (deterministic policy)."""
    log_dir: str | None = None
    """TensorBoard/result directory. Default: runs/cql/<dataset>/<seed>-<timestamp>."""
    save_path: str | None = None
    """Checkpoint file, rewritten at every evaluation. Default: <log_dir>/checkpoint.msgpack."""
    load: str | None = None
    """Checkpoint to restore: resume training up to --num-updates, or with --num-updates 0 only evaluate it."""
    hidden_dim: int = 256
    """Width of every hidden layer (CQL reference code / CORL: 256)."""
    num_layers: int = 3
    """Number of hidden layers of actor and critics (CQL reference code / CORL: 3)."""
    normalize_states: bool = True
    """Standardize observations with the dataset mean/std (CORL's default)."""
    discount: float = 0.99
    """Discount gamma (CQL paper, App. F: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target critics (SAC / CORL: 5e-3)."""
    actor_lr: float = 3e-5
    """Policy Adam learning rate (CORL's Gym-MuJoCo setting 3e-5; the CQL paper's App. F uses 1e-4 / 3e-5)."""
    critic_lr: float = 3e-4
    """Q-network Adam learning rate (CQL paper, App. F: 3e-4)."""
    alpha_lr: float = 3e-4
    """Adam learning rate of the SAC temperature log(alpha) and of the CQL Lagrange multiplier (CORL: 3e-4)."""
    target_entropy: float | None = None
    """SAC entropy target for automatic temperature tuning; default -action_dim (SAC, Haarnoja et al. 2018)."""
    backup_entropy: bool = False
    """Subtract alpha * log pi(a'|s') in the TD target (the SAC soft backup; off in CQL/CORL for Gym)."""
    cql_alpha: float = 10.0
    """Weight alpha of the CQL(H) regularizer, Eq. (4) (CORL Gym-MuJoCo: 10; CQL paper App. F: 5)."""
    cql_n_actions: int = 10
    """Sampled actions per state for each of the three logsumexp proposals (CQL paper, App. F: 10)."""
    cql_temp: float = 1.0
    """Temperature of the logsumexp in the CQL(H) term (CORL: 1.0)."""
    cql_lagrange: bool = False
    """Tune the CQL weight by dual gradient descent, CQL paper Eq. (30) ('CQL-Lagrange')."""
    cql_target_gap: float = 10.0
    """Threshold tau of the Lagrange version: the gap E[logsumexp Q] - E[Q(s,a)] it aims for (reference code: 10)."""
    reward_scale: float = 1.0
    """Rewards are trained as reward_scale * r + reward_bias (CORL's cql.py options; 1 and 0 for Gym-MuJoCo)."""
    reward_bias: float = 0.0
    """See --reward-scale."""
    log_std_min: float = -20.0
    """Lower clip of the actor log-std (SAC / CORL: -20)."""
    log_std_max: float = 2.0
    """Upper clip of the actor log-std (SAC / CORL: 2)."""
    debug_nan_at: int = -1
    """Testing aid: inject a NaN into the critic loss at this update number (1-based) to exercise the NaN guard."""


def resolve_hyperparameters(args: Args, info: dict) -> dict[str, Any]:
    """CQL uses one set of hyperparameters for all Gym-MuJoCo datasets (CQL paper, App. F)."""
    return {"cql_alpha": args.cql_alpha, "lagrange": args.cql_lagrange, "target_gap": args.cql_target_gap,
            "reward_scale": args.reward_scale, "reward_bias": args.reward_bias}


def process_rewards(hp: dict[str, Any], data: dict[str, np.ndarray], info: dict) -> np.ndarray:
    """reward_scale * r + reward_bias (identity by default: CQL uses the raw rewards on Gym-MuJoCo)."""
    return (hp["reward_scale"] * data["rewards"] + hp["reward_bias"]).astype(np.float32)


# ---- Networks ----
class MLP(nn.Module):
    hidden_dim: int
    num_layers: int
    out_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.num_layers):
            x = nn.relu(nn.Dense(self.hidden_dim)(x))
        return nn.Dense(self.out_dim)(x)


class DoubleCritic(nn.Module):
    """Twin Q_theta(s, a) -> [2, *leading] for obs [*leading, obs], actions [*leading, act]."""

    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, action], axis=-1)
        ensemble = nn.vmap(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=2,
        )
        return ensemble(self.hidden_dim, self.num_layers, 1)(x)[..., 0]


class TanhGaussianActor(nn.Module):
    """SAC policy: a = tanh(u), u ~ N(mu(s), sigma(s)^2); returns (mu, log_sigma), each [batch, act]."""

    action_dim: int
    hidden_dim: int
    num_layers: int
    log_std_min: float
    log_std_max: float

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = MLP(self.hidden_dim, self.num_layers, 2 * self.action_dim)(obs)
        mean, log_std = jnp.split(out, 2, axis=-1)
        return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)


def deterministic_action(actor_def: nn.Module, params: Any, obs: jax.Array) -> jax.Array:
    """Evaluation action: tanh of the Gaussian mean."""
    return jnp.tanh(actor_def.apply(params, obs)[0])


def sample_tanh_gaussian(key: jax.Array, mean: jax.Array, log_std: jax.Array,
                         num_samples: int) -> tuple[jax.Array, jax.Array]:
    """num_samples reparameterized actions per state: ([batch, n, act], log-probs [batch, n]).

    log pi(a|s) = log N(u; mu, sigma) - sum log(1 - tanh(u)^2), with the stable form
    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
    """
    batch, act_dim = mean.shape
    eps = jax.random.normal(key, (batch, num_samples, act_dim))
    u = mean[:, None, :] + jnp.exp(log_std)[:, None, :] * eps
    log_prob = jnp.sum(-0.5 * eps**2 - log_std[:, None, :] - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)
    log_prob = log_prob - jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)
    return jnp.tanh(u), log_prob


# ---- Losses ----
def q_of_samples(q_fn: Callable, obs: jax.Array, actions: jax.Array) -> jax.Array:
    """Twin Q of n sampled actions per state: obs [batch, obs], actions [batch, n, act] -> [2, batch, n].

    q_fn maps ([M, obs], [M, act]) -> [2, M]. The (state, sample) pairs are flattened to M = batch * n rows
    (XLA:CPU is much faster on plain 2-D matmuls) with row b * n + j = (obs[b], actions[b, j]), and the result
    is reshaped back to [2, batch, n] in the same order.
    """
    batch, n, act_dim = actions.shape
    obs_rep = jnp.broadcast_to(obs[:, None, :], (batch, n, obs.shape[-1])).reshape(batch * n, obs.shape[-1])
    q = q_fn(obs_rep, actions.reshape(batch * n, act_dim))
    chex.assert_shape(q, (2, batch * n))
    return q.reshape(2, batch, n)


def cql_logsumexp(q_rand: jax.Array, q_cur: jax.Array, q_next: jax.Array, log_prob_rand: float | jax.Array,
                  log_prob_cur: jax.Array, log_prob_next: jax.Array, temp: float = 1.0) -> jax.Array:
    """Importance-sampled log sum_a exp Q(s, a) of CQL(H) (CQL paper, Eq. (4) and App. F).

    q_*: [..., batch, n] Q(s, a_j) for uniform actions, pi(.|s) actions and pi(.|s') actions (all evaluated
    at s); log_prob_*: the log-densities of those proposals (rand: the scalar log(0.5^act_dim); others
    [batch, n]). Each sample is divided by its proposal density, the three sets are concatenated along the
    sample axis, and logsumexp runs over that axis only: returns [..., batch]. (The constant log(3n) of the
    Monte-Carlo average is dropped, as in the reference code; it does not change gradients.)
    """
    cat = jnp.concatenate([q_rand - log_prob_rand, q_next - log_prob_next, q_cur - log_prob_cur], axis=-1)
    return temp * jax.nn.logsumexp(cat / temp, axis=-1)


def cql_gap(ood: jax.Array, q_data: jax.Array) -> jax.Array:
    """E_s[logsumexp_a Q(s, a)] - E_(s,a)~D[Q(s, a)], per critic: [2, batch] x2 -> [2]."""
    return (ood - q_data).mean(axis=-1)


def sac_actor_loss(log_prob: jax.Array, q_pi: jax.Array, alpha: jax.Array) -> jax.Array:
    """SAC policy loss E[alpha log pi(a|s) - min_i Q_i(s, a)], a ~ pi(.|s)."""
    return (alpha * log_prob - q_pi).mean()


def temperature_loss(log_alpha: jax.Array, log_prob: jax.Array, target_entropy: float) -> jax.Array:
    """SAC automatic entropy tuning: -log(alpha) * (log pi + target_entropy), log pi held constant."""
    return -(log_alpha * jax.lax.stop_gradient(log_prob + target_entropy)).mean()


# ---- Train step ----
@flax.struct.dataclass
class CQLState:
    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    log_alpha: TrainState  # SAC temperature
    log_alpha_prime: TrainState  # CQL Lagrange multiplier (only trained with --cql-lagrange)
    key: jax.Array


def make_networks(args: Args, action_dim: int) -> tuple[TanhGaussianActor, DoubleCritic]:
    actor = TanhGaussianActor(action_dim, args.hidden_dim, args.num_layers, args.log_std_min, args.log_std_max)
    return actor, DoubleCritic(args.hidden_dim, args.num_layers)


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], CQLState]:
    actor_def, critic_def = make_networks(args, action_dim)
    scalar_apply = lambda p: p["value"]  # noqa: E731  (TrainState needs a dict of params)

    def init(seed: jax.Array) -> CQLState:
        key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed), 3)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        critic_params = critic_def.init(k_critic, obs, act)
        return CQLState(
            actor=TrainState.create(apply_fn=actor_def.apply, params=actor_def.init(k_actor, obs),
                                    tx=optax.adam(args.actor_lr)),
            critic=TrainState.create(apply_fn=critic_def.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            target_critic_params=critic_params,
            log_alpha=TrainState.create(apply_fn=scalar_apply, params={"value": jnp.zeros(())}, tx=optax.adam(args.alpha_lr)),
            log_alpha_prime=TrainState.create(apply_fn=scalar_apply, params={"value": jnp.zeros(())},
                                              tx=optax.adam(args.alpha_lr)),
            key=key,
        )

    return init


def make_update(args: Args, hp: dict[str, Any]) -> Callable:
    n = args.cql_n_actions

    def update(state: CQLState, data: dict[str, jax.Array], step: jax.Array) -> tuple[CQLState, dict]:
        key, k_idx, k_pi, k_next, k_rand, k_cur, k_cnext = jax.random.split(state.key, 7)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, data["observations"].shape[0])
        b = jax.tree.map(lambda x: x[idx], data)
        obs, act, next_obs = b["observations"], b["actions"], b["next_observations"]
        batch, act_dim = act.shape
        target_entropy = -act_dim if args.target_entropy is None else args.target_entropy
        actor_apply, critic_apply = state.actor.apply_fn, state.critic.apply_fn

        # SAC actor and temperature losses (with the current critics).
        alpha = jnp.exp(state.log_alpha.params["value"])

        def actor_loss_fn(params):
            pi, log_prob = sample_tanh_gaussian(k_pi, *actor_apply(params, obs), 1)
            q_pi = critic_apply(state.critic.params, obs, pi[:, 0]).min(0)
            return sac_actor_loss(log_prob[:, 0], q_pi, alpha), log_prob[:, 0]

        (actor_loss, log_prob), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)
        alpha_loss, grads = jax.value_and_grad(
            lambda p: temperature_loss(p["value"], log_prob, target_entropy))(state.log_alpha.params)
        log_alpha = state.log_alpha.apply_gradients(grads=grads)

        # TD target: r + gamma (1 - done) min_i Q'_i(s', a'), a' ~ pi(.|s')  (CQL paper, Eq. (2) backup).
        next_a, next_log_prob = sample_tanh_gaussian(k_next, *actor_apply(state.actor.params, next_obs), 1)
        next_q = critic_apply(state.target_critic_params, next_obs, next_a[:, 0]).min(0)
        if args.backup_entropy:
            next_q = next_q - alpha * next_log_prob[:, 0]
        target = b["rewards"] + args.discount * (1.0 - b["terminals"]) * next_q

        # Proposal actions for the logsumexp, kept as [batch, n, act] with log-densities [batch, n].
        rand_a = jax.random.uniform(k_rand, (batch, n, act_dim), minval=-1.0, maxval=1.0)
        log_prob_rand = act_dim * jnp.log(0.5)  # uniform density on [-1, 1]^act_dim
        cur_a, cur_log_prob = sample_tanh_gaussian(k_cur, *actor_apply(state.actor.params, obs), n)
        next_pa, next_pa_log_prob = sample_tanh_gaussian(k_cnext, *actor_apply(state.actor.params, next_obs), n)
        chex.assert_shape([rand_a, cur_a, next_pa], (batch, n, act_dim))
        chex.assert_shape([cur_log_prob, next_pa_log_prob], (batch, n))
        alpha_prime = jnp.clip(jnp.exp(state.log_alpha_prime.params["value"]), 0.0, 1e6)

        def critic_loss_fn(params):
            q_data = critic_apply(params, obs, act)  # [2, batch]
            td_loss = ((q_data - target) ** 2).mean(1).sum()
            q_fn = lambda o, a: critic_apply(params, o, a)  # noqa: E731
            q_rand = q_of_samples(q_fn, obs, rand_a)  # [2, batch, n], every proposal scored at s
            q_cur = q_of_samples(q_fn, obs, cur_a)
            q_next = q_of_samples(q_fn, obs, next_pa)
            chex.assert_shape([q_rand, q_cur, q_next], (2, batch, n))
            ood = cql_logsumexp(q_rand, q_cur, q_next, log_prob_rand, cur_log_prob, next_pa_log_prob, args.cql_temp)
            chex.assert_shape(ood, (2, batch))
            gap = cql_gap(ood, q_data)  # [2]
            if args.cql_lagrange:  # CQL paper Eq. (30): alpha' * (gap - tau), alpha' >= 0 by dual ascent
                cql_loss = (alpha_prime * args.cql_alpha * (gap - args.cql_target_gap)).sum()
            else:
                cql_loss = args.cql_alpha * gap.sum()
            loss = td_loss + cql_loss
            if args.debug_nan_at >= 0:  # testing aid, see --debug-nan-at
                loss = loss + jnp.where(step + 1 == args.debug_nan_at, jnp.nan, 0.0)
            return loss, (td_loss, cql_loss, gap, q_data)

        (critic_loss, (td_loss, cql_loss, gap, q_data)), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)
        target_params = optax.incremental_update(critic.params, state.target_critic_params, args.tau)

        log_alpha_prime = state.log_alpha_prime
        metrics = {}
        if args.cql_lagrange:  # dual step: maximize alpha' (gap - tau), i.e. minimize its negative
            def alpha_prime_loss_fn(p):
                ap = jnp.clip(jnp.exp(p["value"]), 0.0, 1e6)
                return -0.5 * (ap * args.cql_alpha * (jax.lax.stop_gradient(gap) - args.cql_target_gap)).sum()

            alpha_prime_loss, grads = jax.value_and_grad(alpha_prime_loss_fn)(log_alpha_prime.params)
            log_alpha_prime = log_alpha_prime.apply_gradients(grads=grads)
            metrics.update(alpha_prime_loss=alpha_prime_loss, alpha_prime=alpha_prime)

        new_state = CQLState(actor=actor, critic=critic, target_critic_params=target_params, log_alpha=log_alpha,
                             log_alpha_prime=log_alpha_prime, key=key)
        metrics.update(critic_loss=critic_loss, td_loss=td_loss, cql_loss=cql_loss, cql_gap=gap.mean(),
                       actor_loss=actor_loss, alpha_loss=alpha_loss, alpha=alpha, entropy=-log_prob.mean(),
                       q_mean=q_data.mean())
        return new_state, metrics

    return update


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: CQLState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
        def body(carry, step):
            return jax.vmap(update, in_axes=(0, None, None))(carry, data, step)

        states, metrics = jax.lax.scan(body, states, step0 + jnp.arange(num_steps))
        # metrics: [num_steps, num_seeds] -> chunk means per seed, and the first non-finite step (-1 if none).
        means = {k: m.mean(0) for k, m in metrics.items()}
        first_bad = {}
        for k, m in metrics.items():
            bad = ~jnp.all(jnp.isfinite(m), axis=1)
            first_bad[k] = jnp.where(bad.any(), jnp.argmax(bad), -1)
        return states, means, first_bad

    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=0)


# ---- Evaluation ----
def make_policy_fn(actor_def: nn.Module, obs_mean: np.ndarray, obs_std: np.ndarray) -> Callable:
    """Deterministic policy (the tanh mean) for all seeds: params [S, ...], obs [S, E, obs] -> [S, E, act]."""

    @jax.jit
    def policy(params: Any, obs: jax.Array) -> jax.Array:
        obs = (obs - obs_mean) / obs_std
        return jax.vmap(lambda p, o: deterministic_action(actor_def, p, o))(params, obs)

    return policy


def run_evaluation(env, policy: Callable, params: Any, info: dict, num_seeds: int, episodes: int,
                   act_low: np.ndarray, act_high: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns per-seed mean return [S] and normalized score [S] (None without reference scores)."""

    def act_fn(obs: np.ndarray) -> np.ndarray:
        a = np.asarray(policy(params, jnp.asarray(obs, jnp.float32).reshape(num_seeds, episodes, -1)))
        a = np.clip(a.reshape(num_seeds * episodes, -1), -1.0, 1.0)
        return act_low + (a + 1.0) * 0.5 * (act_high - act_low)  # [-1, 1] -> env action bounds

    returns = np.asarray(common.evaluate(env, act_fn)).reshape(num_seeds, episodes)
    norm = common.normalized_score(info, returns)
    return returns.mean(1), (None if norm is None else np.asarray(norm).reshape(num_seeds, episodes).mean(1))


# ---- Checkpointing ----
def save_checkpoint(path: str, states: Any, step: int) -> None:
    """Atomic write: an interrupted run always leaves the last complete checkpoint."""
    blob = flax.serialization.to_bytes({"state": states, "step": step})
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def load_checkpoint(path: str, template: Any) -> tuple[Any, int]:
    try:
        restored = flax.serialization.from_bytes({"state": template, "step": 0}, Path(path).read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot load checkpoint {path}: {e}") from None
    for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(restored["state"]), strict=True):
        if np.shape(a) != np.shape(b):
            raise SystemExit(
                f"error: checkpoint {path} does not match this configuration (array shape {np.shape(b)} vs "
                f"{np.shape(a)}); use the same --num-seeds/--hidden-dim/--num-layers as when it was saved"
            )
    return jax.tree.map(jnp.asarray, restored["state"]), int(restored["step"])


# ---- Main ----
def _f(x: Any) -> float | None:
    return None if x is None else float(x)


def main(args: Args) -> dict:
    t_start = time.time()
    if args.dataset is not None and args.eval_env is None:
        raise SystemExit("error: --dataset needs --eval-env (the gymnasium id to evaluate in, e.g. Hopper-v4)")
    for name in ("num_seeds", "batch_size", "eval_interval", "eval_episodes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    num_seeds, episodes = args.num_seeds, args.eval_episodes
    seeds = [args.seed + i for i in range(num_seeds)]
    try:
        data_np, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
        env = common.make_eval_env(info, num_envs=num_seeds * episodes, seed=args.seed)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    hp = resolve_hyperparameters(args, info)

    # Actions are trained in [-1, 1]; evaluation maps them back to the env's bounds.
    act_low = np.asarray(env.single_action_space.low, np.float32)
    act_high = np.asarray(env.single_action_space.high, np.float32)
    actions = np.clip(2.0 * (data_np["actions"] - act_low) / (act_high - act_low) - 1.0, -1.0, 1.0)
    obs_dim, action_dim = data_np["observations"].shape[1], actions.shape[1]
    if args.normalize_states:
        obs_mean, obs_std = common.state_stats(data_np["observations"])
    else:
        obs_mean, obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
    rewards = process_rewards(hp, data_np, info)
    data = {  # goes onto the device once
        "observations": jnp.asarray((data_np["observations"] - obs_mean) / obs_std, jnp.float32),
        "actions": jnp.asarray(actions, jnp.float32),
        "rewards": jnp.asarray(rewards, jnp.float32),
        "next_observations": jnp.asarray((data_np["next_observations"] - obs_mean) / obs_std, jnp.float32),
        "terminals": jnp.asarray(data_np["terminals"], jnp.float32),
    }

    dataset_tag = Path(str(info["dataset"])).stem if args.dataset else str(info["dataset"])
    log_dir = Path(args.log_dir or f"runs/{ALGORITHM}/{dataset_tag}/{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    log_dir.mkdir(parents=True, exist_ok=True)
    save_path = args.save_path or str(log_dir / "checkpoint.msgpack")
    Path(save_path).parent.mkdir(parents=True, exist_ok=True)
    writer = Writer(str(log_dir))

    states = jax.vmap(make_init(args, obs_dim, action_dim))(jnp.asarray(seeds))
    states = jax.tree.map(lambda x: jnp.array(x, copy=True), states)  # distinct buffers (they get donated)
    step = 0
    if args.load:
        states, step = load_checkpoint(args.load, states)
        print(f"[{ALGORITHM}] restored {args.load} at update {step}")
    train_chunk = make_train_chunk(make_update(args, hp))
    policy = make_policy_fn(make_networks(args, action_dim)[0], obs_mean, obs_std)

    compiled: dict[int, Any] = {}
    compile_time = train_time = 0.0
    trained = 0
    history: list[dict] = []
    best_ret = np.full(num_seeds, -np.inf)
    best_norm: np.ndarray | None = None
    last_ret, last_norm = best_ret, None
    csv_path = log_dir / "evals.csv"
    print(f"[{ALGORITHM}] {info['dataset']} ({info['source']}) -> {info['eval_env']}; seeds {seeds}; "
          f"{hp}; logs in {log_dir}")

    def evaluate_and_log(step: int) -> None:
        nonlocal best_ret, best_norm, last_ret, last_norm
        t0 = time.perf_counter()
        last_ret, last_norm = run_evaluation(
            env, policy, states.actor.params, info, num_seeds, episodes, act_low, act_high)
        best_ret = np.maximum(best_ret, last_ret)
        if last_norm is not None:
            best_norm = last_norm if best_norm is None else np.maximum(best_norm, last_norm)
        history.append({"update": step, "returns": [float(x) for x in last_ret],
                        "normalized": None if last_norm is None else [float(x) for x in last_norm]})
        for i in range(num_seeds):
            writer.add_scalar(f"eval/return/seed{i}", float(last_ret[i]), step)
            if last_norm is not None:
                writer.add_scalar(f"eval/normalized/seed{i}", float(last_norm[i]), step)
        writer.add_scalar("eval/return", float(last_ret.mean()), step)
        msg = f"return {last_ret.mean():.1f} ± {last_ret.std():.1f}"
        if last_norm is not None:
            writer.add_scalar("eval/normalized", float(last_norm.mean()), step)
            msg += f" | normalized {last_norm.mean():.1f} ± {last_norm.std():.1f} (best {best_norm.mean():.1f})"
        new_file = not csv_path.exists()
        with open(csv_path, "a", newline="") as f:
            w = csv.writer(f)
            if new_file:
                w.writerow(["update", "seed", "return", "normalized"])
            for i in range(num_seeds):
                w.writerow([step, seeds[i], float(last_ret[i]), "" if last_norm is None else float(last_norm[i])])
        ups = trained / train_time if train_time > 0 else float("nan")
        writer.add_scalar("perf/updates_per_s", ups, step)
        writer.flush()
        print(f"[{ALGORITHM}] update {step}/{args.num_updates} | {msg} | {ups:.0f} upd/s | "
              f"eval {time.perf_counter() - t0:.1f}s", flush=True)

    while step < args.num_updates:
        n = min(args.eval_interval, args.num_updates - step)
        step0 = jnp.asarray(step, jnp.int32)
        if n not in compiled:  # AOT compile, timed separately from training throughput
            t0 = time.perf_counter()
            compiled[n] = train_chunk.lower(states, data, step0, num_steps=n).compile()
            compile_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        states, means, first_bad = compiled[n](states, data, step0)
        means, first_bad = jax.device_get((means, first_bad))
        train_time += time.perf_counter() - t0
        trained += n
        for k, m in means.items():  # NaN guard: the last good checkpoint on disk is left untouched
            if not np.all(np.isfinite(m)):
                where = f"update {step + int(first_bad[k]) + 1}" if first_bad[k] >= 0 else "an update"
                writer.close()
                raise FloatingPointError(
                    f"non-finite {k} at {where} (chunk of updates {step + 1}-{step + n}); "
                    f"stopped without overwriting the last good checkpoint {save_path}")
        step += n
        for k, m in means.items():
            writer.add_scalar(f"train/{k}", float(np.mean(m)), step)
        evaluate_and_log(step)
        save_checkpoint(save_path, states, step)
    if not history:  # --num-updates 0 (or a finished checkpoint): evaluate only
        evaluate_and_log(step)
    writer.close()

    per_seed = [{"seed": seeds[i], "last_return": float(last_ret[i]), "best_return": float(best_ret[i]),
                 "last_normalized": None if last_norm is None else float(last_norm[i]),
                 "best_normalized": None if best_norm is None else float(best_norm[i])} for i in range(num_seeds)]
    result = {
        "algorithm": ALGORITHM,
        "dataset": str(info["dataset"]),
        "source": str(info["source"]),
        "source_kind": str(info["source_kind"]),
        "dataset_sha256": info.get("dataset_sha256"),  # recipe data: sha256 of its arrays
        "eval_env": str(info["eval_env"]),
        "num_updates": step,
        "seeds": seeds,
        "last_return": float(last_ret.mean()),
        "best_return": float(best_ret.mean()),
        "last_normalized": None if last_norm is None else float(last_norm.mean()),
        "best_normalized": None if best_norm is None else float(best_norm.mean()),
        "per_seed": per_seed,
        "wall_time_s": time.time() - t_start,
        "updates_per_s": trained / train_time if train_time > 0 else None,
        "compile_time_s": compile_time,
        "config": asdict(args),
        "hyperparameters": hp,
        "eval_history": history,
    }
    (log_dir / "result.json").write_text(json.dumps(result, indent=2))
    norm_msg = "" if last_norm is None else f", normalized {last_norm.mean():.1f} ± {last_norm.std():.1f}"
    print(f"[{ALGORITHM}] done after {step} updates: return {last_ret.mean():.1f} ± {last_ret.std():.1f}{norm_msg} "
          f"(best {best_ret.mean():.1f}); {result['updates_per_s'] or 0:.0f} upd/s; result in {log_dir}")
    for s in per_seed:
        print(f"[{ALGORITHM}]   seed {s['seed']}: last return {s['last_return']:.1f}, best {s['best_return']:.1f}, "
              f"last normalized {_f(s['last_normalized'])}, best normalized {_f(s['best_normalized'])}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))

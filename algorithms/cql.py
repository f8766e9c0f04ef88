"""Conservative Q-Learning (CQL) -- single-file JAX/Flax implementation (SAC-based CQL(H)).

Kumar, Zhou, Tucker & Levine, "Conservative Q-Learning for Offline Reinforcement Learning", NeurIPS 2020.
https://arxiv.org/abs/2006.04779  (reference code: github.com/aviralkumar2907/CQL; settings also follow CORL's cql.py)

    python algorithms/cql.py --env hopper-medium-v2
    python algorithms/cql.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/cql.py --env hopper-medium-v2 --cql-lagrange --cql-target-gap 10
    python algorithms/cql.py --env hopper-medium-v2 --online-steps 1000000         # then fine-tune online (1M env steps)
    python algorithms/cql.py --load runs/.../checkpoint.msgpack                    # resume (same folder, same schedule)
    python algorithms/cql.py --load runs/.../checkpoint.msgpack --num-updates 0    # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack"); action = act(obs)           # in your own code (env units)

The whole training loop runs on the device: every jitted call performs a few seconds of updates in one
`jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process with `jax.vmap`.
All sampled-action arrays are kept as [batch, n_samples, ...] (Q values as [2, batch, n_samples]).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # common.py beside me first
import common  # noqa: E402

ALGORITHM = "cql"


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
    seed: int = 0
    """Random seed of the first run; run i of --num-seeds uses seed + i."""
    num_seeds: int = 1
    """Independent seeds trained in parallel in one process (jax.vmap over the whole train state)."""
    num_updates: int = 1_000_000
    """Total gradient updates (CQL paper, App. F; CORL: 1M)."""
    batch_size: int = 256
    """Minibatch size (CQL paper, App. F; CORL: 256)."""
    eval_interval: int = 5000
    """Updates between evaluations; a checkpoint is saved at each."""
    eval_episodes: int = 10
    """Evaluation episodes per seed, with the deterministic policy."""
    log_dir: str | None = None
    """Folder of the TensorBoard logs, evals.csv, result.json and checkpoint. Default: runs/<algorithm>/<dataset>/<seed>-<time>."""
    save_path: str | None = None
    """Checkpoint file, rewritten at every evaluation and on Ctrl-C. Default: <log_dir>/checkpoint.msgpack."""
    load: str | None = None
    """Checkpoint to resume, in its own folder and with its config and schedule (flags given here override); --num-updates 0 only evaluates it."""
    keep_checkpoints: bool = False
    """Also keep the checkpoint of every evaluation, as <log_dir>/checkpoints/<update>.msgpack (the policy family of off-policy evaluation, benchmarks/dope.py)."""
    hidden_dim: int = 256
    """Width of every hidden layer (CQL reference code / CORL: 256)."""
    num_layers: int = 3
    """Number of hidden layers (CQL reference code / CORL: 3)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint)."""
    discount: float = 0.99
    """Discount gamma of the TD target (CQL paper, App. F: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target critic (SAC / CORL: 0.005)."""
    actor_lr: float = 3e-5
    """Actor Adam learning rate (CORL's Gym-MuJoCo setting 3e-5; the CQL paper's App. F uses 1e-4 / 3e-5)."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate (CQL paper, App. F: 3e-4)."""
    critic_layer_norm: bool = False
    """LayerNorm before each hidden ReLU of the critics (JAX-CORL's TD3+BC; Ball et al. 2023). Off in the paper."""
    alpha_lr: float = 3e-4
    """Adam learning rate of the SAC temperature log(alpha) and of the CQL Lagrange multiplier (CORL: 3e-4)."""
    target_entropy: float | None = None
    """SAC entropy target for automatic temperature tuning; default -action_dim (SAC, Haarnoja et al. 2018)."""
    backup_entropy: bool = False
    """Subtract alpha * log pi(a'|s') in the TD target (the SAC soft backup; off in CQL/CORL for Gym)."""
    cql_alpha: float = 10.0
    """Weight alpha of the CQL(H) regularizer, Eq. (4) (CORL Gym-MuJoCo: 10; CQL paper App. F: 5)."""
    cql_num_actions: int = 10
    """Sampled actions per state for each of the three logsumexp proposals (CQL paper, App. F: 10)."""
    cql_temperature: float = 1.0
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
    """Lower clip of the policy log-std (SAC / CORL: -20)."""
    log_std_max: float = 2.0
    """Upper clip of the policy log-std (SAC / CORL: 2)."""
    online_steps: int = 0
    """Online fine-tuning after the offline updates: env steps per seed, one update each (CORL's fine-tuning: 1M); 0: offline only."""
    num_envs: int = 1
    """Fine-tuning envs per seed, stepped in lockstep: each device call adds num_envs transitions and runs num_envs updates."""
    mixing_ratio: float | None = None
    """Offline share of each fine-tuning batch (Cal-QL: 0.5); None samples the data and the online transitions as one buffer (CORL's CQL)."""
    buffer_size: int = 1_000_000
    """Online transitions kept on the device while fine-tuning, the oldest overwritten first; the offline data is always kept."""


# CQL uses one set of hyperparameters for all Gym-MuJoCo datasets (CQL paper, App. F): no presets.
def reward_transform(args: Args, data: dict[str, np.ndarray], info: dict) -> Callable[[np.ndarray], np.ndarray]:
    """r -> the training reward reward_scale * r + reward_bias, one map for the data and for the online transitions
    (identity by default: CQL uses the raw rewards on Gym-MuJoCo)."""
    return lambda r: (args.reward_scale * np.asarray(r, np.float32) + args.reward_bias).astype(np.float32)


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


class DoubleCritic(nn.Module):
    """Twin Q_theta(s, a) -> [2, batch] (two independent MLPs, vmapped over the ensemble axis)."""

    hidden_dim: int
    num_layers: int
    layer_norm: bool = False
    orthogonal_init: bool = False

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
        return ensemble(self.hidden_dim, self.num_layers, 1, self.layer_norm, self.orthogonal_init)(x)[..., 0]


class TanhGaussianActor(nn.Module):
    """SAC policy pi(a|s): a = tanh(u), u ~ N(mu(s), diag(sigma(s))^2), with a state-dependent std.

    obs [batch, obs] -> (mu, log_sigma), each [batch, act]: the parameters of the Gaussian *before* the tanh,
    from one MLP whose 2 * action_dim outputs are split into mu (first half) and log_sigma (second half);
    log_sigma is clipped to [log_std_min, log_std_max]. Draw actions and their log-densities with
    sample_tanh_gaussian; the deterministic (evaluation) action is tanh(mu).
    """

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
    """num_samples reparameterized draws a = tanh(mu + sigma * eps), eps ~ N(0, I), per state, with log pi(a|s).

    mean, log_std: [batch, act], the pre-tanh Gaussian of TanhGaussianActor. Returns actions [batch, num_samples, act]
    in (-1, 1) and their log-densities [batch, num_samples], differentiable in mean and log_std (reparameterization
    trick); take [:, 0] of num_samples=1 for one action per state. The density follows from the change of
    variables a = tanh(u) (SAC paper, App. C):
        log pi(a|s) = log N(u; mu, sigma^2) - sum_d log(1 - tanh(u_d)^2),
    with the numerically stable log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
    """
    batch, act_dim = mean.shape
    eps = jax.random.normal(key, (batch, num_samples, act_dim))
    u = mean[:, None, :] + jnp.exp(log_std)[:, None, :] * eps
    log_prob = jnp.sum(-0.5 * eps**2 - log_std[:, None, :] - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)
    log_prob = log_prob - jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)
    return jnp.tanh(u), log_prob


# ---- Losses ----
def q_of_samples(q_fn: Callable, obs: jax.Array, actions: jax.Array) -> jax.Array:
    """Q of n sampled actions per state: obs [batch, obs], actions [batch, n, act] -> [2, batch, n] (or [batch, n]).

    q_fn maps ([M, obs], [M, act]) -> [2, M] (both heads; or [M], one head). The (state, sample) pairs are flattened
    to M = batch * n rows (XLA:CPU is much faster on plain 2-D matmuls) with row b * n + j = (obs[b], actions[b, j]),
    and the result is reshaped back to [..., batch, n] in the same order.
    """
    batch, n, act_dim = actions.shape
    obs_rep = jnp.broadcast_to(obs[:, None, :], (batch, n, obs.shape[-1])).reshape(batch * n, obs.shape[-1])
    q = q_fn(obs_rep, actions.reshape(batch * n, act_dim))
    chex.assert_shape(q, (..., batch * n))
    return q.reshape(*q.shape[:-1], batch, n)


def cql_logsumexp(q_rand: jax.Array, q_cur: jax.Array, q_next: jax.Array, log_prob_rand: float | jax.Array,
                  log_prob_cur: jax.Array, log_prob_next: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Importance-sampled log sum_a exp Q(s, a) of CQL(H) (CQL paper, Eq. (4) and App. F).

    q_*: [..., batch, n] Q(s, a_j) for uniform actions, pi(.|s) actions and pi(.|s') actions (all evaluated
    at s); log_prob_*: the log-densities of those proposals (rand: the scalar log(0.5^act_dim); others
    [batch, n]). Each sample is divided by its proposal density, the three sets are concatenated along the
    sample axis, and logsumexp runs over that axis only: returns [..., batch]. (The constant log(3n) of the
    Monte-Carlo average is dropped, as in the reference code; it does not change gradients.) With a temperature T
    it is T * logsumexp(x / T).
    """
    cat = jnp.concatenate([q_rand - log_prob_rand, q_next - log_prob_next, q_cur - log_prob_cur], axis=-1)
    return temperature * jax.nn.logsumexp(cat / temperature, axis=-1)


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
def sample_batch(key: jax.Array, data: dict[str, jax.Array], batch_size: int, online: tuple | None = None,
                 mixing_ratio: float | None = None) -> dict[str, jax.Array]:
    """A minibatch drawn uniformly from the data; while fine-tuning (online = (rows, filled), the online ring buffer and
    its filled length), a mixing_ratio share from the data and the rest from the online rows, or, with None, uniformly
    from both as one buffer."""
    n = data["rewards"].shape[0]
    if online is None:
        idx = jax.random.randint(key, (batch_size,), 0, n)
        return jax.tree.map(lambda x: x[idx], data)
    rows, filled = online
    if mixing_ratio is None:  # one buffer: rows [0, n) are the data, [n, n + filled) the online transitions
        idx = jax.random.randint(key, (batch_size,), 0, n + filled)
        pick = lambda x, y: jnp.where((idx < n).reshape(-1, *[1] * (x.ndim - 1)), x[jnp.minimum(idx, n - 1)], y[jnp.maximum(idx - n, 0)])
        return jax.tree.map(pick, data, rows)
    k_off, k_on = jax.random.split(key)
    n_off = round(mixing_ratio * batch_size)
    off, on = jax.random.randint(k_off, (n_off,), 0, n), jax.random.randint(k_on, (batch_size - n_off,), 0, filled)
    return jax.tree.map(lambda x, y: jnp.concatenate([x[off], y[on]]), data, rows)


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
    return actor, DoubleCritic(args.hidden_dim, args.num_layers, args.critic_layer_norm)


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


def make_update(args: Args) -> Callable:
    n, nan_at = args.cql_num_actions, common.debug_nan_at()

    def update(state: CQLState, data: dict[str, jax.Array], step: jax.Array, online: tuple | None = None) -> tuple[CQLState, dict]:
        key, k_idx, k_pi, k_next, k_rand, k_cur, k_cnext = jax.random.split(state.key, 7)
        b = sample_batch(k_idx, data, args.batch_size, online, args.mixing_ratio)
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
            ood = cql_logsumexp(q_rand, q_cur, q_next, log_prob_rand, cur_log_prob, next_pa_log_prob,
                                args.cql_temperature)
            chex.assert_shape(ood, (2, batch))
            gap = cql_gap(ood, q_data)  # [2]
            if args.cql_lagrange:  # CQL paper Eq. (30): alpha' * (gap - tau), alpha' >= 0 by dual ascent
                cql_loss = (alpha_prime * args.cql_alpha * (gap - args.cql_target_gap)).sum()
            else:
                cql_loss = args.cql_alpha * gap.sum()
            loss = td_loss + cql_loss
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
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


# ---- Online fine-tuning (--online-steps) ----
def new_buffer(data: dict[str, jax.Array], num_seeds: int, capacity: int) -> dict:
    """The online part of the replay buffer, on the device: per seed a ring of `capacity` rows with the data's fields."""
    rows = {k: jnp.zeros((num_seeds, capacity, *v.shape[1:]), v.dtype) for k, v in data.items()}
    return {"rows": rows, "count": jnp.zeros((), jnp.int32)}  # count: transitions written per seed


def buffer_insert(buffer: dict, new: dict[str, jax.Array]) -> dict:
    """Write K new transitions per seed ([S, K, ...]) after the last ones, wrapping over the oldest when full."""
    capacity, k = buffer["rows"]["rewards"].shape[1], new["rewards"].shape[1]
    idx = (buffer["count"] + jnp.arange(k)) % capacity
    return {"rows": jax.tree.map(lambda b, x: b.at[:, idx].set(x), buffer["rows"], new), "count": buffer["count"] + k}


def make_explore(actor_def: nn.Module) -> Callable:
    """One seed's exploration actions while fine-tuning: a ~ pi(.|s), the tanh-Gaussian's sample (CORL's CQL samples its policy)."""

    def explore(state: CQLState, obs: jax.Array) -> tuple[CQLState, jax.Array]:
        key, k = jax.random.split(state.key)
        return state.replace(key=key), sample_tanh_gaussian(k, *actor_def.apply(state.actor.params, obs), 1)[0][:, 0]

    return explore


def make_online_call(update: Callable, explore: Callable) -> Callable:
    """jit: put the last env steps' transitions [S, K] into the buffer, run K updates of every seed on batches mixing
    the data with the online rows (update-to-data ratio 1), then pick the next K actions of every seed."""

    def call(states: CQLState, data: dict, buffer: dict, new: dict, obs: jax.Array, step0: jax.Array):
        buffer = buffer_insert(buffer, new)
        online = (buffer["rows"], jnp.minimum(buffer["count"], buffer["rows"]["rewards"].shape[1]))

        def body(carry, step):
            return jax.vmap(update, in_axes=(0, None, None, (0, None)))(carry, data, step, online)

        states, metrics = jax.lax.scan(body, states, step0 + jnp.arange(new["rewards"].shape[1]))
        states, actions = jax.vmap(explore)(states, obs)
        return states, buffer, actions, jax.tree.map(lambda m: m[-1], metrics)

    return jax.jit(call, donate_argnums=(0, 2))


def fine_tune(args: Args, run: common.Run, states: CQLState, batch: dict, policy: Callable, reward_fn: Callable) -> tuple:
    """Online fine-tuning after the offline updates: the same update, on the data plus the agent's own transitions."""
    explore = make_explore(make_networks(args, run.prep.act_dim)[0])
    envs = common.OnlineEnvs(run.info, run.prep, len(run.seeds), args.num_envs, args.seed)
    buffer, online_call = new_buffer(batch, len(run.seeds), min(args.buffer_size, args.online_steps)), make_online_call(make_update(args), explore)
    buffer = run.restore_online(buffer, envs)  # resuming a fine-tune: the transitions it had collected
    states, actions = jax.jit(jax.vmap(explore))(states, jnp.asarray(envs.obs))
    if not run.history or run.history[-1]["update"] != run.step:  # the score at hand-over
        run.evaluate(policy, states.actor.params)
    for _ in run.online():  # until --online-steps more updates, or Ctrl-C
        new = envs.step(np.asarray(actions))
        new["rewards"] = reward_fn(new["rewards"])
        states, buffer, actions = run.train_online(online_call, states, batch, buffer, new, envs.obs)
        if run.eval_due:
            run.evaluate(policy, states.actor.params)
            run.save(states, buffer, envs)
    if run.saved_step != run.step:  # stopped by Ctrl-C: the checkpoint keeps the buffer too
        run.save(states, buffer, envs)
    return states, common.online_summary(run.history, run.handover, args.online_steps, envs.episodes)


# ---- Evaluation and use ----
def make_policy_fn(actor_def: nn.Module, prep: common.Prep) -> Callable:
    """Deterministic policy (the tanh mean) for all seeds: params [S, ...], obs [S, E, obs] -> [S, E, act] in [-1, 1]."""

    @jax.jit
    def policy(params: Any, obs: jax.Array) -> jax.Array:
        obs = (obs - prep.obs_mean) / prep.obs_std
        return jax.vmap(lambda p, o: deterministic_action(actor_def, p, o))(params, obs)

    return policy


def load_policy(path: str, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> action in env units, from a checkpoint of this file (seed: which of its --num-seeds runs)."""
    ckpt = common.read_checkpoint(path, ALGORITHM)
    args, prep = Args(**ckpt["meta"]["config"]), common.Prep(**ckpt["meta"]["prep"])
    actor_def = make_networks(args, prep.act_dim)[0]
    params = jax.tree.map(lambda x: x[seed], ckpt["state"]["actor"]["params"])
    return common.policy_act(prep, lambda obs: deterministic_action(actor_def, params, obs))


# ---- Main ----
def main(args: Args) -> dict:
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    run = common.Run(ALGORITHM, args, info, data, hyperparameters={k: getattr(args, k) for k in ("cql_alpha", "cql_lagrange", "cql_target_gap")})
    reward_fn = reward_transform(args, data, info)
    batch = jax.device_put(run.prep.arrays(data, rewards=reward_fn(data["rewards"])))  # on the device once
    states = run.restore(jax.vmap(make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim))(jnp.asarray(run.seeds)))
    train_chunk = make_train_chunk(make_update(args))
    policy = make_policy_fn(make_networks(args, run.prep.act_dim)[0], run.prep)
    for n in run.chunks():  # device calls of a few seconds each, until --num-updates or Ctrl-C
        states = run.train(train_chunk, states, batch, n)  # n updates; stops on a NaN loss, naming the update
        if run.eval_due:
            run.evaluate(policy, states.actor.params)
            run.save(states)
    online = {}
    if args.online_steps and not run.stop:  # then fine-tune online (--online-steps)
        states, online = fine_tune(args, run, states, batch, policy, reward_fn)
    return run.finish(states, policy, states.actor.params, **({"online": online} if online else {}))


if __name__ == "__main__":
    common.cli(Args, main)

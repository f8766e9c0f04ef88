"""Implicit Q-Learning (IQL) -- single-file JAX/Flax implementation.

Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022.
https://arxiv.org/abs/2110.06169  (reference code: github.com/ikostrikov/implicit_q_learning)

    python algorithms/iql.py --env hopper-medium-v2
    python algorithms/iql.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/iql.py --load runs/.../checkpoint.msgpack                    # resume (same folder, same schedule)
    python algorithms/iql.py --load runs/.../checkpoint.msgpack --num-updates 0    # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack"); action = act(obs)           # in your own code (env units)

The whole training loop runs on the device: every jitted call performs a few seconds of updates in one
`jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process with `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # common.py beside me first
import common  # noqa: E402

ALGORITHM = "iql"


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
    """Total gradient updates (IQL paper, App. B: 1M)."""
    batch_size: int = 256
    """Minibatch size (IQL paper, App. B: 256)."""
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
    """Width of every hidden layer (IQL paper, App. B: 2x256 MLPs)."""
    num_layers: int = 2
    """Number of hidden layers (IQL paper, App. B: 2)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint)."""
    preset: Literal["auto", "locomotion", "antmaze"] = "auto"
    """Hyperparameter preset (PRESETS): auto picks antmaze if the dataset name contains 'antmaze', else locomotion."""
    expectile: float | None = None
    """Expectile tau of the value loss, Eq. (5). Default from the preset (locomotion 0.7, antmaze 0.9; App. B)."""
    temperature: float | None = None
    """Inverse temperature beta of the policy extraction, Eq. (7). Default from the preset (3.0 / 10.0; App. B)."""
    exp_adv_max: float = 100.0
    """Clip of the advantage weights exp(beta*A) (reference code: 100)."""
    discount: float = 0.99
    """Discount gamma of the TD target (IQL paper, App. B: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target critic (IQL paper, App. B: 0.005)."""
    actor_lr: float = 3e-4
    """Actor Adam learning rate, cosine-decayed to 0 over --num-updates (App. B: 3e-4, cosine schedule)."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate (IQL paper, App. B: 3e-4)."""
    critic_layer_norm: bool = False
    """LayerNorm before each hidden ReLU of the critics (JAX-CORL's TD3+BC; Ball et al. 2023). Off in the paper."""
    value_lr: float = 3e-4
    """V-network Adam learning rate (App. B: 3e-4)."""
    log_std_min: float = -5.0
    """Lower clip of the policy log-std (reference code: -5)."""
    log_std_max: float = 2.0
    """Upper clip of the policy log-std (reference code: 2)."""
    online_steps: int = 0
    """Online fine-tuning after the offline updates: env steps per seed, one update each (CORL's fine-tuning: 1M); 0: offline only."""
    num_envs: int = 1
    """Fine-tuning envs per seed, stepped in lockstep: each device call adds num_envs transitions and runs num_envs updates."""
    mixing_ratio: float | None = None
    """Offline share of each fine-tuning batch (Cal-QL: 0.5); None samples the data and the online transitions as one buffer (CORL's IQL)."""
    buffer_size: int = 1_000_000
    """Online transitions kept on the device while fine-tuning, the oldest overwritten first; the offline data is always kept."""


# Presets per dataset family (IQL paper, App. B). Locomotion rewards are scaled by 1000 / (max - min episode
# return); antmaze rewards are shifted by -1.
PRESETS: dict[str, dict[str, Any]] = {
    "locomotion": {"expectile": 0.7, "temperature": 3.0},
    "antmaze": {"expectile": 0.9, "temperature": 10.0},
}


def resolve_preset(args: Args, info: dict) -> Args:
    """Args with the preset's values filled in where no flag set them (and --preset auto resolved)."""
    name = args.preset if args.preset != "auto" else "antmaze" if "antmaze" in str(info["dataset"]).lower() else "locomotion"
    return dataclasses.replace(args, preset=name, **{k: v for k, v in PRESETS[name].items() if getattr(args, k) is None})


def reward_transform(args: Args, data: dict[str, np.ndarray], info: dict) -> Callable[[np.ndarray], np.ndarray]:
    """r -> the training reward, one map for the data and for the online transitions (IQL paper, App. B)."""
    if args.preset == "antmaze":  # antmaze: r - 1
        return lambda r: np.asarray(r, np.float32) - 1.0
    ep_returns = common.episode_returns(data, info)  # locomotion: r * 1000 / (max R - min R), R the data's episode returns
    spread = max(float(ep_returns.max() - ep_returns.min()), 1e-6)
    return lambda r: np.asarray(r, np.float32) * 1000.0 / spread


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


class ValueNet(nn.Module):
    """V_psi(s) -> [batch]."""

    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return MLP(self.hidden_dim, self.num_layers, 1)(obs)[..., 0]


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


class GaussianActor(nn.Module):
    """pi(a|s) = N(tanh(mu(s)), exp(log_std)) with a state-independent log-std (as in the IQL code)."""

    action_dim: int
    hidden_dim: int
    num_layers: int
    log_std_min: float
    log_std_max: float

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = jnp.tanh(MLP(self.hidden_dim, self.num_layers, self.action_dim)(obs))
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)


def deterministic_action(actor_def: nn.Module, params: Any, obs: jax.Array) -> jax.Array:
    """Evaluation action: the tanh mean of the Gaussian."""
    return actor_def.apply(params, obs)[0]


# ---- Losses ----
def expectile_loss(diff: jax.Array, expectile: float) -> jax.Array:
    """Asymmetric L2 of Eq. (5): L_2^tau(u) = |tau - 1(u < 0)| u^2, with u = Q(s,a) - V(s). Elementwise."""
    weight = jnp.where(diff < 0, 1.0 - expectile, expectile)
    return weight * diff**2


def advantage_weights(q: jax.Array, v: jax.Array, temperature: float, max_weight: float) -> jax.Array:
    """AWR weights of Eq. (7): exp(beta * (Q(s,a) - V(s))), clipped from above at max_weight."""
    return jnp.minimum(jnp.exp(temperature * (q - v)), max_weight)


def gaussian_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """log N(action; mean, diag(exp(log_std))^2), summed over the action axis."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def q_backup(reward: jax.Array, terminal: jax.Array, next_v: jax.Array, discount: float) -> jax.Array:
    """Target of Eq. (6): r + gamma * (1 - done) * V(s')."""
    return reward + discount * (1.0 - terminal) * next_v


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
class IQLState:
    actor: TrainState
    critic: TrainState
    value: TrainState
    target_critic_params: Any
    key: jax.Array


def make_networks(args: Args, action_dim: int) -> tuple[GaussianActor, DoubleCritic, ValueNet]:
    actor = GaussianActor(action_dim, args.hidden_dim, args.num_layers, args.log_std_min, args.log_std_max)
    return actor, DoubleCritic(args.hidden_dim, args.num_layers, args.critic_layer_norm), ValueNet(args.hidden_dim, args.num_layers)


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], IQLState]:
    actor_def, critic_def, value_def = make_networks(args, action_dim)
    # Cosine-decayed actor learning rate (IQL paper, App. B / reference code); constant while fine-tuning online, as in the
    # reference code's fine-tuning config (opt_decay_schedule = None).
    schedule = optax.cosine_decay_schedule(args.actor_lr, max(args.num_updates, 1))
    if args.online_steps:
        schedule = optax.join_schedules([schedule, optax.constant_schedule(args.actor_lr)], [args.num_updates])
    actor_tx = optax.adam(schedule)

    def init(seed: jax.Array) -> IQLState:
        key = jax.random.PRNGKey(seed)
        key, k_actor, k_critic, k_value = jax.random.split(key, 4)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        critic_params = critic_def.init(k_critic, obs, act)
        return IQLState(
            actor=TrainState.create(apply_fn=actor_def.apply, params=actor_def.init(k_actor, obs), tx=actor_tx),
            critic=TrainState.create(apply_fn=critic_def.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            value=TrainState.create(
                apply_fn=value_def.apply, params=value_def.init(k_value, obs), tx=optax.adam(args.value_lr)
            ),
            target_critic_params=critic_params,
            key=key,
        )

    return init


def make_update(args: Args) -> Callable:
    expectile, temperature, nan_at = args.expectile, args.temperature, common.debug_nan_at()

    def update(state: IQLState, data: dict[str, jax.Array], step: jax.Array, online: tuple | None = None) -> tuple[IQLState, dict]:
        key, k_idx = jax.random.split(state.key)
        b = sample_batch(k_idx, data, args.batch_size, online, args.mixing_ratio)
        obs, act = b["observations"], b["actions"]

        # Value update, Eq. (5): expectile regression of V(s) onto min_i Q_target_i(s, a).
        target_q = state.critic.apply_fn(state.target_critic_params, obs, act).min(0)

        def value_loss_fn(params):
            v = state.value.apply_fn(params, obs)
            return expectile_loss(target_q - v, expectile).mean(), v

        (value_loss, v), grads = jax.value_and_grad(value_loss_fn, has_aux=True)(state.value.params)
        value = state.value.apply_gradients(grads=grads)

        # Policy extraction, Eq. (7): advantage-weighted regression with the updated V.
        v_new = value.apply_fn(value.params, obs)
        adv = target_q - v_new
        weights = advantage_weights(target_q, v_new, temperature, args.exp_adv_max)

        def actor_loss_fn(params):
            mean, log_std = state.actor.apply_fn(params, obs)
            return -(weights * gaussian_log_prob(mean, log_std, act)).mean()

        actor_loss, grads = jax.value_and_grad(actor_loss_fn)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        # Q update, Eq. (6): regress both Q_i(s, a) onto r + gamma (1 - done) V(s').
        next_v = value.apply_fn(value.params, b["next_observations"])
        target = q_backup(b["rewards"], b["terminals"], next_v, args.discount)

        def critic_loss_fn(params):
            q = state.critic.apply_fn(params, obs, act)  # [2, batch]
            loss = ((q - target) ** 2).mean(1).sum()
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss, q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)
        target_params = optax.incremental_update(critic.params, state.target_critic_params, args.tau)

        new_state = IQLState(actor=actor, critic=critic, value=value, target_critic_params=target_params, key=key)
        metrics = {
            "value_loss": value_loss,
            "critic_loss": critic_loss,
            "actor_loss": actor_loss,
            "q_mean": q.mean(),
            "v_mean": v.mean(),
            "adv_mean": adv.mean(),
            "weight_mean": weights.mean(),
        }
        return new_state, metrics

    return update


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: IQLState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
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
    """One seed's exploration actions while fine-tuning: a ~ pi(.|s), clipped to [-1, 1] (CORL's IQL samples its Gaussian)."""

    def explore(state: IQLState, obs: jax.Array) -> tuple[IQLState, jax.Array]:
        key, k = jax.random.split(state.key)
        mean, log_std = actor_def.apply(state.actor.params, obs)
        return state.replace(key=key), jnp.clip(mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape), -1.0, 1.0)

    return explore


def make_online_call(update: Callable, explore: Callable) -> Callable:
    """jit: put the last env steps' transitions [S, K] into the buffer, run K updates of every seed on batches mixing
    the data with the online rows (update-to-data ratio 1), then pick the next K actions of every seed."""

    def call(states: IQLState, data: dict, buffer: dict, new: dict, obs: jax.Array, step0: jax.Array):
        buffer = buffer_insert(buffer, new)
        online = (buffer["rows"], jnp.minimum(buffer["count"], buffer["rows"]["rewards"].shape[1]))

        def body(carry, step):
            return jax.vmap(update, in_axes=(0, None, None, (0, None)))(carry, data, step, online)

        states, metrics = jax.lax.scan(body, states, step0 + jnp.arange(new["rewards"].shape[1]))
        states, actions = jax.vmap(explore)(states, obs)
        return states, buffer, actions, jax.tree.map(lambda m: m[-1], metrics)

    return jax.jit(call, donate_argnums=(0, 2))


def fine_tune(args: Args, run: common.Run, states: IQLState, batch: dict, policy: Callable, reward_fn: Callable) -> tuple:
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
    args = resolve_preset(args, info)
    run = common.Run(ALGORITHM, args, info, data, hyperparameters={k: getattr(args, k) for k in ("preset", *PRESETS[args.preset])})
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

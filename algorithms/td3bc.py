"""TD3+BC -- single-file JAX/Flax implementation.

Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021.
https://arxiv.org/abs/2106.06860  (reference code: github.com/sfujim/TD3_BC)

    python algorithms/td3bc.py --env hopper-medium-v2
    python algorithms/td3bc.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/td3bc.py --load runs/.../checkpoint.msgpack                  # resume (same folder, same schedule)
    python algorithms/td3bc.py --load runs/.../checkpoint.msgpack --num-updates 0  # only evaluate it

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

ALGORITHM = "td3bc"


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
    """Total gradient updates (TD3+BC paper, App. C: 1M)."""
    batch_size: int = 256
    """Minibatch size (TD3+BC paper, App. C: 256)."""
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
    """Width of every hidden layer (TD3+BC paper, App. C: 2x256 actor and critics)."""
    num_layers: int = 2
    """Number of hidden layers (TD3+BC paper, App. C: 2)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint)."""
    preset: Literal["paper", "fast"] = "paper"
    """Hyperparameter preset (PRESETS): paper (TD3+BC paper, App. C), or fast (JAX-CORL's learning rates and critic LayerNorm)."""
    alpha: float = 2.5
    """alpha in lambda = alpha / mean|Q(s, pi(s))| weighting the Q term of the actor loss (Eq. 4; App. C: 2.5)."""
    discount: float = 0.99
    """Discount gamma of the TD target (TD3+BC paper, App. C: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target actor and critic (TD3+BC paper, App. C: 0.005)."""
    policy_noise: float = 0.2
    """Std of the target policy smoothing noise, in units of the max action (TD3; App. C: 0.2)."""
    noise_clip: float = 0.5
    """Clip of the target policy smoothing noise (TD3; App. C: 0.5)."""
    policy_freq: int = 2
    """Actor and target networks are updated every policy_freq critic updates (TD3 delay; App. C: 2)."""
    actor_lr: float = 3e-4
    """Actor Adam learning rate (TD3+BC paper, App. C: 3e-4)."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate (TD3+BC paper, App. C: 3e-4)."""
    critic_layer_norm: bool = False
    """LayerNorm before each hidden ReLU of the critics (JAX-CORL's TD3+BC; Ball et al. 2023). Off in the paper."""
    orthogonal_init: bool = False
    """Orthogonal(sqrt 2) kernels in every layer (JAX-CORL's TD3+BC) instead of flax's lecun_normal."""
    max_transitions: int | None = None
    """Train on a random subset of this many transitions, drawn with --seed (JAX-CORL: 1M). Default: all."""
    episode_ends_terminal: bool = False
    """Treat every episode end as terminal, time-limit cuts included (JAX-CORL's dones). Default: true terminations only."""


# "fast": learning rates 1e-3 and LayerNorm in the critics, as in JAX-CORL's TD3+BC. At 20k updates on
# walker2d-medium-expert-recipe (3 seeds) these two explain its fast start; the paper's settings are the default
# until a longer budget shows the change loses nothing (benchmarks/results/ablation-td3bc-wme/ablation.md).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {"actor_lr": 1e-3, "critic_lr": 1e-3, "critic_layer_norm": True},
}


def resolve_preset(args: Args, info: dict) -> Args:
    """Args with the preset's values where the flag still has its default (a flag set to another value wins)."""
    default = Args()
    return dataclasses.replace(args, **{k: v for k, v in PRESETS[args.preset].items() if getattr(args, k) == getattr(default, k)})


def select_data(args: Args, data: dict[str, np.ndarray], info: dict) -> dict[str, np.ndarray]:
    """JAX-CORL's data handling, as options (both off by default, as in the paper): every episode end terminal,
    and a random subset of --max-transitions rows."""
    if args.episode_ends_terminal:
        data = dict(data, terminals=data["terminals"].copy())
        data["terminals"][info["episode_ends"] - 1] = 1.0
    if args.max_transitions is not None and args.max_transitions < len(data["rewards"]):
        keep = np.random.default_rng(args.seed).permutation(len(data["rewards"]))[: args.max_transitions]
        data = {k: v[keep] for k, v in data.items()}
    return data


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


class DeterministicActor(nn.Module):
    """pi(s) = tanh(MLP(s)) in [-1, 1]^act (max action 1: actions are rescaled to [-1, 1])."""

    action_dim: int
    hidden_dim: int
    num_layers: int
    orthogonal_init: bool = False

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return jnp.tanh(MLP(self.hidden_dim, self.num_layers, self.action_dim, orthogonal_init=self.orthogonal_init)(obs))


def deterministic_action(actor_def: nn.Module, params: Any, obs: jax.Array) -> jax.Array:
    """Evaluation action: the policy output."""
    return actor_def.apply(params, obs)


# ---- Losses ----
def td3bc_lambda(q: jax.Array, alpha: float) -> jax.Array:
    """lambda = alpha / ((1/N) sum |Q(s_i, pi(s_i))|) of Eq. (4), treated as a constant (no gradient)."""
    return jax.lax.stop_gradient(alpha / jnp.abs(q).mean())


def td3bc_actor_loss(q: jax.Array, pi_action: jax.Array, action: jax.Array, alpha: float) -> jax.Array:
    """Eq. (4): -lambda * mean Q(s, pi(s)) + mean (pi(s) - a)^2."""
    return -td3bc_lambda(q, alpha) * q.mean() + jnp.mean((pi_action - action) ** 2)


def smoothed_target_action(next_pi: jax.Array, noise: jax.Array, policy_noise: float,
                           noise_clip: float) -> jax.Array:
    """TD3 target policy smoothing: clip(pi'(s') + clip(eps * sigma, -c, c), -1, 1), eps ~ N(0, 1)."""
    return jnp.clip(next_pi + jnp.clip(noise * policy_noise, -noise_clip, noise_clip), -1.0, 1.0)


def td_target(reward: jax.Array, terminal: jax.Array, next_q: jax.Array, discount: float) -> jax.Array:
    """r + gamma * (1 - done) * min_i Q'_i(s', a'), with next_q: [2, batch] from the target critics."""
    return reward + discount * (1.0 - terminal) * next_q.min(0)


# ---- Train step ----
@flax.struct.dataclass
class TD3BCState:
    actor: TrainState
    critic: TrainState
    target_actor_params: Any
    target_critic_params: Any
    key: jax.Array


def make_networks(args: Args, action_dim: int) -> tuple[DeterministicActor, DoubleCritic]:
    actor = DeterministicActor(action_dim, args.hidden_dim, args.num_layers, args.orthogonal_init)
    return actor, DoubleCritic(args.hidden_dim, args.num_layers, args.critic_layer_norm, args.orthogonal_init)


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], TD3BCState]:
    actor_def, critic_def = make_networks(args, action_dim)

    def init(seed: jax.Array) -> TD3BCState:
        key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed), 3)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        actor_params, critic_params = actor_def.init(k_actor, obs), critic_def.init(k_critic, obs, act)
        return TD3BCState(
            actor=TrainState.create(apply_fn=actor_def.apply, params=actor_params, tx=optax.adam(args.actor_lr)),
            critic=TrainState.create(apply_fn=critic_def.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            target_actor_params=actor_params,
            target_critic_params=critic_params,
            key=key,
        )

    return init


def make_update(args: Args) -> Callable:
    nan_at = common.debug_nan_at()

    def update(state: TD3BCState, data: dict[str, jax.Array], step: jax.Array) -> tuple[TD3BCState, dict]:
        key, k_idx, k_noise = jax.random.split(state.key, 3)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, data["observations"].shape[0])
        b = jax.tree.map(lambda x: x[idx], data)
        obs, act = b["observations"], b["actions"]

        # Critic: TD3 clipped double-Q target with target policy smoothing.
        noise = jax.random.normal(k_noise, act.shape)
        next_pi = state.actor.apply_fn(state.target_actor_params, b["next_observations"])
        next_action = smoothed_target_action(next_pi, noise, args.policy_noise, args.noise_clip)
        next_q = state.critic.apply_fn(state.target_critic_params, b["next_observations"], next_action)
        target = td_target(b["rewards"], b["terminals"], next_q, args.discount)

        def critic_loss_fn(params):
            q = state.critic.apply_fn(params, obs, act)  # [2, batch]
            loss = ((q - target) ** 2).mean(1).sum()
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss, q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # Delayed actor + target update (every policy_freq-th update, TD3). `step` is the same for all seeds
        # (not vmapped), so this is a real branch, not a select of both sides.
        def actor_update(_):
            def actor_loss_fn(params):
                pi = state.actor.apply_fn(params, obs)
                q_pi = critic.apply_fn(critic.params, obs, pi)[0]  # Q_1 as in the reference code
                return td3bc_actor_loss(q_pi, pi, act, args.alpha), td3bc_lambda(q_pi, args.alpha)

            (actor_loss, lmbda), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
            actor = state.actor.apply_gradients(grads=grads)
            target_actor = optax.incremental_update(actor.params, state.target_actor_params, args.tau)
            target_critic = optax.incremental_update(critic.params, state.target_critic_params, args.tau)
            return actor, target_actor, target_critic, actor_loss, lmbda

        def no_actor_update(_):
            zero = jnp.zeros(())
            return state.actor, state.target_actor_params, state.target_critic_params, zero, zero

        actor_step = (step + 1) % args.policy_freq == 0
        actor, target_actor, target_critic, actor_loss, lmbda = jax.lax.cond(
            actor_step, actor_update, no_actor_update, None)
        new_state = TD3BCState(actor=actor, critic=critic, target_actor_params=target_actor,
                               target_critic_params=target_critic, key=key)
        metrics = {"critic_loss": critic_loss, "q_mean": q.mean(), "actor_loss": actor_loss, "lambda": lmbda,
                   "actor_updated": actor_step.astype(jnp.float32)}
        return new_state, metrics

    return update


ACTOR_METRICS = ("actor_loss", "lambda")  # only defined on delayed actor steps


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: TD3BCState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
        def body(carry, step):
            return jax.vmap(update, in_axes=(0, None, None))(carry, data, step)

        states, metrics = jax.lax.scan(body, states, step0 + jnp.arange(num_steps))
        # metrics: [num_steps, num_seeds] -> chunk means per seed, and the first non-finite step (-1 if none).
        # Actor metrics are averaged over the steps that updated the actor only.
        updated = metrics.pop("actor_updated")
        means = {k: (m * updated).sum(0) / jnp.maximum(updated.sum(0), 1.0) if k in ACTOR_METRICS else m.mean(0)
                 for k, m in metrics.items()}
        first_bad = {}
        for k, m in metrics.items():
            bad = ~jnp.all(jnp.isfinite(m), axis=1)
            first_bad[k] = jnp.where(bad.any(), jnp.argmax(bad), -1)
        return states, means, first_bad

    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=0)


# ---- Evaluation and use ----
def make_policy_fn(actor_def: nn.Module, prep: common.Prep) -> Callable:
    """Deterministic policy (the tanh output) for all seeds: params [S, ...], obs [S, E, obs] -> [S, E, act] in [-1, 1]."""

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
    args, data = resolve_preset(args, info), select_data(args, data, info)
    hyperparameters = {k: getattr(args, k) for k in ("preset", "alpha", *PRESETS["fast"])}
    run = common.Run(ALGORITHM, args, info, data, hyperparameters=hyperparameters)
    batch = jax.device_put(run.prep.arrays(data))  # on the device once (TD3+BC uses the raw rewards)
    states = run.restore(jax.vmap(make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim))(jnp.asarray(run.seeds)))
    train_chunk = make_train_chunk(make_update(args))
    policy = make_policy_fn(make_networks(args, run.prep.act_dim)[0], run.prep)
    for n in run.chunks():  # device calls of a few seconds each, until --num-updates or Ctrl-C
        states = run.train(train_chunk, states, batch, n)  # n updates; stops on a NaN loss, naming the update
        if run.eval_due:
            run.evaluate(policy, states.actor.params)
            run.save(states)
    return run.finish(states, policy, states.actor.params)


if __name__ == "__main__":
    common.cli(Args, main)

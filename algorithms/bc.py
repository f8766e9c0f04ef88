"""Behavior Cloning (BC) -- single-file JAX/Flax implementation.

Deterministic MLP policy regressed onto the dataset actions with an MSE loss, as the BC baseline in
Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning" (TD3+BC), NeurIPS 2021.
https://arxiv.org/abs/2106.06860

    python algorithms/bc.py --env hopper-medium-v2
    python algorithms/bc.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/bc.py --load runs/.../checkpoint.msgpack                     # resume (same folder, same schedule)
    python algorithms/bc.py --load runs/.../checkpoint.msgpack --num-updates 0     # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack"); action = act(obs)           # in your own code (env units)

The whole training loop runs on the device: every jitted call performs a few seconds of updates in one
`jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process with `jax.vmap`.
"""

from __future__ import annotations

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

ALGORITHM = "bc"


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
    """Width of every hidden layer (TD3+BC paper, App. C: 2x256 actor)."""
    num_layers: int = 2
    """Number of hidden layers (TD3+BC paper, App. C: 2)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint)."""
    actor_lr: float = 3e-4
    """Actor Adam learning rate (TD3+BC paper, App. C: 3e-4)."""


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


class DeterministicActor(nn.Module):
    """pi(s) = tanh(MLP(s)) in [-1, 1]^act."""

    action_dim: int
    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return jnp.tanh(MLP(self.hidden_dim, self.num_layers, self.action_dim)(obs))


def deterministic_action(actor_def: nn.Module, params: Any, obs: jax.Array) -> jax.Array:
    """Evaluation action: the policy output."""
    return actor_def.apply(params, obs)


# ---- Losses ----
def bc_loss(pred_action: jax.Array, action: jax.Array) -> jax.Array:
    """Mean squared error (pi(s) - a)^2, averaged over batch and action dimensions."""
    return jnp.mean((pred_action - action) ** 2)


# ---- Train step ----
@flax.struct.dataclass
class BCState:
    actor: TrainState
    key: jax.Array


def make_networks(args: Args, action_dim: int) -> tuple[DeterministicActor]:
    return (DeterministicActor(action_dim, args.hidden_dim, args.num_layers),)


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], BCState]:
    (actor_def,) = make_networks(args, action_dim)

    def init(seed: jax.Array) -> BCState:
        key, k_actor = jax.random.split(jax.random.PRNGKey(seed))
        params = actor_def.init(k_actor, jnp.zeros((1, obs_dim)))
        return BCState(actor=TrainState.create(apply_fn=actor_def.apply, params=params, tx=optax.adam(args.actor_lr)),
                       key=key)

    return init


def make_update(args: Args) -> Callable:
    nan_at = common.debug_nan_at()

    def update(state: BCState, data: dict[str, jax.Array], step: jax.Array) -> tuple[BCState, dict]:
        key, k_idx = jax.random.split(state.key)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, data["observations"].shape[0])
        b = jax.tree.map(lambda x: x[idx], data)

        def loss_fn(params):
            loss = bc_loss(state.actor.apply_fn(params, b["observations"]), b["actions"])
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.actor.params)
        return BCState(actor=state.actor.apply_gradients(grads=grads), key=key), {"actor_loss": loss}

    return update


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: BCState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
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
    run = common.Run(ALGORITHM, args, info, data)  # BC has no dataset-dependent hyperparameters
    batch = jax.device_put(run.prep.arrays(data))  # on the device once (BC ignores the rewards)
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

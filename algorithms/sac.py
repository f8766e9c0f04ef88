"""Soft Actor-Critic (Haarnoja et al. 2018, "SAC: Algorithms and Applications"), online.

Trains the behaviour policies of the D4RL-recipe datasets (see `recipe/`), in the same
single-file style as the offline algorithms. One gymnasium env is stepped on the host;
each env step makes one jitted call that does one SAC update and samples the next action.

    python algorithms/sac.py --env Hopper-v4 --total-steps 1000000

Every `snapshot_interval` steps the actor is evaluated (stochastic and deterministic) and
saved as a small `.npz` in `<log_dir>/snapshots/`: the recipe picks its "medium" and
"expert" behaviour policies from these. Every `checkpoint_interval` steps the whole
train state and the replay buffer are written atomically, and `--load` resumes from them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import flax.serialization
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from tensorboard.summary import Writer


# ---- Config ----
@dataclasses.dataclass
class Args:
    env: str = "Hopper-v4"
    """gymnasium env id to train in."""
    seed: int = 0
    """Random seed (env reset, network init, action noise)."""
    total_steps: int = 1_000_000
    """Environment steps in total (one SAC update per step after `learning_starts`)."""
    learning_starts: int = 10_000
    """Uniform-random actions for this many steps before learning starts (SAC paper: 10k)."""
    batch_size: int = 256
    """Minibatch size (SAC paper, Table 1: 256)."""
    hidden_dim: int = 256
    """Width of the 2 hidden layers of actor and critics (SAC paper, Table 1: 256)."""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and temperature (SAC paper, Table 1)."""
    gamma: float = 0.99
    """Discount factor (SAC paper, Table 1)."""
    tau: float = 0.005
    """Polyak factor of the target critics (SAC paper, Table 1)."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity (SAC paper, Table 1: 1e6)."""
    eval_episodes: int = 5
    """Episodes per snapshot evaluation (each of stochastic and deterministic)."""
    snapshot_interval: int = 10_000
    """Evaluate and save the actor weights every this many steps."""
    checkpoint_interval: int = 50_000
    """Save the full train state and replay buffer every this many steps (for resuming)."""
    log_dir: str = ""
    """Directory for TensorBoard logs, snapshots and checkpoints (default runs/sac/<env>/<seed>)."""
    save_path: str = ""
    """Checkpoint file (default <log_dir>/checkpoint.msgpack; the buffer goes next to it)."""
    load: str = ""
    """Checkpoint to resume from (its replay buffer file is read from beside it)."""


# ---- Networks ----
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy: a = tanh(mu(s) + sigma(s) * eps)."""

    act_dim: int
    hidden_dim: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.relu(nn.Dense(self.hidden_dim, name="l0")(obs))
        h = nn.relu(nn.Dense(self.hidden_dim, name="l1")(h))
        mean = nn.Dense(self.act_dim, name="mean")(h)
        log_std = jnp.clip(nn.Dense(self.act_dim, name="log_std")(h), LOG_STD_MIN, LOG_STD_MAX)
        return mean, log_std


class DoubleCritic(nn.Module):
    """Two Q-networks (clipped double Q, SAC paper Sec. 5)."""

    hidden_dim: int

    @nn.compact
    def __call__(self, obs: jax.Array, act: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, act], -1)
        qs = []
        for i in range(2):
            h = nn.relu(nn.Dense(self.hidden_dim, name=f"q{i}_l0")(x))
            h = nn.relu(nn.Dense(self.hidden_dim, name=f"q{i}_l1")(h))
            qs.append(nn.Dense(1, name=f"q{i}_out")(h)[..., 0])
        return jnp.stack(qs)  # [2, batch]


def sample_action(mean: jax.Array, log_std: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reparameterized tanh-Gaussian sample and its log-density (SAC paper, Eq. 26)."""
    std = jnp.exp(log_std)
    u = mean + std * jax.random.normal(key, mean.shape)
    logp = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    logp -= (2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u))).sum(-1)  # log(1 - tanh(u)^2), stable
    return jnp.tanh(u), logp


# ---- Train state ----
class TrainState(NamedTuple):
    actor: dict
    critic: dict
    critic_target: dict
    log_alpha: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    key: jax.Array


def make_agent(args: Args, obs_dim: int, act_dim: int):
    actor, critic = Actor(act_dim, args.hidden_dim), DoubleCritic(args.hidden_dim)
    opt = optax.adam(args.lr)
    target_entropy = -float(act_dim)  # SAC paper, Sec. 5: H_target = -dim(A)

    def init(key: jax.Array) -> TrainState:
        k1, k2, k3 = jax.random.split(key, 3)
        o, a = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
        ap, cp = actor.init(k1, o), critic.init(k2, o, a)
        la = jnp.zeros(())
        return TrainState(ap, cp, jax.tree.map(jnp.copy, cp), la, opt.init(ap), opt.init(cp), opt.init(la), k3)

    def update(s: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key, k_next, k_pi = jax.random.split(s.key, 3)
        alpha = jnp.exp(s.log_alpha)
        # Critic: soft Bellman target (SAC paper, Eq. 3 with the clipped double-Q of Sec. 5)
        nm, nls = actor.apply(s.actor, batch["next_observations"])
        na, nlogp = sample_action(nm, nls, k_next)
        nq = critic.apply(s.critic_target, batch["next_observations"], na).min(0)
        target = batch["rewards"] + args.gamma * (1 - batch["terminals"]) * (nq - alpha * nlogp)
        target = jax.lax.stop_gradient(target)

        def critic_loss(cp):
            q = critic.apply(cp, batch["observations"], batch["actions"])
            return ((q - target) ** 2).mean(1).sum(), q.mean()

        (closs, qmean), g = jax.value_and_grad(critic_loss, has_aux=True)(s.critic)
        upd, critic_opt = opt.update(g, s.critic_opt)
        cp = optax.apply_updates(s.critic, upd)

        # Actor: minimize E[alpha log pi(a|s) - min_i Q_i(s, a)] (SAC paper, Eq. 7)
        def actor_loss(ap):
            m, ls = actor.apply(ap, batch["observations"])
            a, logp = sample_action(m, ls, k_pi)
            q = critic.apply(cp, batch["observations"], a).min(0)
            return (alpha * logp - q).mean(), logp.mean()

        (aloss, logp), g = jax.value_and_grad(actor_loss, has_aux=True)(s.actor)
        upd, actor_opt = opt.update(g, s.actor_opt)
        ap = optax.apply_updates(s.actor, upd)

        # Temperature: minimize -alpha * (log pi + H_target) (SAC paper, Eq. 18)
        def alpha_loss(la):
            return -(jnp.exp(la) * jax.lax.stop_gradient(logp + target_entropy))

        g = jax.grad(alpha_loss)(s.log_alpha)
        upd, alpha_opt = opt.update(g, s.alpha_opt)
        la = optax.apply_updates(s.log_alpha, upd)

        tgt = optax.incremental_update(cp, s.critic_target, args.tau)
        metrics = {"critic_loss": closs, "actor_loss": aloss, "q_mean": qmean, "alpha": alpha, "entropy": -logp}
        return TrainState(ap, cp, tgt, la, actor_opt, critic_opt, alpha_opt, key), metrics

    def act(actor_params: dict, obs: jax.Array, key: jax.Array, deterministic: bool) -> tuple[jax.Array, jax.Array]:
        m, ls = actor.apply(actor_params, obs)
        return (jnp.tanh(m), jnp.zeros(m.shape[0])) if deterministic else sample_action(m, ls, key)

    return init, update, act


# ---- Replay buffer (host memory) ----
BUFFER_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "qpos", "qvel", "action_log_probs")


def new_buffer(size: int, obs_dim: int, act_dim: int, nq: int, nv: int) -> dict[str, np.ndarray]:
    shapes = {"observations": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_observations": (obs_dim,),
              "terminals": (), "timeouts": (), "qpos": (nq,), "qvel": (nv,), "action_log_probs": ()}
    return {k: np.zeros((size, *shapes[k]), np.float32) for k in BUFFER_KEYS}


def atomic_write(path: Path, write_fn) -> None:
    """Write to <path>.tmp, then rename: a crash never leaves a half-written file at `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write_fn(f)
    os.replace(tmp, path)


# ---- Evaluation ----
def evaluate(env_id: str, act_fn, params, episodes: int, seed: int, deterministic: bool) -> float:
    """Mean undiscounted return of `episodes` episodes in a fresh env."""
    env, key, rets = gym.make(env_id), jax.random.PRNGKey(seed), []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret = False, 0.0
        while not done:
            key, k = jax.random.split(key)
            a = np.asarray(act_fn(params, obs[None].astype(np.float32), k, deterministic)[0])[0]
            obs, r, term, trunc, _ = env.step(a)
            ret, done = ret + float(r), term or trunc
        rets.append(ret)
    return float(np.mean(rets))


# ---- Main ----
def main(args: Args) -> None:
    log_dir = Path(args.log_dir or f"runs/sac/{args.env}/{args.seed}")
    (log_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    save_path = Path(args.save_path or log_dir / "checkpoint.msgpack")
    buffer_path = save_path.with_suffix(".buffer.npz")
    (log_dir / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))

    env = gym.make(args.env)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    assert np.allclose(env.action_space.high, 1.0), "SAC here assumes actions in [-1, 1]"
    init, update, act = make_agent(args, obs_dim, act_dim)
    update = jax.jit(update, donate_argnums=0)
    act = jax.jit(act, static_argnums=3)

    state = init(jax.random.PRNGKey(args.seed))
    uw = env.unwrapped
    buf = new_buffer(args.buffer_size, obs_dim, act_dim, uw.data.qpos.size, uw.data.qvel.size)
    step, ptr, episode = 0, 0, 0
    if args.load:
        with open(args.load, "rb") as f:
            blob = flax.serialization.msgpack_restore(f.read())
        state = flax.serialization.from_state_dict(state, blob["state"])
        step, ptr, episode = int(blob["step"]), int(blob["ptr"]), int(blob["episode"])
        with np.load(Path(args.load).with_suffix(".buffer.npz")) as z:
            for k in BUFFER_KEYS:
                buf[k][: len(z[k])] = z[k]
        print(f"resumed from {args.load} at step {step}")

    writer = Writer(str(log_dir))
    rng = np.random.default_rng(args.seed + step)
    obs, _ = env.reset(seed=args.seed + episode)
    ep_ret, ep_len, t0, t_last, metrics = 0.0, 0, time.time(), time.time(), None
    snapshots_file = log_dir / "snapshots.jsonl"
    while step < args.total_steps:
        qpos, qvel = uw.data.qpos.copy(), uw.data.qvel.copy()
        if step < args.learning_starts:
            a, logp = rng.uniform(-1, 1, act_dim).astype(np.float32), act_dim * np.log(0.5)
        else:
            batch_idx = rng.integers(0, min(ptr, args.buffer_size), args.batch_size)
            batch = {k: buf[k][batch_idx] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
            state, metrics = update(state, batch)
            key = jax.random.fold_in(state.key, 1)
            a, logp = jax.device_get(act(state.actor, obs[None].astype(np.float32), key, False))
            a, logp = a[0], logp[0]
        nobs, r, term, trunc, _ = env.step(a)
        i = ptr % args.buffer_size
        for k, v in (("observations", obs), ("actions", a), ("rewards", r), ("next_observations", nobs),
                     ("terminals", term), ("timeouts", trunc and not term), ("qpos", qpos), ("qvel", qvel),
                     ("action_log_probs", logp)):
            buf[k][i] = v
        ptr, step, ep_ret, ep_len = ptr + 1, step + 1, ep_ret + float(r), ep_len + 1
        obs = nobs
        if term or trunc:
            writer.add_scalar("train/episode_return", ep_ret, step)
            writer.add_scalar("train/episode_length", ep_len, step)
            episode += 1
            obs, _ = env.reset(seed=args.seed + episode)
            ep_ret, ep_len = 0.0, 0

        if step % args.snapshot_interval == 0:
            if metrics is not None:
                for k, v in metrics.items():
                    v = float(v)
                    if not np.isfinite(v):
                        raise FloatingPointError(f"SAC {k} is {v} at step {step}; last good checkpoint: {save_path}")
                    writer.add_scalar(f"train/{k}", v, step)
            sps = args.snapshot_interval / (time.time() - t_last)
            stoch = evaluate(args.env, act, state.actor, args.eval_episodes, 10_000 + step, False)
            det = evaluate(args.env, act, state.actor, args.eval_episodes, 10_000 + step, True)
            t_last = time.time()
            writer.add_scalar("eval/return_stochastic", stoch, step)
            writer.add_scalar("eval/return_deterministic", det, step)
            writer.add_scalar("train/steps_per_s", sps, step)
            params = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(state.actor["params"]).items()}
            snap = log_dir / "snapshots" / f"actor_{step:08d}.npz"
            atomic_write(snap, lambda f, p=params: np.savez(f, **p))
            with open(snapshots_file, "a") as f:
                f.write(json.dumps({"step": step, "return_stochastic": stoch, "return_deterministic": det,
                                    "replay_size": ptr, "episodes": episode, "wall_time_s": time.time() - t0,
                                    "file": snap.name}) + "\n")
            print(f"step {step:>8d} | stoch {stoch:8.1f} | det {det:8.1f} | {sps:6.1f} steps/s | {time.time() - t0:7.0f}s", flush=True)
            writer.flush()

        if step % args.checkpoint_interval == 0 or step == args.total_steps:
            n = min(ptr, args.buffer_size)
            atomic_write(buffer_path, lambda f, n=n: np.savez(f, **{k: v[:n] for k, v in buf.items()}))
            blob = {"state": flax.serialization.to_state_dict(jax.device_get(state)), "step": step, "ptr": ptr, "episode": episode}
            atomic_write(save_path, lambda f, b=blob: f.write(flax.serialization.msgpack_serialize(b)))
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

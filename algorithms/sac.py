"""Soft Actor-Critic (Haarnoja et al. 2018, "SAC: Algorithms and Applications"), online.

Trains the behaviour policies of the D4RL-recipe datasets (see `recipe/`), in the same
single-file style as the offline algorithms. `num_envs` gymnasium envs are stepped in
lockstep on the host; each iteration makes one jitted call that runs `num_envs` SAC updates
(a `lax.scan`, so the update-to-data ratio stays 1 as in the paper) and samples the next
action of every env. One env is the paper's setting; 8 envs keep a GPU busy.

    python algorithms/sac.py --env Hopper-v4 --total-steps 1000000
    python algorithms/sac.py --env HalfCheetah-v4 --num-envs 8 --max-time-s 3600

Every `snapshot_interval` steps the actor is evaluated (stochastic and deterministic) and
saved as a small `.npz` in `<log_dir>/snapshots/`, in the layout of the shipped policies
(recipe/build.py NumpyPolicy): the recipe picks its "medium" and "expert" behaviour policies
from these. Every `checkpoint_interval` steps the whole train state and the replay buffer are
written atomically, and `--load` resumes from them (checkpoints of the older network layout too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

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
    """Environment steps in total, over all envs (one SAC update per step after `learning_starts`)."""
    num_envs: int = 1
    """Envs stepped in lockstep; each iteration adds `num_envs` transitions and runs `num_envs` updates."""
    max_time_s: float = 0.0
    """Stop after this many seconds of wall time, with a final snapshot and checkpoint (0: no limit)."""
    learning_starts: int = 10_000
    """Uniform-random actions for this many steps before learning starts (SAC paper: 10k)."""
    batch_size: int = 256
    """Minibatch size (SAC paper, Table 1: 256)."""
    hidden_dim: int = 256
    """Width of the 2 hidden layers of actor and critics (SAC paper, Table 1: 256)."""
    actor_lr: float = 3e-4
    """Policy Adam learning rate (SAC paper, Table 1: 3e-4)."""
    critic_lr: float = 3e-4
    """Q-network Adam learning rate (SAC paper, Table 1: 3e-4)."""
    alpha_lr: float = 3e-4
    """Adam learning rate of the temperature log(alpha) (SAC paper, Table 1: 3e-4)."""
    discount: float = 0.99
    """Discount gamma (SAC paper, Table 1: 0.99)."""
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
# The canonical tanh-Gaussian actor and twin critic of algorithms/cql.py, copied (one file per algorithm).
# Snapshots keep the layout of the shipped behaviour policies (recipe/build.py NumpyPolicy: l0, l1, mean,
# log_std): `export_actor` maps the params when a snapshot is written, and `upgrade_checkpoint` reads
# checkpoints of the older layout (the networks before these, with that same layout) into this one.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # fixed, not flags: NumpyPolicy clips the shipped policies with these
NUM_LAYERS = 2  # hidden layers of actor and critics (SAC paper, Table 1); the shipped .npz layout has two


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
    """Twin Q_theta(s, a) -> [2, *leading] for obs [*leading, obs], actions [*leading, act].

    The min of the two is SAC's clipped double Q (SAC paper, Sec. 5).
    """

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


def sample_tanh_gaussian(key: jax.Array, mean: jax.Array, log_std: jax.Array,
                         num_samples: int) -> tuple[jax.Array, jax.Array]:
    """num_samples reparameterized actions per state: ([batch, n, act], log-probs [batch, n]) (SAC paper, Eq. 26).

    log pi(a|s) = log N(u; mu, sigma) - sum log(1 - tanh(u)^2), with the stable form
    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
    """
    batch, act_dim = mean.shape
    eps = jax.random.normal(key, (batch, num_samples, act_dim))
    u = mean[:, None, :] + jnp.exp(log_std)[:, None, :] * eps
    log_prob = jnp.sum(-0.5 * eps**2 - log_std[:, None, :] - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)
    log_prob = log_prob - jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)
    return jnp.tanh(u), log_prob


def export_actor(actor_params: dict) -> dict[str, np.ndarray]:
    """The actor as the arrays of a shipped policy .npz: l0, l1, mean, log_std (recipe/build.py NumpyPolicy).

    TanhGaussianActor's last Dense has 2 * act outputs, [mean | log_std]; the .npz has them as two layers.
    """
    p = actor_params["params"]["MLP_0"]
    head = p["Dense_2"]
    act = head["bias"].shape[-1] // 2
    layers = {"l0": p["Dense_0"], "l1": p["Dense_1"], "mean": {k: v[..., :act] for k, v in head.items()},
              "log_std": {k: v[..., act:] for k, v in head.items()}}
    return {f"{name}/{k}": np.ascontiguousarray(v, np.float32)
            for name, layer in sorted(layers.items()) for k, v in sorted(layer.items())}


def upgrade_checkpoint(tree: Any) -> Any:
    """A checkpoint state dict written with the older networks (actor l0/l1/mean/log_std, critics
    q{i}_l0/q{i}_l1/q{i}_out) in the current layout; params and Adam moments alike, exactly. Others pass through."""
    if not isinstance(tree, dict):
        return tree
    if set(tree) == {"l0", "l1", "mean", "log_std"}:
        head = {k: np.concatenate([tree["mean"][k], tree["log_std"][k]], -1) for k in tree["mean"]}
        return {"MLP_0": {"Dense_0": tree["l0"], "Dense_1": tree["l1"], "Dense_2": head}}
    if "q0_l0" in tree:
        return {"VmapMLP_0": {f"Dense_{j}": {k: np.stack([tree[f"q0_{n}"][k], tree[f"q1_{n}"][k]]) for k in tree[f"q0_{n}"]}
                              for j, n in enumerate(("l0", "l1", "out"))}}
    return {k: upgrade_checkpoint(v) for k, v in tree.items()}


# ---- Losses ----
def sac_target(reward: jax.Array, terminal: jax.Array, next_q: jax.Array, next_logp: jax.Array,
               alpha: jax.Array, discount: float) -> jax.Array:
    """Soft Bellman target r + gamma (1 - done) (min_j Q'_j(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s')
    (SAC paper, Eq. 3 with the clipped double Q of Sec. 5)."""
    return reward + discount * (1.0 - terminal) * (next_q - alpha * next_logp)


def sac_actor_loss(log_prob: jax.Array, q_pi: jax.Array, alpha: jax.Array) -> jax.Array:
    """SAC policy loss E[alpha log pi(a|s) - min_i Q_i(s, a)], a ~ pi(.|s) (SAC paper, Eq. 7)."""
    return (alpha * log_prob - q_pi).mean()


def temperature_loss(log_alpha: jax.Array, log_prob: jax.Array, target_entropy: float) -> jax.Array:
    """SAC automatic entropy tuning, E[-alpha (log pi + target_entropy)] with log pi held constant (SAC paper,
    Eq. 18), differentiated w.r.t. log(alpha): alpha grows while the entropy -log pi is below the target.

    (cql.py's temperature_loss multiplies log(alpha) instead of alpha: same sign of the gradient, another scale.)
    """
    return -(jnp.exp(log_alpha) * jax.lax.stop_gradient(log_prob + target_entropy)).mean()


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
    actor = TanhGaussianActor(act_dim, args.hidden_dim, NUM_LAYERS, LOG_STD_MIN, LOG_STD_MAX)
    critic = DoubleCritic(args.hidden_dim, NUM_LAYERS)
    actor_tx, critic_tx, alpha_tx = optax.adam(args.actor_lr), optax.adam(args.critic_lr), optax.adam(args.alpha_lr)
    target_entropy = -float(act_dim)  # SAC paper, Sec. 5: H_target = -dim(A)

    def init(key: jax.Array) -> TrainState:
        k1, k2, k3 = jax.random.split(key, 3)
        o, a = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
        ap, cp = actor.init(k1, o), critic.init(k2, o, a)
        la = jnp.zeros(())
        return TrainState(ap, cp, jax.tree.map(jnp.copy, cp), la, actor_tx.init(ap), critic_tx.init(cp),
                          alpha_tx.init(la), k3)

    def update(s: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key, k_next, k_pi = jax.random.split(s.key, 3)
        alpha = jnp.exp(s.log_alpha)
        # Critic: soft Bellman target with the target critics
        na, nlogp = sample_tanh_gaussian(k_next, *actor.apply(s.actor, batch["next_observations"]), 1)
        nq = critic.apply(s.critic_target, batch["next_observations"], na[:, 0]).min(0)
        target = sac_target(batch["rewards"], batch["terminals"], nq, nlogp[:, 0], alpha, args.discount)
        target = jax.lax.stop_gradient(target)

        def critic_loss(cp):
            q = critic.apply(cp, batch["observations"], batch["actions"])
            return ((q - target) ** 2).mean(1).sum(), q.mean()

        (closs, qmean), g = jax.value_and_grad(critic_loss, has_aux=True)(s.critic)
        upd, critic_opt = critic_tx.update(g, s.critic_opt)
        cp = optax.apply_updates(s.critic, upd)

        # Actor, with the updated critics
        def actor_loss(ap):
            a, logp = sample_tanh_gaussian(k_pi, *actor.apply(ap, batch["observations"]), 1)
            q = critic.apply(cp, batch["observations"], a[:, 0]).min(0)
            return sac_actor_loss(logp[:, 0], q, alpha), logp.mean()

        (aloss, logp), g = jax.value_and_grad(actor_loss, has_aux=True)(s.actor)
        upd, actor_opt = actor_tx.update(g, s.actor_opt)
        ap = optax.apply_updates(s.actor, upd)

        # Temperature, with the batch's mean log pi
        g = jax.grad(temperature_loss)(s.log_alpha, logp, target_entropy)
        upd, alpha_opt = alpha_tx.update(g, s.alpha_opt)
        la = optax.apply_updates(s.log_alpha, upd)

        tgt = optax.incremental_update(cp, s.critic_target, args.tau)
        metrics = {"critic_loss": closs, "actor_loss": aloss, "q_mean": qmean, "alpha": alpha, "entropy": -logp}
        return TrainState(ap, cp, tgt, la, actor_opt, critic_opt, alpha_opt, key), metrics

    def act(actor_params: dict, obs: jax.Array, key: jax.Array, deterministic: bool) -> tuple[jax.Array, jax.Array]:
        m, ls = actor.apply(actor_params, obs)
        if deterministic:
            return jnp.tanh(m), jnp.zeros(m.shape[0])
        a, logp = sample_tanh_gaussian(key, m, ls, 1)
        return a[:, 0], logp[:, 0]

    def update_and_act(s: TrainState, batches: dict, obs: jax.Array) -> tuple[TrainState, dict, jax.Array, jax.Array]:
        """`len(batches)` updates in one device call, then a fresh action for every env."""
        s, metrics = jax.lax.scan(update, s, batches)
        a, logp = act(s.actor, obs, jax.random.fold_in(s.key, 1), False)
        return s, jax.tree.map(lambda m: m[-1], metrics), a, logp

    return init, update_and_act, act


# ---- Replay buffer (host memory) ----
BUFFER_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "qpos", "qvel",
               "action_log_probs", "env_index")


def new_buffer(size: int, obs_dim: int, act_dim: int, nq: int, nv: int) -> dict[str, np.ndarray]:
    shapes = {"observations": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_observations": (obs_dim,),
              "terminals": (), "timeouts": (), "qpos": (nq,), "qvel": (nv,), "action_log_probs": (), "env_index": ()}
    return {k: np.zeros((size, *shapes[k]), np.float32) for k in BUFFER_KEYS}


def atomic_write(path: Path, write_fn) -> None:
    """Write to <path>.tmp, then rename: a crash never leaves a half-written file at `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write_fn(f)
    os.replace(tmp, path)


# ---- Evaluation ----
def evaluate(env_id: str, act_fn, params, episodes: int, seed: int, deterministic: bool) -> float:
    """Mean undiscounted return of `episodes` episodes, run in lockstep in fresh envs."""
    envs, key = [gym.make(env_id) for _ in range(episodes)], jax.random.PRNGKey(seed)
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    rets, done = np.zeros(episodes), np.zeros(episodes, bool)
    while not done.all():
        key, k = jax.random.split(key)
        a = np.asarray(act_fn(params, obs, k, deterministic)[0])
        for i in np.flatnonzero(~done):
            o, r, term, trunc, _ = envs[i].step(a[i])
            obs[i], rets[i], done[i] = o, rets[i] + r, term or trunc
    return float(rets.mean())


# ---- Main ----
def crossed(step: int, k: int, interval: int) -> bool:
    """Whether the last `k` steps passed a multiple of `interval`."""
    return step // interval != (step - k) // interval


def restore(path: str, state: TrainState, buf: dict[str, np.ndarray]) -> tuple[TrainState, int, int, int]:
    """--load: the train state (old layouts upgraded), step, buffer pointer and episode count; the buffer in place."""
    with open(path, "rb") as f:
        blob = flax.serialization.msgpack_restore(f.read())
    state = flax.serialization.from_state_dict(state, upgrade_checkpoint(blob["state"]))
    with np.load(Path(path).with_suffix(".buffer.npz")) as z:
        for k in BUFFER_KEYS:
            if k in z.files:  # buffers of older runs have no env_index
                buf[k][: len(z[k])] = z[k]
    print(f"resumed from {path} at step {int(blob['step'])}")
    return state, int(blob["step"]), int(blob["ptr"]), int(blob["episode"])


def save_checkpoint(save_path: Path, state: TrainState, buf: dict[str, np.ndarray], step: int, ptr: int, episode: int) -> None:
    """The train state and the filled part of the replay buffer (beside it), each written atomically."""
    n = min(ptr, len(buf["rewards"]))
    atomic_write(save_path.with_suffix(".buffer.npz"), lambda f: np.savez(f, **{k: v[:n] for k, v in buf.items()}))
    blob = {"state": flax.serialization.to_state_dict(jax.device_get(state)), "step": step, "ptr": ptr, "episode": episode}
    atomic_write(save_path, lambda f: f.write(flax.serialization.msgpack_serialize(blob)))


def step_envs(args: Args, envs: list, buf: dict[str, np.ndarray], obs: np.ndarray, a: np.ndarray, logp: np.ndarray,
              ptr: int, episode: int, ep_ret: np.ndarray, ep_len: np.ndarray, writer: Writer, step: int) -> tuple[int, int]:
    """One step of every env; each transition (with its MuJoCo state and the action's log-prob) goes into the buffer."""
    for i, env in enumerate(envs):
        qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
        nobs, r, term, trunc, _ = env.step(a[i])
        j = ptr % args.buffer_size
        for k, v in (("observations", obs[i]), ("actions", a[i]), ("rewards", r), ("next_observations", nobs),
                     ("terminals", term), ("timeouts", trunc and not term), ("qpos", qpos), ("qvel", qvel),
                     ("action_log_probs", logp[i]), ("env_index", i)):
            buf[k][j] = v
        ptr, ep_ret[i], ep_len[i] = ptr + 1, ep_ret[i] + r, ep_len[i] + 1
        obs[i] = nobs
        if term or trunc:
            writer.add_scalar("train/episode_return", ep_ret[i], step + i + 1)
            writer.add_scalar("train/episode_length", ep_len[i], step + i + 1)
            obs[i] = env.reset(seed=args.seed + episode)[0]
            episode, ep_ret[i], ep_len[i] = episode + 1, 0.0, 0
    return ptr, episode


def snapshot(args: Args, act, state: TrainState, metrics: dict | None, writer: Writer, log_dir: Path, step: int,
             record: dict) -> None:
    """Log the train metrics (stopping on a non-finite one), evaluate the actor both ways and save it as a snapshot."""
    for k, v in (metrics or {}).items():
        if not np.isfinite(v := float(v)):
            raise FloatingPointError(f"SAC {k} is {v} at step {step}; last good checkpoint: {args.save_path or log_dir / 'checkpoint.msgpack'}")
        writer.add_scalar(f"train/{k}", v, step)
    stoch = evaluate(args.env, act, state.actor, args.eval_episodes, 10_000 + step, False)
    det = evaluate(args.env, act, state.actor, args.eval_episodes, 10_000 + step, True)
    for k, v in (("eval/return_stochastic", stoch), ("eval/return_deterministic", det), ("train/steps_per_s", record["sps"])):
        writer.add_scalar(k, v, step)
    params = export_actor(state.actor)  # the layout of the shipped policies
    snap = log_dir / "snapshots" / f"actor_{step:08d}.npz"
    atomic_write(snap, lambda f, p=params: np.savez(f, **p))
    with open(log_dir / "snapshots.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "return_stochastic": stoch, "return_deterministic": det, "replay_size": record["ptr"],
                            "episodes": record["episode"], "wall_time_s": record["wall_time_s"], "file": snap.name}) + "\n")
    print(f"step {step:>8d} | stoch {stoch:8.1f} | det {det:8.1f} | {record['sps']:6.1f} steps/s | {record['wall_time_s']:7.0f}s", flush=True)
    writer.flush()


def main(args: Args) -> None:
    log_dir = Path(args.log_dir or f"runs/sac/{args.env}/{args.seed}")
    (log_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    save_path = Path(args.save_path or log_dir / "checkpoint.msgpack")
    dev = jax.devices()[0]
    hardware = f"{getattr(dev, 'device_kind', dev.platform)} ({dev.platform}), {os.cpu_count()} CPU cores"
    (log_dir / "config.json").write_text(json.dumps({**dataclasses.asdict(args), "hardware": hardware}, indent=2))

    K = args.num_envs
    envs = [gym.make(args.env) for _ in range(K)]
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    assert np.allclose(envs[0].action_space.high, 1.0), "SAC here assumes actions in [-1, 1]"
    init, update_and_act, act = make_agent(args, obs_dim, act_dim)
    update_and_act, act = jax.jit(update_and_act, donate_argnums=0), jax.jit(act, static_argnums=3)
    state = init(jax.random.PRNGKey(args.seed))
    data = envs[0].unwrapped.data
    buf = new_buffer(args.buffer_size, obs_dim, act_dim, data.qpos.size, data.qvel.size)
    step, ptr, episode = 0, 0, 0
    if args.load:
        state, step, ptr, episode = restore(args.load, state, buf)

    writer = Writer(str(log_dir))
    rng = np.random.default_rng(args.seed + step)
    obs = np.zeros((K, obs_dim), np.float32)
    for i, e in enumerate(envs):
        obs[i] = e.reset(seed=args.seed + episode)[0]
        episode += 1
    ep_ret, ep_len = np.zeros(K), np.zeros(K, int)
    t0, t_last, step_last, metrics = time.time(), time.time(), step, None
    while step < args.total_steps:
        if step < args.learning_starts:
            a, logp = rng.uniform(-1, 1, (K, act_dim)).astype(np.float32), np.full(K, act_dim * np.log(0.5))
        else:  # K updates on K minibatches sampled from the buffer (host), then the next K actions
            idx = rng.integers(0, min(ptr, args.buffer_size), (K, args.batch_size))
            batches = {k: buf[k][idx] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
            state, metrics, a, logp = update_and_act(state, batches, obs)
            a, logp = jax.device_get((a, logp))
        ptr, episode = step_envs(args, envs, buf, obs, a, logp, ptr, episode, ep_ret, ep_len, writer, step)
        step += K
        out_of_time = args.max_time_s > 0 and time.time() - t0 > args.max_time_s
        if crossed(step, K, args.snapshot_interval) or out_of_time or step >= args.total_steps:
            sps = (step - step_last) / (time.time() - t_last)
            snapshot(args, act, state, metrics, writer, log_dir, step, {"sps": sps, "ptr": ptr, "episode": episode,
                                                                         "wall_time_s": time.time() - t0})
            t_last, step_last = time.time(), step
        if crossed(step, K, args.checkpoint_interval) or out_of_time or step >= args.total_steps:
            save_checkpoint(save_path, state, buf, step, ptr, episode)
        if out_of_time:
            print(f"stopped at step {step}: --max-time-s {args.max_time_s} reached (checkpoint saved)")
            break
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

"""TD3+BC -- single-file JAX/Flax implementation.

Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021.
https://arxiv.org/abs/2106.06860  (reference code: github.com/sfujim/TD3_BC)

    python algorithms/td3bc.py --env hopper-medium-v2
    python algorithms/td3bc.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/td3bc.py --load runs/.../checkpoint.msgpack --num-updates 0   # evaluate a checkpoint

The whole training loop runs on the device: every jitted call performs `eval_interval` updates in one
`jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process with `jax.vmap`.
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

ALGORITHM = "td3bc"


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
    """Total gradient updates (TD3+BC paper, App. C: 1M)."""
    batch_size: int = 256
    """Minibatch size (TD3+BC paper, App. C: 256)."""
    eval_interval: int = 5000
    """Updates between evaluations; also the length of one on-device lax.scan chunk."""
    eval_episodes: int = 10
    """Evaluation episodes per seed (deterministic policy)."""
    log_dir: str | None = None
    """TensorBoard/result directory. Default: runs/td3bc/<dataset>/<seed>-<timestamp>."""
    save_path: str | None = None
    """Checkpoint file, rewritten at every evaluation. Default: <log_dir>/checkpoint.msgpack."""
    load: str | None = None
    """Checkpoint to restore: resume training up to --num-updates, or with --num-updates 0 only evaluate it."""
    hidden_dim: int = 256
    """Width of every hidden layer (TD3+BC paper, App. C: 2x256 actor and critics)."""
    num_layers: int = 2
    """Number of hidden layers (TD3+BC paper, App. C: 2)."""
    normalize_states: bool = True
    """Standardize observations with the dataset mean/std (TD3+BC paper, Eq. 5)."""
    alpha: float = 2.5
    """alpha in lambda = alpha / mean|Q(s, pi(s))| weighting the Q term of the actor loss (Eq. 4; App. C: 2.5)."""
    discount: float = 0.99
    """Discount gamma (App. C: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target networks (App. C: 0.005)."""
    policy_noise: float = 0.2
    """Std of the target policy smoothing noise, in units of the max action (TD3; App. C: 0.2)."""
    noise_clip: float = 0.5
    """Clip of the target policy smoothing noise (TD3; App. C: 0.5)."""
    policy_freq: int = 2
    """Actor and target networks are updated every policy_freq critic updates (TD3 delay; App. C: 2)."""
    actor_lr: float = 3e-4
    """Actor Adam learning rate (App. C: 3e-4)."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate (App. C: 3e-4)."""
    debug_nan_at: int = -1
    """Testing aid: inject a NaN into the critic loss at this update number (1-based) to exercise the NaN guard."""


def resolve_hyperparameters(args: Args, info: dict) -> dict[str, Any]:
    """TD3+BC uses one set of hyperparameters for every dataset (App. C)."""
    return {"alpha": args.alpha}


def process_rewards(hp: dict[str, Any], data: dict[str, np.ndarray], info: dict) -> np.ndarray:
    """TD3+BC uses the raw rewards."""
    return data["rewards"].astype(np.float32)


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
    """Twin Q_theta(s, a) -> [2, batch] (two independent MLPs, vmapped over the ensemble axis)."""

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


class DeterministicActor(nn.Module):
    """pi(s) = tanh(MLP(s)) in [-1, 1]^act (max action 1: actions are rescaled to [-1, 1])."""

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
    return DeterministicActor(action_dim, args.hidden_dim, args.num_layers), DoubleCritic(args.hidden_dim, args.num_layers)


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


def make_update(args: Args, hp: dict[str, Any]) -> Callable:
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
            if args.debug_nan_at >= 0:  # testing aid, see --debug-nan-at
                loss = loss + jnp.where(step + 1 == args.debug_nan_at, jnp.nan, 0.0)
            return loss, q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # Delayed actor + target update (every policy_freq-th update, TD3). `step` is the same for all seeds
        # (not vmapped), so this is a real branch, not a select of both sides.
        def actor_update(_):
            def actor_loss_fn(params):
                pi = state.actor.apply_fn(params, obs)
                q_pi = critic.apply_fn(critic.params, obs, pi)[0]  # Q_1 as in the reference code
                return td3bc_actor_loss(q_pi, pi, act, hp["alpha"]), td3bc_lambda(q_pi, hp["alpha"])

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

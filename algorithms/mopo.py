"""Model-based Offline Policy Optimization (MOPO) -- single-file JAX/Flax implementation.

Yu, Thomas, Yu, Ermon, Zou, Levine, Finn & Ma, "MOPO: Model-based Offline Policy Optimization", NeurIPS 2020.
https://arxiv.org/abs/2005.13239  (reference code: github.com/tianheyu927/mopo, built on MBPO)

    python algorithms/mopo.py --env hopper-medium-v2
    python algorithms/mopo.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/mopo.py --env hopper-medium-v2 --load-model runs/mopo/.../dynamics.msgpack   # skip model training
    python algorithms/mopo.py --load runs/.../checkpoint.msgpack --load-model runs/.../dynamics.msgpack --num-updates 0

Two phases:
  1. Dynamics: an ensemble of 7 Gaussian MLPs learns (s, a) -> (s' - s, r) from all transitions; the 5 with the
     lowest held-out error are the elites. Saved to --model-path; --load-model reuses one and skips this phase.
  2. Policy: SAC (automatic entropy tuning) on batches of `real_ratio` dataset transitions and model transitions.
     Every `rollout_freq` updates, `rollout_batch_size` dataset states are rolled out for h steps under the current
     policy, each step with a random elite, and the reward is penalized: r~ = r - lambda * max_i ||sigma_i(s, a)||.

Everything of phase 2 runs on the device: each jitted call performs `eval_interval` updates (rollouts included)
in one `jax.lax.scan`, and `--num-seeds` independent agents are trained with `jax.vmap` (they share the one
dynamics model, which is trained once with --seed). The model replay buffer is not checkpointed: a run started
with --load refills it with a fresh rollout before its first update.
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

ALGORITHM = "mopo"


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
    """Random seed of the first run; run i of --num-seeds uses seed+i. The dynamics model is trained with --seed."""
    num_seeds: int = 1
    """Number of independent agents trained in parallel (jax.vmap over the whole train state)."""
    num_updates: int = 1_000_000
    """Total SAC gradient updates (MOPO code: 1000 epochs x 1000 steps)."""
    batch_size: int = 256
    """SAC minibatch size, real + model transitions (MBPO/MOPO: 256)."""
    eval_interval: int = 5000
    """Updates between evaluations; also the length of one on-device lax.scan chunk."""
    eval_episodes: int = 10
    """Evaluation episodes per seed (deterministic policy)."""
    log_dir: str | None = None
    """TensorBoard/result directory. Default: runs/mopo/<dataset>/<seed>-<timestamp>."""
    save_path: str | None = None
    """Agent checkpoint file, rewritten at every evaluation. Default: <log_dir>/checkpoint.msgpack."""
    load: str | None = None
    """Agent checkpoint to restore: resume training up to --num-updates, or with --num-updates 0 only evaluate it."""
    # dynamics model
    model_path: str | None = None
    """Where the trained dynamics model (params, normalizer, elites) is saved. Default: <log_dir>/dynamics.msgpack."""
    load_model: str | None = None
    """Load this dynamics model file (written by --model-path of an earlier run) and skip model training."""
    ensemble_size: int = 7
    """Members of the dynamics ensemble (MOPO/MBPO: 7)."""
    num_elites: int = 5
    """Members with the lowest held-out MSE used in rollouts (MOPO/MBPO: 5)."""
    model_hidden_dim: int = 200
    """Width of the dynamics MLPs (MBPO/MOPO: 200)."""
    model_num_layers: int = 4
    """Hidden (swish) layers of the dynamics MLPs (MBPO/MOPO: 4)."""
    model_lr: float = 1e-3
    """Adam learning rate of the dynamics ensemble (MBPO: 1e-3)."""
    model_weight_decay: float = 1.0
    """Multiplier of MBPO's per-layer L2 weight decays (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4); 0 disables them."""
    model_batch_size: int = 256
    """Minibatch size of dynamics training (MBPO: 256)."""
    model_holdout_ratio: float = 0.2
    """Fraction of transitions held out for early stopping and elite selection (MBPO: 0.2, capped below)."""
    model_max_holdout: int = 5000
    """Cap on the held-out transitions (MBPO: 5000)."""
    model_epochs: int | None = None
    """Maximum dynamics epochs (None: until early stopping)."""
    model_max_time_s: float | None = None
    """Wall-clock budget of dynamics training in seconds (None: unlimited; MOPO's max_model_t)."""
    model_patience: int = 5
    """Stop when no member improved its held-out MSE by >1% for this many epochs (MBPO: 5)."""
    # rollouts
    preset: str = "auto"
    """Hyperparameter preset from PRESETS (auto: the dataset's name, e.g. hopper-medium; else default)."""
    horizon: int | None = None
    """Model rollout length h. Default from the preset (MOPO configs: 1 or 5)."""
    penalty_coef: float | None = None
    """Uncertainty penalty lambda. Default from the preset (MOPO configs: 0.5 to 5)."""
    rollout_freq: int = 1000
    """Updates between model rollouts (MOPO/MBPO model_train_freq: 1000)."""
    rollout_batch_size: int = 50_000
    """Dataset start states rolled out each time (MOPO: 50e3)."""
    model_retain_rollouts: int = 5
    """The model buffer holds this many rollouts' worth of transitions (MBPO model_retain_epochs: 5)."""
    real_ratio: float = 0.05
    """Fraction of each SAC batch drawn from the dataset; the rest from model rollouts (MOPO: 0.05)."""
    # agent
    hidden_dim: int = 256
    """Width of the SAC actor/critic hidden layers (MOPO/MBPO: 256)."""
    num_layers: int = 2
    """Hidden layers of the SAC actor/critic (MOPO: 2)."""
    normalize_states: bool = True
    """Standardize the agent's inputs with the dataset mean/std (the buffers hold raw states)."""
    actor_lr: float = 3e-4
    """Actor Adam learning rate (MOPO/SAC: 3e-4)."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate (MOPO/SAC: 3e-4)."""
    alpha_lr: float = 3e-4
    """Entropy temperature Adam learning rate (SAC: 3e-4)."""
    target_entropy: float | None = None
    """SAC target entropy (None: -action_dim, as MOPO's configs)."""
    discount: float = 0.99
    """Discount gamma (MOPO: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target critics (MOPO: 5e-3)."""
    debug_nan_at: int = -1
    """Testing aid: inject a NaN into the critic loss at this update number (1-based) to exercise the NaN guard."""


# Rollout length h and penalty lambda per dataset, from the official MOPO configs (github.com/tianheyu927/mopo,
# examples/config/d4rl/*.py, for the -v0 datasets; "mixed" = medium-replay). No config exists for ant or
# full-replay: they get the default (h=5, lambda=1, the setting most MOPO configs use).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"horizon": 5, "penalty_coef": 1.0},
    "halfcheetah-random": {"horizon": 5, "penalty_coef": 0.5},
    "halfcheetah-medium": {"horizon": 1, "penalty_coef": 1.0},
    "halfcheetah-medium-replay": {"horizon": 5, "penalty_coef": 1.0},
    "halfcheetah-medium-expert": {"horizon": 5, "penalty_coef": 5.0},
    "hopper-random": {"horizon": 5, "penalty_coef": 1.0},
    "hopper-medium": {"horizon": 5, "penalty_coef": 5.0},
    "hopper-medium-replay": {"horizon": 5, "penalty_coef": 1.0},
    "hopper-medium-expert": {"horizon": 5, "penalty_coef": 1.0},
    "walker2d-random": {"horizon": 1, "penalty_coef": 1.0},
    "walker2d-medium": {"horizon": 5, "penalty_coef": 5.0},
    "walker2d-medium-replay": {"horizon": 1, "penalty_coef": 1.0},
    "walker2d-medium-expert": {"horizon": 1, "penalty_coef": 2.0},
}


def resolve_hyperparameters(args: Args, info: dict) -> dict[str, Any]:
    """The preset for this dataset, with --horizon/--penalty-coef overrides applied."""
    name = args.preset
    if name == "auto":
        tag = info.get("task") or str(info["dataset"]).removesuffix("-v2")
        name = tag if tag in PRESETS else "default"
    if name not in PRESETS:
        raise SystemExit(f"error: unknown --preset {args.preset!r}; choose auto or one of {sorted(PRESETS)}")
    hp = dict(PRESETS[name], preset=name)
    if args.horizon is not None:
        hp["horizon"] = args.horizon
    if args.penalty_coef is not None:
        hp["penalty_coef"] = args.penalty_coef
    if hp["horizon"] < 1:
        raise SystemExit("error: --horizon must be >= 1")
    return hp


# ---- Termination functions ----
def env_family(eval_env: str | None) -> str:
    """'Hopper-v4' -> 'hopper'; anything without a termination rule here (Pendulum, custom envs) -> 'none'."""
    name = str(eval_env or "").split("/")[-1].split("-v")[0].lower()
    return name if name in ("hopper", "walker2d", "halfcheetah", "ant") else "none"


def termination_fn(family: str) -> Callable[[jax.Array], jax.Array]:
    """Static termination rule on raw next observations [..., obs_dim] -> bool [...] (MBPO's static_fns).

    Checked against gymnasium's v4 `is_healthy` (observations exclude the x position, so obs[0] = qpos[1]):
      hopper:   healthy iff all |obs[1:]| < 100, 0.7 < z = obs[0], and -0.2 < angle = obs[1] < 0.2
                (gymnasium tests state_vector()[2:] = (qpos[2:], qvel); the observation clips qvel to +-10,
                which never crosses 100, so the rule on observations agrees; MBPO's version has a misplaced abs)
      walker2d: healthy iff 0.8 < z < 2.0 and -1 < angle < 1
      ant:      healthy iff all finite and 0.2 <= z = obs[0] <= 1.0
      halfcheetah and every other env ('none', e.g. Pendulum): never terminates.
    """
    if family == "hopper":
        def fn(o):
            healthy = (jnp.isfinite(o).all(-1) & (jnp.abs(o[..., 1:]) < 100).all(-1)
                       & (o[..., 0] > 0.7) & (o[..., 1] > -0.2) & (o[..., 1] < 0.2))
            return ~healthy
    elif family == "walker2d":
        def fn(o):
            return ~((o[..., 0] > 0.8) & (o[..., 0] < 2.0) & (o[..., 1] > -1.0) & (o[..., 1] < 1.0))
    elif family == "ant":
        def fn(o):
            return ~(jnp.isfinite(o).all(-1) & (o[..., 0] >= 0.2) & (o[..., 0] <= 1.0))
    else:
        def fn(o):
            return jnp.zeros(o.shape[:-1], bool)
    return fn


# ---- Networks ----
class GaussianDynamics(nn.Module):
    """One ensemble member: normalized (s, a) -> mean and bounded log-variance of (s' - s, r).

    Soft bounds as in MBPO/PETS: logvar = max - softplus(max - x), then min + softplus(logvar - min), with
    learned max_logvar (init 0.5) and min_logvar (init -10) that the loss regularizes (see model_loss).
    """

    out_dim: int
    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i in range(self.num_layers):
            x = nn.swish(nn.Dense(self.hidden_dim, name=f"hidden_{i}")(x))
        out = nn.Dense(2 * self.out_dim, name="out")(x)
        mean, logvar = out[..., : self.out_dim], out[..., self.out_dim:]
        max_logvar = self.param("max_logvar", nn.initializers.constant(0.5), (self.out_dim,))
        min_logvar = self.param("min_logvar", nn.initializers.constant(-10.0), (self.out_dim,))
        logvar = max_logvar - jax.nn.softplus(max_logvar - logvar)
        logvar = min_logvar + jax.nn.softplus(logvar - min_logvar)
        return mean, logvar


MBPO_WEIGHT_DECAYS = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)  # hidden layers..., output layer (MBPO's bnn)


def model_inputs(obs: jax.Array, act: jax.Array, in_mean: jax.Array, in_std: jax.Array) -> jax.Array:
    return (jnp.concatenate([obs, act], -1) - in_mean) / in_std


def ensemble_predict(model_def: nn.Module, params: Any, in_mean: jax.Array, in_std: jax.Array,
                     obs: jax.Array, act: jax.Array) -> tuple[jax.Array, jax.Array]:
    """All members (params stacked on axis 0) on one batch: mean, logvar [members, batch, obs_dim + 1]."""
    x = model_inputs(obs, act, in_mean, in_std)
    return jax.vmap(lambda p: model_def.apply(p, x))(params)


def model_loss(model_def: nn.Module, params: Any, x: jax.Array, y: jax.Array, decay_scale: float) -> jax.Array:
    """Gaussian NLL summed over members (x, y: [members, batch, .]), + MBPO's L2 decay and logvar-bound terms."""
    mean, logvar = jax.vmap(model_def.apply)(params, x)
    nll = (((mean - y) ** 2) * jnp.exp(-logvar) + logvar).mean((1, 2)).sum()
    p = params["params"]
    bounds = 0.01 * (p["max_logvar"].sum() - p["min_logvar"].sum())
    num_hidden = len(p) - 3  # hidden_0.., out, max_logvar, min_logvar
    decays = {f"hidden_{i}": MBPO_WEIGHT_DECAYS[min(i, 3)] for i in range(num_hidden)} | {"out": MBPO_WEIGHT_DECAYS[4]}
    l2 = sum(d * 0.5 * (p[name]["kernel"] ** 2).sum() for name, d in decays.items())
    return nll + bounds + decay_scale * l2


def holdout_mse(model_def: nn.Module, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Held-out MSE of each member's mean: [members]."""
    mean, _ = jax.vmap(lambda p: model_def.apply(p, x))(params)
    return ((mean - y) ** 2).mean((1, 2))


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy (SAC): a = tanh(mu(s) + sigma(s) * eps)."""

    action_dim: int
    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = obs
        for _ in range(self.num_layers):
            x = nn.relu(nn.Dense(self.hidden_dim)(x))
        mean = nn.Dense(self.action_dim)(x)
        log_std = jnp.clip(nn.Dense(self.action_dim)(x), -5.0, 2.0)
        return mean, log_std


class DoubleCritic(nn.Module):
    """Twin Q(s, a) -> [2, batch] (two MLPs, vmapped over the ensemble axis)."""

    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        class QNet(nn.Module):
            hidden_dim: int
            num_layers: int

            @nn.compact
            def __call__(self, x):
                for _ in range(self.num_layers):
                    x = nn.relu(nn.Dense(self.hidden_dim)(x))
                return nn.Dense(1)(x)[..., 0]

        ensemble = nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=2)
        return ensemble(self.hidden_dim, self.num_layers)(jnp.concatenate([obs, action], -1))


def sample_action(mean: jax.Array, log_std: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reparameterized tanh-Gaussian sample and its log-density (SAC paper, App. C)."""
    std = jnp.exp(log_std)
    u = mean + std * jax.random.normal(key, mean.shape)
    logp = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    logp -= (2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u))).sum(-1)  # log(1 - tanh(u)^2), stable
    return jnp.tanh(u), logp


# ---- Losses ----
def mopo_penalty(std: jax.Array) -> jax.Array:
    """u(s, a) = max_i ||sigma_i(s, a)||_2 over ensemble members i: std [members, batch, dim] -> [batch].

    For the diagonal Gaussians here the Frobenius norm of Sigma_i^(1/2) is the 2-norm of the std vector
    (MOPO Sec. 4.3, "max aleatoric"). `std` is the next-state part; the official code also includes the reward's.
    """
    return jnp.sqrt((std**2).sum(-1)).max(0)


def sac_target(reward: jax.Array, terminal: jax.Array, next_q: jax.Array, next_logp: jax.Array,
               alpha: jax.Array, discount: float) -> jax.Array:
    """Soft Bellman target r + gamma (1 - done) (min_j Q'_j(s', a') - alpha log pi(a'|s'))."""
    return reward + discount * (1.0 - terminal) * (next_q - alpha * next_logp)


# ---- Dynamics training ----
@flax.struct.dataclass
class ModelTrainState:
    params: Any
    opt_state: Any
    key: jax.Array


def train_dynamics(args: Args, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray, rew: np.ndarray,
                   seed: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit the ensemble to (s, a) -> (s' - s, r) with early stopping; returns the model dict (see save_model)."""
    x_all = np.concatenate([obs, act], 1).astype(np.float32)
    y_all = np.concatenate([next_obs - obs, rew[:, None]], 1).astype(np.float32)
    n = len(x_all)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_hold = min(int(n * args.model_holdout_ratio), args.model_max_holdout)
    n_hold = max(1, min(n_hold, n - 1))
    hold, train = perm[:n_hold], perm[n_hold:]
    in_mean = x_all[train].mean(0)
    in_std = x_all[train].std(0)
    in_std = np.where(in_std < 1e-12, 1.0, in_std).astype(np.float32)  # as MBPO's StandardScaler
    x_train = jnp.asarray((x_all[train] - in_mean) / in_std)
    y_train = jnp.asarray(y_all[train])
    x_hold = jnp.asarray((x_all[hold] - in_mean) / in_std)
    y_hold = jnp.asarray(y_all[hold])

    model_def = GaussianDynamics(y_all.shape[1], args.model_hidden_dim, args.model_num_layers)
    m = args.ensemble_size
    keys = jax.random.split(jax.random.PRNGKey(seed), m + 1)
    params = jax.vmap(lambda k: model_def.init(k, jnp.zeros((1, x_all.shape[1]))))(keys[1:])
    tx = optax.adam(args.model_lr)
    state = ModelTrainState(params, tx.init(params), keys[0])
    bs = min(args.model_batch_size, len(train))
    num_batches = max(1, len(train) // bs)

    def epoch(state: ModelTrainState) -> tuple[ModelTrainState, jax.Array, jax.Array]:
        """One pass over the training set: an independent shuffle per member, a scan over minibatches."""
        key, k_perm = jax.random.split(state.key)
        order = jax.vmap(lambda k: jax.random.permutation(k, x_train.shape[0]))(jax.random.split(k_perm, m))
        order = order[:, : num_batches * bs].reshape(m, num_batches, bs).transpose(1, 0, 2)

        def step(carry, idx):  # idx [members, bs]
            params, opt_state = carry
            loss, grads = jax.value_and_grad(lambda p: model_loss(model_def, p, x_train[idx], y_train[idx],
                                                                  args.model_weight_decay))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (state.params, state.opt_state), order)
        return ModelTrainState(params, opt_state, key), losses.mean(), holdout_mse(model_def, params, x_hold, y_hold)

    epoch = jax.jit(epoch, donate_argnums=0)
    best_params = jax.tree.map(jnp.copy, state.params)
    best = np.asarray(holdout_mse(model_def, state.params, x_hold, y_hold))
    since, epochs, t0 = 0, 0, time.perf_counter()
    while True:
        state, train_loss, hold_mse = epoch(state)
        hold_mse = np.asarray(hold_mse)
        epochs += 1
        improved = (best - hold_mse) / np.abs(best) > 0.01  # MBPO's _save_best: > 1% relative improvement
        if improved.any():
            sel = jnp.asarray(improved)
            best_params = jax.tree.map(
                lambda new, old, sel=sel: jnp.where(sel.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
                state.params, best_params)
            best = np.where(improved, hold_mse, best)
            since = 0
        else:
            since += 1
        if epochs == 1 or epochs % 10 == 0:
            log(f"[dynamics] epoch {epochs} | train nll {float(train_loss):.3f} | holdout mse {np.sort(hold_mse)} "
                f"| {time.perf_counter() - t0:.0f}s")
        if not np.isfinite(float(train_loss)):
            raise FloatingPointError(f"dynamics training diverged at epoch {epochs} (non-finite loss)")
        if since > args.model_patience:
            break
        if args.model_epochs is not None and epochs >= args.model_epochs:
            break
        if args.model_max_time_s is not None and time.perf_counter() - t0 >= args.model_max_time_s:
            break
    final_mse = np.asarray(holdout_mse(model_def, best_params, x_hold, y_hold))
    elites = select_elites(final_mse, args.num_elites)
    log(f"[dynamics] done after {epochs} epochs; holdout mse {final_mse}; elites {elites.tolist()}")
    return {"params": jax.device_get(best_params), "in_mean": in_mean, "in_std": in_std, "elites": elites,
            "holdout_mse": final_mse, "epochs": epochs}


def select_elites(holdout_losses: np.ndarray, num_elites: int) -> np.ndarray:
    """Indices of the `num_elites` members with the lowest held-out loss, best first."""
    return np.argsort(np.asarray(holdout_losses), kind="stable")[:num_elites].astype(np.int32)


def save_model(path: str, model: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomic write of the dynamics model: params, input normalizer, elites and the sizes that must match."""
    blob = {"params": flax.serialization.to_state_dict(jax.device_get(model["params"])),
            "in_mean": np.asarray(model["in_mean"]), "in_std": np.asarray(model["in_std"]),
            "elites": np.asarray(model["elites"]), "holdout_mse": np.asarray(model["holdout_mse"]),
            "meta": json.dumps(meta)}
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(blob))
    os.replace(tmp, path)


def load_model(path: str, meta: dict[str, Any]) -> dict[str, Any]:
    try:
        blob = flax.serialization.msgpack_restore(Path(path).read_bytes())
        saved = json.loads(blob["meta"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot load dynamics model {path}: {e}") from None
    diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
    if diff:
        raise SystemExit(f"error: dynamics model {path} does not match this run (saved vs now: {diff})")
    return {"params": jax.tree.map(jnp.asarray, blob["params"]), "in_mean": blob["in_mean"],
            "in_std": blob["in_std"], "elites": np.asarray(blob["elites"]), "holdout_mse": blob["holdout_mse"]}


# ---- Train step ----
@flax.struct.dataclass
class AgentState:
    actor: TrainState
    critic: TrainState
    alpha: TrainState
    target_critic_params: Any
    key: jax.Array


@flax.struct.dataclass
class ModelBuffer:
    """Ring buffer of model transitions on the device (raw states), plus the last rollout's statistics."""

    data: dict[str, jax.Array]
    ptr: jax.Array
    size: jax.Array
    stats: dict[str, jax.Array]


ROLLOUT_STATS = ("rollout_penalty", "rollout_reward", "rollout_valid_frac")


def make_networks(args: Args, action_dim: int) -> tuple[Actor, DoubleCritic]:
    return Actor(action_dim, args.hidden_dim, args.num_layers), DoubleCritic(args.hidden_dim, args.num_layers)


def make_init(args: Args, obs_dim: int, action_dim: int, capacity: int) -> Callable[[jax.Array], tuple]:
    actor_def, critic_def = make_networks(args, action_dim)

    def init(seed: jax.Array) -> tuple[AgentState, ModelBuffer]:
        key = jax.random.PRNGKey(seed)
        key, k_actor, k_critic = jax.random.split(key, 3)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        critic_params = critic_def.init(k_critic, obs, act)
        agent = AgentState(
            actor=TrainState.create(apply_fn=actor_def.apply, params=actor_def.init(k_actor, obs),
                                    tx=optax.adam(args.actor_lr)),
            critic=TrainState.create(apply_fn=critic_def.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            alpha=TrainState.create(apply_fn=None, params={"log_alpha": jnp.zeros(())}, tx=optax.adam(args.alpha_lr)),
            target_critic_params=critic_params,
            key=key,
        )
        shapes = {"observations": (obs_dim,), "actions": (action_dim,), "rewards": (), "next_observations": (obs_dim,),
                  "terminals": ()}
        buffer = ModelBuffer({k: jnp.zeros((capacity, *s)) for k, s in shapes.items()}, jnp.zeros((), jnp.int32),
                             jnp.zeros((), jnp.int32), {k: jnp.zeros(()) for k in ROLLOUT_STATS})
        return agent, buffer

    return init


def make_rollout(args: Args, hp: dict[str, Any], model: dict[str, Any], model_def: nn.Module, actor_def: nn.Module,
                 term_fn: Callable, obs_mean: jax.Array, obs_std: jax.Array) -> Callable:
    """Roll out `rollout_batch_size` dataset states for h steps in the model; write them into the buffer."""
    elites = np.asarray(model["elites"])
    elite_params = jax.tree.map(lambda p: jnp.asarray(p)[elites], model["params"])
    in_mean, in_std = jnp.asarray(model["in_mean"]), jnp.asarray(model["in_std"])
    b, h, lam = args.rollout_batch_size, hp["horizon"], hp["penalty_coef"]
    num_elites = len(elites)

    def rollout(agent: AgentState, buffer: ModelBuffer, data: dict[str, jax.Array], key: jax.Array) -> ModelBuffer:
        k_start, k_steps = jax.random.split(key)
        obs0 = data["observations"][jax.random.randint(k_start, (b,), 0, data["observations"].shape[0])]
        obs_dim = obs0.shape[1]

        def step(carry, k):
            obs, alive = carry
            k_act, k_member, k_noise = jax.random.split(k, 3)
            mean, log_std = actor_def.apply(agent.actor.params, (obs - obs_mean) / obs_std)
            act, _ = sample_action(mean, log_std, k_act)
            mu, logvar = ensemble_predict(model_def, elite_params, in_mean, in_std, obs, act)  # [E, b, obs+1]
            std = jnp.exp(0.5 * logvar)
            member = jax.random.randint(k_member, (b,), 0, num_elites)
            pick = jnp.arange(b)
            sample = mu[member, pick] + std[member, pick] * jax.random.normal(k_noise, (b, obs_dim + 1))
            next_obs, reward = obs + sample[:, :obs_dim], sample[:, obs_dim]
            penalty = mopo_penalty(std[..., :obs_dim])
            reward_pen = reward - lam * penalty
            done = term_fn(next_obs)
            ok = jnp.isfinite(next_obs).all(-1) & jnp.isfinite(reward_pen)
            trans = {"observations": obs, "actions": act, "rewards": reward_pen,
                     "next_observations": jnp.where(ok[:, None], next_obs, obs), "terminals": done.astype(jnp.float32)}
            valid = alive & ok
            # a finished rollout keeps stepping (fixed shapes) but its transitions are not stored
            return (jnp.where((valid & ~done)[:, None], next_obs, obs), valid & ~done), (trans, valid, penalty, reward)

        _, (trans, valid, penalty, reward) = jax.lax.scan(step, (obs0, jnp.ones(b, bool)), jax.random.split(k_steps, h))
        trans = jax.tree.map(lambda x: x.reshape(h * b, *x.shape[2:]), trans)
        valid = valid.reshape(-1)
        # compact the valid transitions to the front, then scatter them into the ring (invalid rows are dropped)
        order = jnp.argsort(~valid, stable=True)
        n_valid = valid.sum().astype(jnp.int32)
        cap = buffer.data["rewards"].shape[0]
        j = jnp.arange(h * b)
        dest = jnp.where(j < n_valid, (buffer.ptr + j) % cap, cap)
        new_data = {k: buffer.data[k].at[dest].set(trans[k][order], mode="drop") for k in buffer.data}
        vf = valid.astype(jnp.float32)
        stats = {"rollout_penalty": (penalty.reshape(-1) * vf).sum() / jnp.maximum(vf.sum(), 1.0),
                 "rollout_reward": (reward.reshape(-1) * vf).sum() / jnp.maximum(vf.sum(), 1.0),
                 "rollout_valid_frac": vf.mean()}
        return ModelBuffer(new_data, (buffer.ptr + n_valid) % cap, jnp.minimum(buffer.size + n_valid, cap), stats)

    return rollout


def make_update(args: Args, obs_mean: jax.Array, obs_std: jax.Array, action_dim: int) -> Callable:
    n_real = int(round(args.batch_size * args.real_ratio))
    n_model = args.batch_size - n_real
    target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy

    def update(agent: AgentState, buffer: ModelBuffer, data: dict[str, jax.Array], step: jax.Array):
        key, k_real, k_model, k_next, k_pi = jax.random.split(agent.key, 5)
        real_idx = jax.random.randint(k_real, (n_real,), 0, data["observations"].shape[0])
        model_idx = jax.random.randint(k_model, (n_model,), 0, jnp.maximum(buffer.size, 1))
        b = {k: jnp.concatenate([data[k][real_idx], buffer.data[k][model_idx]]) for k in buffer.data}
        obs = (b["observations"] - obs_mean) / obs_std
        next_obs = (b["next_observations"] - obs_mean) / obs_std
        alpha = jnp.exp(agent.alpha.params["log_alpha"])

        # Critic: soft Bellman backup with clipped double Q (SAC).
        nm, nls = agent.actor.apply_fn(agent.actor.params, next_obs)
        na, nlogp = sample_action(nm, nls, k_next)
        nq = agent.critic.apply_fn(agent.target_critic_params, next_obs, na).min(0)
        target = jax.lax.stop_gradient(sac_target(b["rewards"], b["terminals"], nq, nlogp, alpha, args.discount))

        def critic_loss_fn(params):
            q = agent.critic.apply_fn(params, obs, b["actions"])
            loss = ((q - target) ** 2).mean(1).sum()
            if args.debug_nan_at >= 0:  # testing aid, see --debug-nan-at
                loss = loss + jnp.where(step + 1 == args.debug_nan_at, jnp.nan, 0.0)
            return loss, q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(agent.critic.params)
        critic = agent.critic.apply_gradients(grads=grads)

        # Actor: minimize E[alpha log pi(a|s) - min_j Q_j(s, a)].
        def actor_loss_fn(params):
            m, ls = agent.actor.apply_fn(params, obs)
            a, logp = sample_action(m, ls, k_pi)
            return (alpha * logp - critic.apply_fn(critic.params, obs, a).min(0)).mean(), logp.mean()

        (actor_loss, logp), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(agent.actor.params)
        actor = agent.actor.apply_gradients(grads=grads)

        # Temperature: minimize -alpha (log pi + target entropy).
        grads = jax.grad(lambda p: -jnp.exp(p["log_alpha"]) * jax.lax.stop_gradient(logp + target_entropy))(agent.alpha.params)
        alpha_state = agent.alpha.apply_gradients(grads=grads)

        target_params = optax.incremental_update(critic.params, agent.target_critic_params, args.tau)
        new = AgentState(actor=actor, critic=critic, alpha=alpha_state, target_critic_params=target_params, key=key)
        metrics = {"critic_loss": critic_loss, "actor_loss": actor_loss, "q_mean": q.mean(), "alpha": alpha,
                   "entropy": -logp, "model_reward_mean": b["rewards"][n_real:].mean(),
                   "model_buffer_size": buffer.size.astype(jnp.float32), **buffer.stats}
        return new, metrics

    return update


def make_train_chunk(update: Callable, rollout: Callable, rollout_freq: int) -> Callable:
    """jit(scan(rollout-if-due, vmap(update))): `num_steps` updates of every seed per device call; state donated.

    The rollout sits outside the vmap under a scalar lax.cond, so it really runs only every `rollout_freq` updates.
    """

    def fill(agents: AgentState, buffers: ModelBuffer, data: dict[str, jax.Array]) -> tuple[AgentState, ModelBuffer]:
        keys = jax.vmap(lambda k: jax.random.split(k))(agents.key)  # [S, 2, 2]
        buffers = jax.vmap(rollout, in_axes=(0, 0, None, 0))(agents, buffers, data, keys[:, 1])
        return agents.replace(key=keys[:, 0]), buffers

    def chunk(agents: AgentState, buffers: ModelBuffer, data: dict[str, jax.Array], step0: jax.Array,
              run_start: jax.Array, num_steps: int):
        def body(carry, step):
            agents, buffers = carry
            due = (step % rollout_freq == 0) & (step != run_start)  # run_start: filled by `fill` already
            agents, buffers = jax.lax.cond(due, lambda a, bf: fill(a, bf, data), lambda a, bf: (a, bf), agents, buffers)
            agents, metrics = jax.vmap(update, in_axes=(0, 0, None, None))(agents, buffers, data, step)
            return (agents, buffers), metrics

        (agents, buffers), metrics = jax.lax.scan(body, (agents, buffers), step0 + jnp.arange(num_steps))
        means = {k: m.mean(0) for k, m in metrics.items()}
        first_bad = {}
        for k, m in metrics.items():
            bad = ~jnp.all(jnp.isfinite(m), axis=1)
            first_bad[k] = jnp.where(bad.any(), jnp.argmax(bad), -1)
        return agents, buffers, means, first_bad

    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=(0, 1)), jax.jit(fill, donate_argnums=(0, 1))


# ---- Evaluation ----
def make_policy_fn(actor_def: nn.Module, obs_mean: np.ndarray, obs_std: np.ndarray) -> Callable:
    """Deterministic policy tanh(mu(s)) for all seeds: params [S, ...], obs [S, E, obs] -> [S, E, act]."""

    @jax.jit
    def policy(params: Any, obs: jax.Array) -> jax.Array:
        obs = (obs - obs_mean) / obs_std
        return jax.vmap(lambda p, o: jnp.tanh(actor_def.apply(p, o)[0]))(params, obs)

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
    for name in ("num_seeds", "batch_size", "eval_interval", "eval_episodes", "rollout_freq", "rollout_batch_size",
                 "model_retain_rollouts", "ensemble_size", "num_elites"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.num_elites > args.ensemble_size:
        raise SystemExit("error: --num-elites cannot exceed --ensemble-size")
    if not 0.0 <= args.real_ratio <= 1.0:
        raise SystemExit("error: --real-ratio must be in [0, 1]")
    num_seeds, episodes = args.num_seeds, args.eval_episodes
    seeds = [args.seed + i for i in range(num_seeds)]
    try:
        data_np, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
        env = common.make_eval_env(info, num_envs=num_seeds * episodes, seed=args.seed)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    hp = resolve_hyperparameters(args, info)
    family = env_family(info["eval_env"])
    hp["termination"] = family

    # Actions are modelled and trained in [-1, 1]; evaluation maps them back to the env's bounds.
    act_low = np.asarray(env.single_action_space.low, np.float32)
    act_high = np.asarray(env.single_action_space.high, np.float32)
    actions = np.clip(2.0 * (data_np["actions"] - act_low) / (act_high - act_low) - 1.0, -1.0, 1.0).astype(np.float32)
    obs_dim, action_dim = data_np["observations"].shape[1], actions.shape[1]
    if args.normalize_states:
        obs_mean, obs_std = common.state_stats(data_np["observations"])
    else:
        obs_mean, obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
    data = {  # raw states (the model and the termination rule work on them); goes onto the device once
        "observations": jnp.asarray(data_np["observations"]),
        "actions": jnp.asarray(actions),
        "rewards": jnp.asarray(data_np["rewards"]),
        "next_observations": jnp.asarray(data_np["next_observations"]),
        "terminals": jnp.asarray(data_np["terminals"]),
    }

    dataset_tag = Path(str(info["dataset"])).stem if args.dataset else str(info["dataset"])
    log_dir = Path(args.log_dir or f"runs/{ALGORITHM}/{dataset_tag}/{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    log_dir.mkdir(parents=True, exist_ok=True)
    save_path = args.save_path or str(log_dir / "checkpoint.msgpack")
    model_path = args.model_path or str(log_dir / "dynamics.msgpack")
    for p in (save_path, model_path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    writer = Writer(str(log_dir))
    print(f"[{ALGORITHM}] {info['dataset']} ({info['source']}) -> {info['eval_env']}; seeds {seeds}; "
          f"{hp}; logs in {log_dir}")

    # Phase 1: the dynamics ensemble.
    model_meta = {"obs_dim": obs_dim, "action_dim": action_dim, "ensemble_size": args.ensemble_size,
                  "model_hidden_dim": args.model_hidden_dim, "model_num_layers": args.model_num_layers}
    t0 = time.perf_counter()
    if args.load_model:
        model = load_model(args.load_model, model_meta)
        if len(model["elites"]) < args.num_elites:
            raise SystemExit(f"error: {args.load_model} has {len(model['elites'])} elites, --num-elites is {args.num_elites}")
        model["elites"] = model["elites"][: args.num_elites]
        model_source, model_epochs = args.load_model, 0
        print(f"[{ALGORITHM}] loaded dynamics model {args.load_model}; elites {model['elites'].tolist()}")
    else:
        model = train_dynamics(args, data_np["observations"], actions, data_np["next_observations"], data_np["rewards"],
                               args.seed, log=lambda s: print(f"[{ALGORITHM}] {s}", flush=True))
        save_model(model_path, model, model_meta)
        model_source, model_epochs = model_path, model["epochs"]
    model_time = time.perf_counter() - t0
    for i, v in enumerate(np.asarray(model["holdout_mse"])):
        writer.add_scalar(f"dynamics/holdout_mse/member{i}", float(v), 0)

    # Phase 2: the agent.
    t_policy = time.perf_counter()
    capacity = args.rollout_batch_size * hp["horizon"] * args.model_retain_rollouts
    model_def = GaussianDynamics(obs_dim + 1, args.model_hidden_dim, args.model_num_layers)
    actor_def, _ = make_networks(args, action_dim)
    om, osd = jnp.asarray(obs_mean), jnp.asarray(obs_std)
    rollout = make_rollout(args, hp, model, model_def, actor_def, termination_fn(family), om, osd)
    agents, buffers = jax.vmap(make_init(args, obs_dim, action_dim, capacity))(jnp.asarray(seeds))
    agents, buffers = jax.tree.map(lambda x: jnp.array(x, copy=True), (agents, buffers))  # distinct (donated) buffers
    step = 0
    if args.load:
        agents, step = load_checkpoint(args.load, agents)
        print(f"[{ALGORITHM}] restored {args.load} at update {step}")
    train_chunk, fill = make_train_chunk(make_update(args, om, osd, action_dim), rollout, args.rollout_freq)
    policy = make_policy_fn(actor_def, obs_mean, obs_std)

    compiled: dict[int, Any] = {}
    compile_time = train_time = 0.0
    trained = 0
    history: list[dict] = []
    best_ret = np.full(num_seeds, -np.inf)
    best_norm: np.ndarray | None = None
    last_ret, last_norm = best_ret, None
    csv_path = log_dir / "evals.csv"
    run_start = step

    def evaluate_and_log(step: int) -> None:
        nonlocal best_ret, best_norm, last_ret, last_norm
        t0 = time.perf_counter()
        last_ret, last_norm = run_evaluation(env, policy, agents.actor.params, info, num_seeds, episodes, act_low, act_high)
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

    if step < args.num_updates:  # the first rollout of this run (also refills the buffer after --load)
        t0 = time.perf_counter()
        agents, buffers = fill(agents, buffers, data)
        jax.block_until_ready(buffers.size)
        compile_time += time.perf_counter() - t0
    while step < args.num_updates:
        n = min(args.eval_interval, args.num_updates - step)
        step0, start = jnp.asarray(step, jnp.int32), jnp.asarray(run_start, jnp.int32)
        if n not in compiled:  # AOT compile, timed separately from training throughput
            t0 = time.perf_counter()
            compiled[n] = train_chunk.lower(agents, buffers, data, step0, start, num_steps=n).compile()
            compile_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        agents, buffers, means, first_bad = compiled[n](agents, buffers, data, step0, start)
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
        save_checkpoint(save_path, agents, step)
    if not history:  # --num-updates 0 (or a finished checkpoint): evaluate only
        evaluate_and_log(step)
    writer.close()
    policy_time = time.perf_counter() - t_policy

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
        "phase_times_s": {"model_training": model_time, "policy_training": policy_time},
        "dynamics": {"model_path": model_source, "loaded": bool(args.load_model), "epochs": model_epochs,
                     "elites": [int(e) for e in model["elites"]],
                     "holdout_mse": [float(x) for x in np.asarray(model["holdout_mse"])]},
        "config": asdict(args),
        "hyperparameters": hp,
        "eval_history": history,
    }
    (log_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(f"[{ALGORITHM}] done: return {result['last_return']:.1f} (best {result['best_return']:.1f}), normalized "
          f"{_f(result['last_normalized'])}; {result['updates_per_s'] or 0:.0f} upd/s; model {model_time:.0f}s, "
          f"policy {policy_time:.0f}s; result in {log_dir}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))

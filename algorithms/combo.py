"""Conservative Offline Model-Based Policy Optimization (COMBO) -- single-file JAX/Flax implementation.

Yu, Kumar, Rafailov, Rajeswaran, Levine & Finn, "COMBO: Conservative Offline Model-Based Policy Optimization",
NeurIPS 2021. https://arxiv.org/abs/2102.08363

    python algorithms/combo.py --env hopper-medium-v2
    python algorithms/combo.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/combo.py --env hopper-medium-v2 --model-load runs/combo/.../dynamics.msgpack  # skip model training
    python algorithms/combo.py --load runs/.../checkpoint.msgpack                    # resume (same folder, schedule, model)
    python algorithms/combo.py --load runs/.../checkpoint.msgpack --num-updates 0    # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack"); action = act(obs)           # in your own code (env units)

Two phases:
  1. Dynamics: an ensemble of 7 Gaussian MLPs learns (s, a) -> (s' - s, r) from all transitions; the 5 with the
     lowest held-out error are the elites. Saved to --model-save-path; --model-load reuses one and skips this phase
     (a resumed run reuses the model its run trained or loaded).
  2. Policy: SAC (automatic entropy tuning) on batches that mix dataset transitions (fraction f = real_ratio) and
     h-step model rollouts (unpenalized rewards), with the conservative critic term of COMBO Eq. (4):
        beta * ( E_{s ~ model rollouts} [ log sum_a exp Q(s, a) ]  -  E_{(s, a) ~ D} [ Q(s, a) ] )
     where the log-sum-exp is CQL(H)'s importance-sampled estimate over uniform and policy actions. The gradient
     flows through both parts (a public implementation stops it through the push-down part, which silently turns
     the regularizer into "push Q up on the data"; tests/test_model_based.py checks the gradient).

Everything of phase 2 runs on the device: every jitted call performs a few seconds of updates (rollouts included)
in one `jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process with `jax.vmap` (they share
the one dynamics model, which is trained once with --seed). The model replay buffer is not checkpointed: a resumed
run refills it with a fresh rollout before its first update.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
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

ALGORITHM = "combo"


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
    """Total gradient updates (COMBO code, as MOPO: 1000 epochs x 1000 steps)."""
    batch_size: int = 256
    """Minibatch size (COMBO: 256)."""
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
    """Width of every hidden layer (actor and critic; COMBO/CQL: 256)."""
    num_layers: int = 3
    """Number of hidden layers (actor and critic; 3, as the d3rlpy/OfflineRL-Kit COMBO and CQL)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint)."""
    preset: Literal["auto", "default", "halfcheetah-random", "halfcheetah-medium", "halfcheetah-medium-replay",
                    "halfcheetah-medium-expert", "hopper-random", "hopper-medium", "hopper-medium-replay",
                    "hopper-medium-expert", "walker2d-random", "walker2d-medium", "walker2d-medium-replay",
                    "walker2d-medium-expert"] = "auto"
    """Hyperparameter preset (PRESETS): auto picks the dataset's name (e.g. hopper-medium) if it has one, else default."""
    horizon: int | None = None
    """Model rollout length h. Default from the preset (1 on walker2d, else 5; sources in the PRESETS comment)."""
    beta: float | None = None
    """Conservative coefficient beta of Eq. (4). Default from the preset (0.5, 1 or 5; sources in the PRESETS comment)."""
    cql_num_actions: int = 10
    """Actions sampled per state and per proposal (uniform, pi(.|s), pi(.|s')) in the log-sum-exp (CQL: 10)."""
    cql_temperature: float = 1.0
    """Temperature of the log-sum-exp (CQL: 1)."""
    # dynamics model
    model_save_path: str | None = None
    """Where the trained dynamics model (params, normalizer, elites) is saved. Default: <log_dir>/dynamics.msgpack."""
    model_load: str | None = None
    """Load this dynamics model file (written by --model-save-path of an earlier run) and skip model training."""
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
    rollout_freq: int = 1000
    """Updates between model rollouts (MOPO/MBPO model_train_freq: 1000)."""
    rollout_batch_size: int = 50_000
    """Dataset start states rolled out each time (MOPO: 50e3)."""
    model_retain_rollouts: int = 5
    """The model buffer holds this many rollouts' worth of transitions (MBPO model_retain_epochs: 5)."""
    real_ratio: float = 0.5
    """Fraction f of each batch drawn from the dataset; the rest from model rollouts (0.5 as d3rlpy/OfflineRL-Kit COMBO)."""
    # agent
    actor_lr: float = 1e-4
    """Actor Adam learning rate (1e-4 as d3rlpy/OfflineRL-Kit COMBO; d3rlpy uses 1e-5 on walker2d)."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate (3e-4 as d3rlpy/OfflineRL-Kit COMBO; d3rlpy uses 1e-4 on walker2d)."""
    alpha_lr: float = 3e-4
    """Adam learning rate of the SAC temperature log(alpha) (SAC: 3e-4)."""
    target_entropy: float | None = None
    """SAC entropy target for automatic temperature tuning; default -action_dim (as the COMBO code)."""
    discount: float = 0.99
    """Discount gamma of the TD target (COMBO: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target critic (COMBO: 5e-3)."""
    log_std_min: float = -5.0
    """Lower clip of the policy log-std (this file's former fixed value: -5)."""
    log_std_max: float = 2.0
    """Upper clip of the policy log-std (this file's former fixed value: 2)."""

# Conservative coefficient beta and rollout length h per dataset.
# NOT checked against the COMBO paper's own table: its appendix (Yu et al. 2021, arXiv 2102.08363) could not be read
# here, so every value below comes from public reimplementations and is tagged with its source:
#   [d3] d3rlpy reproductions/offline/combo.py (D4RL v0): beta 0.5 for all halfcheetah; 5.0 for medium-expert and for
#        hopper/walker2d medium; random and medium-replay: hopper 1.0, walker2d 0.5. It leaves h at its default 5
#        everywhere (no per-dataset h) and uses critic/actor lr 1e-4/1e-5 on walker2d (3e-4/1e-4 otherwise).
#   [kit] OfflineRL-Kit run_example/run_combo.py "suggested hypers" (D4RL v2, medium* only): h = 1 on walker2d, else 5;
#        beta 0.5 for halfcheetah-medium, halfcheetah-medium-replay, hopper-medium-replay, walker2d-medium-replay and
#        5.0 for hopper/walker2d-medium and all medium-expert.
#   [ours] the earlier value, which had no source. A value was changed only where both sources agree against it.
# No entry for ant or full-replay: default beta=1, h=5.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"horizon": 5, "beta": 1.0},
    "halfcheetah-random": {"horizon": 5, "beta": 0.5},  # [d3] (no [kit] value)
    "halfcheetah-medium": {"horizon": 5, "beta": 0.5},  # [d3] = [kit]
    "halfcheetah-medium-replay": {"horizon": 5, "beta": 0.5},  # [d3] = [kit]
    "halfcheetah-medium-expert": {"horizon": 5, "beta": 5.0},  # [kit]; [d3] has beta 0.5
    "hopper-random": {"horizon": 5, "beta": 1.0},  # [d3] (no [kit] value)
    "hopper-medium": {"horizon": 5, "beta": 5.0},  # [d3] = [kit]
    "hopper-medium-replay": {"horizon": 5, "beta": 0.5},  # [kit]; [d3] has beta 1.0
    "hopper-medium-expert": {"horizon": 5, "beta": 5.0},  # [d3] = [kit]
    "walker2d-random": {"horizon": 1, "beta": 1.0},  # [ours]; [d3] has beta 0.5, no [kit] value
    "walker2d-medium": {"horizon": 1, "beta": 5.0},  # [kit]; [d3] same beta
    "walker2d-medium-replay": {"horizon": 1, "beta": 0.5},  # [kit]; [d3] same beta
    "walker2d-medium-expert": {"horizon": 1, "beta": 5.0},  # [kit]; [d3] same beta
}


def resolve_preset(args: Args, info: dict) -> Args:
    """Args with the preset's values filled in where no flag set them (and --preset auto resolved), checked."""
    tag = info.get("task") or str(info["dataset"]).removesuffix("-v2")
    name = args.preset if args.preset != "auto" else tag if tag in PRESETS else "default"
    args = dataclasses.replace(args, preset=name, **{k: v for k, v in PRESETS[name].items() if getattr(args, k) is None})
    for flag in ("horizon", "rollout_freq", "rollout_batch_size", "model_retain_rollouts", "ensemble_size", "num_elites",
                 "cql_num_actions"):
        if getattr(args, flag) < 1:
            raise common.RunError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.num_elites > args.ensemble_size:
        raise common.RunError("--num-elites cannot exceed --ensemble-size")
    if not 0.0 <= args.real_ratio <= 1.0:
        raise common.RunError("--real-ratio must be in [0, 1]")
    n_real = int(round(args.batch_size * args.real_ratio))
    if n_real < 1 or n_real >= args.batch_size:
        raise common.RunError("COMBO needs dataset and model transitions in every batch: choose --real-ratio and "
                              "--batch-size so that both parts are non-empty")
    return args


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


def conservative_term(push_down: jax.Array, q_data: jax.Array, beta: float) -> jax.Array:
    """COMBO Eq. (4): beta * (E_model[logsumexp_a Q(s, a)] - E_D[Q(s, a)]), summed over the twin critics.

    push_down: [2, B_model] log-sum-exp values at model-rollout states; q_data: [2, B_real] Q at dataset pairs.
    """
    return beta * (push_down.mean(-1) - q_data.mean(-1)).sum()


def combo_regularizer(critic_apply: Callable, critic_params: Any, model_obs: jax.Array, rand_act: jax.Array,
                      pi_act: jax.Array, pi_logp: jax.Array, next_pi_act: jax.Array, next_pi_logp: jax.Array,
                      data_obs: jax.Array, data_act: jax.Array, beta: float, temperature: float = 1.0):
    """The conservative term as a function of the critic parameters, for the critic loss.

    model_obs [B, obs]; rand_act / pi_act / next_pi_act [B, N, act]; *_logp [B, N]; data_obs/data_act [B_real, .].
    Only the policy log-densities are constants; Q is differentiated in BOTH the push-down and the push-up part.
    Returns (scalar term, push-down log-sum-exp [2, B], Q on the data [2, B_real]).
    """
    b, n, act_dim = rand_act.shape
    obs_rep = jnp.broadcast_to(model_obs[:, None], (b, 3 * n, model_obs.shape[-1])).reshape(b * 3 * n, -1)
    acts = jnp.concatenate([rand_act, pi_act, next_pi_act], 1).reshape(b * 3 * n, act_dim)
    q = critic_apply(critic_params, obs_rep, acts).reshape(-1, b, 3 * n)  # one critic call: [2, B, 3N]
    logp_pi, logp_next = jax.lax.stop_gradient(pi_logp), jax.lax.stop_gradient(next_pi_logp)
    push_down = cql_logsumexp(q[..., :n], q[..., n: 2 * n], q[..., 2 * n:], act_dim * jnp.log(0.5), logp_pi, logp_next,
                              temperature)  # uniform actions on [-1, 1]^act_dim: density 0.5^act_dim
    q_data = critic_apply(critic_params, data_obs, data_act)
    return conservative_term(push_down, q_data, beta), push_down, q_data


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
                   seed: int, log: Callable[[str], None] = print, stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Fit the ensemble to (s, a) -> (s' - s, r) with early stopping; returns the model dict (see save_model).

    stop() is asked after every epoch (Run.stop: Ctrl-C); it ends the run with an error, as nothing is saved yet."""
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
            raise common.RunError(f"non-finite dynamics loss at epoch {epochs} (dynamics training diverged)")
        if stop():
            raise common.RunError(f"interrupted in dynamics epoch {epochs}: no dynamics model or checkpoint saved")
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
        raise common.RunError(f"cannot load dynamics model {path}: {e}") from None
    diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
    if diff:
        raise common.RunError(f"dynamics model {path} does not match this run (saved vs now: {diff})")
    return {"params": jax.tree.map(jnp.asarray, blob["params"]), "in_mean": blob["in_mean"],
            "in_std": blob["in_std"], "elites": np.asarray(blob["elites"]), "holdout_mse": blob["holdout_mse"]}


# ---- Train step ----
@flax.struct.dataclass
class COMBOState:
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


ROLLOUT_STATS = ("rollout_reward", "rollout_valid_frac")


def make_networks(args: Args, action_dim: int) -> tuple[TanhGaussianActor, DoubleCritic]:
    actor = TanhGaussianActor(action_dim, args.hidden_dim, args.num_layers, args.log_std_min, args.log_std_max)
    return actor, DoubleCritic(args.hidden_dim, args.num_layers)


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], tuple]:
    """init(seed) -> (train state, empty model buffer of `model_retain_rollouts` rollouts)."""
    actor_def, critic_def = make_networks(args, action_dim)
    capacity = args.rollout_batch_size * args.horizon * args.model_retain_rollouts

    def init(seed: jax.Array) -> tuple[COMBOState, ModelBuffer]:
        key = jax.random.PRNGKey(seed)
        key, k_actor, k_critic = jax.random.split(key, 3)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        critic_params = critic_def.init(k_critic, obs, act)
        state = COMBOState(
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
        return state, buffer

    return init


def make_rollout(args: Args, model: dict[str, Any], prep: common.Prep, term_fn: Callable) -> Callable:
    """Roll out `rollout_batch_size` dataset states for h steps in the model (rewards unpenalized); store them."""
    model_def = GaussianDynamics(prep.obs_dim + 1, args.model_hidden_dim, args.model_num_layers)
    actor_def = make_networks(args, prep.act_dim)[0]
    obs_mean, obs_std = jnp.asarray(prep.obs_mean), jnp.asarray(prep.obs_std)
    elites = np.asarray(model["elites"])
    elite_params = jax.tree.map(lambda p: jnp.asarray(p)[elites], model["params"])
    in_mean, in_std = jnp.asarray(model["in_mean"]), jnp.asarray(model["in_std"])
    b, h = args.rollout_batch_size, args.horizon
    num_elites = len(elites)

    def rollout(state: COMBOState, buffer: ModelBuffer, data: dict[str, jax.Array], key: jax.Array) -> ModelBuffer:
        k_start, k_steps = jax.random.split(key)
        obs0 = data["observations"][jax.random.randint(k_start, (b,), 0, data["observations"].shape[0])]
        obs_dim = obs0.shape[1]

        def step(carry, k):
            obs, alive = carry
            k_act, k_member, k_noise = jax.random.split(k, 3)
            mean, log_std = actor_def.apply(state.actor.params, (obs - obs_mean) / obs_std)
            act = sample_tanh_gaussian(k_act, mean, log_std, 1)[0][:, 0]
            mu, logvar = ensemble_predict(model_def, elite_params, in_mean, in_std, obs, act)  # [E, b, obs+1]
            std = jnp.exp(0.5 * logvar)
            member = jax.random.randint(k_member, (b,), 0, num_elites)
            pick = jnp.arange(b)
            sample = mu[member, pick] + std[member, pick] * jax.random.normal(k_noise, (b, obs_dim + 1))
            next_obs, reward = obs + sample[:, :obs_dim], sample[:, obs_dim]
            done = term_fn(next_obs)
            ok = jnp.isfinite(next_obs).all(-1) & jnp.isfinite(reward)
            trans = {"observations": obs, "actions": act, "rewards": reward,
                     "next_observations": jnp.where(ok[:, None], next_obs, obs), "terminals": done.astype(jnp.float32)}
            valid = alive & ok
            # a finished rollout keeps stepping (fixed shapes) but its transitions are not stored
            return (jnp.where((valid & ~done)[:, None], next_obs, obs), valid & ~done), (trans, valid, reward)

        _, (trans, valid, reward) = jax.lax.scan(step, (obs0, jnp.ones(b, bool)), jax.random.split(k_steps, h))
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
        stats = {"rollout_reward": (reward.reshape(-1) * vf).sum() / jnp.maximum(vf.sum(), 1.0),
                 "rollout_valid_frac": vf.mean()}
        return ModelBuffer(new_data, (buffer.ptr + n_valid) % cap, jnp.minimum(buffer.size + n_valid, cap), stats)

    return rollout


def make_update(args: Args, prep: common.Prep) -> Callable:
    """update(state, buffer, data, step): one COMBO update of one seed on real + model transitions (raw states)."""
    n_real = int(round(args.batch_size * args.real_ratio))
    n_model = args.batch_size - n_real  # both >= 1 (resolve_preset checks)
    beta, n_act, temp, action_dim = args.beta, args.cql_num_actions, args.cql_temperature, prep.act_dim
    target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy
    obs_mean, obs_std, nan_at = jnp.asarray(prep.obs_mean), jnp.asarray(prep.obs_std), common.debug_nan_at()

    def update(state: COMBOState, buffer: ModelBuffer, data: dict[str, jax.Array], step: jax.Array):
        key, k_real, k_model, k_next, k_pi, k_rand, k_cql, k_cql_next = jax.random.split(state.key, 8)
        real_idx = jax.random.randint(k_real, (n_real,), 0, data["observations"].shape[0])
        model_idx = jax.random.randint(k_model, (n_model,), 0, jnp.maximum(buffer.size, 1))
        b = {k: jnp.concatenate([data[k][real_idx], buffer.data[k][model_idx]]) for k in buffer.data}
        obs = (b["observations"] - obs_mean) / obs_std
        next_obs = (b["next_observations"] - obs_mean) / obs_std
        alpha = jnp.exp(state.alpha.params["log_alpha"])

        # Critic: soft Bellman backup with clipped double Q (SAC).
        nm, nls = state.actor.apply_fn(state.actor.params, next_obs)
        na, nlogp = (x[:, 0] for x in sample_tanh_gaussian(k_next, nm, nls, 1))
        nq = state.critic.apply_fn(state.target_critic_params, next_obs, na).min(0)
        target = jax.lax.stop_gradient(sac_target(b["rewards"], b["terminals"], nq, nlogp, alpha, args.discount))

        # Conservative term, Eq. (4): push Q down at model-rollout states (uniform and current-policy actions,
        # CQL(H) log-sum-exp) and up at dataset (s, a). Actions from pi are constants for the critic.
        m_obs, m_next = obs[n_real:], next_obs[n_real:]

        def policy_samples(o, k):
            mean, log_std = state.actor.apply_fn(state.actor.params, o)
            a, lp = sample_tanh_gaussian(k, mean, log_std, n_act)
            return jax.lax.stop_gradient(a), jax.lax.stop_gradient(lp)

        pi_act, pi_logp = policy_samples(m_obs, k_cql)
        next_pi_act, next_pi_logp = policy_samples(m_next, k_cql_next)
        rand_act = jax.random.uniform(k_rand, (n_model, n_act, action_dim), minval=-1.0, maxval=1.0)

        def critic_loss_fn(params):
            q = state.critic.apply_fn(params, obs, b["actions"])
            td_loss = ((q - target) ** 2).mean(1).sum()
            reg, push_down, _ = combo_regularizer(state.critic.apply_fn, params, m_obs, rand_act, pi_act, pi_logp,
                                                  next_pi_act, next_pi_logp, obs[:n_real], b["actions"][:n_real],
                                                  beta, temp)
            loss = td_loss + reg
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss, (q, td_loss, reg, push_down)

        (critic_loss, (q, td_loss, reg, push_down)), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # Actor: minimize E[alpha log pi(a|s) - min_j Q_j(s, a)].
        def actor_loss_fn(params):
            m, ls = state.actor.apply_fn(params, obs)
            a, logp = (x[:, 0] for x in sample_tanh_gaussian(k_pi, m, ls, 1))
            return (alpha * logp - critic.apply_fn(critic.params, obs, a).min(0)).mean(), logp.mean()

        (actor_loss, logp), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        # Temperature: minimize -alpha (log pi + target entropy).
        grads = jax.grad(lambda p: -jnp.exp(p["log_alpha"]) * jax.lax.stop_gradient(logp + target_entropy))(state.alpha.params)
        alpha_state = state.alpha.apply_gradients(grads=grads)

        target_params = optax.incremental_update(critic.params, state.target_critic_params, args.tau)
        new = COMBOState(actor=actor, critic=critic, alpha=alpha_state, target_critic_params=target_params, key=key)
        metrics = {"critic_loss": critic_loss, "td_loss": td_loss, "conservative_term": reg,
                   "q_data_mean": q[:, :n_real].mean(), "q_model_mean": q[:, n_real:].mean(),
                   "push_down_mean": push_down.mean(), "actor_loss": actor_loss, "q_mean": q.mean(), "alpha": alpha,
                   "entropy": -logp, "model_reward_mean": b["rewards"][n_real:].mean(),
                   "model_buffer_size": buffer.size.astype(jnp.float32), **buffer.stats}
        return new, metrics

    return update


def make_train_chunk(update: Callable, rollout: Callable, rollout_freq: int) -> Callable:
    """jit(scan(rollout-if-due, vmap(update))): `num_steps` updates of every seed per device call, on the carry
    (states, buffers), donated; and jit(fill): the rollout that fills the buffers before a run's first update.

    The rollout sits outside the vmap under a scalar lax.cond, so it really runs only every `rollout_freq` updates.
    """

    def fill(states: COMBOState, buffers: ModelBuffer, data: dict[str, jax.Array]) -> tuple[COMBOState, ModelBuffer]:
        keys = jax.vmap(lambda k: jax.random.split(k))(states.key)  # [S, 2, 2]
        buffers = jax.vmap(rollout, in_axes=(0, 0, None, 0))(states, buffers, data, keys[:, 1])
        return states.replace(key=keys[:, 0]), buffers

    def chunk(carry: tuple[COMBOState, ModelBuffer], data: dict[str, jax.Array], step0: jax.Array,
              run_start: jax.Array, num_steps: int):
        def body(carry, step):
            states, buffers = carry
            due = (step % rollout_freq == 0) & (step != run_start)  # run_start: filled by `fill` already
            states, buffers = jax.lax.cond(due, lambda s, bf: fill(s, bf, data), lambda s, bf: (s, bf), states, buffers)
            states, metrics = jax.vmap(update, in_axes=(0, 0, None, None))(states, buffers, data, step)
            return (states, buffers), metrics

        carry, metrics = jax.lax.scan(body, carry, step0 + jnp.arange(num_steps))
        means = {k: m.mean(0) for k, m in metrics.items()}
        first_bad = {}
        for k, m in metrics.items():
            bad = ~jnp.all(jnp.isfinite(m), axis=1)
            first_bad[k] = jnp.where(bad.any(), jnp.argmax(bad), -1)
        return carry, means, first_bad

    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=0), jax.jit(fill, donate_argnums=(0, 1))




# ---- Evaluation and use ----
def make_policy_fn(actor_def: nn.Module, prep: common.Prep) -> Callable:
    """Deterministic policy tanh(mu(s)) for all seeds: params [S, ...], obs [S, E, obs] -> [S, E, act] in [-1, 1]."""

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
def training_arrays(prep: common.Prep, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw states (the dynamics model and the termination rule work on them; the agent normalizes its inputs),
    [-1, 1] actions, rewards and terminals."""
    keys = ("observations", "rewards", "next_observations", "terminals")
    return {k: data[k] for k in keys} | {"actions": prep.to_unit(data["actions"])}


def dynamics_phase(args: Args, run: common.Run, data: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Phase 1: train the ensemble and save it, or load one (--model-load; a resumed run loads its run's model).

    Returns the model and its record for result.json."""
    prep = run.prep
    meta = {"obs_dim": prep.obs_dim, "action_dim": prep.act_dim, "ensemble_size": args.ensemble_size,
            "model_hidden_dim": args.model_hidden_dim, "model_num_layers": args.model_num_layers}
    path = args.model_load
    if path is None and args.load:  # resume: the model saved by the run of the checkpoint
        path = args.model_save_path or str(Path(common.read_checkpoint(args.load)["meta"]["log_dir"]) / "dynamics.msgpack")
    loaded = path is not None
    if loaded:
        model = load_model(path, meta)
        if len(model["elites"]) < args.num_elites:
            raise common.RunError(f"{path} has {len(model['elites'])} elites, --num-elites is {args.num_elites}")
        model["elites"], model["epochs"] = model["elites"][: args.num_elites], 0
        print(f"[{ALGORITHM}] loaded dynamics model {path}; elites {model['elites'].tolist()}", flush=True)
    else:
        model = train_dynamics(args, data["observations"], prep.to_unit(data["actions"]), data["next_observations"],
                               data["rewards"], args.seed, log=lambda s: print(f"[{ALGORITHM}] {s}", flush=True),
                               stop=lambda: run.stop)
        path = str(args.model_save_path or run.log_dir / "dynamics.msgpack")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_model(path, model, meta)
    for i, v in enumerate(np.asarray(model["holdout_mse"])):
        run.writer.add_scalar(f"dynamics/holdout_mse/member{i}", float(v), 0)
    return model, {"model_path": path, "loaded": loaded, "epochs": model["epochs"],
                   "elites": [int(e) for e in model["elites"]],
                   "holdout_mse": [float(x) for x in np.asarray(model["holdout_mse"])]}


def main(args: Args) -> dict:
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    args, family = resolve_preset(args, info), env_family(info["eval_env"])
    hyperparameters = {k: getattr(args, k) for k in ("preset", *PRESETS[args.preset])} | {"termination": family}
    run = common.Run(ALGORITHM, args, info, data, hyperparameters=hyperparameters)
    t_model = time.perf_counter()
    model, dynamics = dynamics_phase(args, run, data)  # phase 1: the dynamics ensemble, trained or loaded
    t_policy = time.perf_counter()
    batch = jax.device_put(training_arrays(run.prep, data))  # on the device once
    states, buffers = jax.vmap(make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim))(jnp.asarray(run.seeds))
    states, buffers = run.restore(states), jax.tree.map(lambda x: jnp.array(x, copy=True), buffers)  # buffers: fresh
    rollout = make_rollout(args, model, run.prep, termination_fn(family))
    train_chunk, fill = make_train_chunk(make_update(args, run.prep), rollout, args.rollout_freq)
    policy = make_policy_fn(make_networks(args, run.prep.act_dim)[0], run.prep)
    run_start = jnp.asarray(run.step, jnp.int32)
    if run.step < args.num_updates:  # this run's first rollout (it also refills the buffers of a resumed run)
        states, buffers = fill(states, buffers, batch)
    for n in run.chunks():  # device calls of a few seconds each (rollouts included), until --num-updates or Ctrl-C
        states, buffers = run.train(train_chunk, (states, buffers), batch, n, run_start)  # stops on a NaN loss
        if run.eval_due:
            run.evaluate(policy, states.actor.params)
            run.save(states)  # the train states only: the model buffers are refilled on resume
    phase_times = {"model_training": t_policy - t_model, "policy_training": time.perf_counter() - t_policy}
    return run.finish(states, policy, states.actor.params, phase_times_s=phase_times, dynamics=dynamics)


if __name__ == "__main__":
    common.cli(Args, main)

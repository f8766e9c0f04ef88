"""BRAC -- single-file JAX/Flax implementation of Behavior Regularized Actor Critic (primal form, KL divergence).

Wu, Tucker & Nachum, "Behavior Regularized Offline Reinforcement Learning", 2019.
https://arxiv.org/abs/1911.11361  (reference code: google-research/behavior_regularized_offline_rl, brac_primal_agent.py)

    python algorithms/brac.py --env hopper-medium-v2                      # BRAC-v: the KL penalty in the value target
    python algorithms/brac.py --env hopper-medium-v2 --penalty policy     # BRAC-p: the KL penalty in the actor loss only
    python algorithms/brac.py --env hopper-medium-v2 --train-alpha        # dual gradient on alpha toward --target-divergence
    python algorithms/brac.py --load runs/.../checkpoint.msgpack --num-updates 0  # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack"); action = act(obs)           # in your own code (env units)

An explicit policy constraint (CS285's offline RL lecture): the policy maximizes Q while a penalty alpha * D_KL(pi || pi_b)
keeps it near a behaviour policy pi_b. pi_b is not known, so it is fitted first, by behaviour cloning, and then frozen;
the lecture names that fit as the method's weakness. Schedule, as in the reference's two scripts (run_bc.sh, then
run_primal.sh): the first --bc-updates of --num-updates fit pi_b; the rest train the critics and the policy, whose first
--warm-start updates ignore Q (the policy only moves toward pi_b).

The whole training loop runs on the device: every jitted call performs a few seconds of updates in one
`jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process with `jax.vmap`.
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

ALGORITHM = "brac"
CLIP_EPS = 1e-3  # actions are clipped to +-(1 - CLIP_EPS) before a density is taken (reference divergences.py CLIP_EPS)


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
    num_updates: int = 800_000
    """Total gradient updates, the behaviour-policy fit included (reference: 300k for pi_b (run_bc.sh), then 500k (run_primal.sh))."""
    batch_size: int = 256
    """Minibatch size (reference run_bc.sh and run_primal.sh: 256)."""
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
    hidden_dim: int = 300
    """Width of every hidden layer of the critics (reference run_primal.sh model_params: Q (300, 300))."""
    actor_hidden_dim: int = 200
    """Width of every hidden layer of the policy and the behaviour policy (reference: (200, 200))."""
    num_layers: int = 2
    """Number of hidden layers of every network (reference: 2)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint). The reference does not; every file here does."""
    penalty: Literal["value", "policy"] = "value"
    """Where alpha * D_KL enters: value (BRAC-v, Eq. 3: the critic's target and the actor loss) or policy (BRAC-p: the actor loss only)."""
    alpha: float = 0.1
    """Weight alpha of the divergence penalty; the start value when --train-alpha (reference run_primal.sh: ALPHA=0.1)."""
    train_alpha: bool = False
    """Adapt alpha by dual gradient descent toward --target-divergence (the paper's Sec. 3 option; reference default: off)."""
    target_divergence: float = 0.0
    """The divergence alpha's dual step aims at, in nats (reference brac_primal_agent.py: 0.0)."""
    alpha_max: float = 500.0
    """alpha is clipped to [0, alpha_max] (reference brac_primal_agent.py ALPHA_MAX: 500)."""
    num_div_samples: int = 4
    """Actions sampled from pi per state for the KL estimate (reference brac_primal_agent.py n_div_samples: 4)."""
    bc_updates: int | None = None
    """Updates that fit the behaviour policy pi_b before BRAC starts. Default: 3/8 of --num-updates (the reference's 300k of 800k)."""
    warm_start: int | None = None
    """BRAC updates at the start whose actor loss omits Q, only alpha * D (reference: 20k of 500k). Default: 1/25 of the BRAC updates."""
    discount: float = 0.99
    """Discount gamma of the TD target (reference train_eval_offline.py: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target critics, updated every step (reference train_eval_offline.py update_rate 0.005, update_freq 1)."""
    bc_lr: float = 5e-4
    """Adam learning rate of the behaviour policy (reference run_bc.sh: 5e-4)."""
    actor_lr: float = 3e-4
    """Actor Adam learning rate (reference run_primal.sh PLR: 3e-4)."""
    critic_lr: float = 1e-3
    """Critic Adam learning rate (reference run_primal.sh: 1e-3)."""
    alpha_lr: float = 1e-3
    """Adam learning rate of alpha with --train-alpha (reference run_primal.sh: 1e-3)."""
    log_std_min: float = -5.0
    """Lower end of the policies' log-std range (reference networks.py LOG_STD_MIN: -5)."""
    log_std_max: float = 0.0
    """Upper end of the policies' log-std range (reference networks.py LOG_STD_MAX: 0)."""


def phases(args: Args) -> tuple[int, int]:
    """(behaviour-policy updates, warm-start updates) of the schedule; raises a one-line error on a bad one."""
    bc = args.bc_updates if args.bc_updates is not None else 3 * args.num_updates // 8
    warm = args.warm_start if args.warm_start is not None else (args.num_updates - bc) // 25
    if not 0 <= bc <= args.num_updates or warm < 0:
        raise common.RunError(f"--bc-updates ({bc}) must be in [0, --num-updates ({args.num_updates})] and --warm-start >= 0")
    return bc, warm


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
    """pi(a|s): a = tanh(u), u ~ N(mu(s), diag(sigma(s))^2), with a state-dependent std.

    obs [batch, obs] -> (mu, log_sigma), each [batch, act], the Gaussian *before* the tanh, from one MLP whose
    2 * action_dim outputs are split into mu and log_sigma. As in the reference's networks.py, log_sigma is squashed
    smoothly into [log_std_min, log_std_max] by a tanh (not clipped): the range [-5, 0] caps sigma at 1.
    The policy and the behaviour policy are both this network.
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
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (jnp.tanh(log_std) + 1.0)
        return mean, log_std


def deterministic_action(actor_def: nn.Module, params: Any, obs: jax.Array) -> jax.Array:
    """Evaluation action: tanh of the Gaussian mean (the reference's DeterministicSoftPolicy, its 'main' evaluation)."""
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


def tanh_gaussian_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """log pi(a|s) of given actions under the tanh-Gaussian (mean, log_std): [batch, act] and actions [batch, n, act]
    -> [batch, n]. Actions are first clipped to +-(1 - CLIP_EPS), where atanh is finite (reference utils.clip_by_eps)."""
    u = jnp.arctanh(jnp.clip(action, -1.0 + CLIP_EPS, 1.0 - CLIP_EPS))
    z = (u - mean[:, None, :]) * jnp.exp(-log_std)[:, None, :]
    log_prob = jnp.sum(-0.5 * z**2 - log_std[:, None, :] - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)
    return log_prob - jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)


# ---- Losses ----
def bc_loss(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """Behaviour cloning of pi_b by maximum likelihood: -mean log pi_b(clip(a)|s) over the batch (reference bc_agent.py)."""
    return -tanh_gaussian_log_prob(mean, log_std, action[:, None, :]).mean()


def kl_estimate(key: jax.Array, pi: tuple[jax.Array, jax.Array], behaviour: tuple[jax.Array, jax.Array],
                num_samples: int) -> jax.Array:
    """The sample-based KL of Sec. 3, D_KL(pi(.|s) || pi_b(.|s)) ~ (1/n) sum_i [log pi(a_i|s) - log pi_b(a_i|s)],
    a_i ~ pi(.|s) (reference divergences.py KL.primal_estimate). pi and behaviour: (mean, log_std) [batch, act] each.
    Returns [batch]; differentiable in pi's parameters through the reparameterized a_i. As tanh is applied to both
    Gaussians alike, it estimates the KL of the two pre-tanh Gaussians (up to the clip at 1 - CLIP_EPS)."""
    actions, log_pi = sample_tanh_gaussian(key, *pi, num_samples)
    chex.assert_shape(log_pi, (pi[0].shape[0], num_samples))
    return (log_pi - tanh_gaussian_log_prob(*behaviour, actions)).mean(-1)


def critic_target(reward: jax.Array, terminal: jax.Array, next_q: jax.Array, next_div: jax.Array, alpha: jax.Array,
                  discount: float) -> jax.Array:
    """Eq. (3), BRAC-v: r + gamma (1 - done) [min_i Q'_i(s', a') - alpha D(s')], a' ~ pi(s'); next_q [2, batch] from the
    target critics. BRAC-p passes next_div = 0."""
    return reward + discount * (1.0 - terminal) * (next_q.min(0) - alpha * next_div)


def actor_loss(q_pi: jax.Array, div: jax.Array, alpha: jax.Array, use_q: jax.Array) -> jax.Array:
    """Eq. (4): mean over states of alpha D(s) - Q(s, a), a ~ pi(s) (min of the twin Q, reference ensemble_q_lambda 1);
    during the warm start use_q = 0 and only the divergence is minimized."""
    return jnp.mean(alpha * div - use_q * q_pi)


def alpha_loss(alpha: jax.Array, div: jax.Array, target: float) -> jax.Array:
    """Dual step on alpha (Sec. 3; reference _build_a_loss): minimize -alpha (D - target), so alpha grows while the
    divergence is above the target and shrinks below it."""
    return -alpha * jax.lax.stop_gradient(div.mean() - target)


# ---- Train step ----
@flax.struct.dataclass
class BRACState:
    behaviour: TrainState
    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    alpha: TrainState  # params {"value": scalar}, the weight alpha itself, kept in [0, alpha_max]
    key: jax.Array


def make_networks(args: Args, action_dim: int) -> tuple[TanhGaussianActor, DoubleCritic]:
    actor = TanhGaussianActor(action_dim, args.actor_hidden_dim, args.num_layers, args.log_std_min, args.log_std_max)
    return actor, DoubleCritic(args.hidden_dim, args.num_layers)


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], BRACState]:
    actor_def, critic_def = make_networks(args, action_dim)

    def init(seed: jax.Array) -> BRACState:
        key, k_behaviour, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed), 4)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        critic_params = critic_def.init(k_critic, obs, act)
        return BRACState(
            behaviour=TrainState.create(apply_fn=actor_def.apply, params=actor_def.init(k_behaviour, obs),
                                        tx=optax.adam(args.bc_lr)),
            actor=TrainState.create(apply_fn=actor_def.apply, params=actor_def.init(k_actor, obs), tx=optax.adam(args.actor_lr)),
            critic=TrainState.create(apply_fn=critic_def.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            target_critic_params=critic_params,
            alpha=TrainState.create(apply_fn=None, params={"value": jnp.asarray(args.alpha)}, tx=optax.adam(args.alpha_lr)),
            key=key,
        )

    return init


METRICS = ("bc_loss", "critic_loss", "q_mean", "actor_loss", "kl", "alpha")
BC_METRICS = ("bc_loss",)  # defined on behaviour-policy steps only; the others on BRAC steps only


def make_update(args: Args) -> Callable:
    """One update of one seed: a behaviour-cloning step of pi_b while step < bc_updates, else a BRAC step. args must carry
    the run's schedule (Run.schedule_args), so that a resumed run keeps its phase boundaries."""
    nan_at = common.debug_nan_at()
    bc_updates, warm_start = phases(args)

    def bc_step(state: BRACState, b: dict[str, jax.Array], step: jax.Array) -> tuple[BRACState, dict]:
        def loss_fn(params):
            loss = bc_loss(*state.behaviour.apply_fn(params, b["observations"]), b["actions"])
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.behaviour.params)
        metrics = dict.fromkeys(METRICS, jnp.zeros(())) | {"bc_loss": loss}
        return state.replace(behaviour=state.behaviour.apply_gradients(grads=grads)), metrics

    def brac_step(state: BRACState, b: dict[str, jax.Array], step: jax.Array) -> tuple[BRACState, dict]:
        key, k_next, k_next_div, k_pi, k_div = jax.random.split(state.key, 5)
        obs, next_obs = b["observations"], b["next_observations"]
        alpha = state.alpha.params["value"]
        behaviour = lambda o: state.behaviour.apply_fn(state.behaviour.params, o)  # frozen pi_b

        # Critic: Eq. (3), the divergence penalty in the target (BRAC-v) or not (BRAC-p); a' ~ pi(s'), as the reference.
        next_pi = state.actor.apply_fn(state.actor.params, next_obs)
        next_action = sample_tanh_gaussian(k_next, *next_pi, 1)[0][:, 0]
        next_q = state.critic.apply_fn(state.target_critic_params, next_obs, next_action)
        next_div = kl_estimate(k_next_div, next_pi, behaviour(next_obs), args.num_div_samples)
        next_div = next_div if args.penalty == "value" else jnp.zeros_like(next_div)
        target = jax.lax.stop_gradient(critic_target(b["rewards"], b["terminals"], next_q, next_div, alpha, args.discount))

        def critic_loss_fn(params):
            q = state.critic.apply_fn(params, obs, b["actions"])  # [2, batch]
            loss = ((q - target) ** 2).mean(1).sum()
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss, q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # Actor: Eq. (4) with the updated critic; Q enters after the warm start.
        use_q = (step - bc_updates >= warm_start).astype(jnp.float32)

        def actor_loss_fn(params):
            pi = state.actor.apply_fn(params, obs)
            action = sample_tanh_gaussian(k_pi, *pi, 1)[0][:, 0]
            q_pi = critic.apply_fn(critic.params, obs, action).min(0)
            div = kl_estimate(k_div, pi, behaviour(obs), args.num_div_samples)
            return actor_loss(q_pi, div, alpha, use_q), div

        (loss_pi, div), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        # alpha: dual gradient toward the target divergence (--train-alpha), projected onto [0, alpha_max].
        new_alpha = state.alpha
        if args.train_alpha:
            grad = jax.grad(lambda p: alpha_loss(p["value"], div, args.target_divergence))(state.alpha.params)
            new_alpha = state.alpha.apply_gradients(grads=grad)
            new_alpha = new_alpha.replace(params=jax.tree.map(lambda x: jnp.clip(x, 0.0, args.alpha_max), new_alpha.params))

        target_critic = optax.incremental_update(critic.params, state.target_critic_params, args.tau)
        new_state = state.replace(actor=actor, critic=critic, target_critic_params=target_critic, alpha=new_alpha, key=key)
        metrics = {"bc_loss": jnp.zeros(()), "critic_loss": critic_loss, "q_mean": q.mean(), "actor_loss": loss_pi,
                   "kl": div.mean(), "alpha": alpha}
        return new_state, metrics

    def update(state: BRACState, data: dict[str, jax.Array], step: jax.Array) -> tuple[BRACState, dict]:
        key, k_idx = jax.random.split(state.key)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, data["observations"].shape[0])
        b = jax.tree.map(lambda x: x[idx], data)
        # `step` is the same for all seeds (not vmapped), so this is a real branch, not a select of both sides.
        new_state, metrics = jax.lax.cond(step < bc_updates, bc_step, brac_step, state.replace(key=key), b, step)
        return new_state, metrics | {"bc_phase": (step < bc_updates).astype(jnp.float32)}

    return update


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: BRACState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
        def body(carry, step):
            return jax.vmap(update, in_axes=(0, None, None))(carry, data, step)

        states, metrics = jax.lax.scan(body, states, step0 + jnp.arange(num_steps))
        # metrics: [num_steps, num_seeds] -> chunk means per seed over the steps of the phase that defines each, and the
        # first non-finite step (-1 if none).
        bc = metrics.pop("bc_phase")
        means, first_bad = {}, {}
        for k, m in metrics.items():
            on = bc if k in BC_METRICS else 1.0 - bc  # a mean over no steps of its phase is 0
            means[k] = (m * on).sum(0) / jnp.maximum(on.sum(0), 1.0)
            bad = ~jnp.all(jnp.isfinite(m), axis=1)
            first_bad[k] = jnp.where(bad.any(), jnp.argmax(bad), -1)
        return states, means, first_bad

    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=0)


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
    bc_updates, warm_start = phases(args)  # None resolves to the reference schedule's fractions
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    hyperparameters = {"penalty": args.penalty, "alpha": args.alpha, "train_alpha": args.train_alpha,
                       "bc_updates": bc_updates, "warm_start": warm_start}
    run = common.Run(ALGORITHM, args, info, data, hyperparameters=hyperparameters)
    batch = jax.device_put(run.prep.arrays(data))  # on the device once (BRAC uses the raw rewards)
    states = run.restore(jax.vmap(make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim))(jnp.asarray(run.seeds)))
    train_chunk = make_train_chunk(make_update(run.schedule_args))  # the phase boundaries of the run's own schedule
    policy = make_policy_fn(make_networks(args, run.prep.act_dim)[0], run.prep)
    for n in run.chunks():  # device calls of a few seconds each, until --num-updates or Ctrl-C
        states = run.train(train_chunk, states, batch, n)  # n updates; stops on a NaN loss, naming the update
        if run.eval_due:  # during the behaviour-policy phase this evaluates the policy before any training
            run.evaluate(policy, states.actor.params)
            run.save(states)
    return run.finish(states, policy, states.actor.params)


if __name__ == "__main__":
    common.cli(Args, main)

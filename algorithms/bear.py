"""BEAR -- single-file JAX/Flax implementation of Bootstrapping Error Accumulation Reduction (BEAR-QL, MMD constraint).

Kumar, Fu, Tucker & Levine, "Stabilizing Off-Policy Q-Learning via Bootstrapping Error Reduction", NeurIPS 2019.
https://arxiv.org/abs/1906.00949  (reference code: rail-berkeley/d4rl_evaluations, bear/ -- the code behind D4RL's BEAR
numbers, which the author's first repository, aviralkumar2907/BEAR, asks users to prefer)

    python algorithms/bear.py --env hopper-medium-v2                     # Laplacian kernel, sigma 20 (D4RL settings)
    python algorithms/bear.py --env halfcheetah-medium-v2                # --kernel auto picks the Gaussian kernel here
    python algorithms/bear.py --load runs/.../checkpoint.msgpack --num-updates 0  # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack"); action = act(obs)          # in your own code (env units)

A *support* constraint (CS285's offline RL lecture): the policy maximizes Q, but must keep the maximum mean discrepancy
(MMD) between its action samples and the behaviour policy's below a threshold epsilon. Unlike BRAC's KL, an MMD computed
from a few samples per state is small whenever the policy stays inside the data's support, even where it puts its mass
on a different part of it (Sec. 4 of the paper). The behaviour policy is a conditional VAE, fitted along with the rest;
the constraint's Lagrange multiplier alpha is adapted by dual gradient ascent. The critic uses the soft clipped
double-Q target over 10 sampled next actions, and the evaluation policy picks the best of 100 policy samples by Q.

Defaults follow d4rl_evaluations' bear (examples/bear_hdf5_d4rl.py, rlkit/torch/sac/bear.py and its README's D4RL
settings). Where the first repository differs (400-300 networks, learning rates 1e-3, batch 100, a target actor, 5
MMD samples, a 20k-update warm start, 10 evaluation samples), the field's docstring says so.

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

ALGORITHM = "bear"


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
    """Total gradient updates (the house budget; the reference runs 3000 epochs x 1000 = 3M)."""
    batch_size: int = 256
    """Minibatch size (reference bear_hdf5_d4rl.py: 256; the first repository: 100)."""
    eval_interval: int = 5000
    """Updates between evaluations; a checkpoint is saved at each."""
    eval_episodes: int = 10
    """Evaluation episodes per seed, with the sample-and-argmax policy (--eval-samples)."""
    log_dir: str | None = None
    """Folder of the TensorBoard logs, evals.csv, result.json and checkpoint. Default: runs/<algorithm>/<dataset>/<seed>-<time>."""
    save_path: str | None = None
    """Checkpoint file, rewritten at every evaluation and on Ctrl-C. Default: <log_dir>/checkpoint.msgpack."""
    load: str | None = None
    """Checkpoint to resume, in its own folder and with its config and schedule (flags given here override); --num-updates 0 only evaluates it."""
    keep_checkpoints: bool = False
    """Also keep the checkpoint of every evaluation, as <log_dir>/checkpoints/<update>.msgpack (the policy family of off-policy evaluation, benchmarks/dope.py)."""
    hidden_dim: int = 256
    """Width of every hidden layer of the policy and the critics (reference layer_size: 256; the first repository: 400, 300)."""
    num_layers: int = 2
    """Number of hidden layers of the policy and the critics (reference: 2)."""
    vae_hidden_dim: int = 750
    """Width of the behaviour VAE's two encoder and two decoder layers (reference, from BCQ: 750); its latent has 2 x action_dim."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint). The reference does not; every file here does."""
    kernel: Literal["auto", "laplacian", "gaussian"] = "auto"
    """MMD kernel on pre-tanh actions: laplacian exp(-|x - y|_1 / 2 sigma) or gaussian exp(-|x - y|^2 / 2 sigma). auto: gaussian for halfcheetah, else laplacian (reference README, D4RL settings)."""
    mmd_sigma: float = 20.0
    """Kernel bandwidth sigma (reference README, D4RL settings: 20 for hopper, walker2d and halfcheetah)."""
    num_mmd_samples: int = 4
    """Actions sampled per state from the policy and from the VAE for the MMD estimate (reference bear.py num_samples_mmd_match: 4; the first repository's README: 5)."""
    target_mmd: float = 0.05
    """The constraint's threshold epsilon: MMD <= epsilon (reference target_mmd_thresh: 0.05)."""
    warm_start: int = 40_000
    """Updates at the start whose actor loss omits Q, only alpha * (MMD - epsilon) (reference bear.py: 40k; the first repository: 20 epochs = 20k)."""
    num_target_samples: int = 10
    """Policy actions per next state over which the TD target takes its max (reference, from BCQ: 10)."""
    target_lambda: float = 0.75
    """Soft clipped double Q: lambda min(Q'_1, Q'_2) + (1 - lambda) max(Q'_1, Q'_2) (reference, from BCQ: 0.75)."""
    eval_samples: int = 100
    """Evaluation action: the best of this many policy samples by Q_1 (reference bear_hdf5_d4rl.py num_samples: 100; the first repository: 10)."""
    discount: float = 0.99
    """Discount gamma of the TD target (reference: 0.99)."""
    tau: float = 0.005
    """Polyak rate of the target critics, updated every step (reference soft_target_tau: 5e-3)."""
    actor_lr: float = 1e-4
    """Actor Adam learning rate (reference policy_lr: 1e-4; the first repository: 1e-3)."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate (reference qf_lr: 3e-4; the first repository: 1e-3)."""
    vae_lr: float = 3e-4
    """Adam learning rate of the behaviour VAE (reference bear.py: 3e-4)."""
    alpha_lr: float = 1e-3
    """Adam learning rate of log alpha, the Lagrange multiplier (reference bear.py: 1e-3)."""
    log_alpha_min: float = -5.0
    """log alpha is clamped to [log_alpha_min, log_alpha_max] after each dual step (reference: -5)."""
    log_alpha_max: float = 10.0
    """Upper clamp of log alpha (reference bear.py: 10; the first repository's --lagrange_thresh: 10)."""


def resolve_kernel(args: Args, info: dict) -> Args:
    """Args with --kernel auto resolved from the dataset's name (reference README: gaussian for halfcheetah)."""
    if args.kernel != "auto":
        return args
    return dataclasses.replace(args, kernel="gaussian" if "halfcheetah" in str(info["dataset"]).lower() else "laplacian")


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
    """pi(a|s): a = tanh(u), u ~ N(mu(s), diag(sigma(s))^2); obs [..., obs] -> (mu, log_sigma), each [..., act].

    One MLP with 2 * action_dim outputs, split into mu and log_sigma; log_sigma is clipped to [-5, 2] (reference rlkit
    policies.py LOG_SIG_MIN, LOG_SIG_MAX)."""

    action_dim: int
    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_std = jnp.split(MLP(self.hidden_dim, self.num_layers, 2 * self.action_dim)(obs), 2, axis=-1)
        return mean, jnp.clip(log_std, -5.0, 2.0)


def sample_actor(key: jax.Array, mean: jax.Array, log_std: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
    """num_samples reparameterized draws per state: mean, log_std [batch, act] -> (tanh(u), u), each [batch, n, act],
    u = mu + sigma * eps, eps ~ N(0, I). The pre-tanh u is what the MMD compares (Sec. 5: "to prevent gradient dying
    out due to saturation", the reference's comment)."""
    eps = jax.random.normal(key, (mean.shape[0], num_samples, mean.shape[1]))
    u = mean[:, None, :] + jnp.exp(log_std)[:, None, :] * eps
    return jnp.tanh(u), u


class VAE(nn.Module):
    """The behaviour model: a conditional VAE of p(a|s) (from BCQ, Fujimoto et al. 2019; reference VAEPolicy).

    Encoder q(z|s, a) = N(mean, std^2), log std clipped to [-4, 15]; decoder a = tanh(d(s, z)). Two ReLU layers of
    hidden_dim each, latent size 2 x action_dim."""

    action_dim: int
    hidden_dim: int

    def setup(self) -> None:
        self.encoder = MLP(self.hidden_dim, 2, 2 * 2 * self.action_dim)
        self.decoder = MLP(self.hidden_dim, 2, self.action_dim)

    def __call__(self, key: jax.Array, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Reconstruction of a and the encoder's (mean, std), for the VAE loss; [batch, ...] each."""
        mean, log_std = jnp.split(self.encoder(jnp.concatenate([obs, action], -1)), 2, axis=-1)
        std = jnp.exp(jnp.clip(log_std, -4.0, 15.0))
        z = mean + std * jax.random.normal(key, mean.shape)
        return jnp.tanh(self.decode_raw(obs, z)), mean, std

    def decode_raw(self, obs: jax.Array, z: jax.Array) -> jax.Array:
        """The decoder's pre-tanh output d(s, z)."""
        return self.decoder(jnp.concatenate([obs, z], -1))

    def sample_raw(self, key: jax.Array, obs: jax.Array, num_samples: int) -> jax.Array:
        """num_samples pre-tanh behaviour actions per state, [batch, n, act], from z ~ N(0, I) clipped to [-0.5, 0.5]
        (reference decode_multiple: the clip keeps the samples near the mode of p(a|s))."""
        z = jnp.clip(jax.random.normal(key, (obs.shape[0], num_samples, 2 * self.action_dim)), -0.5, 0.5)
        return self.decode_raw(jnp.broadcast_to(obs[:, None, :], (*z.shape[:2], obs.shape[-1])), z)


def best_of_samples(key: jax.Array, actor_def: nn.Module, critic_def: nn.Module, params: tuple[Any, Any],
                    obs: jax.Array, num_samples: int) -> jax.Array:
    """Evaluation action (reference batch_rl_algorithm.py policy_fn): draw num_samples actions from pi(.|s) and take
    the one with the highest Q_1. obs [batch, obs] -> [batch, act] in (-1, 1)."""
    actor_params, critic_params = params
    actions = sample_actor(key, *actor_def.apply(actor_params, obs), num_samples)[0]  # [batch, n, act]
    q1 = critic_def.apply(critic_params, jnp.broadcast_to(obs[:, None, :], (*actions.shape[:2], obs.shape[-1])), actions)[0]
    return jnp.take_along_axis(actions, jnp.argmax(q1, axis=1)[:, None, None], axis=1)[:, 0]


# ---- Losses ----
def vae_loss(recon: jax.Array, action: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """The VAE's ELBO as in BCQ: mean squared reconstruction error + 0.5 KL(q(z|s,a) || N(0, I)), the KL averaged over
    the batch and latent dimensions (reference bear.py)."""
    kl = -0.5 * jnp.mean(1.0 + jnp.log(std**2) - mean**2 - std**2)
    return jnp.mean((recon - action) ** 2) + 0.5 * kl


def mmd(x: jax.Array, y: jax.Array, kernel: str, sigma: float) -> jax.Array:
    """Sample estimate of the MMD between two sets of actions per state, Eq. (4) (reference mmd_loss_laplacian/gaussian):
        MMD(s) = sqrt( E k(x, x') + E k(y, y') - 2 E k(x, y) + 1e-6 ),
    the means over all n x n pairs (self-pairs included), k(x, y) = exp(-|x - y|_1 / 2 sigma) (laplacian) or
    exp(-|x - y|_2^2 / 2 sigma) (gaussian). x, y: [batch, n, act] -> [batch]. The 1e-6 keeps the sqrt differentiable,
    so two identical sets give sqrt(1e-6) = 1e-3, not 0."""
    chex.assert_equal_shape([x, y])

    def k(a: jax.Array, b: jax.Array) -> jax.Array:
        d = a[:, :, None, :] - b[:, None, :, :]  # [batch, n, n, act]
        dist = jnp.abs(d).sum(-1) if kernel == "laplacian" else (d**2).sum(-1)
        return jnp.exp(-dist / (2.0 * sigma)).mean((1, 2))

    return jnp.sqrt(k(x, x) + k(y, y) - 2.0 * k(x, y) + 1e-6)


def critic_target(reward: jax.Array, terminal: jax.Array, next_q: jax.Array, target_lambda: float,
                  discount: float) -> jax.Array:
    """Soft clipped double-Q target (BEAR Alg. 1, step 5, from BCQ): next_q [2, batch, n] of the target critics at n
    policy actions per next state ->
        y = r + gamma (1 - done) max_j [lambda min_i Q'_i(s', a_j) + (1 - lambda) max_i Q'_i(s', a_j)]."""
    soft = target_lambda * next_q.min(0) + (1.0 - target_lambda) * next_q.max(0)
    return reward + discount * (1.0 - terminal) * soft.max(-1)


def actor_loss(q_pi: jax.Array, mmd_s: jax.Array, alpha: jax.Array, target_mmd: float, use_q: jax.Array) -> jax.Array:
    """The Lagrangian of Eq. (1)'s constrained problem, minimized in pi (Alg. 1, step 7):
        mean_s [ -min_i Q_i(s, a) + alpha (MMD(s) - epsilon) ],  a ~ pi(s);
    during the warm start use_q = 0 and only the constraint term is minimized (reference bear.py)."""
    return jnp.mean(-use_q * q_pi + alpha * (mmd_s - target_mmd))


def alpha_loss(log_alpha: jax.Array, mmd_s: jax.Array, target_mmd: float) -> jax.Array:
    """Dual step on the Lagrange multiplier alpha = exp(log_alpha) (Alg. 1, step 8): minimize -alpha (MMD - epsilon),
    so alpha grows while the constraint is violated and shrinks while it holds."""
    return -jnp.exp(log_alpha) * jax.lax.stop_gradient(mmd_s.mean() - target_mmd)


# ---- Train step ----
@flax.struct.dataclass
class BEARState:
    vae: TrainState
    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    log_alpha: TrainState  # params {"value": scalar log alpha}, kept in [log_alpha_min, log_alpha_max]; reference init 0
    key: jax.Array


def make_networks(args: Args, action_dim: int) -> tuple[TanhGaussianActor, DoubleCritic, VAE]:
    return (TanhGaussianActor(action_dim, args.hidden_dim, args.num_layers), DoubleCritic(args.hidden_dim, args.num_layers),
            VAE(action_dim, args.vae_hidden_dim))


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], BEARState]:
    actor_def, critic_def, vae_def = make_networks(args, action_dim)

    def init(seed: jax.Array) -> BEARState:
        key, k_vae, k_vae_noise, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed), 5)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        critic_params = critic_def.init(k_critic, obs, act)
        return BEARState(
            vae=TrainState.create(apply_fn=vae_def.apply, params=vae_def.init(k_vae, k_vae_noise, obs, act),
                                  tx=optax.adam(args.vae_lr)),
            actor=TrainState.create(apply_fn=actor_def.apply, params=actor_def.init(k_actor, obs), tx=optax.adam(args.actor_lr)),
            critic=TrainState.create(apply_fn=critic_def.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            target_critic_params=critic_params,
            log_alpha=TrainState.create(apply_fn=None, params={"value": jnp.zeros(())}, tx=optax.adam(args.alpha_lr)),
            key=key,
        )

    return init


def make_update(args: Args) -> Callable:
    """One BEAR update of one seed (Alg. 1), in the reference's order: a VAE step; then the critic, actor and alpha
    losses, all from the critic and policy before this step (the reference builds them before it steps those
    optimizers), the MMD against the updated VAE; then the target critics."""
    nan_at = common.debug_nan_at()
    n, kernel = args.num_mmd_samples, args.kernel
    assert kernel != "auto", "resolve --kernel auto with resolve_kernel first"

    def update(state: BEARState, data: dict[str, jax.Array], step: jax.Array) -> tuple[BEARState, dict]:
        key, k_idx, k_vae, k_next, k_pi, k_beta = jax.random.split(state.key, 6)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, data["observations"].shape[0])
        b = jax.tree.map(lambda x: x[idx], data)
        obs, next_obs = b["observations"], b["next_observations"]
        vae_apply = state.vae.apply_fn

        # Behaviour model: the conditional VAE, by its ELBO.
        def vae_loss_fn(params):
            recon, mean, std = vae_apply(params, k_vae, obs, b["actions"])
            return vae_loss(recon, b["actions"], mean, std)

        loss_vae, grads = jax.value_and_grad(vae_loss_fn)(state.vae.params)
        vae = state.vae.apply_gradients(grads=grads)

        # Critic: the soft clipped double-Q target over num_target_samples actions of the current policy at s'.
        next_actions = sample_actor(k_next, *state.actor.apply_fn(state.actor.params, next_obs), args.num_target_samples)[0]
        next_obs_rep = jnp.broadcast_to(next_obs[:, None, :], (*next_actions.shape[:2], next_obs.shape[-1]))
        next_q = state.critic.apply_fn(state.target_critic_params, next_obs_rep, next_actions)  # [2, batch, n]
        chex.assert_shape(next_q, (2, args.batch_size, args.num_target_samples))
        target = jax.lax.stop_gradient(critic_target(b["rewards"], b["terminals"], next_q, args.target_lambda, args.discount))

        def critic_loss_fn(params):
            q = state.critic.apply_fn(params, obs, b["actions"])  # [2, batch]
            loss = ((q - target) ** 2).mean(1).sum()
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss, q

        (loss_critic, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)

        # Actor: MMD on pre-tanh actions between n policy samples and n VAE samples; Q of the first sample.
        alpha = jnp.exp(state.log_alpha.params["value"])
        raw_beta = jax.lax.stop_gradient(vae_apply(vae.params, k_beta, obs, n, method=VAE.sample_raw))  # [batch, n, act]
        use_q = (step >= args.warm_start).astype(jnp.float32)

        def actor_loss_fn(params):
            actions, raw = sample_actor(k_pi, *state.actor.apply_fn(params, obs), n)
            mmd_s = mmd(raw_beta, raw, kernel, args.mmd_sigma)
            q_pi = state.critic.apply_fn(state.critic.params, obs, actions[:, 0]).min(0)
            return actor_loss(q_pi, mmd_s, alpha, args.target_mmd, use_q), mmd_s

        (loss_pi, mmd_s), grads_pi = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)

        # alpha: dual ascent on the constraint, then the clamp of log alpha.
        grad = jax.grad(lambda p: alpha_loss(p["value"], mmd_s, args.target_mmd))(state.log_alpha.params)
        log_alpha = state.log_alpha.apply_gradients(grads=grad)
        log_alpha = log_alpha.replace(params=jax.tree.map(lambda x: jnp.clip(x, args.log_alpha_min, args.log_alpha_max),
                                                          log_alpha.params))

        critic = state.critic.apply_gradients(grads=grads)
        new_state = state.replace(
            vae=vae, critic=critic, actor=state.actor.apply_gradients(grads=grads_pi), log_alpha=log_alpha, key=key,
            target_critic_params=optax.incremental_update(critic.params, state.target_critic_params, args.tau))
        metrics = {"vae_loss": loss_vae, "critic_loss": loss_critic, "q_mean": q.mean(), "actor_loss": loss_pi,
                   "mmd": mmd_s.mean(), "alpha": alpha}
        return new_state, metrics

    return update


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: BEARState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
        def body(carry, step):
            return jax.vmap(update, in_axes=(0, None, None))(carry, data, step)

        states, metrics = jax.lax.scan(body, states, step0 + jnp.arange(num_steps))
        # metrics: [num_steps, num_seeds] -> chunk means per seed, and the first non-finite step (-1 if none)
        bad = {k: ~jnp.all(jnp.isfinite(m), axis=1) for k, m in metrics.items()}
        first_bad = {k: jnp.where(v.any(), jnp.argmax(v), -1) for k, v in bad.items()}
        return states, jax.tree.map(lambda m: m.mean(0), metrics), first_bad

    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=0)


# ---- Evaluation and use ----
def state_key(obs: jax.Array) -> jax.Array:
    """A PRNG key from the bits of one state, so that the sampling evaluation policy is a fixed function of the state."""
    return jax.random.PRNGKey(jax.lax.bitcast_convert_type(obs.astype(jnp.float32), jnp.uint32).sum())


def make_policy_fn(args: Args, prep: common.Prep) -> Callable:
    """The sample-and-argmax policy for all seeds: params ([S] actor, [S] critic), obs [S, E, obs] -> [S, E, act]."""
    actor_def, critic_def, _ = make_networks(args, prep.act_dim)

    def one(params: tuple[Any, Any], obs: jax.Array) -> jax.Array:  # one state [obs] -> [act]
        return best_of_samples(state_key(obs), actor_def, critic_def, params, obs[None], args.eval_samples)[0]

    @jax.jit
    def policy(params: tuple[Any, Any], obs: jax.Array) -> jax.Array:
        obs = (obs - prep.obs_mean) / prep.obs_std
        return jax.vmap(lambda p, o: jax.vmap(lambda x: one(p, x))(o))(params, obs)

    return policy


def load_policy(path: str, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> action in env units, from a checkpoint of this file (seed: which of its --num-seeds runs)."""
    ckpt = common.read_checkpoint(path, ALGORITHM)
    args, prep = Args(**ckpt["meta"]["config"]), common.Prep(**ckpt["meta"]["prep"])
    actor_def, critic_def, _ = make_networks(args, prep.act_dim)
    params = jax.tree.map(lambda x: x[seed], (ckpt["state"]["actor"]["params"], ckpt["state"]["critic"]["params"]))
    one = lambda o: best_of_samples(state_key(o), actor_def, critic_def, params, o[None], args.eval_samples)[0]
    return common.policy_act(prep, lambda obs: jax.vmap(one)(obs) if obs.ndim == 2 else one(obs))


# ---- Main ----
def main(args: Args) -> dict:
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    args = resolve_kernel(args, info)
    hyperparameters = {k: getattr(args, k) for k in ("kernel", "mmd_sigma", "target_mmd", "warm_start")}
    run = common.Run(ALGORITHM, args, info, data, hyperparameters=hyperparameters)
    batch = jax.device_put(run.prep.arrays(data))  # on the device once (BEAR uses the raw rewards)
    states = run.restore(jax.vmap(make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim))(jnp.asarray(run.seeds)))
    train_chunk = make_train_chunk(make_update(run.schedule_args))
    policy = make_policy_fn(args, run.prep)
    for n in run.chunks():  # device calls of a few seconds each, until --num-updates or Ctrl-C
        states = run.train(train_chunk, states, batch, n)  # n updates; stops on a NaN loss, naming the update
        if run.eval_due:
            run.evaluate(policy, (states.actor.params, states.critic.params))
            run.save(states)
    return run.finish(states, policy, (states.actor.params, states.critic.params))


if __name__ == "__main__":
    common.cli(Args, main)

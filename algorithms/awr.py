"""Advantage-Weighted Regression (AWR) -- single-file JAX/Flax implementation.

Peng, Kumar, Zhang & Levine, "Advantage-Weighted Regression: Simple and Scalable Off-Policy Reinforcement Learning", 2019.
https://arxiv.org/abs/1910.00177  (offline, on the static data; reference code: github.com/xbpeng/awr at 831442f)

    python algorithms/awr.py --env hopper-medium-v2
    python algorithms/awr.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/awr.py --load runs/.../checkpoint.msgpack                   # resume (same folder, same schedule)
    python algorithms/awr.py --load runs/.../checkpoint.msgpack --num-updates 0   # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack"); action = act(obs)           # in your own code (env units)

Training runs in iterations, as in the reference code's `_update`: the TD(lambda) returns of the whole dataset are computed
with the current value net V, V is regressed onto them for --critic-steps updates, then the returns and advantages are
recomputed with the new V and the policy is regressed onto the data actions, weighted by exp(A / beta), for --actor-steps
updates. One gradient step of either net is one update. The whole training loop runs on the device: every jitted call
performs a few seconds of updates in one `jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process
with `jax.vmap`.
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

ALGORITHM = "awr"
ADV_EPS = 1e-5  # the reference code's ADV_EPS (awr_agent.py L14): std + eps when standardizing the advantages
EVAL_ROWS = 16384  # rows per batch when V is evaluated on the whole dataset (bounds the memory of that pass)


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
    """Total gradient updates, critic and actor steps together (this project's 1M: 833 iterations of the default 200 + 1000;
    the reference code trains online for run.py's --max_iter iterations)."""
    batch_size: int = 256
    """Minibatch size of both nets (awr_agent.py L24 actor_batch_size, L33 critic_batch_size: 256)."""
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
    hidden_dim: int = 128
    """Width of every hidden layer (awr_agent.py L20/L30, actor_net_layers and critic_net_layers: [128, 64]; one width here)."""
    num_layers: int = 2
    """Number of hidden layers (awr_agent.py L20/L30: 2, ReLU, util/net_util.py)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint)."""
    temperature: float = 1.0
    """Temperature beta of the weights exp(A(s,a) / beta), Algorithm 1's policy step (awr_agent.py L43 / awr_configs.py: temp 1.0)."""
    weight_clip: float = 20.0
    """Clip of the advantage weights exp(A/beta) (awr_agent.py L41 / awr_configs.py: weight_clip 20)."""
    discount: float = 0.99
    """Discount gamma of the TD(lambda) returns (awr_agent.py L36 / awr_configs.py: 0.99)."""
    td_lambda: float = 0.95
    """lambda of the TD(lambda) returns that V is regressed onto and the advantages come from (awr_agent.py L42 / awr_configs.py: 0.95)."""
    critic_steps: int = 200
    """Value-net updates per iteration, before the actor steps (awr_configs.py, every env, e.g. L68: 200; awr_agent.py L34 default: 500)."""
    actor_steps: int = 1000
    """Policy updates per iteration, after the critic steps (awr_agent.py L25 / awr_configs.py: 1000)."""
    actor_lr: float = 5e-5
    """Actor learning rate, SGD with --momentum (awr_agent.py L21 default and awr_configs.py HalfCheetah/Ant: 5e-5; Hopper 1e-4,
    Walker2d 2.5e-5, Humanoid 1e-5)."""
    critic_lr: float = 0.01
    """Value-net learning rate, SGD with --momentum, on values scaled by (1 - gamma) (awr_agent.py L31 / awr_configs.py: 0.01)."""
    momentum: float = 0.9
    """Momentum of both SGD optimizers (awr_agent.py L22/L32, MomentumOptimizer L180/L184: 0.9)."""
    bound_loss_weight: float = 10.0
    """Weight of the penalty 0.5 * mean(sum of squared excess of the policy mean outside [-1, 1]) added to the actor loss
    (awr_agent.py L70/L168, rl_agent.py _action_bound_loss: 10)."""
    critic_layer_norm: bool = False
    """LayerNorm before each hidden ReLU of the critics (JAX-CORL's TD3+BC; Ball et al. 2023). Off in the paper."""
    fixed_std: bool = True
    """Keep the policy std fixed at exp(init_log_std) instead of learning the state-independent log-std (rl_agent.py L382-384: the
    log-std is a constant, trainable=False)."""
    init_log_std: float = float(np.log(0.4))
    """Initial (or, with --fixed-std, fixed) policy log-std: log 0.4 = -0.916 (awr_configs.py HalfCheetah/Hopper/Walker2d/Humanoid:
    action_std 0.4, e.g. L62; Ant and the awr_agent.py L26 default: 0.2), in [-1, 1] action units (rl_agent.py L214-228)."""
    log_std_min: float = -20.0
    """Lower clip of the policy log-std (CORL: -20)."""
    log_std_max: float = 2.0
    """Upper clip of the policy log-std (CORL: 2)."""
    tanh_mean: bool = False
    """Squash the Gaussian mean with tanh into the action box. Off, as in the reference code: its mean is linear, kept inside the box
    by --bound-loss-weight."""


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


class GaussianActor(nn.Module):
    """pi(a|s) = N(tanh(mu(s)), exp(log_std)) (or N(mu(s), .) without tanh_mean) with a state-independent
    log-std, learned or fixed."""

    action_dim: int
    hidden_dim: int
    num_layers: int
    fixed_std: bool
    init_log_std: float
    log_std_min: float
    log_std_max: float
    tanh_mean: bool

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = MLP(self.hidden_dim, self.num_layers, self.action_dim)(obs)
        mean = jnp.tanh(mean) if self.tanh_mean else mean
        if self.fixed_std:
            return mean, jnp.full((self.action_dim,), self.init_log_std)
        log_std = self.param("log_std", nn.initializers.constant(self.init_log_std), (self.action_dim,))
        return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)


def deterministic_action(actor_def: nn.Module, params: Any, obs: jax.Array) -> jax.Array:
    """Evaluation action: the Gaussian mean, clipped to the action box."""
    return jnp.clip(actor_def.apply(params, obs)[0], -1.0, 1.0)


# ---- Losses ----
def gaussian_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """log N(action; mean, diag(exp(log_std))^2), summed over the action axis."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def awr_weights(adv: jax.Array, temperature: float, weight_clip: float) -> jax.Array:
    """Algorithm 1's policy step: exp(A(s,a) / beta), A = R^D(s,a) - V(s). As in the reference code (awr_agent.py _calc_adv
    L396-404, since its first commit; the paper writes exp(A / beta) without it) the advantages are first standardized over
    the whole dataset, (A - mean) / (std + 1e-5); the weights are clipped from above at weight_clip (L407, L414)."""
    norm_adv = (adv - adv.mean()) / (adv.std() + ADV_EPS)
    return jnp.minimum(jnp.exp(norm_adv / temperature), weight_clip)


def td_lambda_returns(rewards: jax.Array, terminals: jax.Array, next_values: jax.Array, episode_last: jax.Array,
                      discount: float, lam: float) -> jax.Array:
    """R^D(s,a) of Algorithm 1 as the reference code estimates it, by TD(lambda) along each episode (awr_agent.py
    _compute_return L379-394, with V = 0 after a failure, L341-351):
        G_t = r_t + gamma (1 - d_t) [(1 - lambda) V(s_{t+1}) + lambda G_{t+1}]   inside an episode,
        G_T = r_T + gamma (1 - d_T) V(s_{T+1})                                   at its last row,
    so an episode cut by a timeout bootstraps from V and one ending in a terminal does not. All arrays are [N] over the
    whole dataset; episode_last marks each episode's last row. The recurrence G_t = b_t + a_t G_{t+1} is linear, so it is
    solved by jax.lax.associative_scan (log depth, no sequential loop); a_t = 0 at an episode's last row keeps episodes apart."""
    cont, inside = discount * (1.0 - terminals), 1.0 - episode_last.astype(rewards.dtype)
    a = cont * lam * inside
    b = rewards + cont * next_values * (1.0 - lam * inside)

    def compose(later, earlier):  # reverse scan: x -> b_e + a_e (b_l + a_l x), the earlier row's map after the later's
        return earlier[0] * later[0], earlier[1] + earlier[0] * later[1]

    return jax.lax.associative_scan(compose, (a, b), reverse=True)[1]


def critic_loss_fn(pred: jax.Array, target: jax.Array, discount: float) -> jax.Array:
    """Algorithm 1's value step: ||R^D(s,a) - V(s)||^2, in the reference code's value units V (1 - gamma) (awr_agent.py L161-163,
    the fixed value normalizer of rl_agent.py L230-234): 0.5 mean((target (1 - gamma) - pred)^2); pred = V(s) (1 - gamma)."""
    return 0.5 * jnp.mean((target * (1.0 - discount) - pred) ** 2)


def bound_loss(mean: jax.Array) -> jax.Array:
    """The reference code's action-bound penalty (rl_agent.py _action_bound_loss): 0.5 mean of the summed squared excess of the
    policy mean outside the action box [-1, 1]."""
    return 0.5 * jnp.mean(jnp.sum(jnp.minimum(mean + 1.0, 0.0) ** 2 + jnp.maximum(mean - 1.0, 0.0) ** 2, axis=-1))


# ---- Train step ----
def sample_batch(key: jax.Array, data: dict[str, jax.Array], batch_size: int) -> jax.Array:
    """The rows of a minibatch, drawn uniformly from the data (the reference code shuffles and sweeps; this samples with replacement)."""
    return jax.random.randint(key, (batch_size,), 0, data["rewards"].shape[0])


@flax.struct.dataclass
class AWRState:
    actor: TrainState
    critic: TrainState
    target_critic_params: Any  # V at the start of the iteration: the critic steps regress onto its TD(lambda) returns
    cache: jax.Array  # [N], one value per dataset row: the phase's TD(lambda) returns or advantage weights (make_refresh)
    key: jax.Array


def make_networks(args: Args, action_dim: int) -> tuple[GaussianActor, MLP]:
    actor = GaussianActor(action_dim, args.hidden_dim, args.num_layers, args.fixed_std, args.init_log_std,
                          args.log_std_min, args.log_std_max, args.tanh_mean)
    return actor, MLP(args.hidden_dim, args.num_layers, 1, args.critic_layer_norm)


def make_init(args: Args, obs_dim: int, action_dim: int, num_rows: int) -> Callable[[jax.Array], AWRState]:
    actor_def, critic_def = make_networks(args, action_dim)

    def init(seed: jax.Array) -> AWRState:
        key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed), 3)
        obs = jnp.zeros((1, obs_dim))
        critic_params = critic_def.init(k_critic, obs)
        return AWRState(
            actor=TrainState.create(apply_fn=actor_def.apply, params=actor_def.init(k_actor, obs),
                                    tx=optax.sgd(args.actor_lr, momentum=args.momentum)),
            critic=TrainState.create(apply_fn=critic_def.apply, params=critic_params,
                                     tx=optax.sgd(args.critic_lr, momentum=args.momentum)),
            target_critic_params=critic_params,
            cache=jnp.zeros(num_rows),  # filled by the first update's refresh (update 0 starts an iteration)
            key=key,
        )

    return init


def check_iteration(args: Args) -> int:
    """Updates per iteration (critic steps, then actor steps)."""
    if args.critic_steps < 0 or args.actor_steps < 0 or args.critic_steps + args.actor_steps < 1:
        raise common.RunError("--critic-steps and --actor-steps must be >= 0, and not both 0")
    return args.critic_steps + args.actor_steps


def make_refresh(args: Args) -> Callable:
    """One seed's per-row cache for the current phase, from the whole dataset: in the critic steps the TD(lambda) returns of V at
    the iteration's start (awr_agent.py L222-223), in the actor steps the weights from the returns and values of the V the critic
    steps left (L229-232). It is rebuilt at those two phase starts only. The cache is part of the train state, so a checkpoint
    keeps it and a resumed run continues exactly. Rebuilding it at every device call instead is slow on a big file: one pass
    over 2M rows costs more than a thousand updates."""
    iteration = check_iteration(args)

    def values(state: AWRState, params: Any, data: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """V(s) and V(s') of every row, one pass over the states: inside an episode s' is the next row's state (common.load_dataset
        ends an episode wherever it is not), so only the episodes' last next-states are evaluated apart."""
        v_fn = lambda o: state.critic.apply_fn(params, o)[..., 0] / (1.0 - args.discount)
        v = jax.lax.map(v_fn, data["observations"], batch_size=EVAL_ROWS)
        next_v = jnp.roll(v, -1).at[data["last_rows"]].set(v_fn(data["next_observations"][data["last_rows"]]))
        return v, next_v

    def returns(state: AWRState, params: Any, data: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        v, next_v = values(state, params, data)
        return td_lambda_returns(data["rewards"], data["terminals"], next_v, data["episode_last"], args.discount, args.td_lambda), v

    def refresh(state: AWRState, data: dict[str, jax.Array], step: jax.Array) -> AWRState:
        pos = step % iteration
        state = jax.lax.cond(pos == 0, lambda s: s.replace(target_critic_params=s.critic.params), lambda s: s, state)

        def weights():
            g, v = returns(state, state.critic.params, data)
            return awr_weights(g - v, args.temperature, args.weight_clip)

        cache = jax.lax.cond(pos < args.critic_steps, lambda: returns(state, state.target_critic_params, data)[0], weights)
        return state.replace(cache=jax.lax.stop_gradient(cache))

    return refresh


CRITIC_METRICS = ("critic_loss", "v_mean", "target_mean")  # logged as means over a device call's critic steps; the rest over its actor steps


def make_update(args: Args) -> Callable:
    nan_at = common.debug_nan_at()
    iteration = check_iteration(args)

    def update(state: AWRState, data: dict[str, jax.Array], step: jax.Array) -> tuple[AWRState, dict]:
        key, k_idx = jax.random.split(state.key)
        idx = sample_batch(k_idx, data, args.batch_size)
        obs, act = data["observations"][idx], data["actions"][idx]
        actor_apply, critic_apply = state.actor.apply_fn, state.critic.apply_fn
        nan = jnp.where(step + 1 == nan_at, jnp.nan, 0.0) if nan_at >= 0 else 0.0  # testing aid, see common.debug_nan_at
        zeros = dict.fromkeys(("critic_loss", "v_mean", "target_mean", "actor_loss", "weight_mean", "clip_frac"), jnp.zeros(()))

        # Value step of Algorithm 1: regress V(s) onto the TD(lambda) returns of the V the iteration started with.
        def critic_step(state: AWRState) -> tuple[AWRState, dict]:
            target = state.cache[idx]

            def loss_fn(params):
                pred = critic_apply(params, obs)[..., 0]  # V(s) (1 - gamma)
                return critic_loss_fn(pred, target, args.discount) + nan, pred

            (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.critic.params)
            metrics = {**zeros, "critic_loss": loss, "v_mean": pred.mean() / (1.0 - args.discount), "target_mean": target.mean()}
            return state.replace(critic=state.critic.apply_gradients(grads=grads)), metrics

        # Policy step of Algorithm 1: weighted max-likelihood of the data actions, weights exp(A / beta) (standardized, clipped).
        def actor_step(state: AWRState) -> tuple[AWRState, dict]:
            weights = state.cache[idx]

            def loss_fn(params):
                mean, log_std = actor_apply(params, obs)
                loss = -(weights * gaussian_log_prob(mean, log_std, act)).mean() + args.bound_loss_weight * bound_loss(mean)
                return loss + nan

            loss, grads = jax.value_and_grad(loss_fn)(state.actor.params)
            metrics = {**zeros, "actor_loss": loss, "weight_mean": weights.mean(), "clip_frac": (weights >= args.weight_clip).mean()}
            return state.replace(actor=state.actor.apply_gradients(grads=grads)), metrics

        new_state, metrics = jax.lax.cond(step % iteration < args.critic_steps, critic_step, actor_step, state)
        return new_state.replace(key=key), metrics

    return update


def make_train_chunk(args: Args, update: Callable, refresh: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated. The per-row cache
    (returns or weights) is rebuilt at every phase boundary, wherever it falls."""
    iteration = check_iteration(args)
    vrefresh = jax.vmap(refresh, in_axes=(0, None, None))

    def chunk(states: AWRState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
        def body(states, step):
            pos = step % iteration
            states = jax.lax.cond((pos == 0) | (pos == args.critic_steps), lambda: vrefresh(states, data, step), lambda: states)
            return jax.vmap(update, in_axes=(0, None, None))(states, data, step)

        steps = step0 + jnp.arange(num_steps)
        states, metrics = jax.lax.scan(body, states, steps)
        # metrics: [num_steps, num_seeds] -> chunk means per seed over the steps of each metric's phase (0 if the call had none),
        # and the first non-finite step (-1 if none).
        critic = (steps % iteration < args.critic_steps)[:, None]
        means = {}
        for k, m in metrics.items():
            mask = critic if k in CRITIC_METRICS else ~critic
            means[k] = jnp.where(mask, m, 0.0).sum(0) / jnp.maximum(mask.sum(), 1)
        first_bad = {}
        for k, m in metrics.items():
            bad = ~jnp.all(jnp.isfinite(m), axis=1)
            first_bad[k] = jnp.where(bad.any(), jnp.argmax(bad), -1)
        return states, means, first_bad

    return jax.jit(chunk, static_argnames="num_steps", donate_argnums=0)


def episode_arrays(n: int, episode_ends: np.ndarray) -> dict[str, np.ndarray]:
    """What the TD(lambda) returns need besides the transitions: each episode's last row, as a [N] mask and as row indices."""
    last = np.zeros(n, np.float32)
    last[np.asarray(episode_ends, np.int64) - 1] = 1.0
    return {"episode_last": last, "last_rows": np.flatnonzero(last).astype(np.int32)}


# ---- Evaluation and use ----
def make_policy_fn(actor_def: nn.Module, prep: common.Prep) -> Callable:
    """Deterministic policy (the Gaussian mean) for all seeds: params [S, ...], obs [S, E, obs] -> [S, E, act] in [-1, 1]."""

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
    check_iteration(args)
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    run = common.Run(ALGORITHM, args, info, data, hyperparameters={"temperature": args.temperature, "td_lambda": args.td_lambda,
                                                                  "critic_steps": args.critic_steps, "actor_steps": args.actor_steps})
    arrays = {**run.prep.arrays(data), **episode_arrays(len(data["rewards"]), info["episode_ends"])}
    batch = jax.device_put(arrays)  # on the device once (AWR uses the raw rewards)
    init = make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim, len(data["rewards"]))
    states = run.restore(jax.vmap(init)(jnp.asarray(run.seeds)))
    train_chunk = make_train_chunk(args, make_update(args), make_refresh(args))
    policy = make_policy_fn(make_networks(args, run.prep.act_dim)[0], run.prep)
    for n in run.chunks():  # device calls of a few seconds each, until --num-updates or Ctrl-C
        states = run.train(train_chunk, states, batch, n)  # n updates; stops on a NaN loss, naming the update
        if run.eval_due:
            run.evaluate(policy, states.actor.params)
            run.save(states)
    return run.finish(states, policy, states.actor.params)


if __name__ == "__main__":
    common.cli(Args, main)

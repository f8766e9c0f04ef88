"""CEM-Q -- single-file JAX/Flax implementation of QT-Opt-style Q-learning with no actor: CEM maximizes Q over actions.

Kalashnikov et al., "QT-Opt: Scalable Deep Reinforcement Learning for Vision-Based Robotic Manipulation", CoRL 2018.
https://arxiv.org/abs/1806.10293  (QT-Opt's code is not public; this file follows the paper's Sec. 4.)
Optional conservative penalty: Kumar et al., "Conservative Q-Learning for Offline Reinforcement Learning", 2020, Eq. (4).

    python algorithms/cemq.py --env hopper-medium-v2                     # plain: offline Q-learning with a CEM max
    python algorithms/cemq.py --env hopper-medium-v2 --cql-alpha 5       # with a CQL(H)-style penalty on the same critic
    python algorithms/cemq.py --load runs/.../checkpoint.msgpack --num-updates 0  # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack"); action = act(obs)          # in your own code (env units)

QT-Opt is the CS285 lecture's large-scale real-robot example of Q-learning, and Actionable Models builds on it. There is no
policy network: the policy is argmax_a Q(s, a), found by the cross-entropy method (CEM), and the TD target uses the same
maximization at s'. Offline, that max is exactly where out-of-distribution overestimation enters: CEM searches the whole
action box for the highest Q, so it finds the actions the data never shows, whose Q nothing has corrected. The metric
`q_cem - q_data` (the lagging target's first head at the CEM maximizer of s', which the backup uses, minus the same
head at the data's (s, a); batch means over one state distribution) shows it growing in a plain run; `--cql-alpha`
adds CQL's push-down of Q on actions off the data, which holds it back.

The whole training loop runs on the device: every jitted call performs a few seconds of updates in one
`jax.lax.scan`, and `--num-seeds` independent seeds are trained in one process with `jax.vmap`. CEM runs on the whole
batch at once (vmapped over states, with `jax.lax.top_k` for the elites).
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

ALGORITHM = "cemq"


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
    """Total gradient updates (the house budget of every offline file)."""
    batch_size: int = 256
    """Minibatch size (the house default; QT-Opt trains on 32 image transitions per GPU)."""
    eval_interval: int = 5000
    """Updates between evaluations; a checkpoint is saved at each."""
    eval_episodes: int = 10
    """Evaluation episodes per seed, acting by CEM on the critic's first head."""
    log_dir: str | None = None
    """Folder of the TensorBoard logs, evals.csv, result.json and checkpoint. Default: runs/<algorithm>/<dataset>/<seed>-<time>."""
    save_path: str | None = None
    """Checkpoint file, rewritten at every evaluation and on Ctrl-C. Default: <log_dir>/checkpoint.msgpack."""
    load: str | None = None
    """Checkpoint to resume, in its own folder and with its config and schedule (flags given here override); --num-updates 0 only evaluates it."""
    keep_checkpoints: bool = False
    """Also keep the checkpoint of every evaluation, as <log_dir>/checkpoints/<update>.msgpack (the policy family of off-policy evaluation, benchmarks/dope.py)."""
    hidden_dim: int = 256
    """Width of every hidden layer of the critics (the house's state-vector networks; QT-Opt's is a conv net on images)."""
    num_layers: int = 2
    """Number of hidden layers of the critics."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint)."""
    cem_iterations: int = 2
    """CEM rounds per maximization (QT-Opt Sec. 4.2: 2)."""
    cem_samples: int = 64
    """Actions sampled per state in each CEM round (QT-Opt Sec. 4.2: 64)."""
    cem_elites: int = 6
    """Best samples per round that the next round's Gaussian is fitted to (QT-Opt Sec. 4.2: 6, about 10%)."""
    cql_alpha: float = 0.0
    """Weight of the CQL(H) penalty alpha (E_s logsumexp_a Q - E_D Q), Eq. (4); 0 is plain QT-Opt-style Q-learning. CQL's Gym value: 5."""
    cql_num_actions: int = 10
    """Uniform actions per state for the penalty's importance-sampled logsumexp (CQL reference code: 10)."""
    discount: float = 0.99
    """Discount gamma of the TD target."""
    tau: float = 0.005
    """Polyak rate of the lagging target critics, updated every step (the house's TD3/SAC value)."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate."""


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


def first_head(critic_def: DoubleCritic, params: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Q_1(s, a) alone, ([M, obs], [M, act]) -> [M]: the twin's first member through one MLP. CEM maximizes only this
    head, so scoring its samples with both heads would double the cost of every update and every action."""
    member = jax.tree.map(lambda p: p[0], params["params"]["VmapMLP_0"])
    mlp = MLP(critic_def.hidden_dim, critic_def.num_layers, 1, critic_def.layer_norm, critic_def.orthogonal_init)
    return lambda obs, act: mlp.apply({"params": member}, jnp.concatenate([obs, act], axis=-1))[..., 0]


def q_of_samples(q_fn: Callable, obs: jax.Array, actions: jax.Array) -> jax.Array:
    """Q of n sampled actions per state: obs [batch, obs], actions [batch, n, act] -> [2, batch, n] (or [batch, n]).

    q_fn maps ([M, obs], [M, act]) -> [2, M] (both heads; or [M], one head). The (state, sample) pairs are flattened
    to M = batch * n rows (XLA:CPU is much faster on plain 2-D matmuls) with row b * n + j = (obs[b], actions[b, j]),
    and the result is reshaped back to [..., batch, n] in the same order.
    """
    batch, n, act_dim = actions.shape
    obs_rep = jnp.broadcast_to(obs[:, None, :], (batch, n, obs.shape[-1])).reshape(batch * n, obs.shape[-1])
    q = q_fn(obs_rep, actions.reshape(batch * n, act_dim))
    chex.assert_shape(q, (..., batch * n))
    return q.reshape(*q.shape[:-1], batch, n)


def cem_argmax(key: jax.Array, score_fn: Callable[[jax.Array], jax.Array], batch: int, act_dim: int,
               iterations: int, samples: int, elites: int) -> tuple[jax.Array, jax.Array]:
    """The cross-entropy method on the action box [-1, 1]^act_dim, for a batch of states at once (QT-Opt Sec. 4.2).

    score_fn maps candidate actions [batch, n, act] to scores [batch, n] (Q at each state). Round 1 samples uniformly
    over the box; each later round samples a diagonal Gaussian fitted to the previous round's `elites` best samples
    (jax.lax.top_k per state), clipped to the box. Returns the best sample of all rounds and its score:
    ([batch, act], [batch]).
    """
    keys = jax.random.split(key, iterations)
    cand = jax.random.uniform(keys[0], (batch, samples, act_dim), minval=-1.0, maxval=1.0)  # round 1: the whole box
    best_a, best_q = jnp.zeros((batch, act_dim)), jnp.full((batch,), -jnp.inf)
    for i in range(iterations):  # a few static rounds: unrolled
        q = score_fn(cand)
        chex.assert_shape(q, (batch, samples))
        top_q, top_i = jax.lax.top_k(q, elites)  # [batch, elites], best first
        elite = jnp.take_along_axis(cand, top_i[..., None], axis=1)  # [batch, elites, act]
        better = top_q[:, 0] > best_q
        best_a, best_q = jnp.where(better[:, None], elite[:, 0], best_a), jnp.where(better, top_q[:, 0], best_q)
        if i + 1 < iterations:  # the next round samples the Gaussian fitted to the elites
            eps = jax.random.normal(keys[i + 1], (batch, samples, act_dim))
            cand = jnp.clip(elite.mean(1)[:, None, :] + (elite.std(1)[:, None, :] + 1e-6) * eps, -1.0, 1.0)
    return best_a, best_q


# ---- Losses ----
def critic_target(reward: jax.Array, terminal: jax.Array, next_q: jax.Array, discount: float) -> jax.Array:
    """Clipped double Q-learning with lagging targets (QT-Opt Sec. 4.2, in TD3's twin-head form):
        y = r + gamma (1 - done) min_i Q'_i(s', a*),  a* = CEM argmax_a Q'_1(s', a);
    next_q [2, batch] are the two lagging target heads at a*."""
    return reward + discount * (1.0 - terminal) * next_q.min(0)


def cql_penalty(q_rand: jax.Array, q_data: jax.Array, act_dim: int) -> jax.Array:
    """CQL(H), Eq. (4), with a uniform proposal: E_s[log (1/n) sum_j exp Q(s, a_j) / U(a_j)] - E_D[Q(s, a)], per head.
    q_rand [2, batch, n] at uniform actions on [-1, 1]^act_dim (density 0.5^act_dim), q_data [2, batch] -> [2]."""
    n = q_rand.shape[-1]
    lse = jax.nn.logsumexp(q_rand - act_dim * jnp.log(0.5), axis=-1) - jnp.log(n)
    return (lse - q_data).mean(-1)


# ---- Train step ----
@flax.struct.dataclass
class CEMQState:
    critic: TrainState
    target_critic_params: Any
    key: jax.Array


def make_networks(args: Args) -> DoubleCritic:
    return DoubleCritic(args.hidden_dim, args.num_layers)


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], CEMQState]:
    critic_def = make_networks(args)

    def init(seed: jax.Array) -> CEMQState:
        key, k_critic = jax.random.split(jax.random.PRNGKey(seed))
        params = critic_def.init(k_critic, jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim)))
        return CEMQState(critic=TrainState.create(apply_fn=critic_def.apply, params=params, tx=optax.adam(args.critic_lr)),
                         target_critic_params=params, key=key)

    return init


def make_update(args: Args) -> Callable:
    nan_at = common.debug_nan_at()
    critic_def = make_networks(args)

    def update(state: CEMQState, data: dict[str, jax.Array], step: jax.Array) -> tuple[CEMQState, dict]:
        key, k_idx, k_next, k_rand = jax.random.split(state.key, 4)
        idx = jax.random.randint(k_idx, (args.batch_size,), 0, data["observations"].shape[0])
        b = jax.tree.map(lambda x: x[idx], data)
        obs, next_obs, act = b["observations"], b["next_observations"], b["actions"]
        batch, act_dim = act.shape
        critic_apply = state.critic.apply_fn
        cem = lambda k, params, o: cem_argmax(  # noqa: E731 - CEM on head 1 of `params` at states o
            k, lambda a: q_of_samples(first_head(critic_def, params), o, a), batch, act_dim,
            args.cem_iterations, args.cem_samples, args.cem_elites)

        # TD target: the CEM maximizer of the lagging target's first head at s', scored by both lagging heads.
        next_a, q_cem = cem(k_next, state.target_critic_params, next_obs)  # q_cem: head 1 at the maximizer, [batch]
        next_q = critic_apply(state.target_critic_params, next_obs, next_a)
        q_target_data = critic_apply(state.target_critic_params, obs, act)[0]  # the same head at the data, for the gap
        target = jax.lax.stop_gradient(critic_target(b["rewards"], b["terminals"], next_q, args.discount))
        rand_a = jax.random.uniform(k_rand, (batch, args.cql_num_actions, act_dim), minval=-1.0, maxval=1.0)

        def critic_loss_fn(params):
            q_data = critic_apply(params, obs, act)  # [2, batch]
            td_loss = ((q_data - target) ** 2).mean(1).sum()
            loss = td_loss
            penalty = jnp.zeros(2)
            if args.cql_alpha > 0:
                penalty = cql_penalty(q_of_samples(lambda x, y: critic_apply(params, x, y), obs, rand_a), q_data, act_dim)
                loss = loss + args.cql_alpha * penalty.sum()
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss, (td_loss, penalty, q_data)

        (loss, (td_loss, penalty, q_data)), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)
        new_state = state.replace(critic=critic, key=key,
                                  target_critic_params=optax.incremental_update(critic.params, state.target_critic_params, args.tau))
        metrics = {"critic_loss": loss, "td_loss": td_loss, "cql_gap": penalty.mean(), "q_data": q_data.mean(),
                   "q_cem": q_cem.mean(), "q_cem_minus_data": q_cem.mean() - q_target_data.mean()}
        return new_state, metrics

    return update


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: CEMQState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
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


def cem_action(args: Args, critic_def: nn.Module, params: Any, obs: jax.Array, act_dim: int) -> jax.Array:
    """The policy: CEM argmax of the critic's first head at one state, obs [obs] -> [act] in [-1, 1]."""
    q_fn = lambda a: q_of_samples(first_head(critic_def, params), obs[None], a)  # noqa: E731
    return cem_argmax(state_key(obs), q_fn, 1, act_dim, args.cem_iterations, args.cem_samples, args.cem_elites)[0][0]


def make_policy_fn(args: Args, prep: common.Prep) -> Callable:
    """CEM on Q for all seeds: params [S, ...], obs [S, E, obs] -> [S, E, act] in [-1, 1]."""
    critic_def = make_networks(args)

    @jax.jit
    def policy(params: Any, obs: jax.Array) -> jax.Array:
        obs = (obs - prep.obs_mean) / prep.obs_std
        return jax.vmap(lambda p, o: jax.vmap(lambda x: cem_action(args, critic_def, p, x, prep.act_dim))(o))(params, obs)

    return policy


def load_policy(path: str, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> action in env units, from a checkpoint of this file (seed: which of its --num-seeds runs)."""
    ckpt = common.read_checkpoint(path, ALGORITHM)
    args, prep = Args(**ckpt["meta"]["config"]), common.Prep(**ckpt["meta"]["prep"])
    critic_def = make_networks(args)
    params = jax.tree.map(lambda x: x[seed], ckpt["state"]["critic"]["params"])
    one = lambda o: cem_action(args, critic_def, params, o, prep.act_dim)  # noqa: E731
    return common.policy_act(prep, lambda obs: jax.vmap(one)(obs) if obs.ndim == 2 else one(obs))


# ---- Main ----
def main(args: Args) -> dict:
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    hyperparameters = {k: getattr(args, k) for k in ("cem_iterations", "cem_samples", "cem_elites", "cql_alpha")}
    run = common.Run(ALGORITHM, args, info, data, hyperparameters=hyperparameters)
    batch = jax.device_put(run.prep.arrays(data))  # on the device once (raw rewards)
    states = run.restore(jax.vmap(make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim))(jnp.asarray(run.seeds)))
    train_chunk = make_train_chunk(make_update(run.schedule_args))
    policy = make_policy_fn(args, run.prep)
    for n in run.chunks():  # device calls of a few seconds each, until --num-updates or Ctrl-C
        states = run.train(train_chunk, states, batch, n)  # n updates; stops on a NaN loss, naming the update
        if run.eval_due:
            run.evaluate(policy, states.critic.params)
            run.save(states)
    return run.finish(states, policy, states.critic.params)


if __name__ == "__main__":
    common.cli(Args, main)

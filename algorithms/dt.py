"""Decision Transformer (DT) -- single-file JAX/Flax implementation.

Chen, Lu, Rajeswaran, Lee, Grover, Laskin, Abbeel, Srinivas & Mordatch, "Decision Transformer: Reinforcement Learning via
Sequence Modeling", NeurIPS 2021. https://arxiv.org/abs/2106.01345  (defaults: CORL's algorithms/offline/dt.py, which
follows the reference code github.com/kzl/decision-transformer, gym/experiment.py)

    python algorithms/dt.py --env hopper-medium-v2
    python algorithms/dt.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/dt.py --load runs/.../checkpoint.msgpack                     # resume (same folder, same schedule)
    python algorithms/dt.py --load runs/.../checkpoint.msgpack --num-updates 0     # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack")           # in your own code (env units): the policy keeps a history,
    action = act(obs); act.observe(reward); ...; act.reset()   # so tell it each reward, and reset it at a new episode

DT is return-conditioned behaviour cloning with a causal Transformer: a trajectory is the token sequence
(R_1, s_1, a_1, R_2, s_2, a_2, ...) with R_t = sum_{t' >= t} r_t' the return-to-go (paper Eq. 1), and the action a_t is
regressed from the output at the s_t token. At evaluation the first R is a target return, and each reward received is
subtracted from it. There is no value function and no Bellman backup.

The whole training loop runs on the device: every jitted call performs a few seconds of updates in one `jax.lax.scan`
(windows of --seq-len transitions sampled inside the step), and `--num-seeds` independent seeds are trained in one process
with `jax.vmap`. Evaluation runs all seeds' episodes in lockstep, one jitted call per env step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

ALGORITHM = "dt"
# The target return of the first evaluation token, per env: the first of the reference code's two env_targets
# (kzl/decision-transformer gym/experiment.py L47-L58; CORL's configs/offline/dt/*: target_returns [3600, 1800] etc.).
TARGET_RETURNS = {"hopper": 3600.0, "halfcheetah": 12000.0, "walker2d": 5000.0}


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
    num_updates: int = 100_000
    """Total gradient updates (CORL dt.py update_steps: 100k)."""
    batch_size: int = 64
    """Minibatch size, in windows of --seq-len transitions (paper App. A and CORL dt.py's default: 64; CORL's published
    D4RL scores come from its configs/offline/dt/*.yaml: 4096, with --learning-rate 8e-4)."""
    eval_interval: int = 10_000
    """Updates between evaluations; a checkpoint is saved at each (CORL dt.py eval_every: 10k)."""
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
    """Width of the Transformer: token embeddings and residual stream (CORL dt.py embedding_dim: 128)."""
    num_layers: int = 3
    """Number of Transformer blocks (CORL dt.py: 3; paper App. A: 3)."""
    num_heads: int = 1
    """Attention heads per block (CORL dt.py: 1; paper App. A: 1)."""
    seq_len: int = 20
    """Context K: transitions per window, 3K tokens (CORL dt.py: 20; paper App. A: 20 for hopper and walker2d)."""
    episode_len: int = 1000
    """Longest episode: the timestep embedding has episode_len + seq_len entries (CORL dt.py: 1000)."""
    dropout: float = 0.1
    """Dropout of the embeddings, attention weights and residual branches (CORL dt.py: 0.1 each)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std (kept in the checkpoint)."""
    learning_rate: float = 1e-4
    """AdamW learning rate, after a linear warmup (CORL dt.py's default: 1e-4; paper App. A: 1e-4; CORL's configs: 8e-4
    at batch 4096)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (CORL dt.py: 1e-4)."""
    warmup_steps: int = 10_000
    """Updates of linear learning-rate warmup (CORL dt.py: 10k)."""
    clip_grad: float = 0.25
    """Global gradient-norm clip (CORL dt.py: 0.25)."""
    reward_scale: float = 0.001
    """Returns-to-go are fed to the model times this (CORL dt.py: 0.001; the reference code's scale = 1000)."""
    target_return: float | None = None
    """Return-to-go of the first evaluation token, in env units. Default: TARGET_RETURNS for hopper/halfcheetah/walker2d,
    else the best episode return in the dataset."""


# ---- Networks ----
dense_init = nn.initializers.normal(0.02)  # CORL dt.py _init_weights (after minGPT): N(0, 0.02) weights, zero biases


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + Drop(Attn(LN(x))), then x + Drop(MLP(LN(x))) with a 4x GELU MLP."""

    hidden_dim: int
    num_heads: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(self.num_heads, kernel_init=dense_init, dropout_rate=self.dropout,
                                            deterministic=not train)(h, h, mask=mask)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Dense(4 * self.hidden_dim, kernel_init=dense_init)(nn.LayerNorm()(x))
        h = nn.Dense(self.hidden_dim, kernel_init=dense_init)(nn.gelu(h))  # GPT-2's tanh form (CORL's erf form: 1.5x slower on a CPU)
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class DecisionTransformer(nn.Module):
    """(R_t, s_t, a_t) tokens, each embedding plus a learned timestep embedding; a_t = tanh(head(output at s_t))."""

    action_dim: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    seq_len: int
    episode_len: int
    dropout: float

    @nn.compact
    def __call__(self, states: jax.Array, actions: jax.Array, rtg: jax.Array, timesteps: jax.Array, valid: jax.Array,
                 train: bool = False) -> jax.Array:
        b, k = states.shape[:2]
        chex.assert_shape([rtg, timesteps, valid], (b, k))  # one (R, s, a, t) per window slot
        chex.assert_shape(actions, (b, k, self.action_dim))
        dense = lambda: nn.Dense(self.hidden_dim, kernel_init=dense_init)
        time = nn.Embed(self.episode_len + self.seq_len, self.hidden_dim, embedding_init=dense_init)(timesteps)
        tokens = jnp.stack([dense()(rtg[..., None]) + time, dense()(states) + time, dense()(actions) + time], axis=2)
        x = tokens.reshape(b, 3 * k, self.hidden_dim)  # R_1, s_1, a_1, R_2, ...
        keys = jnp.repeat(valid, 3, axis=1)  # padded transitions are never attended to
        mask = nn.combine_masks(nn.make_causal_mask(keys), nn.make_attention_mask(jnp.ones_like(keys), keys))
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.LayerNorm()(x))
        for _ in range(self.num_layers):
            x = Block(self.hidden_dim, self.num_heads, self.dropout)(x, mask, train)
        x = nn.LayerNorm()(x)
        return jnp.tanh(nn.Dense(self.action_dim, kernel_init=dense_init)(x[:, 1::3]))  # from the s_t tokens


# ---- Data: windows of whole-episode context ----
def sequence_arrays(data: dict[str, np.ndarray], episode_ends: np.ndarray, reward_scale: float) -> dict[str, np.ndarray]:
    """Per row: its return-to-go R_t (Eq. 1, undiscounted, to its episode's end; a timeout cuts it there, as the reference
    code does) times reward_scale, its timestep in the episode, and its episode's end (exclusive row index)."""
    ends = np.asarray(episode_ends, np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    ep_end = np.repeat(ends, ends - starts)
    timestep = np.arange(len(ep_end)) - np.repeat(starts, ends - starts)
    suffix = np.cumsum(np.asarray(data["rewards"], np.float64)[::-1])[::-1]  # sum of rewards from row i to the data's end
    after = np.append(suffix, 0.0)[ep_end]  # ... minus what comes after the episode
    return {"rtg": ((suffix - after) * reward_scale).astype(np.float32), "timestep": timestep.astype(np.int32),
            "ep_end": ep_end.astype(np.int32)}


def sample_windows(data: dict[str, jax.Array], key: jax.Array, batch_size: int, seq_len: int) -> dict[str, jax.Array]:
    """batch_size windows of seq_len rows. Each starts at a uniform row: an episode is picked in proportion to its length,
    then a uniform start in it (CORL's SequenceDataset); rows past the episode end are padding (valid 0)."""
    n = data["observations"].shape[0]
    start = jax.random.randint(key, (batch_size,), 0, n)
    idx = start[:, None] + jnp.arange(seq_len)
    valid = idx < data["ep_end"][start][:, None]
    idx = jnp.minimum(idx, n - 1)
    zero = lambda x: x * valid.reshape(valid.shape + (1,) * (x.ndim - 2))
    return {"states": zero(data["observations"][idx]), "actions": zero(data["actions"][idx]), "rtg": zero(data["rtg"][idx]),
            "timesteps": data["timestep"][start][:, None] + jnp.arange(seq_len), "valid": valid.astype(jnp.float32)}


# ---- Losses ----
def action_loss(pred: jax.Array, actions: jax.Array, valid: jax.Array) -> jax.Array:
    """Masked MSE (a_t - pi(R_<=t, s_<=t, a_<t))^2, averaged over every slot as CORL does (padding counts as 0)."""
    return jnp.mean((pred - actions) ** 2 * valid[..., None])


# ---- Train step ----
@flax.struct.dataclass
class DTState:
    model: TrainState
    key: jax.Array


def make_networks(args: Args, action_dim: int) -> tuple[DecisionTransformer]:
    return (DecisionTransformer(action_dim, args.hidden_dim, args.num_layers, args.num_heads, args.seq_len, args.episode_len,
                                args.dropout),)


def make_init(args: Args, obs_dim: int, action_dim: int) -> Callable[[jax.Array], DTState]:
    (model_def,) = make_networks(args, action_dim)
    k = args.seq_len
    schedule = lambda step: args.learning_rate * jnp.minimum((step + 1) / args.warmup_steps, 1.0)  # CORL's LambdaLR warmup
    tx = optax.chain(optax.clip_by_global_norm(args.clip_grad), optax.adamw(schedule, 0.9, 0.999, weight_decay=args.weight_decay))

    def init(seed: jax.Array) -> DTState:
        key, k_model = jax.random.split(jax.random.PRNGKey(seed))
        params = model_def.init(k_model, jnp.zeros((1, k, obs_dim)), jnp.zeros((1, k, action_dim)), jnp.zeros((1, k)),
                                jnp.zeros((1, k), jnp.int32), jnp.ones((1, k)))
        return DTState(model=TrainState.create(apply_fn=model_def.apply, params=params, tx=tx), key=key)

    return init


def make_update(args: Args) -> Callable:
    nan_at = common.debug_nan_at()

    def update(state: DTState, data: dict[str, jax.Array], step: jax.Array) -> tuple[DTState, dict]:
        key, k_batch, k_drop = jax.random.split(state.key, 3)
        b = sample_windows(data, k_batch, args.batch_size, args.seq_len)

        def loss_fn(params):
            pred = state.model.apply_fn(params, b["states"], b["actions"], b["rtg"], b["timesteps"], b["valid"], train=True,
                                        rngs={"dropout": k_drop})
            loss = action_loss(pred, b["actions"], b["valid"])
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.model.params)
        return DTState(model=state.model.apply_gradients(grads=grads), key=key), {"action_loss": loss}

    return update


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: DTState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
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
def target_return(args: Args, info: dict, data: dict[str, np.ndarray]) -> float:
    """--target-return, else the env's TARGET_RETURNS entry, else the dataset's best episode return."""
    if args.target_return is not None:
        return args.target_return
    env_name = (info.get("task") or "").split("-")[0]
    return TARGET_RETURNS.get(env_name, float(common.episode_returns(data, info).max()))


def make_act_step(model_def: DecisionTransformer, args: Args) -> Callable:
    """(params, history, normalized obs [E, obs]) -> (history, action [E, act] in [-1, 1]) for E episodes in lockstep:
    the window shifts by one, the new state goes last with a zero action slot (the causal mask hides it), and the output at
    that state is the action. history: the last seq_len (rtg, state, action, timestep, valid), and the next rtg and t."""

    def act_step(params, hist: dict, obs: jax.Array) -> tuple[dict, jax.Array]:
        push = lambda x, new: jnp.roll(x, -1, axis=1).at[:, -1].set(new)
        h = {"states": push(hist["states"], obs), "actions": push(hist["actions"], 0.0), "rtg": push(hist["rtg"], hist["rtg_now"]),
             "timesteps": push(hist["timesteps"], hist["t"]), "valid": push(hist["valid"], 1.0)}
        action = model_def.apply(params, h["states"], h["actions"], h["rtg"], h["timesteps"], h["valid"])[:, -1]
        h["actions"] = h["actions"].at[:, -1].set(action)
        return {**hist, **h}, action

    return act_step


def new_history(args: Args, num_episodes: int, obs_dim: int, action_dim: int, target: float) -> dict[str, jax.Array]:
    k, e = args.seq_len, num_episodes
    return {"states": jnp.zeros((e, k, obs_dim)), "actions": jnp.zeros((e, k, action_dim)), "rtg": jnp.zeros((e, k)),
            "timesteps": jnp.zeros((e, k), jnp.int32), "valid": jnp.zeros((e, k)),
            "rtg_now": jnp.full((e,), target * args.reward_scale, jnp.float32), "t": jnp.zeros((e,), jnp.int32)}


def observe_reward(args: Args, hist: dict, rewards: jax.Array) -> dict:
    """After an env step: R_{t+1} = R_t - r_t (scaled), t + 1 (held at the last timestep embedding past episode_len)."""
    return {**hist, "rtg_now": hist["rtg_now"] - rewards * args.reward_scale, "t": jnp.minimum(hist["t"] + 1, args.episode_len - 1)}


class SeedsPolicy:
    """The evaluation policy of all seeds (common.Run.evaluate): policy(params [S, ...], obs [S, E, obs]) -> [S, E, act]
    in [-1, 1]; reset() before each evaluation and observe(rewards [S * E]) after each env step keep the histories."""

    def __init__(self, model_def: DecisionTransformer, args: Args, prep: common.Prep, target: float):
        self.args, self.prep, self.target, self.hist = args, prep, target, None
        act_step = make_act_step(model_def, args)
        self._act = jax.jit(jax.vmap(lambda p, h, o: act_step(p, h, (o - prep.obs_mean) / prep.obs_std)))
        self._observe = jax.jit(jax.vmap(lambda h, r: observe_reward(args, h, r)))

    def reset(self) -> None:
        self.hist = None

    def __call__(self, params, obs: jax.Array) -> jax.Array:
        if self.hist is None:
            s, e = obs.shape[:2]
            one = new_history(self.args, e, self.prep.obs_dim, self.prep.act_dim, self.target)
            self.hist = jax.tree.map(lambda x: jnp.broadcast_to(x, (s, *x.shape)), one)
        self.hist, action = self._act(params, self.hist, obs)
        return action

    def observe(self, rewards: np.ndarray) -> None:
        self.hist = self._observe(self.hist, jnp.asarray(rewards, jnp.float32).reshape(self.hist["t"].shape))


class UserPolicy:
    """act(obs) -> env action for obs [obs_dim] or [batch, obs_dim] (one episode per row); act.observe(reward) after each
    env step; act.reset() at a new episode (a new batch size also starts afresh)."""

    def __init__(self, policy: SeedsPolicy, params):
        self.policy, self.params, self.batch = policy, params, None

    def reset(self) -> None:
        self.policy.reset()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, np.float32)
        rows = obs.reshape(1, -1, self.policy.prep.obs_dim)
        if rows.shape[1] != self.batch:
            self.policy.reset()
            self.batch = rows.shape[1]
        action = self.policy.prep.to_env(np.asarray(self.policy(self.params, jnp.asarray(rows)))[0])
        return action[0] if obs.ndim == 1 else action

    def observe(self, reward) -> None:
        self.policy.observe(np.reshape(reward, (1, -1)))


def load_policy(path: str, seed: int = 0, target: float | None = None) -> UserPolicy:
    """The policy of a checkpoint of this file (seed: which of its --num-seeds runs; target: the first return-to-go,
    default the one it was evaluated with). Call act(obs), then act.observe(reward); act.reset() at a new episode."""
    ckpt = common.read_checkpoint(path, ALGORITHM)
    args, prep = Args(**ckpt["meta"]["config"]), common.Prep(**ckpt["meta"]["prep"])
    model_def = make_networks(args, prep.act_dim)[0]
    params = jax.tree.map(lambda x: jnp.asarray(x[seed:seed + 1]), ckpt["state"]["model"]["params"])
    target = ckpt["meta"]["hyperparameters"]["target_return"] if target is None else target
    return UserPolicy(SeedsPolicy(model_def, args, prep, target), params)


# ---- Main ----
def main(args: Args) -> dict:
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    target = target_return(args, info, data)
    run = common.Run(ALGORITHM, args, info, data, hyperparameters={"target_return": target})  # in the checkpoint too
    arrays = {k: v for k, v in run.prep.arrays(data).items() if k in ("observations", "actions")}
    batch = jax.device_put({**arrays, **sequence_arrays(data, info["episode_ends"], args.reward_scale)})  # on the device once
    states = run.restore(jax.vmap(make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim))(jnp.asarray(run.seeds)))
    train_chunk = make_train_chunk(make_update(args))
    policy = SeedsPolicy(make_networks(args, run.prep.act_dim)[0], args, run.prep, target)
    for n in run.chunks():  # device calls of a few seconds each, until --num-updates or Ctrl-C
        states = run.train(train_chunk, states, batch, n)  # n updates; stops on a NaN loss, naming the update
        if run.eval_due:
            run.evaluate(policy, states.model.params)
            run.save(states)
    return run.finish(states, policy, states.model.params)


if __name__ == "__main__":
    common.cli(Args, main)

"""Trajectory Transformer (TT) with beam-search planning -- single-file JAX/Flax implementation.

Janner, Li & Levine, "Offline Reinforcement Learning as One Big Sequence Modeling Problem", NeurIPS 2021.
https://arxiv.org/abs/2106.02039  (defaults: the reference code github.com/jannerm/trajectory-transformer, config/offline.py)

    python algorithms/tt.py --env hopper-medium-v2
    python algorithms/tt.py --dataset my_data.hdf5 --eval-env Hopper-v4 --num-seeds 4
    python algorithms/tt.py --load runs/.../checkpoint.msgpack                     # resume (same folder, same schedule)
    python algorithms/tt.py --load runs/.../checkpoint.msgpack --num-updates 0     # only evaluate it

    act = load_policy("runs/.../checkpoint.msgpack")           # the planner, in your own code (env units): it keeps the
    action = act(obs); act.observe(reward); ...; act.reset()   # last transitions as context, so tell it each reward

Every dimension of a transition (state dims, action dims, the reward, and the discounted reward-to-go after it) is
discretized into --num-bins quantile bins, and a GPT models the flattened token sequence of whole trajectories,
P(s_1, a_1, r_1, V_1, s_2, ...) (paper Sec. 3). Acting is planning: a beam search over the model's own continuations
keeps the --beam-width sequences with the highest r_1 + g r_2 + ... + g^(t-1) r_t + g^t V_t (Sec. 3.2, Algorithm 1), with
actions sampled from the model and states, rewards and values decoded greedily or by their expected value. The search
only follows sequences the model finds probable, so it stays near the data.

Planning cost is the method's weak point; here each new token reads the keys and values of the earlier ones from a cache
(one model layer call per token instead of a forward over the whole window), the search is one jitted call per env step,
and it is vmapped over episodes and seeds. The reference crops the model's input to its last 5 transitions at every
token, which would invalidate any cache; here the window instead grows until --seq-len - 1 transitions and then restarts
from the last --max-context-transitions - 1 (make_planner states the rule). The model still sees at least the 4 transitions
the reference's crop leaves it. The whole training loop runs on the device as in every file of this project: every
jitted call performs a few seconds of updates in one `jax.lax.scan`, and `--num-seeds` seeds are one `jax.vmap`.
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

ALGORITHM = "tt"
NEG = -1e9  # attention logit of a masked key (finite: a row with every key masked stays a uniform, not a NaN)


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
    num_updates: int = 195_000
    """Total gradient updates (config/offline.py: n_epochs_ref 50 epochs of a 1M-transition dataset at batch 256, about
    195k whatever the dataset size; 80 epochs, 312.5k, for hopper and walker2d medium-replay)."""
    batch_size: int = 256
    """Minibatch size, in windows of --seq-len transitions (config/offline.py: 256)."""
    eval_interval: int = 50_000
    """Updates between evaluations; a checkpoint is saved at each (planning is slow: evaluate rarely)."""
    eval_episodes: int = 10
    """Evaluation episodes per seed, each one beam search per env step."""
    log_dir: str | None = None
    """Folder of the TensorBoard logs, evals.csv, result.json and checkpoint. Default: runs/<algorithm>/<dataset>/<seed>-<time>."""
    save_path: str | None = None
    """Checkpoint file, rewritten at every evaluation and on Ctrl-C. Default: <log_dir>/checkpoint.msgpack."""
    load: str | None = None
    """Checkpoint to resume, in its own folder and with its config and schedule (flags given here override); --num-updates 0 only evaluates it."""
    keep_checkpoints: bool = False
    """Also keep the checkpoint of every evaluation, as <log_dir>/checkpoints/<update>.msgpack (the policy family of off-policy evaluation, benchmarks/dope.py)."""
    hidden_dim: int = 128
    """Width of the Transformer: token embeddings and residual stream (config/offline.py: n_embd 32 per head x 4 heads)."""
    num_layers: int = 4
    """Number of Transformer blocks (config/offline.py n_layer: 4)."""
    num_heads: int = 4
    """Attention heads per block (config/offline.py n_head: 4)."""
    seq_len: int = 10
    """Transitions per training window (config/offline.py subsampled_sequence_length: 10); the model's block size is
    seq_len x (obs + act + 2) - 1 tokens."""
    episode_len: int = 1000
    """Longest episode: tokens of later timesteps get no loss (the reference's max_path_length: 1000)."""
    dropout: float = 0.1
    """Dropout of the embeddings, attention weights and residual branches (config/offline.py: 0.1 each)."""
    normalize_states: bool = True
    """Standardize states with the dataset's mean and std before the quantile bins (the bins do not depend on it)."""
    num_bins: int = 100
    """Quantile bins per dimension (config/offline.py N: 100); token num_bins is the end-of-episode token."""
    discount: float = 0.99
    """Discount of the value tokens and of the search's return (config/offline.py: 0.99)."""
    termination_penalty: float = -100.0
    """Reward of a transition that ends the episode by failure, in place of its own (config/offline.py: -100)."""
    action_weight: float = 5.0
    """Loss weight of the action tokens; state, reward and value tokens weigh 1 (config/offline.py: 5, 1, 1)."""
    learning_rate: float = 6e-4
    """AdamW peak learning rate (config/offline.py: 6e-4)."""
    weight_decay: float = 0.1
    """AdamW weight decay of the Dense kernels and the output head, none elsewhere (the reference's minGPT trainer: 0.1)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (the reference's minGPT trainer: 1.0)."""
    warmup_steps: int | None = None
    """Updates of linear warmup. Default: one epoch of the data (the reference: warmup_tokens = one epoch)."""
    decay_steps: int | None = None
    """Updates at which the cosine reaches its 0.1 floor. Default: 20 epochs (the reference: final_tokens = 20 epochs;
    its minGPT cosine rises again after that, and so does this one)."""
    horizon: int | None = None
    """Planning horizon in transitions. Default from PLAN_PRESETS, else 15 (config/offline.py)."""
    beam_width: int = 128
    """Sequences kept by the beam search (config/offline.py: 128)."""
    num_expand: int = 2
    """Continuations sampled per kept sequence at each step (config/offline.py n_expand: 2)."""
    action_top_p: float = 0.6
    """Actions are sampled from the smallest set of bins holding this much probability (config/offline.py cdf_act: 0.6)."""
    max_context_transitions: int = 5
    """Past transitions of the episode given to the planner as its prefix (config/offline.py: 5)."""
    plan_freq: int | None = None
    """Replan every this many env steps, acting on the last plan in between. Default from PLAN_PRESETS, else 1."""


# Per-dataset planning overrides of the reference (config/offline.py, "locomotion"); the rest use the base values.
PLAN_BASE = {"horizon": 15, "plan_freq": 1}
PLAN_PRESETS: dict[str, dict[str, Any]] = {
    **{f"halfcheetah-{k}": {"horizon": 5} for k in ("medium", "medium-replay", "medium-expert")},
    **{f"ant-{k}": {"horizon": 5} for k in ("random", "medium", "medium-replay", "medium-expert")},
    "hopper-medium": {"plan_freq": 5},
    "walker2d-medium-expert": {"horizon": 5},
}


def resolve_plan(args: Args, info: dict) -> Args:
    """Args with the planning preset of the dataset (PLAN_PRESETS, else PLAN_BASE) where no flag set them."""
    preset = {**PLAN_BASE, **PLAN_PRESETS.get(info.get("task") or "", {})}
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    if args.plan_freq > args.horizon or not 2 <= args.max_context_transitions <= args.seq_len - 2:
        raise common.RunError("need --plan-freq <= --horizon and 2 <= --max-context-transitions <= --seq-len - 2")
    return args


# ---- Tokens: per-dimension quantile bins ----
def quantile_edges(x: np.ndarray, num_bins: int) -> np.ndarray:
    """[num_bins + 1, dims] bin edges: each dimension's quantiles, so every bin holds about as many data points
    (the reference's QuantileDiscretizer)."""
    return np.quantile(np.asarray(x, np.float64), np.linspace(0.0, 1.0, num_bins + 1), axis=0).astype(np.float32)


def discretize(edges: jax.Array, x: jax.Array) -> jax.Array:
    """x [..., dims] -> bin indices [..., dims] in 0..num_bins-1 (values outside the data's range go to the end bins)."""
    inner = edges[1:-1]  # [num_bins - 1, dims]
    return jnp.sum(x[..., None, :] >= inner, axis=-2).astype(jnp.int32)


def reconstruct(edges: jax.Array, tokens: jax.Array) -> jax.Array:
    """Bin indices [..., dims] -> the bins' midpoints: the reconstruction error inside the data's range is at most half a bin."""
    centers = (edges[1:] + edges[:-1]) / 2  # [num_bins, dims]
    return jnp.take_along_axis(centers, jnp.minimum(tokens, centers.shape[0] - 1).reshape(-1, tokens.shape[-1]), axis=0
                               ).reshape(tokens.shape)


def expectation(edges: jax.Array, probs: jax.Array) -> jax.Array:
    """E[x] of one dimension under token probabilities [..., num_bins + 1] (end token dropped, renormalized); edges [num_bins + 1]."""
    p = probs[..., :-1]
    return (p @ ((edges[1:] + edges[:-1]) / 2)) / jnp.maximum(p.sum(-1), 1e-12)


def value_to_go(rewards: np.ndarray, episode_ends: np.ndarray, discount: float) -> np.ndarray:
    """V_t = sum_{k >= 1} discount^(k-1) r_{t+k} to the end of the episode, no bootstrap past it (the reference's values:
    the return after the reward token of the same transition; a timeout cuts it there)."""
    ends = np.asarray(episode_ends, np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    t = np.arange(len(rewards)) - np.repeat(starts, ends - starts)
    g = np.asarray(rewards, np.float64) * discount ** t  # G_t = sum_{j >= t} discount^(j - t) r_j, in-episode
    suffix = np.cumsum(g[::-1])[::-1]
    after = np.append(suffix, 0.0)[np.repeat(ends, ends - starts)]
    ret = (suffix - after) / discount ** t  # discount^t >= 0.99^1000 = 4e-5: exact enough in float64
    return np.where(t + 1 < np.repeat(ends - starts, ends - starts), np.append(ret[1:], 0.0), 0.0)


def trajectory_arrays(args: Args, data: dict[str, np.ndarray], info: dict, prep: common.Prep) -> tuple[dict, np.ndarray]:
    """The training arrays and the bin edges: per row its transition (normalized state, [-1, 1] action, reward with the
    termination penalty, value-to-go) as tokens [N, obs + act + 2], its timestep, its episode's end, and the rows a window
    may start at (every row but an episode's last, as the reference's indices)."""
    arrays = prep.arrays(data)
    rewards = np.where(data["terminals"] > 0, args.termination_penalty, data["rewards"]).astype(np.float64)
    values = value_to_go(rewards, info["episode_ends"], args.discount)
    joined = np.concatenate([arrays["observations"], arrays["actions"], rewards[:, None], values[:, None]], axis=1)
    edges = quantile_edges(joined, args.num_bins)
    ends = np.asarray(info["episode_ends"], np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    ep_end = np.repeat(ends, ends - starts)
    timestep = np.arange(len(ep_end)) - np.repeat(starts, ends - starts)
    window_starts = np.flatnonzero(np.arange(len(ep_end)) + 1 < ep_end)  # every row but an episode's last
    if len(window_starts) == 0:
        raise common.DatasetError("no episode in the data has 2 or more transitions (does next_observations[i] equal "
                                  "observations[i + 1] inside an episode?); tt.py models windows of consecutive transitions")
    out = {"tokens": np.asarray(discretize(jnp.asarray(edges), jnp.asarray(joined, jnp.float32))), "timestep": timestep.astype(np.int32),
           "ep_end": ep_end.astype(np.int32), "starts": window_starts.astype(np.int32)}
    return out, edges


def sample_windows(data: dict[str, jax.Array], key: jax.Array, args: Args) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inputs [B, T], targets [B, T] and loss mask [B, T] of batch_size windows of seq_len transitions flattened to
    T + 1 tokens: rows past the episode's end are end tokens (num_bins), and timesteps past episode_len get no loss."""
    n, k = data["tokens"].shape[0], args.seq_len
    start = data["starts"][jax.random.randint(key, (args.batch_size,), 0, data["starts"].shape[0])]
    idx = start[:, None] + jnp.arange(k)
    tokens = jnp.where((idx < data["ep_end"][start][:, None])[..., None], data["tokens"][jnp.minimum(idx, n - 1)], args.num_bins)
    in_range = data["timestep"][start][:, None] + jnp.arange(k) < args.episode_len
    flat, mask = tokens.reshape(args.batch_size, -1), jnp.repeat(in_range, tokens.shape[-1], axis=1)
    return flat[:, :-1], flat[:, 1:], mask[:, :-1].astype(jnp.float32)


# ---- Networks ----
dense_init = nn.initializers.normal(0.02)  # minGPT's init (the reference's GPT): N(0, 0.02) weights, zero biases


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, tdim: int) -> jax.Array:
    """[Tq, Tk]: causal, and no token attends to a value token (the reference's GPT masks their keys: values are
    targets, never inputs)."""
    return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] % tdim != tdim - 1)


class SelfAttention(nn.Module):
    hidden_dim: int
    num_heads: int
    dropout: float

    def setup(self):
        self.qkv = nn.Dense(3 * self.hidden_dim, kernel_init=dense_init)
        self.proj = nn.Dense(self.hidden_dim, kernel_init=dense_init)
        self.attn_drop, self.resid_drop = nn.Dropout(self.dropout), nn.Dropout(self.dropout)

    def heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B, T, C] -> q, k, v [B, heads, T, C / heads] (head-major: a cache in this layout is read without a transpose)."""
        return tuple(y.reshape(*y.shape[:-1], self.num_heads, -1).swapaxes(1, 2) for y in jnp.split(self.qkv(x), 3, axis=-1))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        """softmax(q k^T / sqrt(d)) v over the unmasked keys, then the output projection; mask [Tq, Tk]."""
        att = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
        att = self.attn_drop(jax.nn.softmax(jnp.where(mask, att, NEG), axis=-1), deterministic=not train)
        y = jnp.einsum("bhqk,bhkd->bqhd", att, v).reshape(q.shape[0], q.shape[2], -1)
        return self.resid_drop(self.proj(y), deterministic=not train)


class Block(nn.Module):
    """minGPT block: x + Attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP; `step` runs one token against a KV cache."""

    hidden_dim: int
    num_heads: int
    dropout: float

    def setup(self):
        self.ln1, self.ln2 = nn.LayerNorm(), nn.LayerNorm()
        self.attn = SelfAttention(self.hidden_dim, self.num_heads, self.dropout)
        self.fc, self.out = nn.Dense(4 * self.hidden_dim, kernel_init=dense_init), nn.Dense(self.hidden_dim, kernel_init=dense_init)
        self.drop = nn.Dropout(self.dropout)

    def mlp(self, x: jax.Array, train: bool) -> jax.Array:
        return self.drop(self.out(nn.gelu(self.fc(x))), deterministic=not train)

    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = self.attn.heads(self.ln1(x))
        x = x + self.attn.attend(q, k, v, mask, train)
        return x + self.mlp(self.ln2(x), train), k, v

    def step(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array, mask: jax.Array):
        """x [B, 1, C] at window position pos; caches [B, heads, W, d] get its key and value at pos."""
        q, k, v = self.attn.heads(self.ln1(x))
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, pos, axis=2)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, pos, axis=2)
        x = x + self.attn.attend(q, k_cache, v_cache, mask, False)
        return x + self.mlp(self.ln2(x), False), k_cache, v_cache


class GPT(nn.Module):
    """Token embedding (one table per transition dimension, plus the end token), learned positions, blocks, and one
    output head per transition dimension (the reference's EinLinear): logits at position j are for token j + 1."""

    tdim: int
    num_bins: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    block_size: int
    dropout: float

    def setup(self):
        self.tok_emb = nn.Embed(self.num_bins * self.tdim + 1, self.hidden_dim, embedding_init=dense_init)
        self.pos_emb = self.param("pos_emb", nn.initializers.zeros, (self.block_size, self.hidden_dim))
        self.blocks = [Block(self.hidden_dim, self.num_heads, self.dropout) for _ in range(self.num_layers)]
        self.ln_f, self.drop = nn.LayerNorm(), nn.Dropout(self.dropout)
        self.head = self.param("head", dense_init, (self.tdim, self.hidden_dim, self.num_bins + 1))

    def embed(self, tokens: jax.Array, pos: jax.Array) -> jax.Array:
        ids = jnp.where(tokens == self.num_bins, self.num_bins * self.tdim, tokens + (pos % self.tdim) * self.num_bins)
        return self.tok_emb(ids) + self.pos_emb[pos]

    def logits(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        return jnp.einsum("btc,tcv->btv", self.ln_f(x), self.head[pos % self.tdim])

    def __call__(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, tuple, tuple]:
        """tokens [B, T] from window position 0 -> logits [B, T, num_bins + 1] and each layer's keys and values
        [B, heads, T, d] (what a KV cache holds: one array per layer, so a step updates them in place)."""
        pos = jnp.arange(tokens.shape[1])
        x = self.drop(self.embed(tokens, pos), deterministic=not train)
        mask, ks, vs = attention_mask(pos, pos, self.tdim), [], []
        for block in self.blocks:
            x, k, v = block(x, mask, train)
            ks.append(k)
            vs.append(v)
        return self.logits(x, pos), tuple(ks), tuple(vs)

    def step(self, token: jax.Array, pos: jax.Array, k_cache: tuple, v_cache: tuple):
        """One token per sequence, token [B] at window position pos (a scalar), against per-layer caches [B, heads, W, d]
        holding positions < pos -> logits [B, num_bins + 1] for the token after it, and the caches with pos written."""
        p = jnp.reshape(pos, (1,))
        x = self.embed(token[:, None], p)
        mask, ks, vs = attention_mask(p, jnp.arange(k_cache[0].shape[2]), self.tdim), [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.step(x, k_cache[i], v_cache[i], pos, mask)
            ks.append(k)
            vs.append(v)
        return self.logits(x, p)[:, 0], tuple(ks), tuple(vs)


# ---- Losses ----
def token_weights(args: Args, obs_dim: int, act_dim: int, length: int) -> jax.Array:
    """Loss weight of target j (token j + 1 of a window): action tokens action_weight, the others 1."""
    per_dim = jnp.concatenate([jnp.ones(obs_dim), jnp.full(act_dim, args.action_weight), jnp.ones(2)])
    return per_dim[(jnp.arange(length) + 1) % (obs_dim + act_dim + 2)]


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, mask: jax.Array) -> jax.Array:
    """Weighted next-token cross-entropy, mean over every slot (the reference's GPT loss: (CE * weights * mask).mean())."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights * mask)


# ---- Train step ----
@flax.struct.dataclass
class TTState:
    model: TrainState
    edges: jax.Array  # [num_bins + 1, obs + act + 2] quantile bin edges: fixed, kept with the model they tokenize for
    key: jax.Array


def make_networks(args: Args, obs_dim: int, action_dim: int) -> tuple[GPT]:
    tdim = obs_dim + action_dim + 2
    return (GPT(tdim, args.num_bins, args.hidden_dim, args.num_layers, args.num_heads, args.seq_len * tdim - 1, args.dropout),)


def lr_schedule(args: Args, num_rows: int) -> Callable[[jax.Array], jax.Array]:
    """The reference's minGPT schedule in updates: linear warmup, then max(0.1, (1 + cos(pi * progress)) / 2)."""
    epoch = max(num_rows // args.batch_size, 1)
    warmup, decay = args.warmup_steps or epoch, args.decay_steps or 20 * epoch

    def schedule(step: jax.Array) -> jax.Array:
        progress = (step - warmup) / max(decay - warmup, 1)
        return args.learning_rate * jnp.where(step < warmup, step / warmup, jnp.maximum(0.1, 0.5 * (1 + jnp.cos(jnp.pi * progress))))

    return schedule


def make_init(args: Args, obs_dim: int, action_dim: int, edges: np.ndarray, num_rows: int) -> Callable[[jax.Array], TTState]:
    (model_def,) = make_networks(args, obs_dim, action_dim)
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "head"), params)
    tx = optax.chain(optax.clip_by_global_norm(args.clip_grad),
                     optax.adamw(lr_schedule(args, num_rows), 0.9, 0.95, weight_decay=args.weight_decay, mask=decay_mask))

    def init(seed: jax.Array) -> TTState:
        key, k_model = jax.random.split(jax.random.PRNGKey(seed))
        params = model_def.init(k_model, jnp.zeros((1, model_def.block_size), jnp.int32))
        return TTState(model=TrainState.create(apply_fn=model_def.apply, params=params, tx=tx), edges=jnp.asarray(edges), key=key)

    return init


def make_update(args: Args, obs_dim: int, action_dim: int) -> Callable:
    nan_at = common.debug_nan_at()
    weights = token_weights(args, obs_dim, action_dim, args.seq_len * (obs_dim + action_dim + 2) - 1)

    def update(state: TTState, data: dict[str, jax.Array], step: jax.Array) -> tuple[TTState, dict]:
        key, k_batch, k_drop = jax.random.split(state.key, 3)
        x, y, mask = sample_windows(data, k_batch, args)

        def loss_fn(params):
            logits = state.model.apply_fn(params, x, train=True, rngs={"dropout": k_drop})[0]
            loss = token_loss(logits, y, weights, mask)
            if nan_at >= 0:  # testing aid, see common.debug_nan_at
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.model.params)
        return state.replace(model=state.model.apply_gradients(grads=grads), key=key), {"token_loss": loss}

    return update


def make_train_chunk(update: Callable) -> Callable:
    """jit(scan(vmap(update))): `num_steps` updates of every seed in one device call; state buffers donated."""

    def chunk(states: TTState, data: dict[str, jax.Array], step0: jax.Array, num_steps: int):
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


# ---- Planning: beam search (Algorithm 1) ----
def top_p_logits(logits: jax.Array, p: float) -> jax.Array:
    """Logits outside the smallest most-probable set of bins with probability >= p set to -inf (the top one always stays)."""
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    keep_sorted = jnp.cumsum(sorted_p, axis=-1) - sorted_p < p  # the mass before a bin is still short of p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def make_planner(model_def: GPT, args: Args, obs_dim: int, action_dim: int, cached: bool = True) -> Callable:
    """plan(params, edges, context [max_context_transitions * tdim] (its first c transitions real), c, state tokens [obs],
    key) -> the best sequence's tokens [horizon, tdim], for one episode (vmap it; c is the same for every episode).

    The window rule: the model sees the tokens from a transition boundary `start` on; when a finished transition leaves
    more than seq_len - 2 whole ones in the window, it restarts with the last max_context_transitions - 1. cached=True
    keeps each layer's keys and values and runs one token per step (refilled when the window restarts); cached=False
    recomputes the whole block for every token, the straightforward planner (tests and the speed benchmark: same
    windows, same plan)."""
    d, a, tdim, block = obs_dim, action_dim, obs_dim + action_dim + 2, model_def.block_size
    h, beam, c_max = args.horizon, args.beam_width, args.max_context_transitions
    keep, discounts = c_max - 1, args.discount ** jnp.arange(h + 1)
    length = c_max * tdim + h * tdim + block  # context, plan, and room for a block-long window read past the end
    apply = lambda params, tokens: model_def.apply(params, tokens)

    def plan(params, edges: jax.Array, context: jax.Array, c: jax.Array, obs_tokens: jax.Array, key: jax.Array) -> jax.Array:
        chex.assert_shape(context, (c_max * tdim,))
        n = c * tdim + d  # tokens so far; n and the window's first transition are the same for every beam
        seq = jax.lax.dynamic_update_slice(jnp.zeros(length, jnp.int32).at[:c_max * tdim].set(context), obs_tokens, (c * tdim,))
        logits, k, v = apply(params, seq[None, :c_max * tdim + d])  # the shared prefix once (causal: the rest is unseen)
        s = {"seq": jnp.repeat(seq[None], beam, 0), "logits": jnp.repeat(logits[:, n - 1], beam, 0),
             "rewards": jnp.zeros((beam, h + 1))}
        if cached:  # per-layer caches [beam, heads, block, d]
            pad = [(0, 0), (0, 0), (0, block - k[0].shape[2]), (0, 0)]
            s["k"], s["v"] = (tuple(jnp.repeat(jnp.pad(x, pad), beam, axis=0) for x in kv) for kv in (k, v))

        def feed(s: dict, token: jax.Array, n: jax.Array, start: jax.Array) -> tuple[dict, jax.Array, jax.Array]:
            """Append token [beam] at n; the logits of the token after it come from the cache (or the recomputed block)."""
            seq, n1 = jax.lax.dynamic_update_slice_in_dim(s["seq"], token[:, None], n, axis=1), n + 1
            restart = (n1 % tdim == 0) & (n1 // tdim - start > args.seq_len - 2)
            start1 = jnp.where(restart, n1 // tdim - keep, start)
            if not cached:
                window = jax.lax.dynamic_slice_in_dim(seq, start1 * tdim, block, axis=1)
                logits = jnp.take(apply(params, window)[0], n1 - 1 - start1 * tdim, axis=1)
                return {**s, "seq": seq, "logits": logits}, n1, start1

            def refill(_):  # the window restarts: the kept transitions at their new positions
                lg, k, v = apply(params, jax.lax.dynamic_slice_in_dim(seq, start1 * tdim, keep * tdim, axis=1))
                put = lambda caches, new: tuple(c.at[:, :, :keep * tdim].set(x) for c, x in zip(caches, new, strict=True))
                return lg[:, -1], put(s["k"], k), put(s["v"], v)

            def step(_):
                return model_def.apply(params, token, n - start * tdim, s["k"], s["v"], method=GPT.step)

            logits, k, v = jax.lax.cond(restart, refill, step, None)
            return {**s, "seq": seq, "logits": logits, "k": k, "v": v}, n1, start1

        def tokens(carry: tuple, count: int, how: str, key: jax.Array) -> tuple[tuple, jax.Array]:
            """count tokens, each drawn from the current logits (sampled from the top-p bins, or the most probable) and
            fed back: one lax.scan. Returns the raw probabilities of each [count, beam, bins + 1]."""

            def body(carry, i):
                s, n, start = carry
                if how == "top_p":
                    token = jax.random.categorical(jax.random.fold_in(key, i), top_p_logits(s["logits"], args.action_top_p))
                else:
                    token = jnp.argmax(s["logits"], axis=-1)
                return feed(s, token.astype(jnp.int32), n, start), jax.nn.softmax(s["logits"], axis=-1)

            return jax.lax.scan(body, carry, jnp.arange(count))

        def transition(carry: tuple, t: jax.Array, key: jax.Array) -> tuple[tuple, jax.Array]:
            """Expand every sequence num_expand times, sample its action, decode reward and value, keep the best beam."""
            s, n, start = carry
            s = jax.tree.map(lambda x: jnp.repeat(x, args.num_expand, axis=0), s)
            (s, n, start), _ = tokens((s, n, start), a, "top_p", key)
            (s, n, start), (p_r, p_v) = tokens((s, n, start), 2, "greedy", key)
            rewards = s["rewards"].at[:, t].set(expectation(edges[:, d + a], p_r))
            rewards = rewards.at[:, t + 1].set(expectation(edges[:, d + a + 1], p_v))
            values, best = jax.lax.top_k(rewards @ discounts, beam)  # r_1 + ... + g^t r_t + g^(t+1) V_t
            return (jax.tree.map(lambda x: jnp.take(x, best, axis=0), {**s, "rewards": rewards}), n, start), values

        def body(carry, t):  # a whole transition, then the next state (greedy)
            carry, _ = transition(carry, t, jax.random.fold_in(key, t))
            return tokens(carry, d, "greedy", key)[0], None

        carry, _ = jax.lax.scan(body, (s, n, jnp.int32(0)), jnp.arange(h - 1))
        (s, _, _), values = transition(carry, h - 1, jax.random.fold_in(key, h - 1))  # the last one: no next state
        return jax.lax.dynamic_slice_in_dim(s["seq"][jnp.argmax(values)], c * tdim, h * tdim).reshape(h, tdim)

    return plan


# ---- Evaluation and use ----
class SeedsPolicy:
    """The planner of all seeds (common.Run.evaluate): policy({"model": params, "edges": bin edges} [S, ...],
    obs [S, E, obs]) -> [S, E, act] in [-1, 1]; reset() before each evaluation and observe(rewards [S * E]) after each
    env step keep each episode's context."""

    def __init__(self, model_def: GPT, args: Args, prep: common.Prep, seed: int = 0):
        self.args, self.prep, self.seed, self.d, self.a = args, prep, seed, prep.obs_dim, prep.act_dim
        plan = make_planner(model_def, args, self.d, self.a)  # vmapped over seeds, then episodes; one compile
        self.planner = jax.jit(jax.vmap(jax.vmap(plan, in_axes=(None, None, 0, None, 0, 0)), in_axes=(0, 0, 0, None, 0, 0)))
        self.reset()

    def reset(self) -> None:
        self.t, self.context, self.plan, self.key = 0, None, None, jax.random.PRNGKey(self.seed)

    def __call__(self, params: dict, obs: jax.Array) -> jax.Array:
        s, e = obs.shape[:2]
        self.edges = params["edges"]
        tdim, c_max = self.d + self.a + 2, self.args.max_context_transitions
        if self.context is None:
            self.context = jnp.zeros((s, e, c_max, tdim), jnp.int32)
        obs_tokens = jax.vmap(discretize)(self.edges[:, :, :self.d], (obs - self.prep.obs_mean) / self.prep.obs_std)
        k = self.t % self.args.plan_freq
        if k == 0:
            c = min(self.t, c_max)
            self.key, key = jax.random.split(self.key)
            context = jnp.roll(self.context, c - c_max, axis=2).reshape(s, e, c_max * tdim)  # the last c first
            self.plan = self.planner(params["model"], self.edges, context, jnp.int32(c), obs_tokens, jax.random.split(key, (s, e)))
        act_tokens = self.plan[:, :, k, self.d:self.d + self.a]
        self.last = (obs_tokens, act_tokens)
        return jax.vmap(reconstruct)(self.edges[:, :, self.d:self.d + self.a], act_tokens)

    def observe(self, rewards: np.ndarray) -> None:
        """The transition just taken joins the context: state, action, reward, and a placeholder value (never attended to)."""
        obs_tokens, act_tokens = self.last
        r = jnp.asarray(rewards, jnp.float32).reshape(act_tokens.shape[:2])
        rv = jax.vmap(discretize)(self.edges[:, :, self.d + self.a:], jnp.stack([r, jnp.zeros_like(r)], -1))
        transition = jnp.concatenate([obs_tokens, act_tokens, rv], axis=-1)
        self.context = jnp.concatenate([self.context[:, :, 1:], transition[:, :, None]], axis=2)
        self.t += 1


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


def load_policy(path: str, seed: int = 0) -> UserPolicy:
    """The planner of a checkpoint of this file (seed: which of its --num-seeds runs), with the checkpoint's planning
    settings. Call act(obs), then act.observe(reward); act.reset() at a new episode."""
    ckpt = common.read_checkpoint(path, ALGORITHM)
    args, prep = Args(**ckpt["meta"]["config"]), common.Prep(**ckpt["meta"]["prep"])
    model_def = make_networks(args, prep.obs_dim, prep.act_dim)[0]
    state = ckpt["state"]
    params = jax.tree.map(lambda x: jnp.asarray(x[seed:seed + 1]), {"model": state["model"]["params"], "edges": state["edges"]})
    return UserPolicy(SeedsPolicy(model_def, args, prep), params)


# ---- Main ----
def main(args: Args) -> dict:
    data, info = common.load_dataset(args.dataset or args.env, source=args.source, eval_env=args.eval_env)
    args = resolve_plan(args, info)
    run = common.Run(ALGORITHM, args, info, data, hyperparameters={"horizon": args.horizon, "plan_freq": args.plan_freq})
    arrays, edges = trajectory_arrays(args, data, info, run.prep)
    batch = jax.device_put(arrays)  # on the device once
    init = make_init(run.schedule_args, run.prep.obs_dim, run.prep.act_dim, edges, len(arrays["starts"]))
    states = run.restore(jax.vmap(init)(jnp.asarray(run.seeds)))
    train_chunk = make_train_chunk(make_update(args, run.prep.obs_dim, run.prep.act_dim))
    policy = SeedsPolicy(make_networks(args, run.prep.obs_dim, run.prep.act_dim)[0], args, run.prep, args.seed)
    for n in run.chunks():  # device calls of a few seconds each, until --num-updates or Ctrl-C
        states = run.train(train_chunk, states, batch, n)  # n updates; stops on a NaN loss, naming the update
        if run.eval_due:
            run.evaluate(policy, {"model": states.model.params, "edges": states.edges})
            run.save(states)
    return run.finish(states, policy, {"model": states.model.params, "edges": states.edges})


if __name__ == "__main__":
    common.cli(Args, main)

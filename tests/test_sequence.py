"""Unit tests of the sequence models: dt.py's returns-to-go and windows, tt.py's tokens, KV cache and beam search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script

dt = load_script("dt")
tt = load_script("tt")


# ---- dt.py ----
def test_returns_to_go_stop_at_terminals_and_timeouts() -> None:
    # two episodes, rows 0-2 (ended by a terminal or a timeout: the same cut) and rows 3-4
    data = {"rewards": np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)}
    out = dt.sequence_arrays(data, np.array([3, 5]), reward_scale=0.5)
    np.testing.assert_allclose(out["rtg"], 0.5 * np.array([6.0, 5.0, 3.0, 9.0, 5.0]))
    np.testing.assert_array_equal(out["timestep"], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(out["ep_end"], [3, 3, 3, 5, 5])


def test_windows_never_cross_an_episode_end() -> None:
    n = 7
    data = {"observations": jnp.arange(n, dtype=jnp.float32)[:, None] + 1, "actions": jnp.ones((n, 1)),
            **{k: jnp.asarray(v) for k, v in dt.sequence_arrays({"rewards": np.ones(n)}, np.array([3, 7]), 1.0).items()}}
    b = dt.sample_windows(data, jax.random.PRNGKey(0), batch_size=256, seq_len=4)
    first = b["states"][:, 0, 0] - 1  # the start row
    end = np.where(first < 3, 3, 7)
    for row, start, stop in zip(np.asarray(b["states"][..., 0]), np.asarray(first, int), end, strict=True):
        length = min(4, stop - start)
        np.testing.assert_array_equal(row[:length], np.arange(start, start + length) + 1)
        np.testing.assert_array_equal(row[length:], 0.0)  # padding
    assert np.all(np.asarray(b["valid"]).sum(1) == np.minimum(4, end - np.asarray(first)))


def test_dt_is_causal_and_blind_to_padding() -> None:
    args = dt.Args(hidden_dim=16, num_layers=2, seq_len=5, dropout=0.0)
    model = dt.make_networks(args, 2)[0]
    rng = np.random.default_rng(0)
    s, a, r = rng.normal(size=(1, 5, 3)), rng.normal(size=(1, 5, 2)), rng.normal(size=(1, 5))
    t, valid = np.arange(5)[None], np.ones((1, 5))
    params = model.init(jax.random.PRNGKey(0), s, a, r, t, valid)
    out = model.apply(params, s, a, r, t, valid)
    s2, a2 = s.copy(), a.copy()
    s2[0, 3:], a2[0, 2:] = 9.0, 9.0  # the future of step 2: its own action and every later token
    np.testing.assert_allclose(model.apply(params, s2, a2, r, t, valid)[0, :3], out[0, :3], atol=1e-6)
    # evaluation's left padding: garbage in the padded slots changes nothing where it is masked
    pad = valid.copy()
    pad[0, :2] = 0.0
    s3 = s.copy()
    s3[0, :2] = 100.0
    np.testing.assert_allclose(model.apply(params, s3, a, r, t, pad)[0, 2:], model.apply(params, s, a, r, t, pad)[0, 2:], atol=1e-6)


# ---- tt.py: tokens ----
def test_discretizer_round_trip_within_half_a_bin() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(5000, 2)), rng.exponential(size=(5000, 1))], axis=1).astype(np.float32)
    edges = tt.quantile_edges(x, 100)
    tokens = np.asarray(tt.discretize(jnp.asarray(edges), jnp.asarray(x)))
    assert tokens.min() == 0 and tokens.max() == 99
    np.testing.assert_array_less(np.abs(np.diff(np.bincount(tokens[:, 0], minlength=100))), 10)  # quantile bins: ~50 each
    err = np.abs(np.asarray(tt.reconstruct(jnp.asarray(edges), jnp.asarray(tokens))) - x)
    width = np.take_along_axis(np.diff(edges, axis=0), tokens, axis=0)
    assert np.all(err <= width / 2 + 1e-6)


def test_value_to_go_with_terminals_timeouts_and_the_penalty() -> None:
    # episode 1 (rows 0-2) ends in a failure, episode 2 (rows 3-4) in a timeout
    r = np.array([1.0, 2.0, 4.0, 1.0, 1.0])
    np.testing.assert_allclose(tt.value_to_go(r, np.array([3, 5]), 0.5), [2.0 + 0.5 * 4.0, 4.0, 0.0, 1.0, 0.0])
    args = tt.Args(num_bins=4, discount=0.5)
    data = {"observations": np.zeros((5, 1), np.float32), "actions": np.zeros((5, 1), np.float32), "rewards": r.astype(np.float32),
            "next_observations": np.zeros((5, 1), np.float32), "terminals": np.array([0, 0, 1, 0, 0], np.float32)}
    prep = tt.common.Prep(np.zeros(1), np.ones(1), -np.ones(1), np.ones(1))
    out, edges = tt.trajectory_arrays(args, data, {"episode_ends": np.array([3, 5])}, prep)
    values = np.asarray(tt.reconstruct(jnp.asarray(edges), jnp.asarray(out["tokens"])))[:, 2:]
    assert values[2, 0] == pytest.approx(edges[:2, 2].mean())  # the failure's reward is the penalty, the lowest bin
    assert edges[0, 2] == -100.0 and edges[0, 3] == -100.0  # and the value before it: V_1 = -100
    np.testing.assert_allclose(tt.value_to_go(np.array([1.0, 2.0, -100.0, 1.0, 1.0]), np.array([3, 5]), 0.5), [-48.0, -100.0, 0.0, 1.0, 0.0])
    # data whose every episode is one transition (next_observations unrelated to the next row): a one-line error
    with pytest.raises(tt.common.DatasetError, match="2 or more transitions"):
        tt.trajectory_arrays(args, data, {"episode_ends": np.arange(1, 6)}, prep)
    np.testing.assert_array_equal(out["starts"], [0, 1, 3])  # no window starts at an episode's last row


# ---- tt.py: the model and the planner ----
def small_gpt(seq_len: int = 4, obs_dim: int = 2, act_dim: int = 1):
    args = tt.Args(hidden_dim=16, num_layers=2, num_heads=2, seq_len=seq_len, num_bins=10, dropout=0.0)
    model = tt.make_networks(args, obs_dim, act_dim)[0]
    return args, model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, model.block_size), jnp.int32))


def test_kv_cached_steps_equal_the_full_forward() -> None:
    _, model, params = small_gpt()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, model.block_size), 0, 11)  # 10 = the end token
    full = model.apply(params, tokens)[0]
    k = v = (jnp.zeros((3, 2, model.block_size, 8)),) * 2  # per layer: [batch, heads, block, head dim]
    for pos in range(model.block_size):
        logits, k, v = model.apply(params, tokens[:, pos], jnp.int32(pos), k, v, method=tt.GPT.step)
        np.testing.assert_allclose(logits, full[:, pos], atol=1e-4, rtol=1e-4)


def test_value_tokens_are_never_attended_to() -> None:
    _, model, params = small_gpt()
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, model.block_size), 0, 10)
    other = tokens.at[0, 4].set((tokens[0, 4] + 3) % 10)  # tdim 5: position 4 is the first value token
    a, b = model.apply(params, tokens)[0], model.apply(params, other)[0]
    np.testing.assert_allclose(a[0, 5:], b[0, 5:], atol=1e-6)  # later tokens do not see it ...
    assert not np.allclose(a[0, 4], b[0, 4])  # ... only its own output (the next state's first token) does


def test_cached_planner_equals_the_recomputing_one_across_a_window_restart() -> None:
    args, model, params = small_gpt(seq_len=5)
    args = tt.dataclasses.replace(args, horizon=6, beam_width=4, num_expand=2, max_context_transitions=2, plan_freq=1)
    edges = jnp.asarray(np.sort(np.random.default_rng(0).normal(size=(11, 5)), axis=0), jnp.float32)
    context = jax.random.randint(jax.random.PRNGKey(3), (2 * 5,), 0, 10)
    obs = jnp.array([3, 7], jnp.int32)
    plans = [jax.jit(tt.make_planner(model, args, 2, 1, cached=c))(params, edges, context, jnp.int32(c_len), obs, jax.random.PRNGKey(4))
             for c_len in (0, 2) for c in (True, False)]
    np.testing.assert_array_equal(plans[0], plans[1])
    np.testing.assert_array_equal(plans[2], plans[3])
    assert plans[0].shape == (6, 5) and list(np.asarray(plans[0])[0, :2]) == [3, 7]  # it starts from the given state


class ToyModel:
    """A hand-made 'GPT' whose next-token logits depend only on the last token and its dimension (obs, act, r, V):
    action 0 is the more probable (0.55) but earns reward 1 and value -1; action 1 earns reward 0 and value 2."""

    block_size = 19  # seq_len 5 transitions of tdim 4, minus one

    def logits(self, token: jax.Array, dim: jax.Array) -> jax.Array:
        big = 20.0
        act = jnp.log(jnp.array([0.55, 0.45, 1e-9, 1e-9, 1e-9]))
        reward = jnp.where((token == 0)[..., None], big * jax.nn.one_hot(2, 5), big * jax.nn.one_hot(1, 5))  # bins 2 (r=1), 1 (r=0)
        value = jnp.where((token == 2)[..., None], big * jax.nn.one_hot(0, 5), big * jax.nn.one_hot(3, 5))  # bins 0 (V=-1), 3 (V=2)
        obs = big * jax.nn.one_hot(0, 5)
        table = jnp.stack([jnp.broadcast_to(act, token.shape + (5,)), reward, value, jnp.broadcast_to(obs, token.shape + (5,))])
        return table[dim % 4]

    def apply(self, params, tokens, *rest, method=None):
        if method is None:  # full forward: tokens [B, T]
            pos = jnp.arange(tokens.shape[1])
            lg = jax.vmap(lambda tok, p: self.logits(tok, p), in_axes=(1, 0), out_axes=1)(tokens, pos)
            kv = (jnp.zeros((tokens.shape[0], 1, tokens.shape[1], 1)),)  # one layer, [B, heads, T, d]
            return lg, kv, kv
        pos, k, v = rest
        return self.logits(tokens, pos), k, v


def test_beam_search_finds_the_best_sequence_where_greedy_decoding_does_not() -> None:
    model = ToyModel()
    args = tt.Args(seq_len=5, horizon=1, beam_width=4, num_expand=2, action_top_p=0.99, max_context_transitions=2,
                   plan_freq=1, discount=0.9, num_bins=4)
    centers = np.array([-1.0, 0.0, 1.0, 2.0])
    edges = jnp.asarray(np.stack([np.append(centers - 0.5, centers[-1] + 0.5)] * 4, axis=1), jnp.float32)  # [5, tdim 4]
    plan = jax.jit(tt.make_planner(model, args, 1, 1))
    obs = jnp.array([0], jnp.int32)
    greedy_action = int(jnp.argmax(model.logits(obs, jnp.int32(0))))
    assert greedy_action == 0  # the most probable action: return 1 + 0.9 * (-1) = 0.1
    for seed in range(3):
        best = np.asarray(plan(None, edges, jnp.zeros(8, jnp.int32), jnp.int32(0), obs, jax.random.PRNGKey(seed)))
        assert best[0, 1] == 1  # the search's: 0 + 0.9 * 2 = 1.8
        assert best[0, 2] == 1 and best[0, 3] == 3  # its decoded reward (0) and value (2) bins

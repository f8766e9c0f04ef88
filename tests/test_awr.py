"""Unit tests of AWR's TD(lambda) returns and advantage weights (algorithms/awr.py) against hand computations, and of its
per-row cache across device calls."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, random_transitions


@pytest.fixture(scope="module")
def awr():
    return load_script("awr")


def test_td_lambda_returns_by_hand(awr):
    """gamma = lambda = 0.5 on two episodes: rows 0-2 cut by a timeout in the middle of the data (the last row bootstraps
    from V(s')), rows 3-4 ending in a terminal at the end of the data (no bootstrap)."""
    rewards = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    terminals = jnp.array([0.0, 0.0, 0.0, 0.0, 1.0])
    next_values = jnp.array([10.0, 20.0, 30.0, 40.0, 50.0])  # V(s_{t+1}) of each row
    episode_last = jnp.array([0.0, 0.0, 1.0, 0.0, 1.0])
    g = awr.td_lambda_returns(rewards, terminals, next_values, episode_last, 0.5, 0.5)
    # episode 1 (timeout): G2 = 3 + 0.5 * 30 = 18
    #                      G1 = 2 + 0.5 * (0.5 * 20 + 0.5 * 18) = 2 + 0.5 * 19 = 11.5
    #                      G0 = 1 + 0.5 * (0.5 * 10 + 0.5 * 11.5) = 1 + 0.5 * 10.75 = 6.375
    # episode 2 (terminal): G4 = 5 (V(s') masked), G3 = 4 + 0.5 * (0.5 * 40 + 0.5 * 5) = 4 + 11.25 = 15.25
    np.testing.assert_allclose(g, [6.375, 11.5, 18.0, 15.25, 5.0], rtol=1e-6)


def test_td_lambda_returns_match_a_loop(awr):
    """Random data with many episodes: the associative scan equals the reference code's backward loop per episode."""
    rng = np.random.default_rng(0)
    n, gamma, lam = 300, 0.99, 0.95
    r, nv = rng.normal(size=n), rng.normal(size=n)
    last = np.zeros(n)
    last[np.sort(rng.choice(n - 1, 20, replace=False))] = 1.0
    last[-1] = 1.0
    term = last * (rng.random(n) < 0.5)
    expected, nxt = np.zeros(n), 0.0
    for t in reversed(range(n)):
        boot = nv[t] if last[t] else (1 - lam) * nv[t] + lam * nxt
        expected[t] = nxt = r[t] + gamma * (1 - term[t]) * boot
    g = awr.td_lambda_returns(*(jnp.asarray(x, jnp.float32) for x in (r, term, nv, last)), gamma, lam)
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-4)


def test_awr_weights_standardized_and_clipped(awr):
    adv = jnp.append(jnp.linspace(-1.0, 1.0, 19), 100.0)  # standardized, the last is ~4.4 std out: exp > 20, clipped
    w = np.asarray(awr.awr_weights(adv, 1.0, 20.0))
    a = np.asarray(adv, np.float64)
    z = (a - a.mean()) / (a.std() + 1e-5)
    np.testing.assert_allclose(w[:-1], np.exp(z[:-1]), rtol=1e-5)
    assert w[-1] == pytest.approx(20.0) and math.exp(z[-1]) > 20.0 and (w[:-1] < 20.0).all()
    # a shift or scale of the advantages does not change the weights (they are standardized first)
    np.testing.assert_allclose(awr.awr_weights(3.0 * adv + 7.0, 1.0, 20.0), w, rtol=1e-4)
    # temperature: exp(z / beta), and the clip caps every weight
    np.testing.assert_allclose(awr.awr_weights(adv, 2.0, 20.0)[:-1], np.exp(z[:-1] / 2.0), rtol=1e-5)
    assert float(awr.awr_weights(adv, 0.1, 1.5).max()) == pytest.approx(1.5)


def test_the_cache_follows_the_phases_not_the_device_calls(awr):
    """The per-row cache (TD(lambda) targets in the critic steps, advantage weights in the actor steps) lives in the train
    state and is rebuilt at each phase start only: 7 updates in one device call equal 2 + 4 + 1 in three calls, with the
    boundaries falling inside phases, and after a critic step the cache holds the iteration's targets."""
    args = awr.Args(hidden_dim=8, batch_size=4, critic_steps=2, actor_steps=3)
    data = {**random_transitions(16), **awr.episode_arrays(16, np.array([7, 16]))}
    fresh = lambda: jax.tree.map(jnp.copy, jax.vmap(awr.make_init(args, 3, 2, 16))(jnp.arange(2)))  # noqa: E731 - own buffers: a call donates them
    init = fresh()
    chunk = awr.make_train_chunk(args, awr.make_update(args), awr.make_refresh(args))
    whole, _, _ = chunk(init, data, jnp.asarray(0), num_steps=7)
    parts = fresh()
    for step0, n in ((0, 2), (2, 4), (6, 1)):
        parts, _, _ = chunk(parts, data, jnp.asarray(step0), num_steps=n)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # update 5 starts iteration 2: its critic-phase cache is the TD(lambda) returns of V at that start (the target net)
    after, _, _ = chunk(fresh(), data, jnp.asarray(0), num_steps=6)
    one = jax.tree.map(lambda x: x[0], after)
    v = one.critic.apply_fn(one.target_critic_params, data["observations"])[..., 0] / (1.0 - args.discount)
    next_v = one.critic.apply_fn(one.target_critic_params, data["next_observations"])[..., 0] / (1.0 - args.discount)
    inside = 1.0 - data["episode_last"]
    next_v = jnp.where(inside > 0, jnp.roll(v, -1), next_v)
    want = awr.td_lambda_returns(data["rewards"], data["terminals"], next_v, data["episode_last"], args.discount, args.td_lambda)
    np.testing.assert_allclose(one.cache, want, rtol=1e-5, atol=1e-5)

"""Unit tests of BEAR's MMD, its soft clipped double-Q target, its Lagrange multiplier, its VAE and its evaluation policy
(algorithms/bear.py), against hand computations."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, random_transitions


@pytest.fixture(scope="module")
def bear():
    return load_script("bear")


def mmd_by_hand(x: np.ndarray, y: np.ndarray, kernel: str, sigma: float) -> float:
    """The MMD of one state's two sample sets with explicit loops over all pairs."""
    def k(a, b):
        d = np.abs(a - b).sum() if kernel == "laplacian" else ((a - b) ** 2).sum()
        return math.exp(-d / (2 * sigma))
    mean_k = lambda p, q: np.mean([k(a, b) for a, b in itertools.product(p, q)])
    return math.sqrt(mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y) + 1e-6)


@pytest.mark.parametrize("kernel", ["laplacian", "gaussian"])
def test_mmd_matches_a_hand_computation(bear, kernel):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 4, 2)), rng.normal(loc=1.0, size=(3, 4, 2))
    got = np.asarray(bear.mmd(jnp.asarray(x), jnp.asarray(y), kernel, 2.0))
    want = [mmd_by_hand(x[i], y[i], kernel, 2.0) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(bear.mmd(jnp.asarray(x), jnp.asarray(x), kernel, 2.0)[0]) == pytest.approx(1e-3)  # sqrt(1e-6)


def test_mmd_separates_sets_by_distance_and_its_gradient_pulls_them_together(bear):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 5, 3)))
    near, far = bear.mmd(x, x + 0.1, "laplacian", 20.0), bear.mmd(x, x + 3.0, "laplacian", 20.0)
    assert float(near[0]) < float(far[0])
    shift = jax.grad(lambda s: bear.mmd(x, x + s, "gaussian", 1.0).sum())(jnp.asarray(1.0))
    assert float(shift) > 0  # moving y back toward x (smaller shift) lowers the MMD


def test_soft_clipped_double_q_target(bear):
    # next_q [2 critics, 2 states, 3 sampled actions]
    next_q = jnp.asarray([[[1.0, 4.0, 2.0], [0.0, 1.0, 5.0]],
                          [[3.0, 2.0, 2.0], [2.0, 2.0, 1.0]]])
    target = bear.critic_target(jnp.asarray([1.0, 0.5]), jnp.asarray([0.0, 1.0]), next_q, 0.75, 0.9)
    # state 0: per action 0.75 min + 0.25 max = 1.5, 2.5, 2.0 -> max 2.5; state 1 is terminal
    np.testing.assert_allclose(target, [1.0 + 0.9 * 2.5, 0.5])


def test_actor_loss_warm_start_and_lagrange_direction(bear):
    q, m = jnp.asarray([2.0, 4.0]), jnp.asarray([0.05, 0.25])
    assert float(bear.actor_loss(q, m, jnp.asarray(2.0), 0.05, jnp.asarray(1.0))) == pytest.approx(-3.0 + 2.0 * 0.1)
    assert float(bear.actor_loss(q, m, jnp.asarray(2.0), 0.05, jnp.asarray(0.0))) == pytest.approx(2.0 * 0.1)
    grad = lambda mmd_value: float(jax.grad(bear.alpha_loss)(jnp.asarray(0.0), jnp.asarray([mmd_value]), 0.05))
    assert grad(0.5) < 0 < grad(0.01)  # descent raises alpha while MMD > epsilon, lowers it while the constraint holds


def test_vae_loss_and_samples(bear):
    vae = bear.VAE(action_dim=2, hidden_dim=16)
    obs, act = jnp.ones((5, 3)), jnp.zeros((5, 2))
    params = vae.init(jax.random.PRNGKey(0), jax.random.PRNGKey(1), obs, act)
    recon, mean, std = vae.apply(params, jax.random.PRNGKey(2), obs, act)
    assert recon.shape == (5, 2) and mean.shape == std.shape == (5, 4)  # latent: 2 x action_dim
    assert float(jnp.abs(recon).max()) < 1.0
    # the KL term is 0 for the prior itself and the reconstruction term is the mean squared error
    assert float(bear.vae_loss(jnp.ones((4, 2)), jnp.zeros((4, 2)), jnp.zeros((4, 4)), jnp.ones((4, 4)))) == pytest.approx(1.0)
    raw = vae.apply(params, jax.random.PRNGKey(3), obs, 7, method=bear.VAE.sample_raw)
    assert raw.shape == (5, 7, 2)


def test_evaluation_picks_the_best_sample_by_q1(bear):
    """best_of_samples returns, per state, the sample that the critic's first head rates highest."""
    args = bear.Args(hidden_dim=8)
    actor_def, critic_def, _ = bear.make_networks(args, 2)
    obs = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    actor_params = actor_def.init(jax.random.PRNGKey(1), obs)
    critic_params = critic_def.init(jax.random.PRNGKey(2), obs, jnp.zeros((4, 2)))
    key = jax.random.PRNGKey(3)
    chosen = bear.best_of_samples(key, actor_def, critic_def, (actor_params, critic_params), obs, 50)
    samples = bear.sample_actor(key, *actor_def.apply(actor_params, obs), 50)[0]
    q1 = np.stack([np.asarray(critic_def.apply(critic_params, obs, samples[:, j]))[0] for j in range(50)], 1)
    np.testing.assert_allclose(chosen, samples[np.arange(4), q1.argmax(1)], rtol=1e-6)
    state_key = bear.state_key(obs[0])
    assert jnp.array_equal(state_key, bear.state_key(obs[0])) and not jnp.array_equal(state_key, bear.state_key(obs[1]))


def test_kernel_auto_follows_the_reference_settings(bear):
    assert bear.resolve_kernel(bear.Args(), {"dataset": "halfcheetah-medium-recipe"}).kernel == "gaussian"
    assert bear.resolve_kernel(bear.Args(), {"dataset": "hopper-medium-v2"}).kernel == "laplacian"
    assert bear.resolve_kernel(bear.Args(kernel="gaussian"), {"dataset": "hopper-medium-v2"}).kernel == "gaussian"


def test_one_update_moves_every_part_and_the_warm_start_ignores_q(bear):
    args = bear.Args(hidden_dim=8, vae_hidden_dim=8, batch_size=8, warm_start=1, num_target_samples=3, kernel="laplacian")
    data = random_transitions(max_action=0.9)
    state = bear.make_init(args, 3, 2)(jnp.asarray(0))
    update = jax.jit(bear.make_update(args))
    s1, m1 = update(state, data, jnp.asarray(0))
    leaves = lambda t: jax.tree.leaves(t)
    moved = lambda a, b: not all(bool(jnp.array_equal(x, y)) for x, y in zip(leaves(a), leaves(b), strict=True))
    for part in ("vae", "actor", "critic", "log_alpha"):
        assert moved(getattr(s1, part).params, getattr(state, part).params), part
    assert moved(s1.target_critic_params, state.target_critic_params)
    assert all(math.isfinite(float(v)) for v in m1.values())
    # warm start (step 0 < 1): the actor loss is alpha (MMD - epsilon) alone
    assert float(m1["actor_loss"]) == pytest.approx(float(m1["alpha"]) * (float(m1["mmd"]) - args.target_mmd), rel=1e-5)
    s2, m2 = update(s1, data, jnp.asarray(1))
    assert float(m2["actor_loss"]) != pytest.approx(float(m2["alpha"]) * (float(m2["mmd"]) - args.target_mmd), rel=1e-3)
    assert args.log_alpha_min <= float(s2.log_alpha.params["value"]) <= args.log_alpha_max

"""Unit tests of BRAC's sample-based KL, its targets, its dual alpha and its two-phase schedule (algorithms/brac.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, random_transitions


@pytest.fixture(scope="module")
def brac():
    return load_script("brac")


def gaussian_kl(m1, s1, m2, s2) -> float:
    """Closed form KL(N(m1, s1^2) || N(m2, s2^2)), summed over independent dimensions."""
    return float(np.sum(np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5))


def test_kl_estimate_matches_the_closed_form(brac):
    """tanh maps both Gaussians alike, so the KL of the squashed policies is the KL of the pre-tanh Gaussians."""
    m1, s1, m2, s2 = np.array([0.1, -0.3]), np.array([0.3, 0.2]), np.array([-0.2, 0.0]), np.array([0.5, 0.25])
    pi = (jnp.asarray(m1)[None], jnp.log(jnp.asarray(s1))[None])
    behaviour = (jnp.asarray(m2)[None], jnp.log(jnp.asarray(s2))[None])
    est = brac.kl_estimate(jax.random.PRNGKey(0), pi, behaviour, 200_000)
    assert est.shape == (1,)
    assert float(est[0]) == pytest.approx(gaussian_kl(m1, s1, m2, s2), rel=0.02)
    same = brac.kl_estimate(jax.random.PRNGKey(1), pi, pi, 1000)
    assert abs(float(same[0])) < 1e-3  # identical policies: zero up to the float error of atanh(tanh(u))


def test_log_prob_of_given_actions_matches_the_sampler(brac):
    mean, log_std = jnp.array([[0.3, -0.5], [0.0, 1.0]]), jnp.array([[-1.0, -0.5], [-2.0, -1.5]])
    actions, log_pi = brac.sample_tanh_gaussian(jax.random.PRNGKey(2), mean, log_std, 5)
    np.testing.assert_allclose(brac.tanh_gaussian_log_prob(mean, log_std, actions), log_pi, rtol=1e-4, atol=1e-4)


def test_log_std_is_squashed_into_the_reference_range(brac):
    actor = brac.TanhGaussianActor(3, 16, 2, -5.0, 0.0)
    params = jax.tree.map(lambda x: 50.0 * x + 3.0, actor.init(jax.random.PRNGKey(0), jnp.ones((1, 4))))
    _, log_std = actor.apply(params, jnp.linspace(-3, 3, 40).reshape(10, 4))
    assert bool(((log_std >= -5.0) & (log_std <= 0.0)).all())


def test_value_penalty_target_and_actor_loss(brac):
    r, d = jnp.array([1.0, 1.0]), jnp.array([0.0, 1.0])
    next_q, div = jnp.array([[4.0, 4.0], [3.0, 5.0]]), jnp.array([2.0, 2.0])
    target = brac.critic_target(r, d, next_q, div, jnp.asarray(0.5), 0.9)
    np.testing.assert_allclose(target, [1.0 + 0.9 * (3.0 - 1.0), 1.0])  # min Q - alpha D, cut at a terminal
    q_pi = jnp.array([10.0, 20.0])
    assert float(brac.actor_loss(q_pi, div, jnp.asarray(0.5), jnp.asarray(1.0))) == pytest.approx(1.0 - 15.0)
    assert float(brac.actor_loss(q_pi, div, jnp.asarray(0.5), jnp.asarray(0.0))) == pytest.approx(1.0)  # warm start


def test_dual_alpha_moves_toward_the_target_divergence(brac):
    grad = lambda div: float(jax.grad(brac.alpha_loss)(jnp.asarray(1.0), jnp.asarray([div]), 0.5))
    assert grad(2.0) < 0 < grad(0.1)  # gradient descent raises alpha above the target, lowers it below


def test_schedule_defaults_and_errors(brac):
    assert brac.phases(brac.Args()) == (300_000, 20_000)  # the reference's 300k pi_b updates, then a 20k warm start
    assert brac.phases(brac.Args(num_updates=800, bc_updates=100, warm_start=0)) == (100, 0)
    with pytest.raises(brac.common.RunError, match="--bc-updates"):
        brac.phases(brac.Args(num_updates=100, bc_updates=200))


def test_behaviour_policy_is_fitted_first_then_frozen(brac):
    """Phase 1 moves pi_b only; phase 2 moves the critics and the policy and leaves pi_b as it was."""
    args = brac.Args(num_updates=4, bc_updates=2, warm_start=1, hidden_dim=8, actor_hidden_dim=8, batch_size=8)
    data = random_transitions()
    state = brac.make_init(args, 3, 2)(jnp.asarray(0))
    update = jax.jit(brac.make_update(args))
    leaves = lambda tree: jax.tree.leaves(tree)
    same = lambda a, b: all(bool(jnp.array_equal(x, y)) for x, y in zip(leaves(a), leaves(b), strict=True))
    s1, m1 = update(state, data, jnp.asarray(0))
    assert not same(s1.behaviour.params, state.behaviour.params)
    assert same(s1.actor.params, state.actor.params) and same(s1.critic.params, state.critic.params)
    assert float(m1["bc_phase"]) == 1.0 and math.isfinite(float(m1["bc_loss"]))
    s2, m2 = update(s1, data, jnp.asarray(2))
    assert same(s2.behaviour.params, s1.behaviour.params)
    assert not same(s2.actor.params, s1.actor.params) and not same(s2.critic.params, s1.critic.params)
    assert float(m2["bc_phase"]) == 0.0 and float(m2["kl"]) != 0.0


def test_train_alpha_takes_a_projected_dual_step(brac):
    """With --train-alpha a BRAC step moves alpha in the direction of (KL - target) and projects it onto [0, alpha_max]."""
    args = brac.Args(num_updates=2, bc_updates=0, warm_start=0, hidden_dim=8, actor_hidden_dim=8, batch_size=8,
                     train_alpha=True, target_divergence=1e6, alpha_lr=0.5, alpha_max=0.3)
    data = random_transitions()
    state = brac.make_init(args, 3, 2)(jnp.asarray(0))
    s1, m1 = jax.jit(brac.make_update(args))(state, data, jnp.asarray(0))
    # the KL is far below the target, so the dual step lowers alpha (Adam's first step: lr), clipped at 0
    assert float(s1.alpha.params["value"]) == pytest.approx(0.0) and float(m1["alpha"]) == pytest.approx(0.1)
    s2, _ = jax.jit(brac.make_update(brac.Args(**{**vars(args), "target_divergence": -1e6})))(state, data, jnp.asarray(0))
    assert float(s2.alpha.params["value"]) == pytest.approx(0.3)  # raised by lr 0.5 from 0.1, clipped at alpha_max

"""Unit tests of CEM-Q (algorithms/cemq.py): CEM finds a known maximum, the clipped double-Q target, the CQL penalty,
and one update, and that CEM scores with the first head alone."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, random_transitions


@pytest.fixture(scope="module")
def cemq():
    return load_script("cemq")


def test_cem_finds_the_maximum_of_a_known_quadratic(cemq):
    """Q(s, a) = -|a - c(s)|^2 with a different optimum c per state inside the box, and one outside it."""
    c = jnp.asarray([[0.3, -0.5], [-0.8, 0.1], [0.0, 0.9], [1.5, 0.0]])  # the last one's best action in the box: (1, 0)
    score = lambda a: -jnp.sum((a - c[:, None, :]) ** 2, axis=-1)  # noqa: E731
    best, q = cemq.cem_argmax(jax.random.PRNGKey(0), score, 4, 2, iterations=6, samples=64, elites=6)
    np.testing.assert_allclose(best, [[0.3, -0.5], [-0.8, 0.1], [0.0, 0.9], [1.0, 0.0]], atol=0.02)
    np.testing.assert_allclose(q, score(best[:, None, :])[:, 0], rtol=1e-6)
    # QT-Opt's budget (2 rounds of 64, 6 elites) gets close, and beats the best of its first, uniform round alone
    best2, q2 = cemq.cem_argmax(jax.random.PRNGKey(1), score, 4, 2, iterations=2, samples=64, elites=6)
    best1, q1 = cemq.cem_argmax(jax.random.PRNGKey(1), score, 4, 2, iterations=1, samples=64, elites=6)
    assert float(jnp.max(jnp.abs(best2[:3] - c[:3]))) < 0.15 and bool(jnp.all(q2 >= q1))


def test_clipped_double_q_target_and_cql_penalty(cemq):
    next_q = jnp.asarray([[3.0, 1.0], [2.0, 4.0]])  # [2 heads, 2 states]
    target = cemq.critic_target(jnp.asarray([1.0, 0.5]), jnp.asarray([0.0, 1.0]), next_q, 0.9)
    np.testing.assert_allclose(target, [1.0 + 0.9 * 2.0, 0.5])
    # one head, one state, 2 uniform actions on [-1, 1] (density 1/2): log((e^1 + e^3) / 2 * 2) - Q_data
    q_rand, q_data = jnp.asarray([[[1.0, 3.0]]] * 2), jnp.asarray([[0.5]] * 2)
    want = math.log((math.e + math.e**3) / 2 / 0.5) - 0.5
    np.testing.assert_allclose(cemq.cql_penalty(q_rand, q_data, 1), [want, want], rtol=1e-6)


@pytest.mark.parametrize("cql_alpha", [0.0, 5.0])
def test_one_update_moves_the_critic_and_reports_the_cem_gap(cemq, cql_alpha):
    args = cemq.Args(hidden_dim=8, batch_size=8, cem_samples=8, cem_elites=2, cql_alpha=cql_alpha)
    data = random_transitions()
    state = cemq.make_init(args, 3, 2)(jnp.asarray(0))
    s1, m = jax.jit(cemq.make_update(args))(state, data, jnp.asarray(0))
    changed = [not bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(s1.critic.params),
                                                                  jax.tree.leaves(state.critic.params), strict=True)]
    assert all(changed) and all(math.isfinite(float(v)) for v in m.values())
    assert (float(m["cql_gap"]) != 0.0) == (cql_alpha > 0)


def test_first_head_is_the_twin_critics_first_row(cemq):
    """CEM scores its samples with Q_1 alone; it must be exactly the first of the twin critic's two outputs."""
    args = cemq.Args(hidden_dim=16, num_layers=3)
    critic_def = cemq.make_networks(args)
    params = cemq.make_init(args, 3, 2)(jnp.asarray(0)).critic.params
    obs, act = jax.random.normal(jax.random.PRNGKey(1), (5, 3)), jax.random.uniform(jax.random.PRNGKey(2), (5, 2))
    both = critic_def.apply(params, obs, act)
    assert not np.allclose(both[0], both[1])  # the two heads differ, so the test can tell which one it got
    np.testing.assert_allclose(cemq.first_head(critic_def, params)(obs, act), both[0], rtol=1e-5, atol=1e-6)

"""Unit tests of the algorithms' loss pieces on small arrays, against hand computations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def iql():
    return load_script("iql")


@pytest.fixture(scope="module")
def td3bc():
    return load_script("td3bc")


@pytest.fixture(scope="module")
def cql():
    return load_script("cql")


@pytest.fixture(scope="module")
def awac():
    return load_script("awac")


# ---- IQL ----
def test_expectile_loss(iql):
    diff = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0])  # u = Q - V
    # |tau - 1(u < 0)| u^2 with tau = 0.7: negative u weighted 0.3, positive u weighted 0.7
    np.testing.assert_allclose(iql.expectile_loss(diff, 0.7), [1.2, 0.3, 0.0, 0.7, 2.8], rtol=1e-6)
    # tau = 0.5 is half the squared error
    np.testing.assert_allclose(iql.expectile_loss(diff, 0.5), 0.5 * np.asarray(diff) ** 2, rtol=1e-6)


def test_expectile_regression_finds_expectile(iql):
    """Minimizing the expectile loss over a constant v gives the tau-expectile (> mean for tau > 0.5)."""
    x = jnp.array([0.0, 0.0, 0.0, 10.0])
    v = 0.0
    for _ in range(2000):
        v -= 0.05 * jax.grad(lambda v: iql.expectile_loss(x - v, 0.9).mean())(v)
    # expectile: 0.9 * (10 - v) = 0.1 * 3 v  ->  v = 9 / 1.2 = 7.5
    assert abs(float(v) - 7.5) < 1e-2


def test_iql_advantage_weights_and_clip(iql):
    q = jnp.array([0.0, 1.0, 10.0, -1.0])
    v = jnp.zeros(4)
    w = iql.advantage_weights(q, v, 3.0, 100.0)
    np.testing.assert_allclose(w, [1.0, math.exp(3.0), 100.0, math.exp(-3.0)], rtol=1e-5)


def test_gaussian_log_prob(iql):
    mean, log_std = jnp.array([[0.0, 1.0]]), jnp.array([0.0, math.log(2.0)])
    a = jnp.array([[1.0, 1.0]])
    expected = (-0.5 - 0.5 * math.log(2 * math.pi)) + (-math.log(2.0) - 0.5 * math.log(2 * math.pi))
    np.testing.assert_allclose(iql.gaussian_log_prob(mean, log_std, a), [expected], rtol=1e-6)


def test_iql_q_backup_masks_terminals(iql):
    out = iql.q_backup(jnp.array([1.0, 1.0]), jnp.array([0.0, 1.0]), jnp.array([10.0, 10.0]), 0.99)
    np.testing.assert_allclose(out, [1.0 + 9.9, 1.0], rtol=1e-6)


# ---- TD3+BC ----
def test_td3bc_lambda_and_actor_loss(td3bc):
    q = jnp.array([1.0, -3.0, 2.0, -2.0])  # mean |Q| = 2
    assert float(td3bc.td3bc_lambda(q, 2.5)) == pytest.approx(1.25)
    pi, a = jnp.array([[0.5], [0.0], [0.0], [0.0]]), jnp.zeros((4, 1))
    # -lambda * mean Q + mean (pi - a)^2 = -1.25 * -0.5 + 0.25 / 4
    assert float(td3bc.td3bc_actor_loss(q, pi, a, 2.5)) == pytest.approx(0.625 + 0.0625)
    # lambda is a constant: dL/dQ_i = -lambda / N, with no term from d lambda / dQ
    grad = jax.grad(lambda q: td3bc.td3bc_actor_loss(q, pi, a, 2.5))(q)
    np.testing.assert_allclose(grad, np.full(4, -1.25 / 4), rtol=1e-6)


def test_td3bc_target_smoothing_noise_is_clipped(td3bc):
    next_pi = jnp.array([0.0, 0.0, 0.0, 0.9, -0.9])
    noise = jnp.array([10.0, -10.0, 1.0, 10.0, -1.0])  # standard-normal draws, scaled by sigma = 0.2
    out = td3bc.smoothed_target_action(next_pi, noise, 0.2, 0.5)
    # 0 + clip(2, +-0.5); 0 + clip(-2); 0 + 0.2; clip(0.9 + 0.5, -1, 1); -0.9 - 0.2 -> clipped at -1
    np.testing.assert_allclose(out, [0.5, -0.5, 0.2, 1.0, -1.0], rtol=1e-6)


def test_td3bc_target_uses_min_of_twin_q(td3bc):
    next_q = jnp.array([[5.0, -1.0], [3.0, 2.0]])  # [2 critics, batch 2]
    out = td3bc.td_target(jnp.array([1.0, 1.0]), jnp.array([0.0, 1.0]), next_q, 0.5)
    np.testing.assert_allclose(out, [1.0 + 0.5 * 3.0, 1.0], rtol=1e-6)


# ---- CQL ----
def test_cql_logsumexp_axes(cql):
    rng = np.random.default_rng(0)
    batch, n = 3, 2
    q_rand, q_cur, q_next = (rng.normal(size=(2, batch, n)).astype(np.float32) * 3 for _ in range(3))
    lp_cur, lp_next = (rng.normal(size=(batch, n)).astype(np.float32) for _ in range(2))
    lp_rand = 1 * math.log(0.5)
    out = cql.cql_logsumexp(*map(jnp.asarray, (q_rand, q_cur, q_next)), lp_rand, jnp.asarray(lp_cur),
                            jnp.asarray(lp_next))
    assert out.shape == (2, batch)
    for i in range(2):
        for b in range(batch):  # logsumexp over the 3n samples of one state and one critic only
            vals = np.concatenate([q_rand[i, b] - lp_rand, q_next[i, b] - lp_next[b], q_cur[i, b] - lp_cur[b]])
            assert float(out[i, b]) == pytest.approx(float(np.log(np.exp(vals).sum())), rel=1e-5)
    # temperature T: T * logsumexp(x / T)
    out_t = cql.cql_logsumexp(*map(jnp.asarray, (q_rand, q_cur, q_next)), lp_rand, jnp.asarray(lp_cur),
                              jnp.asarray(lp_next), temperature=2.0)
    vals = np.concatenate([q_rand[1, 2] - lp_rand, q_next[1, 2] - lp_next[2], q_cur[1, 2] - lp_cur[2]])
    assert float(out_t[1, 2]) == pytest.approx(2.0 * float(np.log(np.exp(vals / 2.0).sum())), rel=1e-5)


def test_cql_gap_is_per_critic(cql):
    ood = jnp.array([[1.0, 3.0], [0.0, 0.0]])
    q_data = jnp.array([[0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(cql.cql_gap(ood, q_data), [1.5, -1.0])


def test_cql_q_of_samples_keeps_state_sample_pairs(cql):
    """Each Q(s_b, a_bj) must pair state b with its own samples after the flatten/reshape."""
    batch, n = 3, 4
    obs = jnp.arange(batch, dtype=jnp.float32)[:, None] * 100.0  # state b has feature 100 b
    actions = jnp.arange(batch * n, dtype=jnp.float32).reshape(batch, n, 1)
    q_fn = lambda o, a: jnp.stack([o[:, 0] + a[:, 0], o[:, 0] - a[:, 0]])  # noqa: E731
    q = cql.q_of_samples(q_fn, obs, actions)
    assert q.shape == (2, batch, n)
    for b in range(batch):
        for j in range(n):
            assert float(q[0, b, j]) == 100.0 * b + (b * n + j)
            assert float(q[1, b, j]) == 100.0 * b - (b * n + j)


def test_cql_tanh_gaussian_log_prob(cql):
    mean, log_std = jnp.array([[0.3]]), jnp.array([[math.log(0.5)]])
    a, log_prob = cql.sample_tanh_gaussian(jax.random.PRNGKey(0), mean, log_std, 5)
    assert a.shape == (1, 5, 1) and log_prob.shape == (1, 5)
    u = np.arctanh(np.asarray(a[0, :, 0], np.float64))
    expected = (-0.5 * ((u - 0.3) / 0.5) ** 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
                - np.log(1 - np.tanh(u) ** 2))
    np.testing.assert_allclose(log_prob[0], expected, rtol=1e-4, atol=1e-4)


# ---- AWAC ----
def test_awac_weights_and_clip(awac):
    q, v = jnp.array([1.0, 0.0, 100.0, -1.0]), jnp.zeros(4)
    w = awac.awac_weights(q, v, 1.0 / 3.0, 100.0)
    np.testing.assert_allclose(w, [math.exp(3.0), 1.0, 100.0, math.exp(-3.0)], rtol=1e-5)
    assert float(jax.grad(lambda q: awac.awac_weights(q, v, 1.0 / 3.0, 100.0).sum())(q).sum()) == 0.0


def test_awac_actor_mean_unsquashed_by_default(awac, tmp_path):
    """Issue #15: the default mean is CORL's unsquashed one (2 of 5 seeds collapsed with tanh); the evaluation action is
    clipped to the box either way; a checkpoint from before the flag keeps its tanh."""
    assert awac.Args().tanh_mean is False
    obs = jnp.ones((4, 3))
    for tanh_mean in (True, False):
        actor = awac.GaussianActor(2, 8, 1, False, 0.0, -20.0, 2.0, tanh_mean)
        params = jax.tree.map(lambda x: 100.0 * x + 1.0, actor.init(jax.random.PRNGKey(0), obs))  # large outputs
        mean, _ = actor.apply(params, obs)
        assert bool((jnp.abs(mean) <= 1).all()) if tanh_mean else bool((jnp.abs(mean) > 1).any())
        assert bool((jnp.abs(awac.deterministic_action(actor, params, obs)) <= 1).all())
    assert awac.Args(**{**awac.LEGACY, **{"hidden_dim": 8}}).tanh_mean is True
    # CORL's networks are the default (issue #15: 0 of 5 seeds collapsed on hopper-medium, 3 of 5 with 2 layers and Flax's
    # init); a checkpoint from before --torch-init keeps Flax's init, and its recorded tanh_mean is kept
    assert (awac.Args().num_layers, awac.Args().torch_init) == (3, True)
    old = awac.Args(**{**awac.LEGACY, **{"tanh_mean": False, "num_layers": 2}})
    assert (old.tanh_mean, old.torch_init, old.num_layers) == (False, False, 2)


def test_awac_torch_init_bounds(awac):
    """--torch-init draws every weight and bias from PyTorch nn.Linear's U(+-1/sqrt(fan_in)) (CORL's networks), and keeps
    Flax's parameter names, so checkpoints load either way; without it, lecun_normal kernels and zero biases."""
    obs = jnp.zeros((1, 11))
    torch_p = awac.MLP(256, 3, 6, torch_init=True).init(jax.random.PRNGKey(0), obs)["params"]
    flax_p = awac.MLP(256, 3, 6).init(jax.random.PRNGKey(0), obs)["params"]
    assert torch_p.keys() == flax_p.keys() == {"Dense_0", "Dense_1", "Dense_2", "Dense_3"}
    for layer, fan_in in zip(["Dense_0", "Dense_1", "Dense_2", "Dense_3"], [11, 256, 256, 256], strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        for x in (torch_p[layer]["kernel"], torch_p[layer]["bias"]):
            assert float(jnp.abs(x).max()) <= bound
            assert float(jnp.abs(x).max()) > 0.9 * bound  # uniform over the whole interval, not a narrower law
        assert float(jnp.abs(flax_p[layer]["bias"]).max()) == 0.0


# ---- BC ----
def test_bc_loss():
    bc = load_script("bc")
    assert float(bc.bc_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0]]))) == pytest.approx(0.5)


def test_td3bc_presets_and_jax_corl_data_options(td3bc):
    fast = td3bc.resolve_preset(td3bc.Args(preset="fast"), {})
    assert (fast.actor_lr, fast.critic_lr, fast.critic_layer_norm) == (1e-3, 1e-3, True)
    assert td3bc.resolve_preset(td3bc.Args(preset="fast", actor_lr=5e-4), {}).actor_lr == 5e-4  # a flag wins
    assert td3bc.resolve_preset(td3bc.Args(), {}) == td3bc.Args()  # paper: unchanged
    data = {"rewards": np.arange(10.0), "terminals": np.zeros(10)}
    info = {"episode_ends": np.array([4, 10])}
    out = td3bc.select_data(td3bc.Args(episode_ends_terminal=True), data, info)
    np.testing.assert_array_equal(np.flatnonzero(out["terminals"]), [3, 9])
    assert data["terminals"].sum() == 0  # the caller's arrays are not modified
    sub = td3bc.select_data(td3bc.Args(max_transitions=4, seed=1), data, info)
    assert len(sub["rewards"]) == 4 and len(set(sub["rewards"])) == 4 and set(sub["rewards"]) <= set(range(10))


def test_mlp_layer_norm_and_orthogonal_init(td3bc):
    x = jnp.ones((5, 3))
    plain, ln = td3bc.MLP(8, 2, 1), td3bc.MLP(8, 2, 1, layer_norm=True, orthogonal_init=True)
    p_plain, p_ln = plain.init(jax.random.PRNGKey(0), x), ln.init(jax.random.PRNGKey(0), x)
    assert "LayerNorm_0" in p_ln["params"] and "LayerNorm_0" not in p_plain["params"]
    k = np.asarray(p_ln["params"]["Dense_1"]["kernel"])  # orthogonal(sqrt 2): K^T K = 2 I for a square kernel
    np.testing.assert_allclose(k.T @ k, 2.0 * np.eye(8), atol=1e-5)

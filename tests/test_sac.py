"""algorithms/sac.py (the recipe's online SAC): its loss pieces against hand computations, and its actor
against the shipped behaviour-policy layout (recipe/build.py NumpyPolicy)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import flax.linen as nn
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from recipe import build  # noqa: E402


@pytest.fixture(scope="module")
def sac():
    return load_script("sac")


# ---- Losses ----
def test_soft_td_target(sac):
    r, d = jnp.array([1.0, -0.5, 2.0]), jnp.array([0.0, 0.0, 1.0])
    next_q, next_logp, alpha = jnp.array([10.0, 4.0, 7.0]), jnp.array([-1.0, 2.0, 3.0]), 0.2
    # r + 0.9 (1 - d) (min Q' - alpha log pi'): 1 + 0.9 (10 + 0.2); -0.5 + 0.9 (4 - 0.4); terminal: r only
    want = [1 + 0.9 * 10.2, -0.5 + 0.9 * 3.6, 2.0]
    np.testing.assert_allclose(sac.sac_target(r, d, next_q, next_logp, alpha, 0.9), want, rtol=1e-6)


def test_actor_loss(sac):
    logp, q = jnp.array([-1.0, 0.5, 2.0, -3.0]), jnp.array([4.0, -2.0, 1.0, 0.0])
    # mean of alpha log pi - min Q = mean(-0.5 - 4, 0.25 + 2, 1 - 1, -1.5 - 0) = -3.75 / 4
    np.testing.assert_allclose(sac.sac_actor_loss(logp, q, 0.5), -3.75 / 4, rtol=1e-6)
    # the gradient in log pi is alpha / n, in Q it is -1 / n
    g_logp, g_q = jax.grad(sac.sac_actor_loss, argnums=(0, 1))(logp, q, 0.5)
    np.testing.assert_allclose(g_logp, np.full(4, 0.125))
    np.testing.assert_allclose(g_q, np.full(4, -0.25))


def test_temperature_loss_and_gradient_sign(sac):
    log_alpha, target = jnp.log(0.5), -3.0
    g = jax.grad(sac.temperature_loss)
    # entropy -mean(log pi) = 1.5 above the target -3: loss -alpha mean(log pi + H) = -0.5 (-1.5 - 3) = 2.25;
    # its gradient in log(alpha) is the same (d exp(x) / dx = exp(x)), > 0: a descent step lowers alpha
    above = jnp.array([-1.0, -2.0])
    np.testing.assert_allclose(sac.temperature_loss(log_alpha, above, target), 2.25, rtol=1e-6)
    np.testing.assert_allclose(g(log_alpha, above, target), 2.25, rtol=1e-6)
    # entropy -4 below the target -3: gradient -0.5 (4 - 3) < 0, a descent step raises alpha
    below = jnp.array([4.0, 4.0])
    np.testing.assert_allclose(g(log_alpha, below, target), -0.5, rtol=1e-6)
    assert log_alpha - 0.1 * g(log_alpha, below, target) > log_alpha
    # log pi is held constant: no gradient flows into the policy through the temperature loss
    np.testing.assert_array_equal(jax.grad(sac.temperature_loss, argnums=1)(log_alpha, below, target), 0.0)


def test_learning_rates_are_separate(sac):
    """actor_lr, critic_lr and alpha_lr each drive only their own network."""
    args = sac.Args(hidden_dim=8, batch_size=4, actor_lr=0.0, critic_lr=1e-2, alpha_lr=0.0)
    init, update_and_act, _ = sac.make_agent(args, 3, 2)
    s0 = init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batches = {"observations": rng.standard_normal((1, 4, 3), dtype=np.float32),
               "actions": rng.uniform(-1, 1, (1, 4, 2)).astype(np.float32), "rewards": np.ones((1, 4), np.float32),
               "next_observations": rng.standard_normal((1, 4, 3), dtype=np.float32), "terminals": np.zeros((1, 4), np.float32)}
    s1, metrics, a, logp = jax.jit(update_and_act)(s0, batches, np.zeros((2, 3), np.float32))
    assert a.shape == (2, 2) and logp.shape == (2,) and all(np.isfinite(float(v)) for v in metrics.values())
    same = lambda x, y: all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))  # noqa: E731
    assert same(s0.actor, s1.actor) and float(s1.log_alpha) == 0.0
    assert not same(s0.critic, s1.critic)


# ---- The actor and the shipped .npz layout ----
def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, meta=json.dumps({"step": 0}), **arrays)
    return path


def check_same_actions(sac, act, params, policy: build.NumpyPolicy, obs: np.ndarray) -> None:
    """JAX act(...) and NumpyPolicy give the same actions and log-densities, deterministic and sampled."""
    a_det, _ = act(params, obs, jax.random.PRNGKey(0), True)
    np.testing.assert_allclose(a_det, policy(obs, np.zeros((len(obs), a_det.shape[1]), np.float32))[0], atol=1e-5)
    key = jax.random.PRNGKey(7)
    a, logp = act(params, obs, key, False)
    eps = np.asarray(jax.random.normal(key, (len(obs), 1, a.shape[1])))[:, 0]  # sample_tanh_gaussian's noise
    a_np, logp_np = policy(obs, eps)
    np.testing.assert_allclose(a, a_np, atol=1e-5)
    np.testing.assert_allclose(logp, logp_np, rtol=1e-4, atol=1e-3)


def test_exported_actor_is_the_shipped_layout_and_acts_the_same(sac, tmp_path):
    obs_dim, act_dim = 11, 3
    init, _, act = sac.make_agent(sac.Args(hidden_dim=16), obs_dim, act_dim)
    params = init(jax.random.PRNGKey(1)).actor
    # spread the log-stds over the clip range so that the clipping is exercised too
    head = params["params"]["MLP_0"]["Dense_2"]
    head["bias"] = head["bias"].at[act_dim:].set(jnp.array([-6.0, 0.5, 3.0]))
    exported = sac.export_actor(params)
    with np.load(build.policy_path("hopper", "medium")) as shipped:
        assert sorted(exported) == sorted(k for k in shipped.files if k != "meta")
        assert all(exported[k].dtype == shipped[k].dtype for k in exported)
    assert exported["mean/kernel"].shape == exported["log_std/kernel"].shape == (16, act_dim)
    policy = build.NumpyPolicy(save_npz(tmp_path / "p.npz", exported))
    obs = np.random.default_rng(0).standard_normal((64, obs_dim)).astype(np.float32)
    check_same_actions(sac, jax.jit(act, static_argnums=3), params, policy, obs)


def test_shipped_policy_runs_in_the_jax_actor(sac, tmp_path):
    """A shipped policy, read into the current actor, acts as NumpyPolicy does, and exports back bit for bit."""
    path = build.policy_path("hopper", "medium")
    policy = build.NumpyPolicy(path)
    old = {"params": flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in policy.w.items()})}
    init, _, act = sac.make_agent(sac.Args(hidden_dim=policy.w["l0/kernel"].shape[1]), 11, 3)
    params = flax.serialization.from_state_dict(init(jax.random.PRNGKey(0)).actor, sac.upgrade_checkpoint(old))
    back = sac.export_actor(params)
    for k, v in policy.w.items():
        np.testing.assert_array_equal(back[k], v)
    obs = np.random.default_rng(1).standard_normal((32, 11)).astype(np.float32)
    check_same_actions(sac, jax.jit(act, static_argnums=3), params, policy, obs)


# ---- Checkpoints of the older layout ----
class OldActor(nn.Module):
    """sac.py's actor before it used cql.py's TanhGaussianActor."""

    act_dim: int
    hidden_dim: int

    @nn.compact
    def __call__(self, obs):
        h = nn.relu(nn.Dense(self.hidden_dim, name="l0")(obs))
        h = nn.relu(nn.Dense(self.hidden_dim, name="l1")(h))
        mean = nn.Dense(self.act_dim, name="mean")(h)
        return mean, jnp.clip(nn.Dense(self.act_dim, name="log_std")(h), -5.0, 2.0)


class OldDoubleCritic(nn.Module):
    hidden_dim: int

    @nn.compact
    def __call__(self, obs, act):
        x, qs = jnp.concatenate([obs, act], -1), []
        for i in range(2):
            h = nn.relu(nn.Dense(self.hidden_dim, name=f"q{i}_l0")(x))
            h = nn.relu(nn.Dense(self.hidden_dim, name=f"q{i}_l1")(h))
            qs.append(nn.Dense(1, name=f"q{i}_out")(h)[..., 0])
        return jnp.stack(qs)


def test_old_checkpoint_resumes_in_the_new_layout(sac):
    """A train state saved with the older networks loads (params and Adam moments) and computes the same."""
    obs_dim, act_dim, hidden = 5, 2, 8
    actor, critic = OldActor(act_dim, hidden), OldDoubleCritic(hidden)
    o, a = jnp.ones((4, obs_dim)), jnp.full((4, act_dim), 0.3)
    ap, cp = actor.init(jax.random.PRNGKey(1), o), critic.init(jax.random.PRNGKey(2), o, a)
    opt = optax.adam(1e-3)
    # Adam moments that are not all zero: one step on some gradient
    _, actor_opt = opt.update(jax.tree.map(jnp.ones_like, ap), opt.init(ap))
    _, critic_opt = opt.update(jax.tree.map(jnp.ones_like, cp), opt.init(cp))
    old = sac.TrainState(ap, cp, cp, jnp.array(0.25), actor_opt, critic_opt, opt.init(jnp.zeros(())), jax.random.PRNGKey(3))
    blob = flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(
        {"state": flax.serialization.to_state_dict(old), "step": 600}))
    init, _, _ = sac.make_agent(dataclasses.replace(sac.Args(), hidden_dim=hidden), obs_dim, act_dim)
    new = flax.serialization.from_state_dict(init(jax.random.PRNGKey(0)), sac.upgrade_checkpoint(blob["state"]))
    new_actor = sac.TanhGaussianActor(act_dim, hidden, sac.NUM_LAYERS, sac.LOG_STD_MIN, sac.LOG_STD_MAX)
    new_critic = sac.DoubleCritic(hidden, sac.NUM_LAYERS)
    for got, want in zip(new_actor.apply(new.actor, o), actor.apply(ap, o), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_critic.apply(new.critic, o, a), critic.apply(cp, o, a), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_critic.apply(new.critic_target, o, a), critic.apply(cp, o, a), rtol=1e-6, atol=1e-6)
    assert float(new.log_alpha) == 0.25
    # the Adam moments moved with their parameters
    mu = new.actor_opt[0].mu["params"]["MLP_0"]["Dense_2"]["kernel"]
    np.testing.assert_array_equal(mu, np.concatenate([actor_opt[0].mu["params"]["mean"]["kernel"],
                                                      actor_opt[0].mu["params"]["log_std"]["kernel"]], -1))
    nu = new.critic_opt[0].nu["params"]["VmapMLP_0"]["Dense_1"]["bias"]
    np.testing.assert_array_equal(nu, np.stack([critic_opt[0].nu["params"][f"q{i}_l1"]["bias"] for i in range(2)]))

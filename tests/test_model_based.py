"""MOPO and COMBO: the dynamics ensemble, elites, the penalty, the conservative term, termination rules, smoke runs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RESULT_KEYS, load_script, random_dataset, run_script

import common

mopo = load_script("mopo")
combo = load_script("combo")
MB_RESULT_KEYS = RESULT_KEYS | {"phase_times_s", "dynamics"}


# ---- Dynamics ensemble ----
def linear_system(n: int, seed: int):
    """s' = A s + B a + N(0, 0.01^2), r = -||s||^2 with s in R^3, a in [-1, 1]^2."""
    rng = np.random.default_rng(seed)
    a_mat = np.array([[0.9, 0.1, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.7]], np.float32)
    b_mat = np.array([[0.5, 0.0], [0.0, 0.3], [0.2, -0.4]], np.float32)
    s = rng.normal(size=(n, 3)).astype(np.float32)
    a = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    s2 = s @ a_mat.T + a @ b_mat.T + 0.01 * rng.normal(size=(n, 3)).astype(np.float32)
    return s, a, s2.astype(np.float32), -(s**2).sum(1).astype(np.float32)


@pytest.fixture(scope="module")
def linear_model():
    args = mopo.Args(ensemble_size=4, num_elites=3, model_hidden_dim=64, model_num_layers=2, model_epochs=150,
                     model_patience=20, model_batch_size=128, model_weight_decay=0.0)
    s, a, s2, r = linear_system(3000, seed=0)
    model = mopo.train_dynamics(args, s, a, s2, r, seed=0, log=lambda _: None)
    return args, model


def predict(module, args, model, s, a):
    model_def = module.GaussianDynamics(s.shape[1] + 1, args.model_hidden_dim, args.model_num_layers)
    return module.ensemble_predict(model_def, model["params"], jnp.asarray(model["in_mean"]), jnp.asarray(model["in_std"]),
                                   jnp.asarray(s), jnp.asarray(a))


def test_ensemble_learns_linear_dynamics(linear_model):
    args, model = linear_model
    s, a, s2, r = linear_system(1000, seed=1)  # fresh test set
    mean, logvar = predict(mopo, args, model, s, a)
    elite_mean = np.asarray(mean)[model["elites"]].mean(0)
    target = np.concatenate([s2 - s, r[:, None]], 1)
    # stated accuracy: R^2 > 0.98 on the state change and on the reward, for the mean of the elites
    resid = ((elite_mean - target) ** 2).mean(0)
    r2 = 1.0 - resid / target.var(0)
    assert r2[:3].min() > 0.98, r2
    assert r2[3] > 0.98, r2
    # the learned std stays within the soft bounds and below the (unit-scale) targets' spread
    std = np.exp(0.5 * np.asarray(logvar))
    assert np.isfinite(std).all() and std[..., :3].mean() < 0.3


def test_elites_are_the_members_with_lowest_holdout_loss(linear_model):
    args, model = linear_model
    assert sorted(model["elites"].tolist()) == sorted(np.argsort(model["holdout_mse"])[: args.num_elites].tolist())
    # corrupt members 0 and 2: they must drop out of the elites
    params = jax.tree.map(np.array, model["params"])
    rng = np.random.default_rng(0)
    for name in ("hidden_0", "out"):
        for m in (0, 2):
            k = params["params"][name]["kernel"]
            k[m] += rng.normal(scale=2.0, size=k[m].shape)
    s, a, s2, r = linear_system(500, seed=2)
    x = (np.concatenate([s, a], 1) - model["in_mean"]) / model["in_std"]
    y = np.concatenate([s2 - s, r[:, None]], 1)
    model_def = mopo.GaussianDynamics(4, args.model_hidden_dim, args.model_num_layers)
    losses = np.asarray(mopo.holdout_mse(model_def, jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y)))
    assert min(losses[0], losses[2]) > 10 * max(losses[1], losses[3])
    elites = mopo.select_elites(losses, 2)
    assert sorted(elites.tolist()) == [1, 3]
    np.testing.assert_array_equal(mopo.select_elites(np.array([0.3, 0.1, 0.5, 0.2]), 3), [1, 3, 0])


def test_dynamics_model_file_roundtrip(linear_model, tmp_path):
    args, model = linear_model
    meta = {"obs_dim": 3, "action_dim": 2, "ensemble_size": 4, "model_hidden_dim": 64, "model_num_layers": 2}
    mopo.save_model(str(tmp_path / "m.msgpack"), model, meta)
    loaded = combo.load_model(str(tmp_path / "m.msgpack"), meta)  # the two scripts share the format
    np.testing.assert_array_equal(loaded["elites"], model["elites"])
    s, a, _, _ = linear_system(10, seed=3)
    np.testing.assert_allclose(predict(combo, args, loaded, s, a)[0], predict(mopo, args, model, s, a)[0], rtol=1e-5)
    with pytest.raises(common.RunError, match="does not match"):
        mopo.load_model(str(tmp_path / "m.msgpack"), {**meta, "obs_dim": 11})


def test_logvar_soft_bounds():
    model_def = mopo.GaussianDynamics(2, 8, 1)
    params = model_def.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
    params = jax.tree.map(lambda x: x * 1000.0, params)  # huge pre-activations
    params["params"]["max_logvar"] = jnp.full(2, 0.5)
    params["params"]["min_logvar"] = jnp.full(2, -10.0)
    _, logvar = model_def.apply(params, jax.random.normal(jax.random.PRNGKey(1), (64, 3)))
    assert float(logvar.max()) <= 0.5 + 1e-3 and float(logvar.min()) >= -10.0 - 1e-3  # soft: softplus(-10.5) over


# ---- MOPO penalty ----
def test_mopo_penalty_by_hand():
    std = np.array([[[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]],     # member 0: norms 5, 1, 0
                    [[0.0, 1.0], [2.0, 2.0], [0.6, 0.8]]],    # member 1: norms 1, sqrt(8), 1
                   np.float32)
    np.testing.assert_allclose(mopo.mopo_penalty(jnp.asarray(std)), [5.0, np.sqrt(8.0), 1.0], rtol=1e-6)


# ---- COMBO conservative term ----
def test_cql_logsumexp_and_conservative_term_by_hand():
    q_rand = np.array([[1.0, 2.0]])
    q_pi, logp_pi = np.array([[0.5, -1.0]]), np.array([[-0.2, 0.3]])
    q_next, logp_next = np.array([[3.0, 0.0]]), np.array([[1.0, -1.0]])
    act_dim = 3
    vals = np.concatenate([q_rand[0] - act_dim * np.log(0.5), q_pi[0] - logp_pi[0], q_next[0] - logp_next[0]])
    expected = np.log(np.exp(vals).sum())
    args = [jnp.asarray(x) for x in (q_rand, q_pi, q_next)] + [act_dim * np.log(0.5), jnp.asarray(logp_pi), jnp.asarray(logp_next)]
    got = combo.cql_logsumexp(*args)  # cql.py's signature: q_rand, q_cur, q_next, log_prob_rand, log_prob_cur, log_prob_next
    np.testing.assert_allclose(got, [expected], rtol=1e-5)
    got_t = combo.cql_logsumexp(*args, temperature=2.0)
    np.testing.assert_allclose(got_t, [2.0 * np.log(np.exp(vals / 2.0).sum())], rtol=1e-5)

    push_down = np.array([[1.0, 3.0], [2.0, 4.0]])       # [2 critics, 2 model states]
    q_data = np.array([[0.5, 1.5, 1.0], [0.0, 3.0, 0.0]])  # [2 critics, 3 dataset pairs]
    expected = 0.5 * ((2.0 - 1.0) + (3.0 - 1.0))
    np.testing.assert_allclose(combo.conservative_term(jnp.asarray(push_down), jnp.asarray(q_data), 0.5), expected)


def test_combo_regularizer_gradient_flows_through_push_down():
    obs_dim, act_dim, b, n = 4, 2, 5, 3
    critic = combo.DoubleCritic(16, 2)
    params = critic.init(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)))
    ks = jax.random.split(jax.random.PRNGKey(1), 8)
    model_obs = jax.random.normal(ks[0], (b, obs_dim))
    rand_act = jax.random.uniform(ks[1], (b, n, act_dim), minval=-1, maxval=1)
    pi_act = jnp.tanh(jax.random.normal(ks[2], (b, n, act_dim)))
    next_act = jnp.tanh(jax.random.normal(ks[3], (b, n, act_dim)))
    pi_logp, next_logp = jax.random.normal(ks[4], (b, n)), jax.random.normal(ks[5], (b, n))
    data_obs, data_act = jax.random.normal(ks[6], (6, obs_dim)), jnp.tanh(jax.random.normal(ks[7], (6, act_dim)))
    beta = 2.0

    def reg(p):
        return combo.combo_regularizer(critic.apply, p, model_obs, rand_act, pi_act, pi_logp, next_act, next_logp,
                                       data_obs, data_act, beta)

    def push_down_only(p):
        return beta * reg(p)[1].mean(-1).sum()

    def push_up_only(p):
        return -beta * critic.apply(p, data_obs, data_act).mean(-1).sum()

    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    g_reg, g_down, g_up = (flat(jax.jit(jax.grad(f))(params)) for f in (lambda p: reg(p)[0], push_down_only, push_up_only))
    assert float(jnp.linalg.norm(g_reg)) > 1e-3
    assert float(jnp.linalg.norm(g_down)) > 1e-3, "no gradient through the push-down (log-sum-exp) term"
    np.testing.assert_allclose(g_reg, g_down + g_up, rtol=1e-4, atol=1e-6)
    assert float(jnp.linalg.norm(g_reg - g_up)) > 1e-3

    # the value equals the hand-assembled term from explicit Q evaluations
    def q_at(acts):
        obs = jnp.repeat(model_obs, n, 0)
        return critic.apply(params, obs, acts.reshape(b * n, act_dim)).reshape(2, b, n)

    lse = combo.cql_logsumexp(q_at(rand_act), q_at(pi_act), q_at(next_act), act_dim * np.log(0.5), pi_logp, next_logp)
    expected = beta * (lse.mean(-1) - critic.apply(params, data_obs, data_act).mean(-1)).sum()
    np.testing.assert_allclose(reg(params)[0], expected, rtol=1e-5)


# ---- Termination functions ----
def _compare_termination(env_id: str, family: str, sample_qpos, n: int = 300, seed: int = 0) -> int:
    env = gym.make(env_id)
    env.reset(seed=seed)
    uw = env.unwrapped
    rng = np.random.default_rng(seed)
    fn = mopo.termination_fn(family)
    unhealthy = 0
    for _ in range(n):
        qpos = sample_qpos(rng, uw.init_qpos.copy())
        qvel = rng.uniform(-8, 8, size=uw.init_qvel.shape)
        uw.set_state(qpos, qvel)
        obs = uw._get_obs()
        ours = bool(fn(jnp.asarray(obs, jnp.float32)))
        assert ours == (not uw.is_healthy), (env_id, qpos, obs)
        unhealthy += ours
    env.close()
    return unhealthy


def test_termination_matches_gymnasium_hopper():
    def sample(rng, q):
        q[1] = rng.uniform(0.5, 1.5)           # z, healthy above 0.7
        q[2] = rng.uniform(-0.35, 0.35)        # torso angle, healthy within (-0.2, 0.2)
        q[3:] = rng.uniform(-0.8, 0.8, q[3:].shape)
        if rng.uniform() < 0.1:                # a joint angle outside the healthy state range (+-100)
            q[3 + rng.integers(len(q) - 3)] = rng.choice([-1, 1]) * rng.uniform(90, 130)
        return q

    unhealthy = _compare_termination("Hopper-v4", "hopper", sample)
    assert 50 < unhealthy < 280  # both outcomes were exercised


def test_termination_matches_gymnasium_walker2d():
    def sample(rng, q):
        q[1] = rng.uniform(0.6, 2.2)           # z, healthy in (0.8, 2.0)
        q[2] = rng.uniform(-1.4, 1.4)          # angle, healthy in (-1, 1)
        q[3:] = rng.uniform(-0.8, 0.8, q[3:].shape)
        return q

    unhealthy = _compare_termination("Walker2d-v4", "walker2d", sample)
    assert 50 < unhealthy < 280


def test_termination_matches_gymnasium_ant():
    def sample(rng, q):
        q[2] = rng.uniform(0.0, 1.3)           # z, healthy in [0.2, 1.0]
        q[7:] = rng.uniform(-0.5, 0.5, q[7:].shape)
        return q

    unhealthy = _compare_termination("Ant-v4", "ant", sample, n=150)
    assert 20 < unhealthy < 140


def test_termination_families():
    assert mopo.env_family("Hopper-v4") == "hopper" and mopo.env_family("Walker2d-v5") == "walker2d"
    assert mopo.env_family("HalfCheetah-v4") == "halfcheetah" and mopo.env_family("Ant-v4") == "ant"
    assert mopo.env_family("Pendulum-v1") == "none" and mopo.env_family(None) == "none"
    obs = jnp.asarray(np.random.default_rng(0).normal(scale=100, size=(20, 17)), jnp.float32)
    assert not mopo.termination_fn("halfcheetah")(obs).any()
    assert not combo.termination_fn("none")(obs).any()


# ---- Presets ----
def test_presets():
    args = mopo.resolve_preset(mopo.Args(), {"dataset": "walker2d-medium-replay-v2"})
    assert (args.horizon, args.penalty_coef) == (1, 1.0)
    args = mopo.resolve_preset(mopo.Args(horizon=3), {"dataset": "/tmp/x.hdf5"})
    assert args.preset == "default" and args.horizon == 3 and args.penalty_coef == 1.0
    args = combo.resolve_preset(combo.Args(), {"dataset": "hopper-medium-v2"})
    assert (args.horizon, args.beta) == (5, 5.0)
    # recipe data is keyed by its task name, not by a D4RL -v2 name
    args = mopo.resolve_preset(mopo.Args(), {"dataset": "walker2d-medium-replay-recipe", "task": "walker2d-medium-replay"})
    assert args.preset == "walker2d-medium-replay" and args.horizon == 1
    assert combo.Args().real_ratio == 0.5 and mopo.Args().real_ratio == 0.05
    with pytest.raises(common.RunError, match="--horizon must be >= 1"):
        mopo.resolve_preset(mopo.Args(horizon=0), {"dataset": "x"})


# ---- The copies stay copies ----
def test_shared_code_is_identical():
    """The dynamics ensemble is copied into both files, the SAC networks and sampler and the CQL log-sum-exp from cql.py."""
    cql = load_script("cql")
    for name in ("termination_fn", "GaussianDynamics", "model_loss", "train_dynamics", "save_model", "load_model",
                 "MLP", "DoubleCritic", "TanhGaussianActor", "sample_tanh_gaussian", "deterministic_action", "load_policy"):
        assert inspect.getsource(getattr(mopo, name)) == inspect.getsource(getattr(combo, name)), name
    for name in ("MLP", "DoubleCritic", "TanhGaussianActor", "sample_tanh_gaussian", "deterministic_action"):
        assert inspect.getsource(getattr(combo, name)) == inspect.getsource(getattr(cql, name)), name
    assert inspect.signature(combo.cql_logsumexp) == inspect.signature(cql.cql_logsumexp)


# ---- Smoke runs of the scripts ----
@pytest.fixture(scope="module")
def hopper_dataset(tmp_path_factory) -> Path:
    """~2000 uniformly random Hopper-v4 transitions in D4RL layout (episodes cut at 100 steps by timeouts)."""
    return random_dataset(tmp_path_factory.mktemp("mb_data") / "hopper_random_tiny.hdf5", "Hopper-v4", n=2000, max_steps=100)


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> dict[str, str]:
    """A persistent compilation cache shared by the runs of one script (the second run reuses the executables)."""
    d = tmp_path_factory.mktemp("jax_cache")
    return {"JAX_COMPILATION_CACHE_DIR": str(d), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def run(algo: str, env: dict, *args):
    proc = run_script(algo, *args, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("algo, argv, message", [
    ("mopo", ["--num-elites", "9"], "error: --num-elites cannot exceed --ensemble-size"),
    ("mopo", ["--horizon", "0"], "error: --horizon must be >= 1"),
    ("combo", ["--real-ratio", "1.0"], "error: COMBO needs dataset and model transitions in every batch"),
    ("combo", ["--model-load", "/nonexistent/dynamics.msgpack", "--num-updates", "10"],
     "error: cannot load dynamics model /nonexistent/dynamics.msgpack"),
])
def test_bad_input_is_one_line(algo, argv, message, hopper_dataset, tmp_path):
    proc = run_script(algo, "--dataset", hopper_dataset, "--eval-env", "Hopper-v4", "--eval-episodes", 1,
                      "--log-dir", tmp_path, *argv)
    last = proc.stderr.strip().splitlines()[-1]  # (Hopper-v4's deprecation warning may come before it)
    assert proc.returncode == 1 and message in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("algo", ["mopo", "combo"])
def test_smoke_train_reload_model_and_resume(algo, hopper_dataset, jax_cache, tmp_path):
    common_args = ["--dataset", hopper_dataset, "--eval-env", "Hopper-v4", "--num-seeds", 2, "--eval-interval", 100,
                   "--eval-episodes", 1, "--rollout-batch-size", 100, "--rollout-freq", 50, "--hidden-dim", 32,
                   "--model-hidden-dim", 32, "--horizon", 2]
    if algo == "combo":
        common_args += ["--num-layers", 2, "--cql-num-actions", 2]
    run1 = tmp_path / "run1"
    run(algo, jax_cache, *common_args, "--num-updates", 100, "--model-epochs", 3, "--log-dir", run1)
    result = json.loads((run1 / "result.json").read_text())
    assert MB_RESULT_KEYS <= set(result)
    assert result["algorithm"] == algo and result["num_updates"] == 100 and result["seeds"] == [0, 1]
    assert len(result["per_seed"]) == 2 and np.isfinite(result["last_return"])
    assert result["phase_times_s"]["model_training"] > 0 and result["phase_times_s"]["policy_training"] > 0
    assert not result["dynamics"]["loaded"] and result["dynamics"]["epochs"] == 3
    assert len(result["dynamics"]["elites"]) == 5 and result["hyperparameters"]["termination"] == "hopper"
    assert (run1 / "dynamics.msgpack").exists() and (run1 / "checkpoint.msgpack").exists()
    assert list(run1.glob("events.out.tfevents.*"))
    act = load_script(algo).load_policy(str(run1 / "checkpoint.msgpack"), seed=1)
    a = act(np.zeros(11, np.float32))
    assert a.shape == (3,) and np.all(np.abs(a) <= 1.0)  # Hopper's action box

    # second run: reuse the dynamics model (no model training) and resume the agent from the checkpoint
    run2 = tmp_path / "run2"
    proc = run(algo, jax_cache, *common_args, "--num-updates", 200, "--model-load", run1 / "dynamics.msgpack",
               "--load", run1 / "checkpoint.msgpack", "--log-dir", run2)
    assert "loaded dynamics model" in proc.stdout and "restored" in proc.stdout
    assert "[dynamics] epoch" not in proc.stdout
    result2 = json.loads((run2 / "result.json").read_text())
    assert result2["dynamics"]["loaded"] and result2["dynamics"]["elites"] == result["dynamics"]["elites"]
    assert result2["num_updates"] == 200 and [h["update"] for h in result2["eval_history"]] == [200]
    assert result2["phase_times_s"]["model_training"] < result["phase_times_s"]["model_training"]
    assert not (run2 / "dynamics.msgpack").exists()

    if algo == "mopo":  # NaN guard (same code in combo): stop with an error, leave the last checkpoint untouched
        ckpt = run1 / "checkpoint.msgpack"
        before = ckpt.read_bytes()
        proc = run_script(algo, *common_args, "--num-updates", 100, "--model-load", run1 / "dynamics.msgpack",
                          "--save-path", ckpt, "--log-dir", tmp_path / "run3", env={**jax_cache, "OFFRL_DEBUG_NAN_AT": "30"})
        assert proc.returncode == 1 and "error: non-finite critic_loss at update 30" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and ckpt.read_bytes() == before

        # --load alone resumes in the checkpoint's folder with its config and the dynamics model its run saved
        proc = run(algo, jax_cache, "--load", ckpt, "--num-updates", 150)
        assert "loaded dynamics model " + str(run1 / "dynamics.msgpack") in proc.stdout and "[dynamics] epoch" not in proc.stdout
        result = json.loads((run1 / "result.json").read_text())
        assert [h["update"] for h in result["eval_history"]] == [100, 150] and result["dynamics"]["loaded"]

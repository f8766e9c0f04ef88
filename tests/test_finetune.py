"""Offline-to-online fine-tuning (--online-steps): the mixed replay buffer, the online envs, the record, and every path."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RESULT_KEYS, load_script, run_script

import common

FINETUNE = ["iql", "awac", "cql", "calql"]
TINY = ["--eval-env", "Pendulum-v1", "--num-seeds", "2", "--eval-episodes", "2", "--hidden-dim", "32", "--batch-size", "64"]


def marked(n: int, value: float) -> dict[str, jnp.ndarray]:
    """n rows whose every field is `value` plus the row index / 1e4 (so a sampled row says where it came from)."""
    tag = value + np.arange(n, dtype=np.float32) / 1e4
    return {"observations": jnp.asarray(np.repeat(tag[:, None], 3, 1)), "actions": jnp.asarray(tag[:, None]),
            "rewards": jnp.asarray(tag), "next_observations": jnp.asarray(np.repeat(tag[:, None], 3, 1)),
            "terminals": jnp.asarray(tag)}


@pytest.mark.parametrize("algo", FINETUNE)
def test_mixing_ratio_holds_in_sampled_batches(algo: str) -> None:
    mod = load_script(algo)
    data, rows = marked(1000, 0.0), marked(50, 1.0)
    rows = jax.tree.map(lambda x: x.at[20:].set(-1.0), rows)  # only 20 of the 50 online rows are filled
    for mix in (0.25, 0.5):
        b = mod.sample_batch(jax.random.PRNGKey(0), data, 256, (rows, jnp.int32(20)), mix)
        r = np.asarray(b["rewards"])
        assert (r < 0.5).sum() == round(mix * 256) and (r >= 1.0).sum() == 256 - round(mix * 256)  # exact shares
        assert (r >= 0).all() and r.max() < 1.0 + 20 / 1e4  # never an unfilled row
        assert np.allclose(b["observations"][:, 0], r) and np.allclose(b["actions"][:, 0], r)  # one row's fields together
    # None: one buffer of 1000 + 20 rows, so about 2% online
    r = np.concatenate([np.asarray(mod.sample_batch(jax.random.PRNGKey(s), data, 256, (rows, jnp.int32(20)), None)["rewards"])
                        for s in range(40)])
    assert (r >= 0).all() and r.max() < 1.0 + 20 / 1e4
    assert 0.01 < (r >= 1.0).mean() < 0.03
    assert np.array_equal(mod.sample_batch(jax.random.PRNGKey(3), data, 64)["rewards"],  # offline: uniform over the data
                          data["rewards"][jax.random.randint(jax.random.PRNGKey(3), (64,), 0, 1000)])


@pytest.mark.parametrize("algo", FINETUNE)
def test_buffer_wraps_over_the_oldest_when_full(algo: str) -> None:
    mod = load_script(algo)
    data = {"rewards": jnp.zeros(7), "observations": jnp.zeros((7, 3))}
    buf = mod.new_buffer(data, num_seeds=2, capacity=5)
    assert buf["rows"]["observations"].shape == (2, 5, 3) and int(buf["count"]) == 0
    for t in range(3):  # 3 calls of K = 2 transitions per seed: the 6th overwrites the 1st
        vals = np.array([[2 * t, 2 * t + 1], [100 + 2 * t, 101 + 2 * t]], np.float32)  # [S, K]
        buf = mod.buffer_insert(buf, {"rewards": jnp.asarray(vals), "observations": jnp.asarray(np.repeat(vals[..., None], 3, -1))})
    assert int(buf["count"]) == 6
    assert np.array_equal(buf["rows"]["rewards"], [[5, 1, 2, 3, 4], [105, 101, 102, 103, 104]])
    assert np.array_equal(buf["rows"]["observations"][..., 0], buf["rows"]["rewards"])


def test_checkpointed_ring_keeps_write_order_when_its_capacity_changes() -> None:
    mod = load_script("iql")
    data = {"rewards": jnp.zeros(7), "observations": jnp.zeros((7, 3))}
    buf = mod.new_buffer(data, num_seeds=2, capacity=4)
    for t in range(6):  # 6 writes of K = 1 into 4 slots: writes 2..5 remain, write 4 at slot 0
        vals = np.array([[t], [10 + t]], np.float32)
        buf = mod.buffer_insert(buf, {"rewards": jnp.asarray(vals), "observations": jnp.asarray(np.repeat(vals[..., None], 3, -1))})
    saved = common.ring_in_order(buf)
    assert saved["count"] == 6 and np.array_equal(saved["rows"]["rewards"], [[2, 3, 4, 5], [12, 13, 14, 15]])
    for capacity, kept in ((4, [2, 3, 4, 5]), (3, [3, 4, 5]), (8, [2, 3, 4, 5])):  # refilled oldest first from slot 0
        ring = common.ring_refill(mod.new_buffer(data, 2, capacity), saved)
        assert int(ring["count"]) == len(kept) and np.array_equal(ring["rows"]["rewards"][0, :len(kept)], kept)
        assert np.array_equal(ring["rows"]["observations"][1, :len(kept), 0], np.add(kept, 10))
        assert not np.any(ring["rows"]["rewards"][:, len(kept):])  # the sampler's [0, count) is exactly what was kept
        ring = mod.buffer_insert(ring, {"rewards": jnp.asarray([[6.0], [16.0]]), "observations": jnp.full((2, 1, 3), 6.0)})
        assert np.array_equal(common.ring_in_order(ring)["rows"]["rewards"][0], (kept + [6])[-capacity:])  # oldest replaced


def test_online_envs_keep_terminal_and_timeout_apart() -> None:
    info = {"eval_env": "Pendulum-v1", "eval_env_kwargs": {}}
    prep = common.Prep(np.zeros(3), np.ones(3), np.array([-2.0]), np.array([2.0]))
    envs = common.OnlineEnvs(info, prep, num_seeds=1, num_envs=2, seed=0)
    for t in range(200):  # Pendulum: no terminals, a 200-step time limit
        before = envs.obs.copy()
        rows = envs.step(np.zeros((1, 2, 1)))
        assert np.array_equal(rows["observations"], before) and rows["terminals"].sum() == 0
        assert envs.ended.all() == (t == 199)
    assert not np.allclose(rows["next_observations"], envs.obs)  # the cut episode's true last state, not the reset one
    assert [len(e) for e in envs.episodes] == [2] and envs.episodes[0][0][1] is None  # no success signal here
    hop = common.OnlineEnvs({"eval_env": "Hopper-v4", "eval_env_kwargs": {}}, common.Prep(np.zeros(11), np.ones(11), -np.ones(3),
                            np.ones(3)), num_seeds=1, num_envs=1, seed=0)
    for _ in range(1000):  # a falling hopper terminates: a real terminal
        rows = hop.step(np.ones((1, 1, 3)))
        if rows["terminals"].any():
            break
    assert rows["terminals"][0, 0] == 1.0 and hop.ended[0, 0] and len(hop.episodes[0]) == 1


def test_online_summary_by_hand() -> None:
    hist = [{"update": u, "returns": r, "normalized": None} for u, r in
            [(50, [0.0, 0.0]), (100, [10.0, 20.0]), (110, [4.0, 30.0]), (120, [8.0, 10.0]), (200, [30.0, 40.0])]]
    s = common.online_summary(hist, handover=100, online_steps=100, episodes=[[(1.0, True), (2.0, False)], [(3.0, False)]])
    assert s["score"] == "returns" and s["online_steps"] == 100
    assert s["per_seed"]["offline"] == [10.0, 20.0] and s["per_seed"]["final"] == [30.0, 40.0]
    assert s["per_seed"]["dip"] == [4.0, 30.0]  # the first 10% of 100 steps: update 110 only
    # trapezoid mean over [100, 200]: seed 0 (7*10 + 6*10 + 19*80) / 100
    assert np.allclose(s["per_seed"]["auc"], [(7 * 10 + 6 * 10 + 19 * 80) / 100, (25 * 10 + 20 * 10 + 25 * 80) / 100])
    assert s["per_seed"]["regret"] == [0.5, 1.0] and s["regret"] == 0.75
    assert common.online_summary(hist, 100, 100, [[], []])["regret"] is None


def test_calql_returns_to_go_by_hand() -> None:
    rtg = load_script("calql").returns_to_go
    # gamma 0.5. Episode 1 (rows 0-2) is cut by a time limit: nothing is bootstrapped after its last row.
    # Episode 2 (rows 3-4) ends in a terminal at the end of the data.
    rewards, terminals = np.array([1.0, 2.0, 4.0, 2.0, 2.0]), np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    assert np.allclose(rtg(rewards, terminals, [3, 5], 0.5), [1 + 0.5 * 4, 2 + 0.5 * 4, 4, 2 + 0.5 * 2, 2])
    # a terminal mid-episode stops the sum there (the rows after it are their own tail)
    assert np.allclose(rtg(np.array([1.0, 1.0, 1.0]), np.array([0.0, 1.0, 0.0]), [3], 0.5), [1.5, 1.0, 1.0])
    # sparse: a failed episode (every reward the failure reward -5) gets r / (1 - gamma) = -10 on every row;
    # a successful one is summed as usual
    r, d = np.array([-5.0, -5.0, -5.0, 5.0]), np.array([0.0, 0.0, 0.0, 1.0])
    assert np.allclose(rtg(r, d, [2, 4], 0.5, -5.0), [-10, -10, -5 + 0.5 * 5, 5])
    assert np.allclose(rtg(r, d, [2, 4], 0.5), [-5 - 2.5, -5, -2.5, 5])  # dense: no special case
    assert rtg(r, d, [2, 4], 0.5).dtype == np.float32


def test_calql_writes_returns_back_into_the_ring() -> None:
    mod = load_script("calql")
    buffer = {"rows": {"mc_returns": jnp.full((2, 4), -jnp.inf)}, "count": jnp.int32(4)}
    slots, values = jnp.array([[1, 3, 4], [0, 4, 4]]), jnp.array([[7.0, 8.0, 9.0], [6.0, 5.0, 5.0]])  # 4: out of range
    mc = np.asarray(mod.write_returns(buffer, slots, values)["rows"]["mc_returns"])
    assert np.array_equal(mc, [[-np.inf, 7, -np.inf, 8], [6, -np.inf, -np.inf, -np.inf]])


def test_calql_calibration_floors_only_below_the_returns() -> None:
    mod = load_script("calql")
    q = jnp.array([[[0.0, 5.0]], [[-3.0, 1.0]]])  # [2 critics, batch 1, 2 samples]
    floored, rate = mod.calibrate(q, jnp.array([0.5]))
    assert np.array_equal(floored, [[[0.5, 5.0]], [[0.5, 1.0]]]) and float(rate) == 0.5
    assert np.array_equal(mod.calibrate(q, jnp.array([-jnp.inf]))[0], q)  # -inf: an online row not yet ended, no floor


@pytest.mark.parametrize("algo", FINETUNE)
def test_fine_tune_from_a_checkpoint(algo: str, tiny_dataset, tmp_path) -> None:
    """A few hundred offline updates, a checkpoint reload, then a few hundred online steps on Pendulum."""
    off, ft = tmp_path / "offline", tmp_path / "finetune"
    proc = run_script(algo, "--dataset", tiny_dataset, *TINY, "--num-updates", "200", "--eval-interval", "100", "--log-dir", off)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(algo, "--load", off / "checkpoint.msgpack", "--online-steps", "400", "--num-envs", "2",
                      "--eval-interval", "100", "--log-dir", ft)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ft / "result.json").read_text())
    assert RESULT_KEYS <= set(result) and result["num_updates"] == 600 and result["interrupted"] is False
    assert [h["update"] for h in result["eval_history"]] == [200, 300, 400, 500, 600]  # hand-over, then online
    online = result["online"]
    assert online["online_steps"] == 400 and online["score"] == "returns" and online["regret"] is None
    assert online["per_seed"]["offline"] == result["eval_history"][0]["returns"]
    assert online["per_seed"]["final"] == result["eval_history"][-1]["returns"]
    assert online["per_seed"]["dip"] == result["eval_history"][1]["returns"]  # 10% of 400 < 100: the first online eval
    assert online["episodes"] == [2, 2]  # per seed 400 env steps = 200 in each of its 2 envs = one 200-step episode each
    assert "(online)" in proc.stdout or "update 600/600" in proc.stdout
    ckpt = common.read_checkpoint(ft / "checkpoint.msgpack", algo)
    assert ckpt["step"] == 600 and load_script(algo).load_policy(str(ft / "checkpoint.msgpack"))(np.zeros(3)).shape == (1,)
    assert ckpt["buffer"]["count"] == 400 and ckpt["buffer"]["rows"]["rewards"].shape == (2, 400)  # 2 seeds' online rows

    # resuming the fine-tune (to 600 online steps) refills the buffer and keeps the online episodes' record
    proc = run_script(algo, "--load", ft / "checkpoint.msgpack", "--online-steps", "600")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restored the online buffer: the last 400 of 400 online transitions per seed" in proc.stdout
    result = json.loads((ft / "result.json").read_text())
    assert result["num_updates"] == 800 and [h["update"] for h in result["eval_history"]][-3:] == [600, 700, 800]
    assert result["online"]["online_steps"] == 600 and result["online"]["episodes"] == [2, 2]  # the new ones: cut at 100 steps
    assert common.read_checkpoint(ft / "checkpoint.msgpack", algo)["buffer"]["count"] == 600


def test_online_flags_must_divide(tiny_dataset) -> None:
    proc = run_script("iql", "--dataset", tiny_dataset, *TINY, "--num-updates", "100", "--online-steps", "101", "--num-envs", "2")
    assert proc.returncode == 1 and "multiples of --num-envs" in proc.stderr and "Traceback" not in proc.stderr

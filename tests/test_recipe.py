"""SAC behaviour policies and the D4RL-recipe dataset builder."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common
from recipe import __main__ as cli
from recipe import build


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory) -> Path:
    """A tiny SAC run on Hopper-v4: 600 steps, snapshots and a checkpoint every 300, then a resume with 3 envs."""
    d = tmp_path_factory.mktemp("sac")
    base = [sys.executable, str(ROOT / "algorithms" / "sac.py"), "--env", "Hopper-v4", "--learning-starts", "200",
            "--snapshot-interval", "300", "--checkpoint-interval", "300", "--eval-episodes", "1", "--batch-size", "64",
            "--hidden-dim", "32", "--log-dir", str(d)]
    subprocess.run([*base, "--total-steps", "600"], check=True, capture_output=True, timeout=300)
    # the resumed part steps 3 envs in lockstep (3 transitions and 3 updates per device call)
    r = subprocess.run([*base, "--total-steps", "900", "--num-envs", "3", "--load", str(d / "checkpoint.msgpack")],
                       check=True, capture_output=True, text=True, timeout=300)
    assert "resumed from" in r.stdout and "at step 600" in r.stdout
    return d


def test_sac_runs_snapshots_and_resumes(sac_run):
    snaps = [json.loads(s) for s in (sac_run / "snapshots.jsonl").read_text().splitlines()]
    assert [s["step"] for s in snaps] == [300, 600, 900]
    assert all(np.isfinite(s["return_stochastic"]) for s in snaps)
    with np.load(sac_run / "checkpoint.buffer.npz") as z:
        assert len(z["rewards"]) == 900 and z["qpos"].shape == (900, 6)
        np.testing.assert_array_equal(z["env_index"][600:606], [0, 1, 2, 0, 1, 2])
    assert not list(sac_run.glob("*.tmp"))


@pytest.fixture
def shipped(sac_run, tmp_path, monkeypatch) -> Path:
    """Export the tiny run as if it were shipped: policies/ and data/ in a temp folder."""
    monkeypatch.setattr(build, "POLICY_DIR", tmp_path / "policies")
    monkeypatch.setattr(build, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(build, "MANIFEST", tmp_path / "manifest.json")
    cli.cmd_export(argparse.Namespace(run=str(sac_run), env="hopper", expert_step=0, medium_step=0, medium_fraction=1 / 3,
                                  out_dir=None))
    return tmp_path


def test_export_and_build_valid_d4rl_file(shipped, tmp_path):
    assert build.available("hopper", "medium") and build.available("hopper", "medium-replay")
    assert not build.available("walker2d", "medium")
    out = build.build_dataset("hopper-medium", tmp_path / "hm.hdf5", n=2000, seed=0, progress=False)
    with h5py.File(out) as f:
        for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts",
                  "infos/qpos", "infos/qvel", "infos/action_log_probs", "metadata/env_id", "metadata/sha256",
                  "metadata/algorithm", "metadata/policy_medium", "metadata/builder_version", "metadata/seed"):
            assert k in f, k
        assert f["infos/qpos"].shape == (2000, 6)
        assert np.isfinite(f["infos/action_log_probs"][()]).all()
    data, info = common.load_dataset(str(out))
    assert info["source_kind"] == "recipe" and info["eval_env"] == "Hopper-v4"
    assert len(data["rewards"]) == 2000
    # every stream's last episode is cut off and flagged as a timeout; no transition crosses episodes
    assert data["timeouts"].sum() >= 1
    inner = np.setdiff1d(np.arange(1999), info["episode_ends"] - 1)
    np.testing.assert_array_equal(data["next_observations"][inner], data["observations"][inner + 1])
    # medium-replay comes from the shipped replay data, up to the medium snapshot's step
    mr = build.build_dataset("hopper-medium-replay", tmp_path / "mr.hdf5", progress=False)
    d2, i2 = common.load_dataset(str(mr))
    medium_step = json.loads(str(np.load(build.policy_path("hopper", "medium"))["meta"]))["step"]
    assert len(d2["rewards"]) == medium_step
    assert d2["timeouts"][-1] + d2["terminals"][-1] == 1


def test_same_seed_same_hash(shipped):
    a, _ = build.build_arrays("hopper-medium-expert", n=1000, seed=3, progress=False)
    b, _ = build.build_arrays("hopper-medium-expert", n=1000, seed=3, progress=False)
    c, _ = build.build_arrays("hopper-medium-expert", n=1000, seed=4, progress=False)
    assert len(a["rewards"]) == 2000
    assert build.array_hash(a) == build.array_hash(b) != build.array_hash(c)


def test_random_kind_needs_no_policy_and_first_use_builds(tmp_path, monkeypatch):
    for var, sub in (("D4RL_DATASET_DIR", "d4rl"), ("MINARI_DATASETS_PATH", "minari"), ("OFFRL_DATA_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(build, "NUM_TRANSITIONS", 1500)
    data, info = common.load_dataset("walker2d-random")
    assert info["source_kind"] == "recipe" and str(tmp_path / "cache") in info["source"]
    assert info["task"] == "walker2d-random"
    assert info["dataset"] == "walker2d-random-recipe"  # never called -v2: that name is D4RL's
    assert len(data["rewards"]) == 1500
    with h5py.File(common.recipe_path("walker2d", "random")) as f:  # results record exactly which data they used
        assert info["dataset_sha256"] == f["metadata/sha256"][()].decode() and len(info["dataset_sha256"]) == 64
    # the second load reads the cached file, byte for byte the same data
    data2, _ = common.load_dataset("walker2d-random")
    np.testing.assert_array_equal(data["observations"], data2["observations"])


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    for var, sub in (("D4RL_DATASET_DIR", "d4rl"), ("MINARI_DATASETS_PATH", "minari"), ("OFFRL_DATA_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    real_write = h5py.File.create_dataset
    calls = {"n": 0}

    def dying(self, name, *a, **kw):  # the process "dies" halfway through writing the file
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_write(self, name, *a, **kw)

    monkeypatch.setattr(build, "NUM_TRANSITIONS", 500)
    monkeypatch.setattr(h5py.Group, "create_dataset", dying)
    with pytest.raises(KeyboardInterrupt):
        common.load_dataset("hopper-random")
    assert not list((tmp_path / "cache").glob("*")), "an interrupted build left a file behind"
    monkeypatch.setattr(h5py.Group, "create_dataset", real_write)
    with pytest.raises(common.DatasetError, match="not found"):
        common.load_dataset("hopper-random", build=False)


def test_unbuildable_name_says_why(tmp_path, monkeypatch):
    for var, sub in (("D4RL_DATASET_DIR", "d4rl"), ("MINARI_DATASETS_PATH", "minari"), ("OFFRL_DATA_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(build, "POLICY_DIR", tmp_path / "nothing")
    with pytest.raises(common.DatasetError, match="no shipped behaviour policy for ant-expert"):
        common.load_dataset("ant-expert")


def test_cli_build(tmp_path):
    out = tmp_path / "r.hdf5"
    r = subprocess.run([sys.executable, "-m", "recipe", "build", "hopper-random", "--out", str(out), "--num-transitions", "300"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "built hopper-random: 300 transitions" in r.stdout
    r = subprocess.run([sys.executable, "-m", "recipe", "build", "hoper-random"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown dataset name" in r.stderr


def test_build_record_writes_the_manifest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "MANIFEST", tmp_path / "manifest.json")
    out = tmp_path / "r.hdf5"
    args = argparse.Namespace(name="hopper-random", out=str(out), num_transitions=300, seed=2, force=False, record=True)
    cli.cmd_build(args)
    entry = json.loads(build.MANIFEST.read_text())["hopper-random"]
    with h5py.File(out) as f:
        assert entry["sha256"] == f["metadata/sha256"][()].decode()
    assert entry["transitions"] == 300 and entry["seed"] == 2 and entry["num_transitions_arg"] == 300
    # the recorded hash is the one the next build of the same name/size/seed is checked against
    assert build.expected_hash("hopper-random", 300, 2) == entry["sha256"]
    cli.cmd_build(args)  # up to date: not rebuilt
    assert "exists" in capsys.readouterr().out
    assert entry["inputs_sha256"] == build.inputs_sha256("hopper", "random")


def test_medium_expert_is_medium_then_expert(shipped, tmp_path):
    """As in D4RL, medium-expert is the concatenation; cached parts are reused byte for byte."""
    m = build.build_dataset("hopper-medium", tmp_path / "hopper-medium-recipe.hdf5", n=400, progress=False)
    e = build.build_dataset("hopper-expert", tmp_path / "hopper-expert-recipe.hdf5", n=400, progress=False)
    fresh, _ = build.build_arrays("hopper-medium-expert", n=400, progress=False)
    reused, _ = build.build_arrays("hopper-medium-expert", n=400, progress=False, reuse_dir=tmp_path)
    assert build.array_hash(fresh) == build.array_hash(reused)
    with h5py.File(m) as fm, h5py.File(e) as fe:
        np.testing.assert_array_equal(fresh["observations"], np.concatenate([fm["observations"][()], fe["observations"][()]]))


def test_cache_built_from_other_policies_is_rebuilt(shipped, tmp_path, monkeypatch, capsys):
    """A cached dataset records the hash of the policy it came from; a new shipped policy makes it stale."""
    for var, sub in (("D4RL_DATASET_DIR", "d4rl"), ("MINARI_DATASETS_PATH", "minari"), ("OFFRL_DATA_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(build, "NUM_TRANSITIONS", 400)
    old, _ = common.load_dataset("hopper-medium")
    cached = common.recipe_path("hopper", "medium")
    assert not build.is_stale(cached, "hopper", "medium")
    again, _ = common.load_dataset("hopper-medium")  # same policy: the cache is read, not rebuilt
    assert "rebuilding" not in capsys.readouterr().out
    np.testing.assert_array_equal(old["actions"], again["actions"])
    # a new medium policy is shipped (e.g. from a longer SAC run)
    pol = build.policy_path("hopper", "medium")
    with np.load(pol) as z:
        w = {k: z[k] for k in z.files}
    w["mean/bias"] = w["mean/bias"] + 0.5
    np.savez(pol, **w)
    assert build.is_stale(cached, "hopper", "medium")
    # medium-expert must not reuse the stale medium part from the cache folder
    assert build._cached_part(cached.parent, "hopper", "medium", 400, 0) is None
    new, info = common.load_dataset("hopper-medium")
    assert "was built from other behaviour policies" in capsys.readouterr().out
    assert not build.is_stale(cached, "hopper", "medium") and info["source_kind"] == "recipe"
    assert not np.array_equal(old["actions"], new["actions"])
    assert build._cached_part(cached.parent, "hopper", "medium", 400, 0) is not None


# ---- Shipped replay data: the xor-v1 encoding and the export of vectorized SAC buffers ----
def fake_stream(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n made-up Hopper-like transitions in episodes: obs = qpos[1:] ++ clip(qvel, +-10), next_obs[i] = obs[i+1] inside one."""
    qpos = rng.standard_normal((n + 1, 6)).astype(np.float32)
    qvel = (rng.standard_normal((n + 1, 6)) * 8).astype(np.float32)  # some beyond +-10: clipped in obs
    qpos[::7, 2] = -0.0
    states = np.concatenate([qpos[:, 1:], np.clip(qvel, -10, 10)], 1)
    qpos[::11, 4] = -0.0  # and where the observation holds another value
    ends = np.sort(rng.choice(np.arange(1, n), 4, replace=False))  # exclusive episode ends
    nxt = states[1:].copy()
    nxt[ends - 1] = rng.standard_normal((4, 11))  # the episode's final state; the next one starts from a reset
    flags = np.zeros((2, n), np.float32)
    flags[np.arange(4) % 2, ends - 1] = 1.0  # alternately terminal and timeout
    return {"observations": states[:-1], "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
            "rewards": rng.standard_normal(n).astype(np.float32), "next_observations": nxt, "terminals": flags[0],
            "timeouts": flags[1], "qpos": qpos[:-1], "qvel": qvel[:-1], "logp": rng.standard_normal(n).astype(np.float32)}


def test_replay_encoding_is_exact_and_compact(tmp_path):
    arrays = fake_stream(np.random.default_rng(0), 3000)
    assert (np.abs(arrays["qvel"]) > 10).any() and np.signbit(arrays["qpos"][::7, 2]).all()
    build.write_replay(tmp_path / "r.hdf5", arrays, {"source": build.SOURCE})
    back, meta = build.read_replay(tmp_path / "r.hdf5")
    assert set(back) == set(arrays) and meta["sha256"] == build.array_hash(arrays) == build.array_hash(back)
    for k in arrays:  # bit for bit, -0.0 included
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k].view(np.int32), arrays[k].view(np.int32))
    np.testing.assert_array_equal(meta["qpos_obs_col"], [-1, 0, 1, 2, 3, 4])  # qpos[0] (x) is not observed
    np.testing.assert_array_equal(meta["qvel_obs_col"], np.arange(5, 11))
    with h5py.File(tmp_path / "r.hdf5") as f:
        assert "observations" not in f, "a plain D4RL reader must not mistake the encoded arrays for the data"
        assert np.count_nonzero(f["encoded/next_observations"][()].any(1)) <= 5  # the 4 episode ends and the last row
    # a plain D4RL-layout file (as shipped before the encoding) reads the same
    build.write_d4rl(tmp_path / "plain.hdf5", arrays, {"sha256": build.array_hash(arrays)}, compression="gzip")
    assert build.array_hash(build.read_replay(tmp_path / "plain.hdf5")[0]) == build.array_hash(arrays)
    # flags other than 0/1 would not survive the uint8 flags: refused, nothing written
    with pytest.raises(ValueError, match="exactly"):
        build.write_replay(tmp_path / "bad.hdf5", {**arrays, "terminals": arrays["terminals"] * 0.5}, {})
    assert not (tmp_path / "bad.hdf5").exists()


def test_corrupt_replay_file_is_refused(tmp_path):
    path = tmp_path / "r.hdf5"
    build.write_replay(path, fake_stream(np.random.default_rng(1), 500), {})
    with h5py.File(path, "r+") as f:
        f["encoded/rewards"][7] += 1.0
    with pytest.raises(ValueError, match=r"r\.hdf5: the data's sha256 .* the file is corrupt"):
        build.read_replay(path)
    path.write_bytes(path.read_bytes()[:2000])  # truncated
    with pytest.raises(ValueError, match="truncated or corrupt"):
        build.read_replay(path)


def test_shipped_medium_replay_decodes_to_the_manifest_hash():
    if not build.available("hopper", "medium-replay"):
        pytest.skip("hopper medium-replay data is not shipped in this checkout")
    arrays, meta = build.build_arrays("hopper-medium-replay", progress=False)
    assert build.array_hash(arrays) == json.loads(build.MANIFEST.read_text())["hopper-medium-replay"]["sha256"]
    assert len(arrays["rewards"]) == int(meta["policy_step"])


def test_export_vectorized_buffer_gives_contiguous_episodes(tmp_path, monkeypatch):
    """sac.py with K envs appends K rows per iteration; export makes each env's rows one block in time order."""
    k, n, medium_step = 3, 100, 150  # the buffer holds n iterations; medium-replay keeps the first 50 of each env
    rng = np.random.default_rng(2)
    streams = [fake_stream(rng, n) for _ in range(k)]
    buffer = {key: np.stack([s[key] for s in streams], 1).reshape(n * k, *streams[0][key].shape[1:]) for key in streams[0]}
    buffer["action_log_probs"] = buffer.pop("logp")
    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    np.savez(run / "checkpoint.buffer.npz", env_index=np.tile(np.arange(k, dtype=np.float32), n), **buffer)
    (run / "config.json").write_text(json.dumps({"env": "Hopper-v4", "seed": 0, "num_envs": k}))
    snaps = [{"step": s, "file": f"actor_{s}.npz", "return_stochastic": float(s), "return_deterministic": float(s),
              "wall_time_s": 1.0} for s in (medium_step, n * k)]
    (run / "snapshots.jsonl").write_text("".join(json.dumps(s) + "\n" for s in snaps))
    for s in snaps:
        np.savez(run / "snapshots" / s["file"], w=np.zeros(2, np.float32))
    ship = tmp_path / "ship"
    cli.cmd_export(argparse.Namespace(run=str(run), env="hopper", expert_step=0, medium_step=medium_step, medium_fraction=1 / 3,
                                      out_dir=str(ship)))
    assert (ship / "policies" / "hopper-medium.npz").exists() and (ship / "policies" / "hopper-expert.npz").exists()
    monkeypatch.setattr(build, "DATA_DIR", ship / "data")
    monkeypatch.setattr(build, "MANIFEST", tmp_path / "manifest.json")
    out = build.build_dataset("hopper-medium-replay", tmp_path / "mr.hdf5", progress=False)
    with h5py.File(out) as f:
        assert f["metadata/num_envs"][()] == b"3"
    data, info = common.load_dataset(str(out))
    m = medium_step // k
    np.testing.assert_array_equal(data["observations"], np.concatenate([s["observations"][:m] for s in streams]))
    # each env's episodes, its last one cut off at the medium step (flagged as a timeout)
    want = [r.sum() for s in streams for r in np.split(s["rewards"][:m], [e for e in np.flatnonzero(s["terminals"] + s["timeouts"]) + 1 if e < m])]
    np.testing.assert_allclose(common.episode_returns(data, info), want, rtol=1e-5)
    assert (data["timeouts"] + data["terminals"])[np.arange(1, k + 1) * m - 1].all()

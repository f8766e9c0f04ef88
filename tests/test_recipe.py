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
    """A tiny SAC run on Hopper-v4: 600 steps, snapshots and a checkpoint every 300, then a resume."""
    d = tmp_path_factory.mktemp("sac")
    base = [sys.executable, str(ROOT / "algorithms" / "sac.py"), "--env", "Hopper-v4", "--learning-starts", "200",
            "--snapshot-interval", "300", "--checkpoint-interval", "300", "--eval-episodes", "1", "--batch-size", "64",
            "--hidden-dim", "32", "--log-dir", str(d)]
    subprocess.run([*base, "--total-steps", "600"], check=True, capture_output=True, timeout=300)
    r = subprocess.run([*base, "--total-steps", "900", "--load", str(d / "checkpoint.msgpack")],
                       check=True, capture_output=True, text=True, timeout=300)
    assert "resumed from" in r.stdout and "at step 600" in r.stdout
    return d


def test_sac_runs_snapshots_and_resumes(sac_run):
    snaps = [json.loads(s) for s in (sac_run / "snapshots.jsonl").read_text().splitlines()]
    assert [s["step"] for s in snaps] == [300, 600, 900]
    assert all(np.isfinite(s["return_stochastic"]) for s in snaps)
    with np.load(sac_run / "checkpoint.buffer.npz") as z:
        assert len(z["rewards"]) == 900 and z["qpos"].shape == (900, 6)
    assert not list(sac_run.glob("*.tmp"))


@pytest.fixture
def shipped(sac_run, tmp_path, monkeypatch) -> Path:
    """Export the tiny run as if it were shipped: policies/ and data/ in a temp folder."""
    monkeypatch.setattr(build, "POLICY_DIR", tmp_path / "policies")
    monkeypatch.setattr(build, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(build, "MANIFEST", tmp_path / "manifest.json")
    cli.cmd_export(argparse.Namespace(run=str(sac_run), env="hopper", expert_step=0, medium_step=0, medium_fraction=1 / 3))
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


def test_medium_expert_is_medium_then_expert(shipped, tmp_path):
    """As in D4RL, medium-expert is the concatenation; cached parts are reused byte for byte."""
    m = build.build_dataset("hopper-medium", tmp_path / "hopper-medium-recipe.hdf5", n=400, progress=False)
    e = build.build_dataset("hopper-expert", tmp_path / "hopper-expert-recipe.hdf5", n=400, progress=False)
    fresh, _ = build.build_arrays("hopper-medium-expert", n=400, progress=False)
    reused, _ = build.build_arrays("hopper-medium-expert", n=400, progress=False, reuse_dir=tmp_path)
    assert build.array_hash(fresh) == build.array_hash(reused)
    with h5py.File(m) as fm, h5py.File(e) as fe:
        np.testing.assert_array_equal(fresh["observations"], np.concatenate([fm["observations"][()], fe["observations"][()]]))

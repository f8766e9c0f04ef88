"""The dataset layer: D4RL-layout files, Minari folders, names, scores and every error path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_d4rl as write_arrays

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def write_d4rl(path: Path, episodes: list[tuple[int, str]], obs_dim: int = 11, act_dim: int = 3,
               dtype=np.float32, next_obs: bool = True, drop: tuple[str, ...] = ()) -> dict:
    """Write a D4RL-layout file. Each episode is (length, end) with end in terminal/timeout/cut.

    Observation rows hold (episode, t) so that pairing mistakes are visible.
    """
    rows: dict[str, list] = {k: [] for k in common.KEYS}
    for e, (length, end) in enumerate(episodes):
        for t in range(length):
            o = np.full(obs_dim, e * 1000 + t, dtype)
            rows["observations"].append(o)
            rows["next_observations"].append(o + 1)  # true next state, also at a timeout
            rows["actions"].append(np.full(act_dim, 0.1 * t, dtype))
            rows["rewards"].append(dtype(1.0 + e))
            last = t == length - 1
            rows["terminals"].append(last and end == "terminal")
            rows["timeouts"].append(last and end == "timeout")
    arrays = {k: np.asarray(v) for k, v in rows.items()}
    arrays["rewards"] = arrays["rewards"].astype(dtype)
    write_arrays(path, {k: v for k, v in arrays.items() if k not in drop and (next_obs or k != "next_observations")})
    return arrays


@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """Point every dataset source at empty folders."""
    for var, sub in (("D4RL_DATASET_DIR", "d4rl"), ("MINARI_DATASETS_PATH", "minari"), ("OFFRL_DATA_DIR", "recipe")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def test_d4rl_file_terminals_timeouts_and_cut_episode(tmp_path):
    raw = write_d4rl(tmp_path / "x.hdf5", [(5, "terminal"), (4, "timeout"), (3, "cut")])
    data, info = common.load_dataset(str(tmp_path / "x.hdf5"), eval_env="Hopper-v4")
    assert set(data) == set(common.KEYS)
    assert all(v.dtype == np.float32 for v in data.values())
    assert len(data["observations"]) == 12
    np.testing.assert_array_equal(data["terminals"], raw["terminals"].astype(np.float32))
    np.testing.assert_array_equal(data["timeouts"], raw["timeouts"].astype(np.float32))
    # at a timeout the next observation is the stored true one, not the next episode's first
    np.testing.assert_array_equal(data["next_observations"][8], np.full(11, 1004.0))
    np.testing.assert_array_equal(info["episode_ends"], [5, 9, 12])
    np.testing.assert_allclose(common.episode_returns(data, info), [5.0, 8.0, 9.0])
    assert info["source_kind"] == "file" and info["eval_env"] == "Hopper-v4"
    assert info["ref_min_score"] == common.REF_RETURNS["hopper"][0]


def test_float64_becomes_float32(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", [(6, "timeout")], dtype=np.float64)
    data, _ = common.load_dataset(str(tmp_path / "x.hdf5"), eval_env="Hopper-v4")
    assert all(v.dtype == np.float32 for v in data.values())


def test_file_without_next_observations_never_crosses_episodes(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", [(5, "terminal"), (4, "timeout"), (3, "cut")], next_obs=False)
    data, info = common.load_dataset(str(tmp_path / "x.hdf5"), eval_env="Hopper-v4")
    # the timeout row (true next state unknown) and the last row of the cut-off episode are dropped
    assert len(data["observations"]) == 10
    ep = data["observations"][:, 0] // 1000
    nxt = data["next_observations"][:, 0] // 1000
    assert (ep == nxt).all(), "a transition pairs two episodes"
    assert data["timeouts"].sum() == 0 and data["terminals"].sum() == 1
    np.testing.assert_array_equal(info["episode_ends"], [5, 8, 10])


def test_boundary_without_flags_is_detected(tmp_path):
    """Some files flag no timeout; an episode still ends where next row != next_observations."""
    path = tmp_path / "x.hdf5"
    write_d4rl(path, [(4, "cut"), (4, "cut")])
    _, info = common.load_dataset(str(path), eval_env="Hopper-v4")
    np.testing.assert_array_equal(info["episode_ends"], [4, 8])


def test_minari_round_trip(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    import gymnasium as gym

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "none"))
    env = minari.DataCollector(gym.make("Hopper-v4"))
    env.reset(seed=0)
    steps = 0
    while steps < 300:
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        steps += 1
        if term or trunc:
            env.reset()
    env.create_dataset(dataset_id="mujoco/hopper/medium-v0", algorithm_name="random")
    data, info = common.load_dataset("hopper-medium")
    assert info["source_kind"] == "minari" and "minari" in info["source"]
    assert len(data["observations"]) == 300 and data["observations"].shape[1] == 11
    assert info["episode_ends"][-1] == 300
    assert data["terminals"].sum() == len(info["episode_ends"]) - (0 if data["terminals"][-1] else 1)
    # inside an episode, the next observation is the following row's observation
    inner = np.setdiff1d(np.arange(299), info["episode_ends"] - 1)
    np.testing.assert_array_equal(data["next_observations"][inner], data["observations"][inner + 1])
    assert info["eval_env_spec"] and info["eval_env"] == "Hopper-v4"  # the recorded env spec is used
    venv = common.make_eval_env(info, 2)
    assert venv.num_envs == 2 and venv.reset(seed=0)[0].shape == (2, 11)
    # a Minari folder path works too, with the env spec it recorded
    data2, info2 = common.load_dataset(str(tmp_path / "minari" / "mujoco" / "hopper" / "medium-v0"))
    assert info2["eval_env"] == "Hopper-v4" and len(data2["rewards"]) == 300


def test_d4rl_source_by_name_and_forcing(no_sources):
    (no_sources / "d4rl").mkdir()
    write_d4rl(no_sources / "d4rl" / "hopper_medium_replay-v2.hdf5", [(10, "timeout")])
    data, info = common.load_dataset("hopper-medium-replay-v2")
    assert info["source_kind"] == "d4rl" and info["dataset"] == "hopper-medium-replay-v2"
    assert info["eval_env"] == "Hopper-v4"
    with pytest.raises(common.DatasetError, match="not found"):
        common.load_dataset("hopper-medium-replay", source="minari")


def test_normalized_score():
    lo, hi = common.REF_RETURNS["hopper"]
    assert common.normalized_score("hopper-medium", lo) == pytest.approx(0.0)
    assert common.normalized_score("hopper-medium-v2", hi) == pytest.approx(100.0)
    np.testing.assert_allclose(common.normalized_score("walker2d-expert", [1.629008, 4592.3]), [0.0, 100.0])
    assert common.normalized_score("halfcheetah-random", 5927.4105235) == pytest.approx(50.0)
    assert common.normalized_score({"ref_min_score": None, "ref_max_score": None}, 3.0) is None


def test_state_stats():
    obs = np.array([[0.0, 1.0], [2.0, 1.0]], np.float32)
    mean, std = common.state_stats(obs)
    np.testing.assert_allclose(mean, [1.0, 1.0])
    np.testing.assert_allclose(std, [1.001, 0.001])


def test_eval_env_and_evaluate(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", [(5, "terminal")])
    _, info = common.load_dataset(str(tmp_path / "x.hdf5"), eval_env="Hopper-v4")
    env = common.make_eval_env(info, 3, seed=0)
    returns = common.evaluate(env, lambda o: np.zeros((len(o), 3)), seed=0)
    assert returns.shape == (3,) and np.isfinite(returns).all()
    again = common.evaluate(env, lambda o: np.zeros((len(o), 3)), seed=0)
    np.testing.assert_allclose(returns, again)


# ---- Error paths ----
def test_unknown_name_says_did_you_mean():
    with pytest.raises(common.DatasetError, match="did you mean 'hopper-medium'") as e:
        common.load_dataset("hoper-medium")
    assert "hopper/halfcheetah/walker2d/ant" in str(e.value) and "medium-replay" in str(e.value)
    with pytest.raises(common.DatasetError, match="unknown dataset name 'hopper-mediocre' \\(did you mean"):
        common.load_dataset("hopper-mediocre")
    with pytest.raises(common.DatasetError, match="unknown dataset name 'xyz'\\. Names are"):
        common.load_dataset("xyz")


def test_name_that_cannot_be_built_says_why(no_sources):
    with pytest.raises(common.DatasetError, match="no shipped behaviour policy for ant-medium.*cannot be built"):
        common.load_dataset("ant-medium")


def test_unsupported_format_and_corrupt_hdf5(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(common.DatasetError, match=r"unsupported dataset format '\.csv'.*HDF5.*Minari"):
        common.load_dataset(str(tmp_path / "x.csv"), eval_env="Hopper-v4")


def test_minari_id(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(common.DatasetError, match="Minari dataset 'mujoco/hopper/simple-v0' is not installed.*minari download"):
        common.load_dataset("mujoco/hopper/simple-v0")
    (tmp_path / "mujoco" / "hopper" / "simple-v0").mkdir(parents=True)  # found through the id: read as a Minari folder
    with pytest.raises(common.DatasetError, match="not a Minari dataset folder"):
        common.load_dataset("mujoco/hopper/simple-v0")


def test_file_records_its_env(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", [(5, "terminal")])
    with h5py.File(tmp_path / "x.hdf5", "a") as f:
        f["metadata/env_id"] = "Hopper-v4"
    assert common.load_dataset(str(tmp_path / "x.hdf5"))[1]["eval_env"] == "Hopper-v4"


def test_unknown_source():
    with pytest.raises(common.DatasetError, match="valid: auto, d4rl, minari, recipe"):
        common.load_dataset("hopper-medium", source="hf")


def test_missing_dataset_says_where_it_looked(no_sources):
    with pytest.raises(common.DatasetError) as e:
        common.load_dataset("walker2d-medium", build=False)
    msg = str(e.value)
    for where in ("walker2d_medium-v2.hdf5", "mujoco/walker2d/medium-v0", "walker2d-medium-recipe.hdf5", "python -m recipe build"):
        assert where in msg


def test_missing_path():
    with pytest.raises(common.DatasetError, match="does not exist"):
        common.load_dataset("/nonexistent/x.hdf5", eval_env="Hopper-v4")


def test_path_without_eval_env(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", [(5, "terminal")])
    with pytest.raises(common.DatasetError, match="--eval-env"):
        common.load_dataset(str(tmp_path / "x.hdf5"))


def test_missing_keys(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", [(5, "terminal")], drop=("actions",))
    with pytest.raises(common.DatasetError, match=r"missing keys \['actions'\]"):
        common.load_dataset(str(tmp_path / "x.hdf5"), eval_env="Hopper-v4")


def test_mismatched_lengths(tmp_path):
    path = tmp_path / "x.hdf5"
    write_d4rl(path, [(5, "terminal")])
    with h5py.File(path, "a") as f:
        del f["rewards"]
        f["rewards"] = np.zeros(4, np.float32)
    with pytest.raises(common.DatasetError, match="'rewards' has 4 rows but 'observations' has 5"):
        common.load_dataset(str(path), eval_env="Hopper-v4")


def test_nans(tmp_path):
    path = tmp_path / "x.hdf5"
    write_d4rl(path, [(5, "terminal")])
    with h5py.File(path, "a") as f:
        f["observations"][3, 2] = np.nan
    with pytest.raises(common.DatasetError, match="'observations' holds NaN/Inf in 1 rows \\(first at row 3\\)"):
        common.load_dataset(str(path), eval_env="Hopper-v4")


def test_corrupt_file(tmp_path):
    path = tmp_path / "x.hdf5"
    path.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(common.DatasetError, match="cannot read as HDF5"):
        common.load_dataset(str(path), eval_env="Hopper-v4")


def test_not_a_minari_folder(tmp_path):
    with pytest.raises(common.DatasetError, match="not a Minari dataset folder"):
        common.load_dataset(str(tmp_path), eval_env="Hopper-v4")


def test_eval_env_size_mismatch(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", [(5, "terminal")], obs_dim=7)
    _, info = common.load_dataset(str(tmp_path / "x.hdf5"), eval_env="Hopper-v4")
    with pytest.raises(common.DatasetError, match=r"observation shape \(11,\).*\(7,\)"):
        common.make_eval_env(info, 1)


def test_unknown_eval_env(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", [(5, "terminal")])
    _, info = common.load_dataset(str(tmp_path / "x.hdf5"), eval_env="Hoppr-v9")
    with pytest.raises(common.DatasetError, match="unknown gymnasium env 'Hoppr-v9'"):
        common.make_eval_env(info, 1)


def test_reference_constants_match_shared_file():
    """The copy in common.py must match the reference CSV (skipped where shared/ is absent)."""
    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "d4rl_reference_returns.csv"
    if not ref.exists():
        pytest.skip("no ../shared/reference here")
    for line in ref.read_text().splitlines()[1:]:
        env, lo, hi = line.split(",")
        assert common.REF_RETURNS[env] == (float(lo), float(hi))
    json.dumps(common.REF_RETURNS)

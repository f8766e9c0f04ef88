"""The shared layer of every algorithm: load a dataset, normalize, score, make the eval env.

    data, info = load_dataset("hopper-medium")          # by name
    data, info = load_dataset("my.hdf5", eval_env="Hopper-v4")   # any D4RL-layout file

`data` is a dict of float32 arrays: observations, actions, rewards, next_observations,
terminals (true termination: no bootstrap) and timeouts (time limit: bootstrap), the last
two as 0/1. `info` says where the data came from (`source`, `source_kind`), the gymnasium
env to evaluate in, the D4RL reference returns, and the episode boundaries.

Sources of a name, in order (force one with `source=`):
  1. d4rl:   a D4RL HDF5 file, $D4RL_DATASET_DIR or ~/.d4rl/datasets/<env>_<kind>-v2.hdf5
  2. minari: mujoco/<env>/<kind>-v0 under $MINARI_DATASETS_PATH or ~/.minari/datasets
  3. recipe: this project's own D4RL-recipe dataset (NOT the D4RL dataset), built from the
             behaviour policies in recipe/ into $OFFRL_DATA_DIR (default ~/.cache/offrl)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

ENVS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4", "ant": "Ant-v4"}
KINDS = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")
SOURCES = ("auto", "d4rl", "minari", "recipe")
KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
# D4RL reference returns (random and expert policy), from D4RL's infos.py; score = 100 (R - min) / (max - min)
REF_RETURNS = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}


class DatasetError(ValueError):
    """A dataset could not be found, named or read; the message says why and what to do."""


# ---- Names and paths ----
def parse_name(name: str) -> tuple[str, str]:
    """'hopper-medium-replay-v2' -> ('hopper', 'medium-replay')."""
    m = re.fullmatch(r"([a-z0-9]+)-([a-z-]+?)(?:-v2)?", name)
    if m is None or m.group(1) not in ENVS or m.group(2) not in KINDS:
        valid = ", ".join(f"{e}-{k}" for e in ENVS for k in KINDS)
        raise DatasetError(f"unknown dataset name {name!r}. Valid names (optionally with -v2): {valid}. "
                           "Or pass a path to a D4RL-layout HDF5 file or a Minari dataset folder.")
    return m.group(1), m.group(2)


def d4rl_path(env: str, kind: str) -> Path:
    root = Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets"))
    return root / f"{env}_{kind.replace('-', '_')}-v2.hdf5"


def minari_path(env: str, kind: str) -> Path:
    root = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
    return root / "mujoco" / env / f"{kind}-v0"


def recipe_path(env: str, kind: str) -> Path:
    root = Path(os.environ.get("OFFRL_DATA_DIR", Path.home() / ".cache" / "offrl"))
    return root / f"{env}-{kind}-recipe.hdf5"


# ---- Readers ----
def _check(arrays: dict[str, np.ndarray], where: str) -> None:
    n = len(arrays["observations"])
    for k, v in arrays.items():
        if len(v) != n:
            raise DatasetError(f"{where}: '{k}' has {len(v)} rows but 'observations' has {n}")
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            bad = np.flatnonzero(~np.isfinite(v.reshape(n, -1)).all(1))
            raise DatasetError(f"{where}: '{k}' holds NaN/Inf in {len(bad)} rows (first at row {bad[0]})")
    if arrays["observations"].ndim != 2 or arrays["actions"].ndim != 2:
        raise DatasetError(f"{where}: observations and actions must be 2-D arrays")


def read_d4rl_hdf5(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read a D4RL-layout file. Returns the transitions and the exclusive episode ends."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
            if missing:
                raise DatasetError(f"{path}: not a D4RL-layout file, missing keys {missing} (has {sorted(f.keys())})")
            raw = {k: f[k][()] for k in KEYS if k in f}
    except OSError as e:
        raise DatasetError(f"{path}: cannot read as HDF5 ({e}); the file may be truncated or corrupt") from e
    n = len(raw["observations"])
    raw.setdefault("timeouts", np.zeros(n))
    raw["rewards"], raw["terminals"], raw["timeouts"] = (raw[k].reshape(-1) for k in ("rewards", "terminals", "timeouts"))
    _check(raw, str(path))
    obs, term, tout = raw["observations"], raw["terminals"] > 0, raw["timeouts"] > 0
    if "next_observations" in raw:
        # an episode also ends where the next row does not continue this one (files that flag no timeout)
        jump = np.zeros(n, bool)
        jump[:-1] = np.abs(obs[1:] - raw["next_observations"][:-1]).max(1) > 1e-6
        ends = np.flatnonzero(term | tout | jump) + 1
        keep = np.ones(n, bool)
    else:
        # old files: next state = next row, only inside an episode; a timeout's true next state
        # is unknown, so that row is dropped, and so is the last row of a cut-off file
        nxt = np.concatenate([obs[1:], obs[-1:]])
        raw["next_observations"] = np.where(term[:, None], obs, nxt)  # terminal: masked by (1 - d) anyway
        keep = ~tout
        keep[-1] = bool(term[-1])
        ends = np.flatnonzero(term | tout) + 1
    ends = np.union1d(ends, [n]).astype(np.int64)
    data = {k: raw[k].astype(np.float32) for k in KEYS}
    data["terminals"], data["timeouts"] = term.astype(np.float32), tout.astype(np.float32)
    if not keep.all():
        data = {k: v[keep] for k, v in data.items()}
        ends = np.unique(np.cumsum(keep)[ends - 1])
        ends = ends[ends > 0]
    return data, ends


def read_minari(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Read a Minari dataset folder (data/main_data.hdf5 + data/metadata.json) without the minari package."""
    h5, meta_file = path / "data" / "main_data.hdf5", path / "data" / "metadata.json"
    if not h5.exists() or not meta_file.exists():
        raise DatasetError(f"{path}: not a Minari dataset folder (expected data/main_data.hdf5 and data/metadata.json)")
    meta = json.loads(meta_file.read_text())
    parts: dict[str, list] = {k: [] for k in KEYS}
    try:
        with h5py.File(h5, "r") as f:
            for name in sorted(f.keys(), key=lambda s: int(s.split("_")[-1])):
                ep = f[name]
                if not isinstance(ep["observations"], h5py.Dataset):
                    raise DatasetError(f"{path}: dict observations are not supported, only Box spaces")
                o = ep["observations"][()]
                parts["observations"].append(o[:-1])
                parts["next_observations"].append(o[1:])
                for k, src in (("actions", "actions"), ("rewards", "rewards"), ("terminals", "terminations"), ("timeouts", "truncations")):
                    parts[k].append(ep[src][()].reshape(len(o) - 1, -1) if k == "actions" else ep[src][()].reshape(-1))
    except OSError as e:
        raise DatasetError(f"{h5}: cannot read as HDF5 ({e})") from e
    data = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    _check(data, str(path))
    ends = np.cumsum([len(a) for a in parts["actions"]]).astype(np.int64)
    return data, ends, meta


# ---- load_dataset ----
def load_dataset(name_or_path: str, source: str = "auto", eval_env: str | None = None,
                 build: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Load a dataset by name (see module doc) or path. Returns (data, info).

    source: "auto" tries d4rl, minari, recipe in order; any other value forces that one.
    eval_env: gymnasium id to evaluate in; required for a path unless the file records one.
    build: for the recipe source, build the dataset from the shipped policy if it is missing.
    """
    if source not in SOURCES:
        raise DatasetError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    info: dict = {"task": None, "eval_env": eval_env, "eval_env_kwargs": {}, "ref_min_score": None, "ref_max_score": None}
    path = Path(name_or_path).expanduser()
    looks_like_path = path.suffix in (".hdf5", ".h5") or os.sep in name_or_path or path.exists()
    if looks_like_path:
        if not path.exists():
            raise DatasetError(f"dataset path {path} does not exist")
        if path.is_dir():
            data, ends, meta = read_minari(path)
            info.update(source=f"minari:{path}", source_kind="minari")
            if eval_env is None and meta.get("env_spec"):
                info["eval_env_spec"] = meta["env_spec"]
                info["eval_env"] = json.loads(meta["env_spec"])["id"]
        else:
            data, ends = read_d4rl_hdf5(path)
            info.update(source=f"file:{path}", source_kind="file")
            with h5py.File(path, "r") as f:
                if eval_env is None and "metadata/env_id" in f:
                    info["eval_env"] = f["metadata/env_id"][()].decode()
                if "metadata/source" in f:  # files written by recipe/ say so
                    info.update(source=f"recipe:{path}", source_kind="recipe", dataset_sha256=_recipe_sha256(path))
        if info["eval_env"] is None:
            raise DatasetError(f"{path}: the file does not record its env; pass a gymnasium id with --eval-env")
        info["dataset"] = str(path)
        env_name = next((e for e, gid in ENVS.items() if info["eval_env"] == gid), None)
    else:
        env_name, kind = parse_name(name_or_path)
        info["eval_env"] = eval_env or ENVS[env_name]
        tried = []
        data = None
        if source in ("auto", "d4rl"):
            p = d4rl_path(env_name, kind)
            tried.append(f"d4rl: {p}")
            if p.exists():
                data, ends = read_d4rl_hdf5(p)
                info.update(source=f"d4rl:{p}", source_kind="d4rl")
        if data is None and source in ("auto", "minari"):
            p = minari_path(env_name, kind)
            tried.append(f"minari: {p}")
            if p.exists():
                data, ends, meta = read_minari(p)
                info.update(source=f"minari:{p}", source_kind="minari")
                if eval_env is None and meta.get("env_spec"):  # evaluate in the env the data was recorded in
                    info["eval_env_spec"] = meta["env_spec"]
                    info["eval_env"] = json.loads(meta["env_spec"])["id"]
        if data is None and source in ("auto", "recipe"):
            p = recipe_path(env_name, kind)
            tried.append(f"recipe: {p}")
            stale = p.exists() and _recipe_is_stale(env_name, kind, p)
            if stale:
                print(f"{p} was built from other behaviour policies than recipe/ ships now: "
                      + ("rebuilding it" if build else "loading it anyway (build=False)"))
            if build and (stale or not p.exists()):
                p = _build_recipe(env_name, kind, p, tried)
            if p is not None and p.exists():
                data, ends = read_d4rl_hdf5(p)
                info.update(source=f"recipe:{p}", source_kind="recipe", dataset_sha256=_recipe_sha256(p))
        if data is None:
            raise DatasetError(
                f"dataset {env_name}-{kind} not found. Looked in:\n  " + "\n  ".join(tried) +
                "\nTo get one: put the D4RL file there (set $D4RL_DATASET_DIR), or a Minari dataset "
                "($MINARI_DATASETS_PATH), or build the recipe dataset: python -m recipe build " + f"{env_name}-{kind}")
        # the name says where the data came from: only D4RL's own files are called -v2
        info["dataset"] = f"{env_name}-{kind}-" + ("v2" if info["source_kind"] == "d4rl" else info["source_kind"])
        info["task"] = f"{env_name}-{kind}"  # the same for every source: keys per-dataset presets
    if env_name in REF_RETURNS:
        info["ref_min_score"], info["ref_max_score"] = REF_RETURNS[env_name]
    if env_name == "ant" and data["observations"].shape[1] == 111:  # D4RL's Ant keeps contact forces
        info["eval_env_kwargs"] = {"use_contact_forces": True}
    info["episode_ends"] = ends
    info["obs_dim"], info["act_dim"] = data["observations"].shape[1], data["actions"].shape[1]
    return data, info


def _recipe_sha256(path: Path) -> str | None:
    """The sha256 of a recipe file's arrays, as the builder recorded it (results carry it)."""
    with h5py.File(path, "r") as f:
        return f["metadata/sha256"][()].decode() if "metadata/sha256" in f else None


def _recipe_is_stale(env_name: str, kind: str, path: Path) -> bool:
    """A cached recipe file built from older shipped policies (or by an older builder) is stale."""
    try:
        from recipe import build
    except ImportError:
        return False
    return build.available(env_name, kind) and build.is_stale(path, env_name, kind)


def _build_recipe(env_name: str, kind: str, path: Path, tried: list[str]) -> Path | None:
    """Build the recipe dataset on first use, if recipe/ ships a behaviour policy for it."""
    try:
        from recipe import build
    except ImportError:
        tried.append("recipe: the recipe package is not importable")
        return None
    if not build.available(env_name, kind):
        tried.append(f"recipe: no shipped behaviour policy for {env_name}-{kind} ({build.POLICY_DIR})")
        return None
    return build.build_dataset(f"{env_name}-{kind}", path)


def episode_returns(data: dict[str, np.ndarray], info: dict) -> np.ndarray:
    """Undiscounted return of each episode (the last one may be cut off)."""
    csum = np.concatenate([[0.0], np.cumsum(data["rewards"], dtype=np.float64)])
    ends = info["episode_ends"]
    return csum[ends] - csum[np.concatenate([[0], ends[:-1]])]


# ---- Scores and normalization ----
def normalized_score(info_or_name: dict | str, returns):
    """D4RL normalized score 100 (R - min) / (max - min); None when the env has no reference."""
    if isinstance(info_or_name, dict):
        lo, hi = info_or_name.get("ref_min_score"), info_or_name.get("ref_max_score")
    else:
        lo, hi = REF_RETURNS.get(parse_name(info_or_name)[0], (None, None))
    if lo is None or hi is None:
        return None
    return 100.0 * (np.asarray(returns, np.float64) - lo) / (hi - lo)


def state_stats(observations: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (+eps) for state normalization (s - mean) / std."""
    return observations.mean(0).astype(np.float32), (observations.std(0) + eps).astype(np.float32)


# ---- Evaluation env ----
def make_eval_env(info: dict, num_envs: int, seed: int = 0) -> gym.vector.SyncVectorEnv:
    """A vector env of `num_envs` copies of the dataset's eval env, checked against the data's sizes."""
    if info.get("eval_env_spec"):
        spec = gym.envs.registration.EnvSpec.from_json(info["eval_env_spec"])
        fns = [lambda: gym.make(spec)] * num_envs
    else:
        try:
            gym.spec(info["eval_env"])
        except gym.error.Error as e:
            raise DatasetError(f"unknown gymnasium env {info['eval_env']!r}: {e}") from e
        fns = [lambda: gym.make(info["eval_env"], **info["eval_env_kwargs"])] * num_envs
    env = gym.vector.SyncVectorEnv(fns)
    o, a = env.single_observation_space.shape, env.single_action_space.shape
    if o != (info["obs_dim"],) or a != (info["act_dim"],):
        raise DatasetError(f"eval env {info['eval_env']} has observation shape {o} and action shape {a}, "
                           f"but the dataset has ({info['obs_dim']},) and ({info['act_dim']},)")
    env.reset(seed=seed)
    return env


def evaluate(env: gym.vector.VectorEnv, act_fn: Callable[[np.ndarray], np.ndarray], seed: int | None = None) -> np.ndarray:
    """Run one episode in every sub-env; return their undiscounted returns [num_envs]."""
    obs, _ = env.reset(seed=seed)
    n = env.num_envs
    returns, done = np.zeros(n), np.zeros(n, bool)
    low, high = env.single_action_space.low, env.single_action_space.high
    while not done.all():
        action = np.clip(np.asarray(act_fn(obs.astype(np.float32))), low, high)
        obs, r, term, trunc, _ = env.step(action)
        returns += np.where(done, 0.0, r)
        done |= term | trunc
    return returns

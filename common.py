"""The shared layer of every algorithm file: datasets, normalization, scores, eval envs, and the run harness (README.md: the API).

    data, info = load_dataset("hopper-medium")                   # by name: d4rl, then minari, then recipe (recipe/: NOT D4RL's data)
    data, info = load_dataset("my.hdf5", eval_env="Hopper-v4")   # any D4RL-layout file or Minari folder

`data`: float32 observations, actions, rewards, next_observations, terminals (no bootstrap) and timeouts (bootstrap); `info`: the
source, the env to evaluate in, the D4RL reference returns and the episode ends. Prep, Run and cli make up every algorithm's `main`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import flax.serialization
import gymnasium as gym
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tensorboard.summary import Writer

ENVS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4", "ant": "Ant-v4"}
KINDS = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")
SOURCES = ("auto", "d4rl", "minari", "recipe")
KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
# D4RL reference returns (random and expert policy), from D4RL's infos.py; score = 100 (R - min) / (max - min)
REF_RETURNS = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3),
               "ant": (-325.6, 3879.7)}


class RunError(ValueError):
    """A run cannot start or must stop; `cli` prints it as one `error:` line, without a traceback."""


class DatasetError(RunError):
    """A dataset could not be found, named or read; the message says why and what to do."""


# ---- Names and paths ----
def parse_name(name: str) -> tuple[str, str]:
    """'hopper-medium-replay-v2' -> ('hopper', 'medium-replay')."""
    m = re.fullmatch(r"([a-z0-9]+)-([a-z-]+?)(?:-v2)?", name)
    if m is None or m.group(1) not in ENVS or m.group(2) not in KINDS:
        close = difflib.get_close_matches(name.removesuffix("-v2"), [f"{e}-{k}" for e in ENVS for k in KINDS], n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise DatasetError(f"unknown dataset name {name!r}{hint}. Names are <env>-<kind>[-v2] with env in "
                           f"{'/'.join(ENVS)} and kind in {'/'.join(KINDS)} (`python -m recipe list` shows which this "
                           "checkout can build), or a path to a D4RL-layout HDF5 file or a Minari dataset folder")
    return m.group(1), m.group(2)


_root = lambda var, default: Path(os.environ.get(var, Path.home() / default))
d4rl_path = lambda env, kind: _root("D4RL_DATASET_DIR", ".d4rl/datasets") / f"{env}_{kind.replace('-', '_')}-v2.hdf5"
_minari_root = lambda: _root("MINARI_DATASETS_PATH", ".minari/datasets")
minari_path = lambda env, kind: _minari_root() / "mujoco" / env / f"{kind}-v0"
recipe_path = lambda env, kind: _root("OFFRL_DATA_DIR", ".cache/offrl") / f"{env}-{kind}-recipe.hdf5"


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
    raw.update({k: raw.get(k, np.zeros(n)).reshape(-1) for k in ("rewards", "terminals", "timeouts")})
    _check(raw, str(path))
    obs, term, tout = raw["observations"], raw["terminals"] > 0, raw["timeouts"] > 0
    raw["terminals"], raw["timeouts"], keep = term, tout, np.ones(n, bool)
    if "next_observations" in raw:
        # an episode also ends where the next row does not continue this one (files that flag no timeout)
        jump = np.append(np.abs(obs[1:] - raw["next_observations"][:-1]).max(1) > 1e-6, False)
        ends = np.flatnonzero(term | tout | jump) + 1
    else:
        # old files: next state = next row, only inside an episode (a terminal's is masked by (1 - d) anyway); a timeout's
        # true next state is unknown, so that row is dropped, and so is the last row of a cut-off file
        raw["next_observations"] = np.where(term[:, None], obs, np.concatenate([obs[1:], obs[-1:]]))
        keep = np.append(~tout[:-1], term[-1])
        ends = np.flatnonzero(term | tout) + 1
    ends = np.union1d(ends, [n]).astype(np.int64)
    if not keep.all():  # renumber the ends past the dropped rows
        ends = np.unique(np.cumsum(keep)[ends - 1])
        ends = ends[ends > 0]
    return {k: raw[k][keep].astype(np.float32) for k in KEYS}, ends


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
def _read(path: Path, info: dict, kind: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read a Minari folder or a D4RL-layout file into `info`'s source; the env it records, unless one was given."""
    if path.is_dir():
        data, ends, meta = read_minari(path)
        info.update(source=f"minari:{path}", source_kind="minari")
        if info["eval_env"] is None and meta.get("env_spec"):  # evaluate in the env the data was recorded in
            info.update(eval_env_spec=meta["env_spec"], eval_env=json.loads(meta["env_spec"])["id"])
        return data, ends
    data, ends = read_d4rl_hdf5(path)
    info.update(source=f"{kind}:{path}", source_kind=kind)
    with h5py.File(path, "r") as f:
        if info["eval_env"] is None and "metadata/env_id" in f:
            info["eval_env"] = f["metadata/env_id"][()].decode()
        if "metadata/source" in f:  # files written by recipe/ say so, and record the sha256 of their arrays
            sha = f["metadata/sha256"][()].decode() if "metadata/sha256" in f else None
            info.update(source=f"recipe:{path}", source_kind="recipe", dataset_sha256=sha)
    return data, ends


def load_dataset(name_or_path: str, source: str = "auto", eval_env: str | None = None,
                 build: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Load a dataset by name (see module doc), path or Minari id. Returns (data, info).

    source: "auto" tries d4rl, minari, recipe in order; any other value forces that one.
    eval_env: gymnasium id to evaluate in; required for a path unless the file records one.
    build: for the recipe source, build the dataset from the shipped policy if it is missing.
    """
    if source not in SOURCES:
        raise DatasetError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    info: dict = {"task": None, "eval_env": eval_env, "eval_env_kwargs": {}, "ref_min_score": None, "ref_max_score": None}
    path = Path(name_or_path).expanduser()
    if not path.exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)+-v\d+", name_or_path):  # a Minari dataset id
        path = _minari_root() / name_or_path
        if not path.exists():
            raise DatasetError(f"Minari dataset {name_or_path!r} is not installed under {_minari_root()} "
                               f"($MINARI_DATASETS_PATH): `minari download {name_or_path}` fetches it (needs internet)")
    if path.suffix != "" or os.sep in name_or_path or path.exists():
        if not path.exists():
            raise DatasetError(f"dataset path {path} does not exist")
        if path.is_file() and path.suffix not in (".hdf5", ".h5") and not h5py.is_hdf5(path):
            raise DatasetError(f"{path}: unsupported dataset format {path.suffix!r}; supported are D4RL-layout HDF5 "
                               "files (.hdf5/.h5) and Minari dataset folders")
        data, ends = _read(path, info, "file")
        if info["eval_env"] is None:
            raise DatasetError(f"{path}: the file does not record its env; pass a gymnasium id with --eval-env")
        info["dataset"] = str(path)
        env_name = next((e for e, gid in ENVS.items() if info["eval_env"] == gid), None)
    else:
        env_name, kind = parse_name(name_or_path)
        tried, data = [], None
        for src, where in (("d4rl", d4rl_path), ("minari", minari_path), ("recipe", recipe_path)):
            if data is not None or source not in ("auto", src):
                continue
            p = where(env_name, kind)
            tried.append(f"{src}: {p}")
            if src == "recipe":  # recipe/ builds the file, or rebuilds it when stale (see recipe.build.cached_dataset)
                try:
                    from recipe import build as builder
                except ImportError:
                    tried.append("recipe: the recipe package is not importable")
                    continue
                p = builder.cached_dataset(env_name, kind, p, build, tried)
            if p is not None and p.exists():
                data, ends = _read(p, info, src)
        if data is None:
            raise DatasetError(f"dataset {env_name}-{kind} not found. Looked in:\n  " + "\n  ".join(tried) + "\nTo get one: put the D4RL "
                               "file there (set $D4RL_DATASET_DIR), or a Minari dataset ($MINARI_DATASETS_PATH), or build the recipe "
                               f"dataset: python -m recipe build {env_name}-{kind}")
        info["eval_env"] = info["eval_env"] or ENVS[env_name]
        # the name says where the data came from: only D4RL's own files are called -v2
        info["dataset"] = f"{env_name}-{kind}-" + ("v2" if info["source_kind"] == "d4rl" else info["source_kind"])
        info["task"] = f"{env_name}-{kind}"  # the same for every source: keys per-dataset presets
    info["ref_min_score"], info["ref_max_score"] = REF_RETURNS.get(env_name, (None, None))
    if env_name == "ant" and data["observations"].shape[1] == 111:  # D4RL's Ant keeps contact forces
        info["eval_env_kwargs"] = {"use_contact_forces": True}
    info.update(episode_ends=ends, obs_dim=data["observations"].shape[1], act_dim=data["actions"].shape[1])
    return data, info


def episode_returns(data: dict[str, np.ndarray], info: dict) -> np.ndarray:
    """Undiscounted return of each episode (the last one may be cut off)."""
    csum = np.concatenate([[0.0], np.cumsum(data["rewards"], dtype=np.float64)])
    return np.diff(csum[np.concatenate([[0], info["episode_ends"]])])


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
def env_maker(info: dict) -> Callable[[], gym.Env]:
    """make() -> one copy of the dataset's eval env (its recorded spec, or the gymnasium id)."""
    if info.get("eval_env_spec"):
        return lambda: gym.make(gym.envs.registration.EnvSpec.from_json(info["eval_env_spec"]))
    try:
        gym.spec(info["eval_env"])
    except gym.error.Error as e:
        raise DatasetError(f"unknown gymnasium env {info['eval_env']!r}: {e}") from e
    return lambda: gym.make(info["eval_env"], **info["eval_env_kwargs"])


def make_eval_env(info: dict, num_envs: int, seed: int = 0) -> gym.vector.SyncVectorEnv:
    """A vector env of `num_envs` copies of the dataset's eval env, checked against the data's sizes."""
    env = gym.vector.SyncVectorEnv([env_maker(info)] * num_envs)
    o, a = env.single_observation_space.shape, env.single_action_space.shape
    if o != (info["obs_dim"],) or a != (info["act_dim"],):
        raise DatasetError(f"eval env {info['eval_env']} has observation shape {o} and action shape {a}, "
                           f"but the dataset has ({info['obs_dim']},) and ({info['act_dim']},)")
    env.reset(seed=seed)
    return env


def evaluate(env: gym.vector.VectorEnv, act_fn: Callable[[np.ndarray], np.ndarray], seed: int | None = None,
             observe: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Run one episode in every sub-env with act_fn(obs) -> env actions; return the undiscounted returns [num_envs].
    observe(rewards [num_envs]) is told each step's rewards (a sequence model's policy keeps its own history)."""
    obs, _ = env.reset(seed=seed)
    returns, done = np.zeros(env.num_envs), np.zeros(env.num_envs, bool)
    while not done.all():
        action = np.asarray(act_fn(obs.astype(np.float32)))  # in env units (Prep.to_env clips once)
        obs, r, term, trunc, _ = env.step(action)
        if observe is not None:
            observe(r)
        returns += np.where(done, 0.0, r)
        done |= term | trunc
    return returns


class OnlineEnvs:
    """The fine-tuning envs (--online-steps): num_envs copies of the eval env per seed, stepped in lockstep on the host.

    `step(actions [S, K, act] in [-1, 1])` returns the K transitions of every seed in training units (Prep). Only a real
    terminal is a terminal: a time-limit cut is not, and its next state is the true last state, not the reset one.
    `ended` [S, K] says which envs' episodes ended (terminal or cut) at the last step."""

    def __init__(self, info: dict, prep: Prep, num_seeds: int, num_envs: int, seed: int):
        self.envs, self.prep, self.shape = [env_maker(info)() for _ in range(num_seeds * num_envs)], prep, (num_seeds, num_envs)
        self.seed, self.resets = seed + 1_000_003, 0  # reset seeds apart from the evaluation's
        self.raw = np.stack([self._reset(e) for e in self.envs]).astype(np.float32)
        self.ep_return, self.ep_success, self.ended = np.zeros(len(self.envs)), np.zeros(len(self.envs), bool), np.zeros(self.shape, bool)
        self.episodes: list[list[tuple[float, bool | None]]] = [[] for _ in range(num_seeds)]  # (return, success) per seed

    def _reset(self, env: gym.Env) -> np.ndarray:
        self.resets += 1
        return env.reset(seed=self.seed + self.resets)[0]

    @property
    def obs(self) -> np.ndarray:
        """The current states, normalized: [S, K, obs]."""
        return ((self.raw - self.prep.obs_mean) / self.prep.obs_std).reshape(*self.shape, -1)

    def step(self, actions: np.ndarray) -> dict[str, np.ndarray]:
        obs, act = self.obs, np.asarray(actions).reshape(len(self.envs), -1)
        nxt, rew, term = np.empty_like(self.raw), np.zeros(len(self.envs), np.float32), np.zeros(len(self.envs), np.float32)
        self.ended = np.zeros(self.shape, bool)
        for i, env in enumerate(self.envs):
            o, rew[i], terminated, truncated, step_info = env.step(self.prep.to_env(act[i]))
            nxt[i], term[i], self.raw[i] = o, float(terminated), o
            self.ep_return[i] += rew[i]
            success = step_info.get("success", step_info.get("is_success"))  # goal tasks report it; locomotion does not
            self.ep_success[i] |= bool(success)
            if terminated or truncated:
                self.ended.flat[i] = True
                self.episodes[i // self.shape[1]].append((float(self.ep_return[i]), None if success is None else bool(self.ep_success[i])))
                self.raw[i], self.ep_return[i], self.ep_success[i] = self._reset(env), 0.0, False
        nobs = (nxt - self.prep.obs_mean) / self.prep.obs_std
        return {"observations": obs, "actions": act.reshape(*self.shape, -1).astype(np.float32), "rewards": rew.reshape(self.shape),
                "next_observations": nobs.reshape(*self.shape, -1).astype(np.float32), "terminals": term.reshape(self.shape)}


def online_summary(history: list[dict], handover: int, online_steps: int, episodes: list[list]) -> dict:
    """Fine-tuning's record (per seed, then the mean): the score at hand-over; the dip, the minimum over the evaluations of
    the first 10% of the online steps (at least the first one); the final score; the area under the online curve (its
    trapezoid mean, hand-over included); and CORL's regret, mean(1 - success) over the online episodes, where the env has it.
    Scores are normalized where the dataset has reference returns, else returns."""
    key = "normalized" if history and history[-1]["normalized"] is not None else "returns"
    pts = [h for h in history if h["update"] >= handover]
    if not pts or pts[0]["update"] != handover or len(pts) < 2:
        return {}
    x, y = np.array([h["update"] for h in pts], float) - handover, np.array([h[key] for h in pts], float)  # [T], [T, S]
    early = x <= max(0.1 * online_steps, x[1])
    auc = ((y[1:] + y[:-1]) / 2 * np.diff(x)[:, None]).sum(0) / x[-1]
    succ = [[s for _, s in ep if s is not None] for ep in episodes]
    regret = [1.0 - float(np.mean(s)) for s in succ] if all(succ) else None
    per_seed = {"offline": y[0], "dip": y[1:][early[1:]].min(0), "final": y[-1], "auc": auc}
    out = {"score": key, "online_steps": int(x[-1]), **{k: float(v.mean()) for k, v in per_seed.items()},
           "regret": None if regret is None else float(np.mean(regret)), "episodes": [len(e) for e in episodes]}
    return {**out, "per_seed": {**{k: v.tolist() for k, v in per_seed.items()}, "regret": regret}}


def ring_in_order(buffer: dict) -> dict:
    """A fine-tuning ring buffer ({'rows': [S, capacity, ...] per field, 'count': writes per seed}; write c sits at slot
    c % capacity) as host arrays of its written rows, oldest first, and the count: what a checkpoint keeps."""
    count, capacity = int(buffer["count"]), buffer["rows"]["rewards"].shape[1]
    order = np.arange(max(count - capacity, 0), count) % capacity
    return {"rows": {k: np.asarray(v[:, order]) for k, v in buffer["rows"].items()}, "count": count}


def ring_refill(buffer: dict, saved: dict) -> dict:
    """The empty ring `buffer` refilled with ring_in_order's saved rows, the newest that fit its capacity, oldest first
    from slot 0 and counted as that many writes: the filled rows are [0, count), and the next write replaces the oldest."""
    capacity = buffer["rows"]["rewards"].shape[1]
    rows = {k: np.asarray(v)[:, -capacity:] for k, v in saved["rows"].items()}
    kept = rows["rewards"].shape[1]
    return {"rows": {k: v.at[:, :kept].set(rows[k]) for k, v in buffer["rows"].items()}, "count": jnp.asarray(kept, jnp.int32)}


# ---- The run harness: data preparation, the run record, checkpoints, the command line ----
RESULT_KEYS = ("algorithm", "dataset", "source", "source_kind", "dataset_sha256", "eval_env", "num_updates", "seeds",
               "last_return", "best_return", "last_normalized", "best_normalized", "per_seed", "interrupted",
               "wall_time_s", "updates_per_s", "compile_time_s", "config", "hyperparameters", "eval_history")
SECONDS_PER_CALL = 5.0  # target length of one device call: a progress line, and Ctrl-C handled, every few seconds


@dataclasses.dataclass
class Prep:
    """Env units <-> training units: states (s - mean) / std; actions from the env's box to [-1, 1] and back."""

    obs_mean: np.ndarray
    obs_std: np.ndarray
    act_low: np.ndarray
    act_high: np.ndarray

    def __post_init__(self):  # also from a checkpoint's lists
        for k, v in vars(self).items():
            setattr(self, k, np.asarray(v, np.float32))

    @classmethod
    def fit(cls, data: dict[str, np.ndarray], action_space: gym.spaces.Box, normalize_states: bool) -> Prep:
        d = data["observations"].shape[1]
        stats = state_stats(data["observations"]) if normalize_states else (np.zeros(d), np.ones(d))
        return cls(*stats, action_space.low, action_space.high)

    obs_dim = property(lambda self: len(self.obs_mean))
    act_dim = property(lambda self: len(self.act_low))

    def to_unit(self, a: np.ndarray) -> np.ndarray:
        return np.clip(2.0 * (a - self.act_low) / (self.act_high - self.act_low) - 1.0, -1.0, 1.0)

    def to_env(self, a: np.ndarray) -> np.ndarray:
        return self.act_low + (np.clip(a, -1.0, 1.0) + 1.0) * 0.5 * (self.act_high - self.act_low)

    def arrays(self, data: dict[str, np.ndarray], rewards: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The training arrays (put them on the device once): normalized states, [-1, 1] actions, rewards, terminals."""
        obs = {k: (data[k] - self.obs_mean) / self.obs_std for k in ("observations", "next_observations")}
        return {**obs, "actions": self.to_unit(data["actions"]), "terminals": data["terminals"],
                "rewards": np.asarray(data["rewards"] if rewards is None else rewards, np.float32)}


def policy_act(prep: Prep, action_fn: Callable[[jax.Array], jax.Array]) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs) -> env action, for obs [obs_dim] or [batch, obs_dim]; action_fn maps normalized states to [-1, 1]."""
    f = jax.jit(lambda obs: action_fn((obs - prep.obs_mean) / prep.obs_std))
    return lambda obs: prep.to_env(np.asarray(f(jnp.asarray(obs, jnp.float32))))


def read_checkpoint(path: str, algorithm: str | None = None) -> dict:
    """{'state': the raw state dict, 'step', 'meta'} of a checkpoint; an unreadable or foreign file is a RunError."""
    try:
        raw = _read_checkpoint(str(path), Path(path).stat().st_mtime_ns)  # read once per version of the file
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"cannot read checkpoint {path}: {e}") from None
    if algorithm and raw["meta"]["algorithm"] != algorithm:
        raise RunError(f"{path} is a {raw['meta']['algorithm']} checkpoint, not {algorithm}")
    return raw


@lru_cache(maxsize=1)
def _read_checkpoint(path: str, mtime_ns: int) -> dict:
    raw = flax.serialization.msgpack_restore(Path(path).read_bytes())
    return {**raw, "meta": json.loads(raw["meta"])}


def debug_nan_at() -> int:
    """Testing aid, not a flag: $OFFRL_DEBUG_NAN_AT=N puts a NaN into a loss at update N to exercise the NaN guard."""
    return int(os.environ.get("OFFRL_DEBUG_NAN_AT", "-1"))


class Run:
    """One run: eval env, Prep, log folder (TensorBoard, evals.csv, result.json), scores, progress, resumable checkpoints."""

    def __init__(self, algorithm: str, args, info: dict, data: dict[str, np.ndarray], hyperparameters: dict | None = None):
        for name in ("num_seeds", "batch_size", "eval_interval", "eval_episodes"):
            if getattr(args, name) < 1:
                raise RunError(f"--{name.replace('_', '-')} must be >= 1")
        if args.num_updates < 0 or (args.num_updates == 0 and not args.load):
            raise RunError("--num-updates must be > 0 (or 0 with --load CHECKPOINT, to evaluate it)")
        online = getattr(args, "online_steps", 0)
        if online and (online < 0 or args.num_envs < 1 or online % args.num_envs or args.eval_interval % args.num_envs):
            raise RunError("--online-steps and --eval-interval must be multiples of --num-envs (>= 1)")
        self.algorithm, self.args, self.info, self.hp, self.t0 = algorithm, args, info, hyperparameters or {}, time.time()
        self.seeds, self.total = [args.seed + i for i in range(args.num_seeds)], args.num_updates + online  # one update per online step
        self.env = make_eval_env(info, num_envs=args.num_seeds * args.eval_episodes, seed=args.seed)
        ckpt = read_checkpoint(args.load, algorithm) if args.load else {"meta": {}, "step": 0}
        meta = ckpt["meta"]
        if meta and meta["dataset"].get("dataset_sha256") not in (None, info.get("dataset_sha256")):
            print(f"[{algorithm}] warning: {args.load} was trained on other data than this {info['dataset']} (sha256)")
        self.prep = Prep(**meta["prep"]) if meta else Prep.fit(data, self.env.single_action_space, args.normalize_states)
        self.schedule_args = dataclasses.replace(args, num_updates=meta["schedule_updates"]) if meta else args
        tag = Path(str(info["dataset"])).stem if args.dataset else info["dataset"]
        self.log_dir = Path(args.log_dir or meta.get("log_dir") or f"runs/{algorithm}/{tag}/{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.save_path = Path(args.save_path or self.log_dir / "checkpoint.msgpack")
        for d in (self.log_dir, self.save_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        self.history = meta["history"] if meta and Path(meta["log_dir"]) == self.log_dir else []  # one curve per folder
        self._write_evals()
        self.writer, self.step = Writer(str(self.log_dir)), ckpt["step"]
        self.saved_step, self.chunk, self.compiled, self.compile_time, self.train_time, self.trained = self.step, None, {}, 0.0, 0.0, 0
        self.evaluated, self.stop, self.eval_time, self.eval_total, self.last_line = False, False, 0.0, 0.0, time.time()
        signal.signal(signal.SIGINT, self._on_sigint)
        label = ", recipe data: not D4RL" if info["source_kind"] == "recipe" else ""
        print(f"[{algorithm}] {info['dataset']} ({info['source']}{label}) -> {info['eval_env']}; seeds {self.seeds}; "
              f"{self.hp or ''} logs in {self.log_dir}", flush=True)

    def _on_sigint(self, *_) -> None:
        self.stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once
        print(f"\n[{self.algorithm}] Ctrl-C: stopping after this device call (again to abort)", flush=True)

    def restore(self, template):
        """The freshly initialized train states, or the checkpoint's (--load); fresh buffers, as they get donated."""
        if self.args.load:
            raw = read_checkpoint(self.args.load)["state"]
            for a, b in zip(jax.tree.leaves(flax.serialization.to_state_dict(template)), jax.tree.leaves(raw), strict=False):
                if np.shape(a) != np.shape(b):
                    raise RunError(f"{self.args.load} does not match this configuration (array shape {np.shape(b)} vs {np.shape(a)})")
            template = flax.serialization.from_state_dict(template, raw)
            print(f"[{self.algorithm}] restored {self.args.load} at update {self.step}", flush=True)
        return jax.tree.map(lambda x: jnp.array(x, copy=True), template)

    def restore_online(self, buffer: dict, envs: OnlineEnvs) -> dict:
        """Resuming a fine-tune (--load of a checkpoint saved while online): the empty buffer refilled with the saved rows
        (the newest that fit, if --buffer-size or --online-steps shrank it) and the online episodes' record put back. The
        envs start new episodes: the ones running at the save are cut there (their rows stay, none is a terminal)."""
        saved = read_checkpoint(self.args.load) if self.args.load else {}
        if "buffer" not in saved:
            return buffer
        if saved["buffer"]["rows"].keys() != buffer["rows"].keys():
            raise RunError(f"{self.args.load}: its online buffer has the fields {sorted(saved['buffer']['rows'])}, "
                           f"this run's {sorted(buffer['rows'])}")
        buffer = ring_refill(buffer, saved["buffer"])
        envs.episodes, envs.resets = saved["meta"]["online"]["episodes"], saved["meta"]["online"]["resets"]
        print(f"[{self.algorithm}] restored the online buffer: the last {int(buffer['count'])} of {saved['buffer']['count']} "
              "online transitions per seed", flush=True)
        return buffer

    def chunks(self) -> Iterator[int]:
        """Lengths of the device calls: ~SECONDS_PER_CALL each, ending at every evaluation, until done or Ctrl-C."""
        while self.step < self.args.num_updates and not self.stop:
            next_eval = (self.step // self.args.eval_interval + 1) * self.args.eval_interval
            yield min(self.chunk or 20, next_eval - self.step, self.args.num_updates - self.step)

    @property
    def eval_due(self) -> bool:
        return self.step % self.args.eval_interval == 0 or self.step in (self.args.num_updates, self.total)

    def train(self, train_chunk: Callable, states, data: dict, n: int, *extra):
        """One device call of n updates; stops on a non-finite loss (naming the update); logs train/ metrics."""
        step0 = jnp.asarray(self.step, jnp.int32)
        if n not in self.compiled:  # AOT compile, timed apart from training throughput
            t0 = time.perf_counter()
            self._print(f"compiling a device call of {n} updates")
            self.compiled[n] = train_chunk.lower(states, data, step0, *extra, num_steps=n).compile()
            self.compile_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        states, means, first_bad = self.compiled[n](states, data, step0, *extra)
        means, first_bad = jax.device_get((means, first_bad))
        dt = time.perf_counter() - t0
        self.train_time, self.trained = self.train_time + dt, self.trained + n
        for k in [k for k, m in means.items() if not np.all(np.isfinite(m))][:1]:
            self.writer.close()
            where = f"update {self.step + int(first_bad[k]) + 1}" if first_bad[k] >= 0 else "an update"
            raise RunError(f"non-finite {k} at {where} (updates {self.step + 1}-{self.step + n}); stopped, "
                           f"the last good checkpoint {self.save_path} is kept")
        self.step += n
        for k, m in means.items():
            self.writer.add_scalar(f"train/{k}", float(np.mean(m)), self.step)
        fit = max([c * 10**e for e in range(8) for c in (1, 2, 5) if c * 10**e <= n / dt * SECONDS_PER_CALL] or [1])
        if self.chunk is None or (fit >= 5 * self.chunk and len(self.compiled) <= 2):  # sized by the first calls' speed
            self.chunk = fit
        if time.time() - self.last_line >= 10 and not self.eval_due:
            self._print(f"update {self.step}/{self.total} | {self._speed()}")
        return states

    def online(self) -> Iterator[None]:
        """Fine-tuning's iterations (--online-steps), one per num_envs env steps of every seed, until done or Ctrl-C."""
        self.handover, self.last_check = self.args.num_updates, self.step
        first = True  # the first iteration compiles
        while self.step < self.total and not self.stop:
            t0, evals = time.perf_counter(), self.eval_total
            yield  # env steps, a device call, maybe an evaluation: timed without the evaluation
            dt = time.perf_counter() - t0 - (self.eval_total - evals)
            if first:
                self.compile_time, first = self.compile_time + dt, False
            else:
                self.train_time, self.trained = self.train_time + dt, self.trained + self.args.num_envs

    def train_online(self, online_call: Callable, states, *inputs):
        """One fine-tuning device call (num_envs env steps' transitions in, num_envs updates, the next actions out);
        its train/ metrics are logged and checked for NaN every ~10 s and at evaluations, not at every step."""
        states, *outputs, metrics = online_call(states, *inputs, jnp.asarray(self.step, jnp.int32))
        self.step += self.args.num_envs
        if time.time() - self.last_line >= 10 or self.eval_due:
            metrics = jax.device_get(metrics)
            for k in [k for k, m in metrics.items() if not np.all(np.isfinite(m))][:1]:
                self.writer.close()
                raise RunError(f"non-finite {k} at an update in {self.last_check + 1}-{self.step}; stopped, "
                               f"the last good checkpoint {self.save_path} is kept")
            for k, m in metrics.items():
                self.writer.add_scalar(f"train/{k}", float(np.mean(m)), self.step)
            self.last_check = self.step
            if not self.eval_due:
                self._print(f"update {self.step}/{self.total} (online) | {self._speed()}")
        return (states, *outputs)

    def evaluate(self, policy: Callable, params) -> None:
        """Each seed's deterministic policy(params, obs [S, E, obs]) -> [S, E, act] in [-1, 1], E episodes each. A policy
        with a history (dt.py, tt.py) also has reset(), called first, and observe(rewards [S * E]), after every env step."""
        t0, s = time.perf_counter(), len(self.seeds)
        if hasattr(policy, "reset"):
            policy.reset()
        ret = evaluate(self.env, lambda o: self.prep.to_env(np.asarray(policy(params, jnp.asarray(o).reshape(s, -1, o.shape[-1])))
                                                            .reshape(len(o), -1)), observe=getattr(policy, "observe", None)).reshape(s, -1)
        norm = normalized_score(self.info, ret)
        ret, norm = ret.mean(1), None if norm is None else np.asarray(norm).mean(1)
        self.history.append({"update": self.step, "returns": ret.tolist(), "normalized": None if norm is None else norm.tolist()})
        self._write_evals()
        for name, x in (("return", ret), ("normalized", norm)):
            for i, v in enumerate([] if x is None else [x.mean(), *x]):
                self.writer.add_scalar(f"eval/{name}" + (f"/seed{i - 1}" if i else ""), float(v), self.step)
        self.writer.flush()
        self.evaluated, self.eval_time = True, time.perf_counter() - t0
        self.eval_total += self.eval_time
        self._print(f"update {self.step}/{self.total} | {self._text(self.scores())} | eval {self.eval_time:.1f}s"
                    + (f" | {self._speed()}" if self.trained else ""))

    def scores(self) -> dict:
        """Per-seed last and best return and normalized score over this folder's evaluations (None before any)."""
        r, n = (np.array([h[k] for h in self.history]) if self.history and self.history[-1][k] is not None else None
                for k in ("returns", "normalized"))
        return {"last_return": None if r is None else r[-1], "best_return": None if r is None else r.max(0),
                "last_normalized": None if n is None else n[-1], "best_normalized": None if n is None else n.max(0)}

    def _write_evals(self) -> None:
        rows = [f"{h['update']},{s},{h['returns'][i]},{'' if h['normalized'] is None else h['normalized'][i]}\n"
                for h in self.history for i, s in enumerate(self.seeds)]
        (self.log_dir / "evals.csv").write_text("update,seed,return,normalized\n" + "".join(rows))

    def _speed(self) -> str:
        ups, left = self.trained / max(self.train_time, 1e-9), self.total - self.step
        if not self.trained:  # only compiled so far (a resumed run, or the first online call): no speed yet
            return "compiling"
        eta = left / ups + left // self.args.eval_interval * self.eval_time
        return f"{ups:.0f} upd/s | ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s"

    def _text(self, sc: dict, i: int | None = None) -> str:
        """'return R ± sd (best B) | normalized N ± sd (best M)': the mean over seeds (i=None) or seed i; no ± for one."""
        f = lambda k: f"{sc[k].mean() if i is None else sc[k][i]:.1f}" + (
            f" ± {sc[k].std():.1f}" if i is None and len(self.seeds) > 1 and "last" in k else "")
        label = "recipe-normalized" if self.info["source_kind"] == "recipe" else "normalized"
        return f"return {f('last_return')} (best {f('best_return')})" + (
            "" if sc["last_normalized"] is None else f" | {label} {f('last_normalized')} (best {f('best_normalized')})")

    def _print(self, msg: str) -> None:
        print(f"[{self.algorithm}] {msg}", flush=True)
        self.last_line = time.time()

    def save(self, states, buffer: dict | None = None, envs: OnlineEnvs | None = None) -> None:
        """Atomic write: train state, update count and what resuming and load_policy need (config, Prep, data, folder);
        while fine-tuning also the online buffer's rows (oldest first) and the online episodes' record (envs)."""
        meta = {"algorithm": self.algorithm, "config": dataclasses.asdict(self.args), "schedule_updates": self.schedule_args.num_updates,
                "prep": {k: v.tolist() for k, v in vars(self.prep).items()}, "log_dir": str(self.log_dir), "seeds": self.seeds,
                "dataset": {k: self.info.get(k) for k in ("dataset", "task", *RESULT_KEYS[2:6])}, "history": self.history,
                "hyperparameters": self.hp, **({"online": {"episodes": envs.episodes, "resets": envs.resets}} if envs else {})}
        blob = {"state": flax.serialization.to_state_dict(states), "step": self.step, "meta": json.dumps(meta)}
        if buffer is not None:
            blob["buffer"] = ring_in_order(buffer)
        Path(f"{self.save_path}.tmp").write_bytes(flax.serialization.msgpack_serialize(blob))
        if self.args.keep_checkpoints and self.history and self.history[-1]["update"] == self.step:  # an evaluated update
            kept = self.log_dir / "checkpoints" / f"{self.step}.msgpack"
            kept.parent.mkdir(exist_ok=True)
            kept.unlink(missing_ok=True)
            try:
                os.link(f"{self.save_path}.tmp", kept)  # the same file, no copy (the next save replaces the name, not the data)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(f"{self.save_path}.tmp", kept)
        os.replace(f"{self.save_path}.tmp", self.save_path)
        self.saved_step = self.step

    def finish(self, states, policy: Callable, params, **extra) -> dict:
        """Evaluate if nothing was (--num-updates 0), save an interrupted run, write result.json, print the summary."""
        if not self.evaluated and not self.stop:
            self.evaluate(policy, params)
        if self.saved_step != self.step or not self.save_path.exists():
            self.save(states)
        self.writer.close()
        sc, f = self.scores(), lambda x, i=None: None if x is None else float(x.mean() if i is None else x[i])
        result = {"algorithm": self.algorithm, **{k: self.info.get(k) for k in RESULT_KEYS[1:6]}, "num_updates": self.step,
                  "seeds": self.seeds, **{k: f(v) for k, v in sc.items()},
                  "per_seed": [{"seed": s, **{k: f(v, i) for k, v in sc.items()}} for i, s in enumerate(self.seeds)],
                  "interrupted": self.stop, "wall_time_s": time.time() - self.t0, "compile_time_s": self.compile_time,
                  "updates_per_s": self.trained / self.train_time if self.train_time > 0 else None,
                  "config": dataclasses.asdict(self.args), "hyperparameters": self.hp, "eval_history": self.history, **extra}
        Path(f"{self.log_dir}/result.json.tmp").write_text(json.dumps(result, indent=2))
        os.replace(f"{self.log_dir}/result.json.tmp", self.log_dir / "result.json")
        self._print(f"{'interrupted' if self.stop else 'done'} after {self.step} updates"
                    + (f": {self._text(sc)}" if self.history else "") + f"; result in {self.log_dir}")
        for i, s in enumerate(self.seeds if len(self.seeds) > 1 and self.history else []):
            self._print(f"  seed {s}: {self._text(sc, i)}")
        if self.stop:
            self._print(f"resume with: python {sys.argv[0]} --load {self.save_path}")
        return result


def cli(args_cls: type, main: Callable) -> None:
    """An algorithm file's command line: flags (defaults from the checkpoint of --load, if given), one-line errors."""
    argv = sys.argv[1:]
    try:
        load = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                     if a.split("=")[0] == "--load" and ("=" in a or i + 1 < len(argv))), None)
        config = read_checkpoint(load)["meta"]["config"] if load else {}
        main(tyro.cli(args_cls, default=args_cls(**{k: v for k, v in config.items() if k in args_cls.__dataclass_fields__}) if load else None))
    except RunError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted (before the run started: nothing to save)")

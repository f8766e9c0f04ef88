"""Shared test helpers: the one writer of D4RL-layout files, the one script loader, small datasets, RESULT_KEYS."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

ALGORITHMS = ["bc", "td3bc", "iql", "cql", "awac", "calql", "awr", "brac", "bear", "cemq", "dt", "tt"]
RESULT_KEYS = set(common.RESULT_KEYS)  # the keys every script writes into result.json


def write_d4rl(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, str] | None = None) -> Path:
    """Write arrays (as given: dtypes kept) in D4RL's HDF5 layout; attrs become metadata/<key> strings."""
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        for k, v in (attrs or {}).items():
            f[f"metadata/{k}"] = v
    return path


def random_transitions(n: int = 32, obs_dim: int = 3, act_dim: int = 2, max_action: float = 1.0, seed: int = 0) -> dict:
    """n random transitions as float32 device arrays, for unit tests of one update (no terminals)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    data = {"observations": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-max_action, max_action, size=(n, act_dim)),
            "rewards": rng.normal(size=n), "next_observations": rng.normal(size=(n, obs_dim)), "terminals": np.zeros(n)}
    return {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}


def load_script(name: str):
    """Import algorithms/<name>.py as a module (for unit tests of its functions)."""
    spec = importlib.util.spec_from_file_location(f"algo_{name}", ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def random_dataset(path: Path, env_id: str = "Hopper-v4", n: int = 2000, max_steps: int = 100, seed: int = 0,
                   attrs: dict[str, str] | None = None) -> Path:
    """n uniformly random transitions of env_id, episodes cut at max_steps by timeouts."""
    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    buf: dict[str, list] = {k: [] for k in common.KEYS}
    obs, _ = env.reset(seed=seed)
    t = ep = 0
    while len(buf["rewards"]) < n:
        a = rng.uniform(low, high).astype(np.float32)
        nobs, r, term, trunc, _ = env.step(a)
        t += 1
        trunc = (trunc or t >= max_steps) and not term
        for k, v in zip(common.KEYS, (obs, a, r, nobs, term, trunc), strict=True):
            buf[k].append(v)
        obs = nobs
        if term or trunc:
            ep += 1
            obs, _ = env.reset(seed=seed + ep)
            t = 0
    return write_d4rl(path, {k: np.asarray(v, np.float32) for k, v in buf.items()}, attrs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: learning tests that train for minutes (still run in CI)")


def pendulum_expert(obs: np.ndarray) -> float:
    """Hand-written Pendulum-v1 controller: energy-pumping swing-up, PD stabilization near the top.

    Dynamics: theta'' = 15 sin(theta) + 3 u, so E = 0.5 theta'^2 + 15 cos(theta) is conserved for u = 0 and
    equals 15 at the upright rest. Mean return about -140 (uniformly random actions: about -1200).
    """
    c, s, w = obs
    if c > 0.85:
        u = -(10.0 * np.arctan2(s, c) + 2.0 * w)
    else:
        u = (15.0 - (0.5 * w**2 + 15.0 * c)) * (np.sign(w) if abs(w) > 1e-3 else 1.0)
    return float(np.clip(u, -2.0, 2.0))


def make_pendulum_dataset(path: Path, random_episodes: int, expert_episodes: int, expert_noise: float = 0.5,
                          seed: int = 0) -> Path:
    """Write a D4RL-layout HDF5 of Pendulum-v1 episodes (200 steps each, cut by timeouts, no terminals)."""
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(seed)
    buf: dict[str, list] = {k: [] for k in
                            ["observations", "actions", "rewards", "next_observations", "terminals", "timeouts"]}
    kinds = ["random"] * random_episodes + ["expert"] * expert_episodes
    for ep, kind in enumerate(kinds):
        obs, _ = env.reset(seed=seed * 100_003 + ep)
        for t in range(200):
            if kind == "random":
                a = rng.uniform(-2.0, 2.0)
            else:
                a = np.clip(pendulum_expert(obs) + expert_noise * rng.normal(), -2.0, 2.0)
            next_obs, r, term, trunc, _ = env.step(np.array([a], np.float32))
            buf["observations"].append(obs)
            buf["actions"].append([a])
            buf["rewards"].append(r)
            buf["next_observations"].append(next_obs)
            buf["terminals"].append(float(term))
            buf["timeouts"].append(float(trunc or t == 199))
            obs = next_obs
    return write_d4rl(path, {k: np.asarray(v, np.float32) for k, v in buf.items()})


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~2000 transitions for smoke tests."""
    return make_pendulum_dataset(tmp_path_factory.mktemp("data") / "pendulum_tiny.hdf5", 8, 2)


def run_script(algo: str, *args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run algorithms/<algo>.py in a subprocess (env: extra environment variables)."""
    return subprocess.run([sys.executable, str(ROOT / "algorithms" / f"{algo}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})

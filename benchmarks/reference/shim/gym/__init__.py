"""Stand-in for the old `gym` API (0.21-0.23: env.seed, reset() -> obs, step() -> 4-tuple) over gymnasium, so that
reference implementations (CORL) run unmodified on this project's data and eval envs. Only for benchmarks/reference.

`make(name)` ignores the D4RL name and builds $OFFRL_REF_EVAL_ENV (e.g. Hopper-v4); `get_dataset()` reads the D4RL-layout
HDF5 file $OFFRL_REF_DATASET, as d4rl's env.get_dataset() does; `get_normalized_score(R)` is d4rl's
(R - min) / (max - min) with the reference returns $OFFRL_REF_SCORE_RANGE ("min,max"; NaN without them).
"""

from __future__ import annotations

import os

import gymnasium
import h5py
import numpy as np

from . import wrappers  # noqa: F401  (gym.wrappers.TransformObservation)

spaces = gymnasium.spaces
Wrapper = wrappers.Wrapper


class Env:
    """One gymnasium env behind the old API. seed(s) seeds the next reset, as gym's env.seed did."""

    def __init__(self, name: str):
        self.name = name
        self._env = gymnasium.make(os.environ["OFFRL_REF_EVAL_ENV"])
        self.observation_space, self.action_space = self._env.observation_space, self._env.action_space
        self._max_episode_steps = self._env.spec.max_episode_steps
        self.spec = self._env.spec
        self._seed: int | None = None

    def seed(self, seed: int | None = None) -> list:
        self._seed = seed
        return [seed]

    def reset(self) -> np.ndarray:
        obs, _ = self._env.reset(seed=self._seed)
        self._seed = None
        return obs

    def step(self, action):
        obs, r, term, trunc, info = self._env.step(np.asarray(action))
        info = dict(info, **({"TimeLimit.truncated": True} if trunc and not term else {}))
        return obs, float(r), bool(term or trunc), info

    def get_dataset(self) -> dict[str, np.ndarray]:
        with h5py.File(os.environ["OFFRL_REF_DATASET"], "r") as f:
            return {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                          "next_observations") if k in f}

    def get_normalized_score(self, returns):
        lo, hi = (float(x) for x in os.environ.get("OFFRL_REF_SCORE_RANGE", "nan,nan").split(","))
        return (np.asarray(returns, np.float64) - lo) / (hi - lo)

    @property
    def unwrapped(self):
        return self


def make(name: str, **_) -> Env:
    return Env(name)

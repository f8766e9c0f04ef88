"""Stand-in for d4rl (which needs mujoco-py and does not install): qlearning_dataset with d4rl's semantics,
over the shim gym env's get_dataset() (a D4RL-layout HDF5 file). Only for benchmarks/reference."""

from __future__ import annotations

import numpy as np


def qlearning_dataset(env, dataset=None, terminate_on_end: bool = False, **_) -> dict[str, np.ndarray]:
    """As d4rl.qlearning_dataset: next_observations = observations[i + 1]; the last step of a timed-out episode
    (and the file's final row) is dropped, unless terminate_on_end; terminals are the data's true terminals."""
    d = dataset if dataset is not None else env.get_dataset()
    n = d["rewards"].shape[0]
    timeouts = d["timeouts"].astype(bool) if "timeouts" in d else np.zeros(n, bool)
    keep = np.ones(n, bool)
    keep[-1] = False  # no next observation in the file's row order
    if not terminate_on_end:
        keep &= ~timeouts
    idx = np.flatnonzero(keep)
    return {"observations": d["observations"][idx], "actions": d["actions"][idx],
            "next_observations": d["observations"][idx + 1], "rewards": d["rewards"][idx].reshape(-1),
            "terminals": d["terminals"][idx].astype(bool).reshape(-1)}

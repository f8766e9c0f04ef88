"""Build D4RL-recipe datasets from the behaviour policies shipped in recipe/policies/.

This follows the D4RL paper's recipe (Fu et al. 2020, Sec. 5 "gym-mujoco") on gymnasium's
v4 MuJoCo envs. It is NOT the D4RL dataset: a different SAC run, a different simulator
build, other seeds. Every file says so in `metadata/source`.

    random         uniform random actions, 1M transitions
    medium         a SAC policy stopped at about 1/3 of the expert's return, sampled stochastically, 1M
    expert         the fully trained SAC policy, sampled stochastically, 1M
    medium-replay  SAC's replay buffer up to the step the medium policy was taken (shipped as data)
    medium-expert  medium followed by expert (2M)

Same name and seed, same bytes: `K_ENVS` envs are stepped in lockstep with batched numpy
policies, all randomness comes from seeded generators, and each file records the sha256 of
its arrays (`metadata/sha256`), checked against recipe/manifest.json when one is listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent
POLICY_DIR = ROOT / "policies"
DATA_DIR = ROOT / "data"
MANIFEST = ROOT / "manifest.json"
BUILDER_VERSION = "1"
SOURCE = "offrl D4RL-recipe dataset (self-generated; not the D4RL dataset)"
ENV_IDS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4", "ant": "Ant-v4"}
NUM_TRANSITIONS = 1_000_000  # D4RL: 1M transitions for random, medium and expert
K_ENVS = 10  # envs stepped in lockstep; part of the recipe (changing it changes the bytes)
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # as in algorithms/sac.py


# ---- Behaviour policies ----
class NumpyPolicy:
    """The SAC actor of algorithms/sac.py in numpy: a = tanh(mu + sigma * eps)."""

    def __init__(self, path: Path):
        with np.load(path) as z:
            self.w = {k: z[k].astype(np.float32) for k in z.files if not k.startswith("meta")}
            self.meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        self.path = path

    def __call__(self, obs: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Actions and their log-densities for a batch of observations and standard-normal noise."""
        w = self.w
        h = np.maximum(obs @ w["l0/kernel"] + w["l0/bias"], 0)
        h = np.maximum(h @ w["l1/kernel"] + w["l1/bias"], 0)
        mean = h @ w["mean/kernel"] + w["mean/bias"]
        log_std = np.clip(h @ w["log_std/kernel"] + w["log_std/bias"], LOG_STD_MIN, LOG_STD_MAX)
        u = mean + np.exp(log_std) * eps
        logp = (-0.5 * eps**2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        logp -= (2 * (np.log(2.0) - u - np.logaddexp(0, -2 * u))).sum(-1)  # tanh change of variables
        return np.tanh(u), logp


def policy_path(env: str, level: str) -> Path:
    return POLICY_DIR / f"{env}-{level}.npz"


def _inputs(env: str, kind: str) -> list[Path] | None:
    """The shipped files `<env>-<kind>` is built from (None: the recipe has no such kind)."""
    return {"random": [], "medium": [policy_path(env, "medium")], "expert": [policy_path(env, "expert")],
            "medium-expert": [policy_path(env, "medium"), policy_path(env, "expert")],
            "medium-replay": [DATA_DIR / f"{env}-medium-replay.hdf5"]}.get(kind)


def available(env: str, kind: str) -> bool:
    """Whether this checkout can build `<env>-<kind>`."""
    need = _inputs(env, kind) if env in ENV_IDS else None
    return need is not None and all(p.exists() for p in need)


def inputs_sha256(env: str, kind: str) -> str:
    """sha256 of the builder version and the shipped files `<env>-<kind>` is built from.

    Recorded in each built file (`metadata/inputs_sha256`): a cached dataset whose value differs
    from this checkout's was built from other behaviour policies and is rebuilt, not trusted.
    """
    h = hashlib.sha256(f"builder {BUILDER_VERSION}".encode())
    for p in _inputs(env, kind) or []:
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def is_stale(path: Path, env: str, kind: str) -> bool:
    """Whether the recipe file at `path` was built from other inputs than this checkout ships."""
    with h5py.File(path, "r") as f:
        got = f["metadata/inputs_sha256"][()].decode() if "metadata/inputs_sha256" in f else None
    return got != inputs_sha256(env, kind)


# ---- Collection ----
def collect(env_id: str, policy: NumpyPolicy | None, n: int, seed: int,
            progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Roll out `policy` (None: uniform random) in K_ENVS envs until `n` transitions are stored.

    Env i contributes its transitions in one contiguous block, in order; a block's last
    episode is cut off and flagged as a timeout (its stored next observation is the true one).
    """
    envs = [gym.make(env_id) for _ in range(K_ENVS)]
    rngs = [np.random.default_rng([seed, i]) for i in range(K_ENVS)]
    act_dim = envs[0].action_space.shape[0]
    sizes = [n // K_ENVS + (i < n % K_ENVS) for i in range(K_ENVS)]
    streams: list[dict[str, list]] = [{k: [] for k in ("observations", "actions", "rewards", "next_observations",
                                                       "terminals", "timeouts", "qpos", "qvel", "logp")} for _ in envs]
    obs = np.stack([e.reset(seed=seed * 1000 + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    while True:
        active = [i for i in range(K_ENVS) if len(streams[i]["rewards"]) < sizes[i]]
        if not active:
            break
        if policy is None:
            acts = np.stack([r.uniform(-1, 1, act_dim) for r in rngs]).astype(np.float32)
            logps = np.full(K_ENVS, act_dim * np.log(0.5))
        else:
            acts, logps = policy(obs, np.stack([r.standard_normal(act_dim, dtype=np.float32) for r in rngs]))
        for i in active:
            s, uw = streams[i], envs[i].unwrapped
            s["qpos"].append(uw.data.qpos.copy())
            s["qvel"].append(uw.data.qvel.copy())
            nobs, r, term, trunc, _ = envs[i].step(acts[i])
            last = len(s["rewards"]) + 1 == sizes[i]
            for k, v in (("observations", obs[i].copy()), ("actions", acts[i]), ("rewards", r), ("next_observations", nobs),
                         ("terminals", term), ("timeouts", (trunc or last) and not term), ("logp", logps[i])):
                s[k].append(v)
            obs[i] = envs[i].reset()[0] if term or trunc else nobs
        if progress is not None:
            progress(len(active))
    return {k: np.concatenate([np.asarray(s[k]) for s in streams]).astype(np.float32) for k in streams[0]}


def _merge(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def array_hash(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


@contextmanager
def _atomic_h5(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file written as <path>.tmp-<pid> and renamed when complete: an interrupted write leaves nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_meta(f: h5py.File, meta: dict) -> None:
    for k, v in meta.items():
        f.create_dataset(f"metadata/{k}", data=v if isinstance(v, np.ndarray) else str(v))


def write_d4rl(path: Path, arrays: dict[str, np.ndarray], meta: dict, compression: str | None = None) -> None:
    """Write the D4RL HDF5 layout atomically."""
    with _atomic_h5(path) as f:
        for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
            f.create_dataset(k, data=arrays[k], compression=compression)
        for k, src in (("qpos", "qpos"), ("qvel", "qvel"), ("action_log_probs", "logp")):
            f.create_dataset(f"infos/{k}", data=arrays[src], compression=compression)
        _write_meta(f, meta)


def _read_d4rl(f: h5py.File) -> dict[str, np.ndarray]:
    arrays = {k: f[k][()] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    arrays.update(qpos=f["infos/qpos"][()], qvel=f["infos/qvel"][()], logp=f["infos/action_log_probs"][()])
    return arrays


# ---- Shipped replay data: a compact, exactly reversible encoding ----
# The medium-replay slices live in the repository, which must stay small, and most of their bytes
# repeat others: inside an episode next_observations[i] == observations[i+1], and in the MuJoCo
# locomotion envs observations = qpos[1:] ++ qvel (qvel clipped to +-10 for hopper and walker2d).
# XOR of the float32 bit patterns with the words they repeat leaves mostly zeros, which gzip all but
# removes; XOR is its own inverse, so decoding is bit-exact (-0.0 and clipped entries included).
# The arrays sit under encoded/, not at the top level, so that a plain D4RL reader fails loudly on the
# file instead of reading XOR words as next observations.
ENCODING = "xor-v1"


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.int32)


def _next_rows(obs_bits: np.ndarray) -> np.ndarray:
    """observations[i + 1] for each row i (zeros for the last)."""
    nxt = np.zeros_like(obs_bits)
    nxt[:-1] = obs_bits[1:]
    return nxt


def _obs_cols(x_bits: np.ndarray, obs_bits: np.ndarray) -> np.ndarray:
    """For each column of x, the observation column it equals in most rows; -1 where none does in more than half."""
    cols = []
    for c in range(x_bits.shape[1]):
        same = (x_bits[:, c:c + 1] == obs_bits).sum(0)
        cols.append(int(same.argmax()) if 2 * same.max() > len(x_bits) else -1)
    return np.array(cols, np.int32)


def _xor_cols(x_bits: np.ndarray, obs_bits: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = x_bits.copy()
    for c, j in enumerate(cols):
        if j >= 0:
            out[:, c] ^= obs_bits[:, j]
    return out


def encode_replay(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The encoded datasets and the column maps (metadata) of `arrays`; decode_replay inverts it."""
    obs = _bits(arrays["observations"])
    enc = {k: arrays[k] for k in ("observations", "actions", "rewards", "logp")}
    enc["next_observations"] = _bits(arrays["next_observations"]) ^ _next_rows(obs)
    enc.update({k: arrays[k].astype(np.uint8) for k in ("terminals", "timeouts")})  # 0/1 flags
    cols = {f"{k}_obs_col": _obs_cols(_bits(arrays[k]), obs) for k in ("qpos", "qvel")}
    enc.update({k: _xor_cols(_bits(arrays[k]), obs, cols[f"{k}_obs_col"]) for k in ("qpos", "qvel")})
    return enc, cols


def decode_replay(enc: dict[str, np.ndarray], cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    obs = _bits(enc["observations"])
    arrays = {k: enc[k] for k in ("observations", "actions", "rewards", "logp")}
    arrays["next_observations"] = (enc["next_observations"] ^ _next_rows(obs)).view(np.float32)
    arrays.update({k: enc[k].astype(np.float32) for k in ("terminals", "timeouts")})
    arrays.update({k: _xor_cols(enc[k], obs, cols[f"{k}_obs_col"]).view(np.float32) for k in ("qpos", "qvel")})
    return arrays


def write_replay(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write replay data xor-v1 encoded, atomically; metadata/sha256 is the hash of `arrays` (what read_replay returns)."""
    enc, cols = encode_replay(arrays)
    digest = array_hash(arrays)
    if array_hash(decode_replay(enc, cols)) != digest:  # e.g. flags other than 0.0/1.0
        raise ValueError(f"{path}: the arrays do not survive the {ENCODING} encoding exactly")
    with _atomic_h5(path) as f:
        for k, v in enc.items():
            f.create_dataset(f"encoded/{k}", data=v, compression="gzip", compression_opts=9, shuffle=True)
        _write_meta(f, {**meta, **cols, "encoding": ENCODING, "sha256": digest})


def read_replay(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of a replay file, xor-v1 encoded or in the plain D4RL layout, hash-checked."""
    try:
        with h5py.File(path, "r") as f:
            meta = {k: f[f"metadata/{k}"][()] for k in f.get("metadata", {})}
            meta = {k: v.decode() if isinstance(v, bytes) else v for k, v in meta.items()}
            if meta.get("encoding") == ENCODING:
                arrays = decode_replay({k: f[f"encoded/{k}"][()] for k in f["encoded"]}, meta)
            elif "encoding" not in meta:  # the plain layout, as shipped before the encoding
                arrays = _read_d4rl(f)
            else:
                raise ValueError(f"{path}: unknown encoding {meta['encoding']!r} (this code reads {ENCODING})")
    except (OSError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the replay data ({e}); the file is truncated or corrupt") from e
    if "sha256" in meta and array_hash(arrays) != meta["sha256"]:
        raise ValueError(f"{path}: the data's sha256 {array_hash(arrays)[:12]} differs from the recorded "
                         f"{meta['sha256'][:12]}; the file is corrupt")
    return arrays, meta


# ---- Datasets ----
def build_arrays(name: str, n: int | None = None, seed: int = 0, progress: bool = True,
                 reuse_dir: Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of recipe dataset `name` (e.g. 'hopper-medium').

    medium-expert is exactly medium followed by expert (as in D4RL); with `reuse_dir`, parts
    already built there with the same seed and size are read instead of collected again.
    """
    env, kind = name.split("-", 1)
    if env not in ENV_IDS:
        raise ValueError(f"unknown env {env!r}; valid: {', '.join(ENV_IDS)}")
    env_id, n = ENV_IDS[env], n or NUM_TRANSITIONS
    meta: dict = {"source": SOURCE, "env_id": env_id, "kind": kind, "seed": seed, "builder_version": BUILDER_VERSION,
                  "k_envs": K_ENVS, "recipe": "D4RL (Fu et al. 2020) gym-mujoco recipe on gymnasium v4"}
    if available(env, kind):
        meta["inputs_sha256"] = inputs_sha256(env, kind)
    if kind == "medium-replay":
        src = DATA_DIR / f"{env}-medium-replay.hdf5"
        if not src.exists():
            raise FileNotFoundError(f"{src} is not shipped in this checkout (see recipe/README.md)")
        arrays, file_meta = read_replay(src)
        meta.update({k: file_meta[k] for k in ("algorithm", "policy_step", "training", "num_envs") if k in file_meta})
        return arrays, meta
    levels = {"random": [None], "medium": ["medium"], "expert": ["expert"], "medium-expert": ["medium", "expert"]}
    if kind not in levels:
        raise ValueError(f"the recipe cannot build kind {kind!r}; valid: {', '.join(levels)}, medium-replay")
    bar = _progress_bar(n * len(levels[kind]), name) if progress else None
    parts = []
    for level in levels[kind]:
        policy = None
        if level is not None:
            p = policy_path(env, level)
            if not p.exists():
                raise FileNotFoundError(f"no behaviour policy {p}; train one with algorithms/sac.py and export it "
                                        "with `python -m recipe export` (see recipe/README.md)")
            policy = NumpyPolicy(p)
            meta[f"policy_{level}"] = json.dumps(policy.meta)
            meta[f"policy_{level}_file"] = p.name
            meta.update({f"policy_{level}_weights/{k}": v for k, v in policy.w.items()})
        cached = _cached_part(reuse_dir, env, level, n, seed) if kind == "medium-expert" else None
        if cached is not None and bar:
            bar.update(n)
        parts.append(cached if cached is not None else collect(env_id, policy, n, seed, bar.update if bar else None))
    if bar:
        bar.close()
    meta["algorithm"] = "uniform random" if kind == "random" else "SAC (algorithms/sac.py)"
    return _merge(*parts), meta


def _cached_part(reuse_dir: Path | None, env: str, level: str, n: int, seed: int) -> dict[str, np.ndarray] | None:
    path = None if reuse_dir is None else Path(reuse_dir) / f"{env}-{level}-recipe.hdf5"
    if path is None or not path.exists():
        return None
    if is_stale(path, env, level):  # built from another policy than the one shipped now
        return None
    with h5py.File(path, "r") as f:
        if int(f["metadata/seed"][()]) != seed or len(f["rewards"]) != n:
            return None
        return _read_d4rl(f)


def _progress_bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"building {name}", unit="step", unit_scale=True, mininterval=2.0)


def expected_hash(name: str, n: int | None, seed: int) -> str | None:
    if not MANIFEST.exists():
        return None
    entry = json.loads(MANIFEST.read_text()).get(name)
    if not entry or entry.get("num_transitions_arg") != n or entry.get("seed") != seed:
        return None
    env, kind = name.split("-", 1)
    if "inputs_sha256" in entry and available(env, kind) and entry["inputs_sha256"] != inputs_sha256(env, kind):
        return None  # the manifest lists a build from other policies
    return entry["sha256"]


def current_sha256(env: str, kind: str, cached: Path | None = None) -> str | None:
    """The sha256 that `<env>-<kind>` built from this checkout's shipped policies has.

    That of the cached file at `cached` when it is up to date with the shipped files, else the one
    recorded in recipe/manifest.json (None when neither is known). Runs compare it with their
    `dataset_sha256` to tell whether their data has been rebuilt since.
    """
    if cached is not None and cached.exists() and available(env, kind) and not is_stale(cached, env, kind):
        with h5py.File(cached, "r") as f:
            if "metadata/sha256" in f:
                return f["metadata/sha256"][()].decode()
    return expected_hash(f"{env}-{kind}", None, 0)


def build_dataset(name: str, path: Path, n: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Build `name` into `path` (atomically) and return the path."""
    t0 = time.time()
    arrays, meta = build_arrays(name, n, seed, progress, reuse_dir=Path(path).parent)
    digest = array_hash(arrays)
    want = expected_hash(name, n, seed)
    meta.update(sha256=digest, build_time_s=f"{time.time() - t0:.1f}")
    if want is not None and want != digest:
        print(f"WARNING: {name} hash {digest[:12]} differs from the manifest's {want[:12]} "
              "(different numpy/mujoco build or CPU?); the data is still a valid recipe dataset")
    write_d4rl(Path(path), arrays, meta)
    print(f"built {name}: {len(arrays['rewards'])} transitions -> {path} ({time.time() - t0:.0f}s, sha256 {digest[:16]})")
    return Path(path)


def cached_dataset(env: str, kind: str, path: Path, build: bool, tried: list[str]) -> Path | None:
    """common.load_dataset's recipe source: the file at `path`, built on first use (if `build`) and rebuilt when it
    was built from other inputs than this checkout ships; None, with the reason appended to `tried`, if absent."""
    if not available(env, kind):
        tried.append(f"recipe: no shipped behaviour policy for {env}-{kind} ({POLICY_DIR}), so it cannot be built")
        return path if path.exists() else None
    stale = path.exists() and is_stale(path, env, kind)
    if stale:
        print(f"{path} was built from other behaviour policies than recipe/ ships now: "
              + ("rebuilding it" if build else "loading it anyway (build=False)"))
    if build and (stale or not path.exists()):
        path = build_dataset(f"{env}-{kind}", path)
    return path if path.exists() else None

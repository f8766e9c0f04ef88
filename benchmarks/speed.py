"""Speed table: updates per second, compile time, 1M-update wall time, peak memory, --num-seeds scaling.

    python benchmarks/speed.py --label cpu --algos bc td3bc iql cql awac --seeds 1 4 16

Each measurement is a fresh process `python algorithms/<algo>.py --dataset <synthetic Hopper-shaped
file> --eval-env Hopper-v4 --num-updates U --eval-interval U --eval-episodes 1`; the scripts report
`updates_per_s` (training only) and `compile_time_s` in result.json, and the child's rusage gives its
peak resident memory. Speed does not depend on the data's values, so the file is random numbers.
MOPO and COMBO are timed on their agent phase, with one dynamics ensemble trained first (one epoch,
timed too) and loaded by every measurement through `--model-load`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from run import hardware

ROOT = Path(__file__).resolve().parents[1]
PEERS = [("JAX-CORL IQL (JAX-CORL README)", "GTX 1080 Ti", "about 9 min"), ("CORL IQL (PyTorch; JAX-CORL README)", "GTX 1080 Ti", "4.08 h")]


def synthetic(path: Path, n: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.standard_normal((n, 11), dtype=np.float32)
        f["next_observations"] = np.roll(f["observations"][()], -1, axis=0)  # consecutive rows: episodes (dt, tt windows)
        f["actions"] = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        f["rewards"] = rng.standard_normal(n, dtype=np.float32)
        f["terminals"] = (rng.random(n) < 0.001).astype(np.float32)
        f["timeouts"] = (np.arange(n) % 1000 == 999).astype(np.float32)


MODEL_BASED = ("mopo", "combo")


def dynamics_model(data: Path, out: Path, extra: list[str]) -> tuple[Path, float]:
    """Train one dynamics ensemble for one epoch (mopo.py, one agent update); return its file and the epoch's seconds.

    MOPO and COMBO are then timed on their agent phase with `--model-load` (the agent's speed does not depend on
    the model's quality); a real run trains the model first, for a time that grows with the dataset.
    """
    log, path = out / "dynamics", out / "dynamics.msgpack"
    cmd = [sys.executable, "algorithms/mopo.py", "--dataset", str(data), "--eval-env", "Hopper-v4", "--num-updates", "1",
           "--eval-interval", "1", "--eval-episodes", "1", "--model-epochs", "1", "--model-save-path", str(path), "--log-dir", str(log), *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0 or not path.exists():
        raise SystemExit(f"training the dynamics model failed:\n{p.stdout[-1000:]}{p.stderr[-1000:]}")
    r = json.loads((log / "result.json").read_text())
    return path, float(r["phase_times_s"]["model_training"])


def measure(algo: str, seeds: int, updates: int, data: Path, out: Path, extra: list[str]) -> dict:
    log = out / f"{algo}-s{seeds}"
    log.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, f"algorithms/{algo}.py", "--dataset", str(data), "--eval-env", "Hopper-v4",
           "--num-seeds", str(seeds), "--num-updates", str(updates), "--eval-interval", str(updates), "--eval-episodes", "1",
           "--log-dir", str(log), *extra]
    t0 = time.time()
    with open(log / "console.log", "w") as console:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=console, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak resident memory
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"algorithm": algo, "num_seeds": seeds, "error": (log / "console.log").read_text()[-500:]}
    r = json.loads((log / "result.json").read_text())
    ups = r["updates_per_s"]
    return {"algorithm": algo, "num_seeds": seeds, "updates": updates, "updates_per_s": ups,
            "seed_updates_per_s": ups * seeds, "compile_time_s": r.get("compile_time_s"),
            "hours_per_1M_train_only": 1e6 / ups / 3600,
            "hours_per_1M_with_compile": (1e6 / ups + (r.get("compile_time_s") or 0)) / 3600,
            "peak_rss_mb": usage.ru_maxrss / 1024, "process_wall_s": time.time() - t0}  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="e.g. cpu or h100")
    p.add_argument("--algos", nargs="+", default=["bc", "td3bc", "iql", "cql", "awac"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--seed-updates", type=int, default=20_000, help="updates x seeds per measurement (at least --min-updates)")
    p.add_argument("--min-updates", type=int, default=500, help="fewest updates per measurement (lower it for slow models, e.g. tt)")
    p.add_argument("--extra", default="", help="extra flags for every script")
    p.add_argument("--extra-for", nargs="*", default=[], metavar="ALGO=FLAGS",
                   help="extra flags for one script, e.g. tt='--beam-width 8' (tt's evaluation is a beam search)")
    p.add_argument("--note", default="", help="conditions of the measurement, printed in the table (e.g. pinned cores, other load)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where speed_<label>.md/.json go")
    a = p.parse_args()
    extra_for = dict(e.split("=", 1) for e in a.extra_for)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.hdf5"
        synthetic(data)
        model, model_epoch_s = None, None
        if any(al in MODEL_BASED for al in a.algos):
            model, model_epoch_s = dynamics_model(data, Path(tmp), a.extra.split())
        for algo in a.algos:
            for s in a.seeds:
                extra = a.extra.split() + extra_for.get(algo, "").split() + (["--model-load", str(model)] if algo in MODEL_BASED else [])
                row = measure(algo, s, max(a.min_updates, a.seed_updates // s), data, Path(tmp), extra)
                print(json.dumps(row), flush=True)
                rows.append(row)
    hw = hardware()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    (out_dir / f"speed_{a.label}.json").write_text(json.dumps({"hardware": hw, "date": date, "rows": rows}, indent=2))
    lines = [f"# Speed: {a.label}", "", f"- Hardware: {hw}", f"- Date: {date}",
             f"- Command: `python benchmarks/speed.py {shlex.join(sys.argv[1:])}`",
             "- Each script's default batch size and networks (its `Args`: most use batch 256 and 2x256 hidden layers; "
             "dt and tt are Transformers, batch 64 and 256); synthetic Hopper-shaped data (100k transitions).",
             "- updates/s counts training only (no evaluation, no compilation); 1M-update times are extrapolated from it.",
             *([f"- MOPO/COMBO: the agent phase only (model rollouts included), with a dynamics ensemble loaded by "
                f"`--model-load`; training that ensemble took {model_epoch_s:.0f} s per epoch on these 100k transitions "
                "(a real run trains it first, for up to --model-max-time-s)."] if model else []),
             *([f"- Conditions: {a.note}"] if a.note else []), "",
             "| algorithm | seeds | updates/s (per seed) | seed-updates/s | compile (s) | 1M updates, train only | 1M updates + compile | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algorithm']} | {r['num_seeds']} | failed: {r['error'][-80:]!r} | | | | | |")
            continue
        lines.append(f"| {r['algorithm']} | {r['num_seeds']} | {r['updates_per_s']:.3g} | {r['seed_updates_per_s']:.3g} | "
                     f"{r['compile_time_s']:.1f} | {r['hours_per_1M_train_only']:.2f} h | {r['hours_per_1M_with_compile']:.2f} h | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines += ["", "Published peer figures (1M IQL updates), for comparison on their hardware:", "",
              "| implementation | hardware | 1M updates |", "|---|---|---|"] + [f"| {n} | {h} | {t} |" for n, h, t in PEERS]
    (out_dir / f"speed_{a.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Speed table: updates per second, compile time, 1M-update wall time, peak memory, --num-seeds scaling.

    python benchmarks/speed.py --label cpu --algos bc td3bc iql cql awac --seeds 1 4 16

Each measurement is a fresh process `python algorithms/<algo>.py --dataset <synthetic Hopper-shaped
file> --eval-env Hopper-v4 --num-updates U --eval-interval U --eval-episodes 1`; the scripts report
`updates_per_s` (training only) and `compile_time_s` in result.json, and `/usr/bin/time` gives the
peak resident memory. Speed does not depend on the data's values, so the file is random numbers.
"""

from __future__ import annotations

import argparse
import json
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
        f["next_observations"] = rng.standard_normal((n, 11), dtype=np.float32)
        f["actions"] = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        f["rewards"] = rng.standard_normal(n, dtype=np.float32)
        f["terminals"] = (rng.random(n) < 0.001).astype(np.float32)
        f["timeouts"] = (np.arange(n) % 1000 == 999).astype(np.float32)


def measure(algo: str, seeds: int, updates: int, data: Path, out: Path, extra: list[str]) -> dict:
    log = out / f"{algo}-s{seeds}"
    cmd = ["/usr/bin/time", "-f", "PEAK_KB %M", sys.executable, f"algorithms/{algo}.py", "--dataset", str(data), "--eval-env", "Hopper-v4",
           "--num-seeds", str(seeds), "--num-updates", str(updates), "--eval-interval", str(updates), "--eval-episodes", "1",
           "--log-dir", str(log), *extra]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        return {"algorithm": algo, "num_seeds": seeds, "error": p.stderr[-500:]}
    r = json.loads((log / "result.json").read_text())
    peak = int(next(line.split()[1] for line in p.stderr.splitlines() if line.startswith("PEAK_KB")))
    ups = r["updates_per_s"]
    return {"algorithm": algo, "num_seeds": seeds, "updates": updates, "updates_per_s": ups,
            "seed_updates_per_s": ups * seeds, "compile_time_s": r.get("compile_time_s"),
            "hours_per_1M_train_only": 1e6 / ups / 3600,
            "hours_per_1M_with_compile": (1e6 / ups + (r.get("compile_time_s") or 0)) / 3600,
            "peak_rss_mb": peak / 1024, "process_wall_s": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="e.g. cpu or h100")
    p.add_argument("--algos", nargs="+", default=["bc", "td3bc", "iql", "cql", "awac"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--seed-updates", type=int, default=20_000, help="updates x seeds per measurement (at least 500 updates)")
    p.add_argument("--extra", default="", help="extra flags for every script")
    p.add_argument("--note", default="", help="conditions of the measurement, printed in the table (e.g. pinned cores, other load)")
    a = p.parse_args()
    out_dir = ROOT / "benchmarks" / "results"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.hdf5"
        synthetic(data)
        for algo in a.algos:
            for s in a.seeds:
                row = measure(algo, s, max(500, a.seed_updates // s), data, Path(tmp), a.extra.split())
                print(json.dumps(row), flush=True)
                rows.append(row)
    hw = hardware()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    (out_dir / f"speed_{a.label}.json").write_text(json.dumps({"hardware": hw, "date": date, "rows": rows}, indent=2))
    lines = [f"# Speed: {a.label}", "", f"- Hardware: {hw}", f"- Date: {date}",
             f"- Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`",
             "- Batch 256, 2x256 hidden layers (the scripts' defaults); synthetic Hopper-shaped data (100k transitions).",
             "- updates/s counts training only (no evaluation, no compilation); 1M-update times are extrapolated from it.",
             *([f"- Conditions: {a.note}"] if a.note else []), "",
             "| algorithm | seeds | updates/s (per seed) | seed-updates/s | compile (s) | 1M updates, train only | 1M updates + compile | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algorithm']} | {r['num_seeds']} | failed: {r['error'][-80:]!r} | | | | | |")
            continue
        lines.append(f"| {r['algorithm']} | {r['num_seeds']} | {r['updates_per_s']:.0f} | {r['seed_updates_per_s']:.0f} | "
                     f"{r['compile_time_s']:.1f} | {r['hours_per_1M_train_only']:.2f} h | {r['hours_per_1M_with_compile']:.2f} h | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines += ["", "Published peer figures (1M IQL updates), for comparison on their hardware:", "",
              "| implementation | hardware | 1M updates |", "|---|---|---|"] + [f"| {n} | {h} | {t} |" for n, h, t in PEERS]
    (out_dir / f"speed_{a.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

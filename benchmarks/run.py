"""Run an algorithm x dataset grid, resuming after an interruption.

    python benchmarks/run.py --label cpu-reduced --algos bc td3bc iql cql awac \
        --datasets hopper-medium hopper-medium-replay hopper-medium-expert --num-seeds 2 --num-updates 100000

Each cell is one process `python algorithms/<algo>.py --env <dataset> --num-seeds N ...`, so the
seeds of a cell are trained together with the scripts' own jax.vmap. A finished cell (one with a
result.json) is skipped, unless its recipe dataset was rebuilt since (new behaviour policies); an
interrupted cell resumes from its checkpoint. The runs land in
benchmarks/runs/<label>/<algo>/<dataset>/ and the grid's commands, hardware and date in
benchmarks/runs/<label>/manifest.json, which aggregate.py turns into tables and plots.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"


def hardware() -> str:
    try:
        import jax

        dev = jax.devices()[0]
        accel = f"{dev.platform}: {getattr(dev, 'device_kind', dev)}"
    except Exception:  # noqa: BLE001 - reporting only
        accel = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; jax device {accel}"


def run_cell(cmd: list[str], cell: Path, shown: str) -> int | None:
    """One resumable run of an algorithm script into folder `cell`: skipped (None) if its result.json is finished, resumed
    from its checkpoint if interrupted; the console goes to cell/stdout.log. Returns the exit code."""
    if (cell / "result.json").exists() and not json.loads((cell / "result.json").read_text())["interrupted"]:
        return None
    if (cell / "checkpoint.msgpack").exists():
        cmd = [*cmd, "--load", str(cell / "checkpoint.msgpack")]
    print(shown, flush=True)
    cell.mkdir(parents=True, exist_ok=True)
    with open(cell / "stdout.log", "a") as log:
        return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode


def update_manifest(path: Path, header: dict, cells: dict) -> None:
    """Merge this runner's header and cells into the grid's manifest.json, under a file lock.

    Several runners may fill cells of one grid at once, so the file is re-read under the lock and only
    the cells this runner ran replace their entries; every grid command that touched the grid is kept.
    The file is replaced atomically, so an interrupted write never loses the other cells.
    """
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads(path.read_text()) if path.exists() else {}
        commands = manifest.get("grid_commands") or ([manifest["grid_command"]] if "grid_command" in manifest else [])
        if header["grid_command"] not in commands:
            commands.append(header["grid_command"])
        manifest.update(header, grid_commands=commands, cells={**manifest.get("cells", {}), **cells})
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, path)


def data_changed(result: dict) -> bool:
    """Whether a finished run trained on recipe data that has been rebuilt since (new behaviour policies).

    Runs record the sha256 of their recipe dataset (`dataset_sha256`); the current one is that of the
    cached file when it is up to date with the shipped policies, else the one in recipe/manifest.json.
    Runs without the field (older ones) and non-recipe data are taken as they are.
    """
    got = result.get("dataset_sha256")
    if result.get("source_kind") != "recipe" or not got:
        return False
    sys.path.insert(0, str(ROOT))
    import common
    from recipe import build

    env, kind = common.parse_name(result["dataset"].removesuffix("-recipe"))
    want = build.current_sha256(env, kind, common.recipe_path(env, kind))
    return want is not None and want != got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="name of this grid, e.g. cpu-reduced or gpu-1M")
    p.add_argument("--algos", nargs="+", default=["bc", "td3bc", "iql", "cql", "awac"])
    p.add_argument("--datasets", nargs="+", default=[f"{e}-{k}" for e in ("hopper", "halfcheetah", "walker2d")
                                                      for k in ("medium", "medium-replay", "medium-expert")])
    p.add_argument("--num-seeds", type=int, default=5)
    p.add_argument("--num-updates", type=int, default=1_000_000)
    p.add_argument("--eval-interval", type=int, default=10_000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--extra", default="", help="extra flags passed to every script, e.g. '--model-epochs 20'")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args()

    grid_dir = RUNS / a.label
    grid_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = grid_dir / "manifest.json"
    header = dict(label=a.label, hardware=hardware(), num_seeds=a.num_seeds, num_updates=a.num_updates,
                  grid_command=shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]]))
    ran: dict[str, dict] = {}  # the cells this runner ran; only these replace entries in the manifest
    for algo in a.algos:
        for ds in a.datasets:
            cell = grid_dir / algo / ds
            result = json.loads((cell / "result.json").read_text()) if (cell / "result.json").exists() else None
            if result and result.get("interrupted"):
                print(f"resume {algo} {ds}: interrupted at update {result['num_updates']}")
            elif result:
                if not data_changed(result):
                    print(f"skip {algo} {ds}: done")
                    continue
                print(f"rerun {algo} {ds}: its recipe dataset has been rebuilt since (the old run stays in git history)")
                for f in cell.iterdir():
                    if f.is_file():
                        f.unlink()
            cmd = [sys.executable, f"algorithms/{algo}.py", "--env", ds, "--num-seeds", str(a.num_seeds),
                   "--num-updates", str(a.num_updates), "--eval-interval", str(a.eval_interval),
                   "--eval-episodes", str(a.eval_episodes), "--log-dir", str(cell.relative_to(ROOT)), *a.extra.split()]
            ckpt = cell / "checkpoint.msgpack"
            if ckpt.exists():
                cmd += ["--load", str(ckpt.relative_to(ROOT))]
            shown = shlex.join(["python", *cmd[1:]])
            print(shown, flush=True)
            if a.dry_run:
                continue
            cell.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with open(cell / "stdout.log", "a") as log:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
            ran[f"{algo}/{ds}"] = {"command": shown, "returncode": rc, "wall_time_s": round(time.time() - t0, 1),
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            update_manifest(manifest_path, header, ran)
            if rc != 0:
                print(f"  FAILED (rc {rc}); see {cell / 'stdout.log'}", flush=True)
    if not a.dry_run:
        update_manifest(manifest_path, header, ran)


if __name__ == "__main__":
    main()

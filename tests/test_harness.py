"""The run harness as a user meets it: bad input, Ctrl-C, resuming, load_policy, copying one file, the console."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, load_script, random_dataset, run_script

import common

TINY = ["--eval-env", "Pendulum-v1", "--hidden-dim", "32", "--batch-size", "64", "--eval-episodes", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--num-updates", "-5"], "error: --num-updates must be > 0"),
    (["--num-updates", "0"], "error: --num-updates must be > 0 (or 0 with --load"),
    (["--env", "hoper-medium"], "did you mean 'hopper-medium'"),
    (["--num-seeds", "0"], "error: --num-seeds must be >= 1"),
    (["--load", "/nonexistent/ckpt.msgpack"], "error: cannot read checkpoint /nonexistent/ckpt.msgpack"),
])
def test_bad_input_is_one_line(argv, message, tiny_dataset) -> None:
    extra = [] if "--env" in argv else ["--dataset", str(tiny_dataset), *TINY]
    proc = run_script("iql", *extra, *argv)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_preset_lists_choices() -> None:
    assert "{auto,locomotion,antmaze}" in run_script("iql", "--help").stdout


def test_ctrl_c_saves_and_resume_keeps_folder_and_schedule(tiny_dataset, tmp_path) -> None:
    log_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "algorithms" / "iql.py"), "--dataset", str(tiny_dataset), *TINY,
           "--num-updates", "1000000", "--eval-interval", "1000000", "--log-dir", str(log_dir)]  # no evaluation before Ctrl-C
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 180
    while not any("upd/s | ETA" in x for x in lines) and time.time() < deadline:  # a progress line: it is training
        time.sleep(0.2)
    assert any("upd/s | ETA" in x for x in lines), "".join(lines)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)  # the reader thread alone reads stdout, to its end
    err, out = proc.stderr.read(), "".join(lines)
    assert time.time() - t0 < 30, "Ctrl-C took longer than one short device call"
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    result = json.loads((log_dir / "result.json").read_text())
    assert result["interrupted"] is True and 0 < result["num_updates"] < 1000000
    assert "resume with:" in out and f"--load {log_dir / 'checkpoint.msgpack'}" in out
    done = result["num_updates"]

    # --load alone takes the checkpoint's config: a shorter --num-updates here keeps the 1M-update cosine schedule
    proc = run_script("iql", "--load", log_dir / "checkpoint.msgpack", "--num-updates", done + 50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((log_dir / "result.json").read_text())  # the same folder: one record
    assert result["num_updates"] == done + 50 and result["interrupted"] is False
    assert [h["update"] for h in result["eval_history"]] == [done + 50]
    meta = common.read_checkpoint(str(log_dir / "checkpoint.msgpack"))["meta"]
    assert meta["config"]["num_updates"] == done + 50  # this run's budget ...
    assert meta["schedule_updates"] == 1000000 and meta["log_dir"] == str(log_dir)  # ... on the original schedule


def test_load_policy_reproduces_the_evaluation(tiny_dataset, tmp_path) -> None:
    proc = run_script("iql", "--dataset", tiny_dataset, *TINY, "--num-updates", "100", "--eval-interval", "50",
                      "--log-dir", tmp_path, "--keep-checkpoints")
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = sorted((tmp_path / "checkpoints").iterdir())  # --keep-checkpoints: one file per evaluation
    assert [k.name for k in kept] == ["100.msgpack", "50.msgpack"]
    assert [common.read_checkpoint(str(k))["step"] for k in kept] == [100, 50]
    assert kept[0].read_bytes() == (tmp_path / "checkpoint.msgpack").read_bytes()
    first, act = (load_script("iql").load_policy(str(k)) for k in (kept[1], tmp_path / "checkpoint.msgpack"))
    assert not np.allclose(first(np.ones((4, 3), np.float32)), act(np.ones((4, 3), np.float32)))
    a = act(np.zeros(3, np.float32))
    assert a.shape == (1,) and -2.0 <= a[0] <= 2.0  # env units: Pendulum's box is [-2, 2]
    assert act(np.zeros((5, 3), np.float32)).shape == (5, 1)
    _, info = common.load_dataset(str(tiny_dataset), eval_env="Pendulum-v1")
    returns = common.evaluate(common.make_eval_env(info, 2, seed=0), first)  # the run's own eval env and seed, first evaluation
    result = json.loads((tmp_path / "result.json").read_text())
    np.testing.assert_allclose(returns.mean(), np.mean(result["eval_history"][0]["returns"]), rtol=1e-4)


def test_copied_file_finds_its_own_common(tiny_dataset, tmp_path) -> None:
    (tmp_path / "common.py").write_text("x = 1  # a research repo's own common.py\n")
    (tmp_path / "offrl").mkdir()
    for f in ("algorithms/td3bc.py", "common.py"):
        shutil.copy(ROOT / f, tmp_path / "offrl")
    proc = subprocess.run([sys.executable, "offrl/td3bc.py", "--dataset", str(tiny_dataset), *TINY, "--num-updates", "20",
                           "--eval-interval", "20", "--log-dir", "out"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["num_updates"] == 20


def test_console_labels_recipe_scores_and_one_seed(tmp_path) -> None:
    data = random_dataset(tmp_path / "h.hdf5", n=500, max_steps=50, attrs={"source": "recipe test", "env_id": "Hopper-v4"})
    proc = run_script("iql", "--dataset", data, "--hidden-dim", "32", "--batch-size", "64", "--eval-episodes", "1",
                      "--num-updates", "40", "--eval-interval", "20", "--log-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]  # no --eval-env: the file records its env
    assert "recipe data: not D4RL" in proc.stdout and "recipe-normalized" in proc.stdout
    assert " ± " not in proc.stdout and "None" not in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if "update 40/40" in x)
    assert "(best " in line.split("recipe-normalized")[1]  # best normalized beside normalized

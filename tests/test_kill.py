"""kill -9 at random moments of `train`, `prefs` and `bench`: every file the command writes is
absent or whole afterwards, and `train --run-dir` finishes a killed run (its evaluation and plot
included, even when the kill came after the last checkpoint).

The moments are tied to progress, not to the clock: a run is killed as soon as its N-th line of
metrics or comparisons is on disk, N drawn at random up to the lines a whole run writes (each
command works on after its last line: evaluation, plots). So every attempt kills, on a fast
machine or a loaded one, and the counts below are exact."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from proximal.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TRAIN = ["train", "--ppo.total-timesteps", "8192", "--env.num-envs", "4", "--ppo.num-steps", "64", "--ppo.minibatch-size", "128",
         "--eval-episodes", "5", "--checkpoint-every", "2", "--stop-return", "none"]
PREFS = ["prefs", "Pendulum-v1", "--ppo.total-timesteps", "4096", "--reward.labels", "40", "--reward.query", "random",
         "--reward.initial-steps", "20", "--reward.steps", "10", "--eval-episodes", "2"]
BENCH = ["bench", "--seeds", "2", "--eval-every", "5", "--out", "bench_out"]


# Kill before this many lines of .csv/.jsonl: all a whole run writes (train, prefs); bench's first seed (of ~140).
TRAIN_LINES, PREFS_LINES, BENCH_LINES = 33, 43, 60


def progress(cwd: Path) -> int:
    """Lines of metrics and comparisons on disk below `cwd` (temp files of atomic writes aside)."""
    lines = 0
    for path in cwd.rglob("*"):
        if path.suffix in (".csv", ".jsonl") and not path.name.startswith("."):
            try:
                lines += path.read_bytes().count(b"\n")
            except OSError:  # replaced or removed while we looked
                pass
    return lines


def run_and_kill(args: list[str], cwd: Path, lines: int) -> bool:
    """Start `proximal ARGS` in its own process group; SIGKILL the whole group as soon as `lines`
    lines of progress are on disk. Returns True if it was still running (a kill happened), False
    if it had finished first."""
    process = subprocess.Popen([sys.executable, "-m", "proximal", *args], cwd=cwd, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if progress(cwd) >= lines:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.01)
    return False


def assert_whole(directory: Path) -> None:
    """Every file below `directory` (temp files of an interrupted atomic write, named '.*', aside)
    is whole for its kind."""
    for path in directory.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".csv":
            rows = list(csv.reader(path.open(newline="")))
            assert rows and all(len(row) == len(rows[0]) for row in rows), path
        elif path.suffix == ".pt":
            load_checkpoint(path)
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif path.suffix == ".md":
            assert path.read_text().endswith("\n"), path


def test_train_killed_at_random_moments_leaves_whole_files_and_resumes_to_the_end(tmp_path):
    rng = np.random.default_rng(0)
    kills = resumed = 0
    for attempt in range(6):
        cwd = tmp_path / f"attempt{attempt}"
        cwd.mkdir()
        kills += run_and_kill(TRAIN, cwd, lines=int(rng.integers(1, TRAIN_LINES + 1)))
        runs = list((cwd / "runs").glob("*")) if (cwd / "runs").exists() else []
        for run_dir in runs:
            assert_whole(run_dir)
            if (run_dir / "checkpoint.pt").exists() and not (run_dir / "eval.json").exists():
                result = subprocess.run([sys.executable, "-m", "proximal", "train", "--run-dir", str(run_dir)],
                                        cwd=cwd, capture_output=True, text=True)
                assert result.returncode == 0, result.stderr
                resumed += 1
            if (run_dir / "checkpoint.pt").exists():
                assert_whole(run_dir)
                assert json.loads((run_dir / "eval.json").read_text())["env_steps"] == 8192
                assert (run_dir / "learning_curve.png").exists()
                iterations = [int(row["iteration"]) for row in csv.DictReader((run_dir / "metrics.csv").open())]
                assert iterations == list(range(1, 33))
    print(f"train: {kills} kills of 6 attempts, {resumed} resumed to the end, every file whole")
    assert kills == 6 and resumed >= 2, (kills, resumed)


@pytest.mark.parametrize("command,lines", [(PREFS, PREFS_LINES), (BENCH, BENCH_LINES)], ids=["prefs", "bench"])
def test_prefs_and_bench_killed_at_random_moments_leave_whole_files(command, lines, tmp_path):
    rng = np.random.default_rng(1)
    kills = 0
    for attempt in range(6):
        cwd = tmp_path / f"attempt{attempt}"
        cwd.mkdir()
        kills += run_and_kill(command, cwd, lines=int(rng.integers(1, lines + 1)))
        assert_whole(cwd)
    print(f"{command[0]}: {kills} kills of 6 attempts, every file whole")
    assert kills == 6, kills

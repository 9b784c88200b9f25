"""One process at a time writes into a run directory (proximal.run.locked_run_dir)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from proximal.cli import main
from proximal.errors import ProximalError
from proximal.run import LOCK_NAME, locked_run_dir


HOLD = "import sys, time\nfrom proximal.run import locked_run_dir\nwith locked_run_dir(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(60)\n"


@pytest.fixture
def hold():
    """hold(run_dir) -> the pid of another process that holds run_dir's lock until the test ends."""
    processes = []

    def start(run_dir) -> int:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout.readline().strip() == "held"
        return process.pid

    yield start
    for process in processes:
        process.kill()
        process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_holder_refuses_a_second_writer_and_its_lock_is_left_alone(tmp_path, hold):
    pid = hold(tmp_path)
    with pytest.raises(ProximalError, match=f"is in use by process {pid}"):
        with locked_run_dir(tmp_path):
            pass
    assert (tmp_path / LOCK_NAME).read_text() == f"{pid}\n"


def test_a_holder_whose_pid_is_not_yet_written_still_holds_the_lock(tmp_path, hold):
    """The window between creating the lock file and writing the pid: an empty lock file was taken
    for a stale one and deleted, and a second writer got in beside the first."""
    hold(tmp_path)
    (tmp_path / LOCK_NAME).write_text("")  # the lock as a second process would find it in that window
    with pytest.raises(ProximalError, match="is in use by process"):
        with locked_run_dir(tmp_path):
            pass


def test_a_killed_holders_lock_is_free(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    process.kill()  # SIGKILL: no finally runs, the file stays with its pid in it
    process.wait()
    assert (tmp_path / LOCK_NAME).read_text() == f"{process.pid}\n"
    with locked_run_dir(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_dead_holders_lock_is_taken_over_and_released_after(tmp_path):
    (tmp_path / LOCK_NAME).write_text(f"{dead_pid()}\n")
    with locked_run_dir(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert oct((tmp_path / LOCK_NAME).stat().st_mode & 0o777) == oct(0o600)
        with locked_run_dir(tmp_path):  # the same process again (a study running a variant): no-op
            pass
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_work_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with locked_run_dir(tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_rlhf_into_a_run_directory_in_use_is_one_line_and_writes_nothing(tmp_path, capsys, hold):
    pytest.importorskip("transformers")
    live_pid = hold(tmp_path)
    code, err = _run(["rlhf", "--run-dir", str(tmp_path), "--sft.steps", "2", "--reward.labels", "8",
                      "--ppo.iterations", "1"], capsys)
    assert code != 0 and f"is in use by process {live_pid}" in err and len(err.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_NAME]


def test_train_resume_of_a_run_in_use_is_one_line(tmp_path, capsys, hold):
    runs = tmp_path / "runs"
    assert _run(["train", "CartPole-v1", "--ppo.total-timesteps", "256", "--env.num-envs", "2", "--ppo.num-steps", "64",
                 "--eval-episodes", "1", "--runs-dir", str(runs)], capsys)[0] == 0
    run_dir = next(runs.iterdir())
    live_pid = hold(run_dir)
    code, err = _run(["train", "--run-dir", str(run_dir), "--ppo.total-timesteps", "512"], capsys)
    assert code != 0 and f"is in use by process {live_pid}" in err and len(err.strip().splitlines()) == 1


def test_new_run_directories_are_the_users_alone(tmp_path):
    """A run holds the labelling page's token and the queries' true returns: 0700, whatever the
    files' own modes."""
    from proximal.run import unique_run_dir

    os.umask(0o022)
    created = unique_run_dir(tmp_path / "runs", "x")
    with locked_run_dir(tmp_path / "given"):
        pass
    for directory in (created, tmp_path / "given"):
        assert directory.stat().st_mode & 0o777 == 0o700
    existing = tmp_path / "mine"
    existing.mkdir(mode=0o755)
    with locked_run_dir(existing):  # a directory the user made keeps the mode the user gave it
        pass
    assert existing.stat().st_mode & 0o777 == 0o755

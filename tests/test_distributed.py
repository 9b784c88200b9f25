"""Data-parallel PPO on torch.distributed (gloo, localhost): one update of 2 ranks x N rows equals
one of 1 process x 2N rows; the ranks' parameters and statistics stay identical through real
training; a killed torchrun run resumes; bad launches end in one line on every rank, not a hang."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from proximal.agent import PPOAgent, RolloutBatch
from proximal.config import EnvConfig, PPOConfig, RunConfig, TrainConfig
from proximal.envs import make_vector_env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_rank(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def pendulum_config(**ppo) -> TrainConfig:
    return TrainConfig(env=EnvConfig("Pendulum-v1", num_envs=4),
                       ppo=PPOConfig(**{"total_timesteps": 4 * 32 * 3, "num_steps": 32, "minibatch_size": 32,
                                        "epochs": 2, "normalize_observations": True,
                                        "normalize_rewards": True, **ppo}),
                       run=RunConfig(eval_episodes=1))


def fixed_batch(rows: int, seed: int = 0) -> RolloutBatch:
    """A rollout batch of Pendulum-sized rows with made-up but fixed values."""
    generator = torch.Generator().manual_seed(seed)
    return RolloutBatch(observations=torch.randn(rows, 3, generator=generator),
                        actions=torch.randn(rows, 1, generator=generator),
                        logprobs=-torch.rand(rows, generator=generator) - 0.5,
                        values=torch.randn(rows, generator=generator),
                        advantages=torch.randn(rows, generator=generator) * 3 + 1,
                        returns=torch.randn(rows, generator=generator))


def agent_for(config: TrainConfig) -> PPOAgent:
    torch.manual_seed(0)
    probe = make_vector_env(config.env.env_id, 1)
    agent = PPOAgent.for_spaces(probe.single_observation_space, probe.single_action_space, config)
    probe.close()
    return agent


def rank_share(batch: RolloutBatch, rank: int, world_size: int, minibatches: int) -> RolloutBatch:
    """The rows of `batch` rank r holds so that, in order, its k-th minibatch is its share of the
    one-process k-th minibatch (minibatch k = rows k B/m .. (k+1) B/m - 1)."""
    per_minibatch = batch.size // minibatches
    share = per_minibatch // world_size
    index = torch.cat([torch.arange(k * per_minibatch + rank * share, k * per_minibatch + (rank + 1) * share)
                       for k in range(minibatches)])
    return RolloutBatch(*(getattr(batch, name)[index] for name in
                          ("observations", "actions", "logprobs", "values", "advantages", "returns")))


def update_worker(rank: int, world_size: int, port: int, out: str) -> None:
    from proximal.dist import join, leave

    as_rank(rank, world_size, port)
    dist = join(30)
    torch.randperm = lambda n, **_: torch.arange(n)  # no shuffling: the minibatches are fixed
    agent = agent_for(pendulum_config())
    agent.dist = dist
    stats = agent.update(rank_share(fixed_batch(256), rank, world_size, minibatches=8))
    torch.save({"params": [p.detach().clone() for p in agent.network.parameters()], "stats": stats},
               f"{out}/rank{rank}.pt")
    leave()


def test_one_update_of_two_ranks_equals_one_update_of_one_process_on_the_same_rows(tmp_path, monkeypatch):
    port = free_port()
    mp.spawn(update_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    monkeypatch.setattr(torch, "randperm", lambda n, **_: torch.arange(n))
    single = agent_for(pendulum_config())  # 256 rows in minibatches of 32, 2 epochs
    single_stats = single.update(fixed_batch(256))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for mine, theirs, reference in zip(ranks[0]["params"], ranks[1]["params"], single.network.parameters()):
        assert torch.equal(mine, theirs)  # the ranks agree exactly
        torch.testing.assert_close(mine, reference.detach(), rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(p, q) for p, q in zip(ranks[0]["params"], agent_for(pendulum_config()).network.parameters()))
    for name in ("policy_loss", "value_loss", "approx_kl"):  # means of per-minibatch values: equal too
        assert ranks[0]["stats"][name] == pytest.approx(single_stats[name], rel=1e-4, abs=1e-6)


def train_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Real training on 2 ranks; after every update each rank records a digest of its weights."""
    from proximal.dist import join, leave
    from proximal.train import train

    as_rank(rank, world_size, port)
    dist = join(30)
    digests, original_update = [], PPOAgent.update

    def recording_update(agent, batch):
        stats = original_update(agent, batch)
        digests.append(torch.cat([p.detach().reshape(-1) for p in agent.network.parameters()]).double().sum().item())
        return stats

    PPOAgent.update = recording_update
    config = pendulum_config()
    config = TrainConfig(config.env, config.ppo, RunConfig(eval_episodes=1, runs_dir=f"{out}/runs"))
    seen = {}
    original_prepare = PPOAgent.prepare_observations

    def spy(agent, observations, update_stats):
        seen["stats"] = agent.observation_stats
        return original_prepare(agent, observations, update_stats)

    PPOAgent.prepare_observations = spy
    result = train(config, dist=dist)
    stats = seen["stats"]
    with open(f"{out}/rank{rank}.json", "w") as file:
        json.dump({"digests": digests, "obs_count": stats.count, "obs_mean": stats.mean.tolist(),
                   "run_dir": str(result.run_dir), "eval": len(result.eval_returns)}, file)
    leave()


def test_two_ranks_keep_identical_parameters_and_statistics_through_training(tmp_path):
    mp.spawn(train_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert len(ranks[0]["digests"]) == 3 and ranks[0]["digests"] == ranks[1]["digests"]  # after every update
    assert ranks[0]["obs_mean"] == ranks[1]["obs_mean"]
    assert ranks[0]["obs_count"] == ranks[1]["obs_count"] == 3 * 32 * 4  # every rank's rows, all 4 envs
    run_dir = Path(ranks[0]["run_dir"])
    assert ranks[1]["run_dir"] == str(run_dir) and ranks[0]["eval"] == 1 and ranks[1]["eval"] == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run_dir.name]  # rank 0 alone wrote
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[-1].split(",")[1] == str(3 * 128)  # global env steps


def torchrun(arguments: list[str], cwd: Path, timeout: float = 120, processes: int = 2,
             **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                             "--master-port", str(free_port()), "-m", "proximal", *arguments], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def kill_launcher_and_ranks(launcher: subprocess.Popen, ranks: int = 2) -> None:
    """SIGKILL torchrun and its ranks (each in a session of its own: killing the launcher alone
    leaves them running), and wait until every one is gone."""
    workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    assert len(workers) == ranks
    for pid in [*map(int, workers), launcher.pid]:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    for pid in map(int, workers):
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            time.sleep(0.01)


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_to_the_end(tmp_path):
    arguments = ["train", "CartPole-v1", "--env.num-envs", "4", "--ppo.num-steps", "32", "--ppo.total-timesteps", "12800",
                 "--stop-return", "1000", "--checkpoint-every", "5", "--eval-episodes", "5",
                 "--runs-dir", str(tmp_path / "runs")]
    launcher = torchrun(arguments, tmp_path)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("*/checkpoint.pt")):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    kill_launcher_and_ranks(launcher)
    run_dir = next((tmp_path / "runs").iterdir())
    assert not (run_dir / "eval.json").exists()
    resumed = torchrun(["train", "--run-dir", str(run_dir)], tmp_path)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    assert out.count("run directory:") == 1  # rank 0 alone reports
    iterations = [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert iterations == list(range(1, 101))  # 12,800 / 128 iterations, each once
    assert json.loads((run_dir / "eval.json").read_text())["env_steps"] == 12800


def test_a_world_size_that_does_not_split_the_envs_fails_in_one_line_per_rank_and_writes_nothing(tmp_path):
    launcher = torchrun(["train", "CartPole-v1", "--env.num-envs", "8", "--runs-dir", str(tmp_path / "runs")],
                        tmp_path, processes=3)
    out, err = launcher.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("proximal train: error:")]
    # Once one rank has exited, torchrun stops the others: a rank slower to reach the check (a busy
    # machine) is stopped before it says anything, so 1 to 3 lines.
    assert launcher.returncode != 0 and 1 <= len(lines) <= 3
    assert all("--env.num-envs 8 does not split over 3 processes" in line for line in lines)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_cannot_reach_the_others_stops_with_one_line_within_its_timeout(rank, tmp_path):
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    finished = subprocess.run([sys.executable, "-m", "proximal", "train", "CartPole-v1", "--dist-timeout", "3",
                               "--runs-dir", str(tmp_path / "runs")], env=env, capture_output=True, text=True,
                              timeout=60)
    assert finished.returncode == 1 and time.monotonic() - start < 30
    assert finished.stderr.count("\n") == 1 and "could not join the others at 127.0.0.1" in finished.stderr
    assert f"rank {rank} of 2" in finished.stderr and not (tmp_path / "runs").exists()


def test_other_commands_refuse_to_run_under_torchrun_in_one_line(tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    finished = subprocess.run([sys.executable, "-m", "proximal", "prefs", "--runs-dir", str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 1 and finished.stderr.count("\n") == 1
    assert "only `proximal train` and `proximal rlhf` run on several processes" in finished.stderr


def test_running_statistics_fold_in_every_ranks_rows_in_rank_order():
    from proximal.normalize import RunningMeanStd

    rows = np.random.default_rng(0).normal(size=(6, 4, 3))  # 6 steps of 4 envs
    one = RunningMeanStd((3,))
    for step in rows:
        one.update(step)
    halves = [RunningMeanStd((3,)) for _ in range(2)]
    for rank, stats in enumerate(halves):  # each rank holds 2 of the 4 envs; gather returns all 4
        stats.gather = lambda local, step=None: None
    for step in rows:
        for stats in halves:
            stats.gather = lambda local, step=step: step
            stats.update(step[:2])
    for stats in halves:
        np.testing.assert_array_equal(stats.mean, one.mean)
        np.testing.assert_array_equal(stats.var, one.var)

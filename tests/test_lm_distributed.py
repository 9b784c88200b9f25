"""The LM pipeline on K processes (gloo, localhost): one update of each stage on 2 ranks equals
one update of 1 process on the same rows, the ranks bit-identical after it; `torchrun -m proximal
rlhf` writes one run directory that `proximal generate` reads; killed mid-PPO (launcher and
ranks) it resumes to the end with every iteration logged once; bad launches end in one line on
every rank."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lm_helpers import tiny_model
from test_distributed import as_rank, free_port, kill_launcher_and_ranks, torchrun
from proximal.dist import DistContext
from proximal.labellers import make_labeller
from proximal.lm.config import PPOStageConfig, RewardConfig
from proximal.lm.dpo import dpo_loss, reference_pair_logprobs
from proximal.lm.labels import label_records, pairs_from_records
from proximal.lm.model import ScalarHeadLM, sample_completions
from proximal.lm.ppo import ppo_update
from proximal.lm.reward import RewardModelScorer, fit_reward_model
from proximal.lm.rollout import LMRollout, collect_rollout
from proximal.lm.sft import encode_demonstrations, sft_step

PROMPTS = ["12+34=", "5+6=", "99+1=", "40+44=", "7+7=", "10+90=", "3+4=", "55+55="]
RESPONSES = ["46", "11", "100", "84", "14", "100", "7", "110"]


def pairs(tokenizer):
    """8 labelled pairs of responses of different lengths (the losses' weights differ by rank)."""
    second = ["4", "12", "10", "8", "41", "1", "71", "11"]
    records = label_records(PROMPTS, RESPONSES, second, [True] * 8, [True] * 8, np.ones(8), np.zeros(8),
                            make_labeller(RewardConfig(), np.random.default_rng(0)), 0.0, np.random.default_rng(0))
    return pairs_from_records(records, tokenizer, "cpu")


def rows_of(rollout: LMRollout, index: torch.Tensor) -> LMRollout:
    """The rollout's rows at `index`: what a rank holds."""
    return LMRollout(rollout.completions.select(index), *(getattr(rollout, name)[index] for name in (
        "logprobs", "ref_logprobs", "values", "scores", "kl_penalty", "rewards", "advantages", "returns")))


def one_update_of_each_stage(dist: DistContext) -> dict[str, list[torch.Tensor]]:
    """SFT, reward, DPO and PPO: one step each on this rank's share of 8 (PPO: 16) fixed rows. Plain
    SGD, so the step is the gradient itself (Adam's first step would be its sign alone)."""
    results = {}
    shard = dist.shard(torch.arange(8))  # rank r's rows of the 8

    model, tokenizer = tiny_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = encode_demonstrations(tokenizer, PROMPTS, RESPONSES, "cpu")
    sft_step(model.train(), optimizer, [tensor[shard] for tensor in data], 1.0, dist)
    results["sft"] = [p.detach().clone() for p in model.parameters()]

    reward_lm, _ = tiny_model(seed=1)
    reward_model = ScalarHeadLM(reward_lm)
    optimizer = torch.optim.SGD(reward_model.parameters(), lr=0.5)
    fit_reward_model(reward_model, optimizer, pairs(tokenizer), 1, 8, torch.Generator().manual_seed(0), dist=dist)
    results["reward"] = [p.detach().clone() for p in reward_model.parameters()]

    policy, _ = tiny_model(seed=2)
    reference, _ = tiny_model(seed=0)
    batch = pairs(tokenizer)
    reference_logprobs = reference_pair_logprobs(reference, batch)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    fit_reward_model(policy, optimizer, batch, 1, 8, torch.Generator().manual_seed(0),
                     loss_of=lambda index: dpo_loss(policy, batch.select(index), reference_logprobs[index], 0.1),
                     dist=dist)
    results["dpo"] = [p.detach().clone() for p in policy.parameters()]

    # PPO: 16 rows, global minibatches of 8: rank r holds rows 8r..8r+7, and its k-th minibatch
    # (4 rows) is its share of the one-process k-th minibatch.
    policy = ScalarHeadLM(tiny_model(seed=5)[0])
    config = PPOStageConfig(prompts_per_iteration=16, minibatch_size=8, epochs=1)
    prompts = PROMPTS * 2
    completions = sample_completions(policy.lm, tokenizer, prompts, 5, 1.0, torch.Generator().manual_seed(0), "cpu")
    everything = [torch.arange(16)]
    scorer = RewardModelScorer(reward_model.eval(), None)
    rollout = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer, everything, config, 0.1)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    if dist.distributed:
        mine = torch.arange(8 * dist.rank, 8 * dist.rank + 8)
        ppo_update(policy, optimizer, rows_of(rollout, mine), list(torch.arange(8).split(4)), config,
                   torch.Generator(), dist=dist)
    else:
        first = [torch.cat([torch.arange(4 * k, 4 * k + 4), torch.arange(8 + 4 * k, 12 + 4 * k)]) for k in range(2)]
        ppo_update(policy, optimizer, rollout, first, config, torch.Generator())
    results["ppo"] = [p.detach().clone() for p in policy.parameters()]
    results["moments"] = dist.masked_moments(rows_of(rollout, dist.shard(torch.arange(16))).advantages,
                                             rows_of(rollout, dist.shard(torch.arange(16))).mask)
    return results


def update_worker(rank: int, world_size: int, port: int, out: str) -> None:
    from proximal.dist import join, leave

    as_rank(rank, world_size, port)
    torch.set_num_threads(1)
    dist = join(30)
    torch.save(one_update_of_each_stage(dist), f"{out}/rank{rank}.pt")
    leave()


def test_one_update_of_each_lm_stage_on_two_ranks_equals_one_update_of_one_process(tmp_path):
    mp.spawn(update_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    torch.set_num_threads(1)
    single = one_update_of_each_stage(DistContext())
    untrained = {"sft": tiny_model(seed=0)[0], "dpo": tiny_model(seed=2)[0], "ppo": tiny_model(seed=5)[0]}
    for stage in ("sft", "reward", "dpo", "ppo"):
        for mine, theirs, reference in zip(ranks[0][stage], ranks[1][stage], single[stage]):
            assert torch.equal(mine, theirs), stage  # the ranks agree exactly
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
        if stage in untrained:  # and the step did move the weights
            assert not all(torch.equal(p, q.detach()) for p, q in zip(single[stage], untrained[stage].parameters()))
    for global_moment, local_moment in zip(ranks[0]["moments"], single["moments"]):  # whitening: the global batch's
        torch.testing.assert_close(global_moment, local_moment, rtol=1e-5, atol=1e-7)


TINY = ["--task.demonstrations", "500", "--task.eval-prompts", "40", "--model.width", "32", "--model.heads", "2",
        "--sft.steps", "30", "--sft.batch-size", "32", "--reward.labels", "120", "--reward.epochs", "1",
        "--ppo.prompts-per-iteration", "32", "--ppo.minibatch-size", "16", "--ppo.eval-every", "2",
        "--ppo.relabel-every", "2", "--ppo.relabel-pairs", "16", "--ppo.refit-steps", "2", "--threads", "1"]


@pytest.mark.slow
def test_torchrun_rlhf_writes_one_run_that_generate_reads(tmp_path):
    launcher = torchrun(["rlhf", *TINY, "--ppo.iterations", "4", "--stages", "sft,reward,ppo,dpo",
                         "--runs-dir", str(tmp_path / "runs")], tmp_path)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    assert out.count("run directory:") == 1  # rank 0 alone reports
    (run_dir,) = (tmp_path / "runs").iterdir()  # rank 0 alone created it
    for stage in ("sft", "reward", "ppo", "dpo"):
        assert (run_dir / stage / "summary.json").is_file() and (run_dir / stage / "model").is_dir()
    iterations = [int(line.split(",")[0]) for line in (run_dir / "ppo" / "metrics.csv").read_text().splitlines()[1:]]
    assert iterations == [1, 2, 3, 4]
    labels = json.loads((run_dir / "ppo" / "summary.json").read_text())["labels"]
    assert labels == 120 + 2 * 16  # rank 0 labelled each round once
    assert len((run_dir / "ppo" / "comparisons.jsonl").read_text().splitlines()) == 2 * 16
    generated = subprocess.run([sys.executable, "-m", "proximal", "generate", str(run_dir / "ppo"), "12+34="],
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0 and "12+34=" in generated.stdout, generated.stderr


@pytest.mark.slow
def test_a_torchrun_rlhf_killed_mid_ppo_resumes_to_the_end(tmp_path):
    arguments = ["rlhf", *TINY, "--ppo.iterations", "40", "--run-dir", str(tmp_path / "run")]
    launcher = torchrun(arguments, tmp_path)
    checkpoint, deadline = tmp_path / "run" / "ppo" / "checkpoint.pt", time.monotonic() + 240
    while not checkpoint.exists():  # the kill is tied to progress: right after PPO's first checkpoint
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.02)
    kill_launcher_and_ranks(launcher)
    assert not (tmp_path / "run" / "ppo" / "summary.json").exists()
    resumed = torchrun(arguments, tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert out.count("(finished before; skipped)") == 2  # sft and reward; ppo continues from its checkpoint
    metrics = (tmp_path / "run" / "ppo" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in metrics] == list(range(1, 41))  # each iteration once
    records = (tmp_path / "run" / "ppo" / "comparisons.jsonl").read_text().splitlines()
    assert len(records) == 20 * 16  # no round labelled twice


def test_a_world_size_that_does_not_split_a_batch_fails_in_one_line_per_rank_and_writes_nothing(tmp_path):
    launcher = torchrun(["rlhf", *TINY, "--runs-dir", str(tmp_path / "runs")], tmp_path, processes=3)
    out, err = launcher.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("proximal rlhf: error:")]
    # Once one rank has exited, torchrun stops the others: a rank slower to reach the check (a busy
    # machine) is stopped before it says anything, so 1 to 3 lines (as for `proximal train`).
    assert launcher.returncode != 0 and 1 <= len(lines) <= 3
    assert all("--sft.batch-size 32 does not split over 3 processes" in line for line in lines)
    assert not (tmp_path / "runs").exists()


def test_an_rlhf_rank_that_cannot_reach_the_others_stops_with_one_line(tmp_path):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    finished = subprocess.run([sys.executable, "-m", "proximal", "rlhf", *TINY, "--dist-timeout", "3",
                               "--runs-dir", str(tmp_path / "runs")], env=env, capture_output=True, text=True,
                              timeout=60)
    assert finished.returncode == 1 and time.monotonic() - start < 45
    assert finished.stderr.count("\n") == 1 and "rank 1 of 2: could not join the others" in finished.stderr
    assert not (tmp_path / "runs").exists()


def on_main_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Rank 0 works alone for twice the collectives' timeout, then fails; the others wait for it
    and stop with one line naming rank 0's error."""
    from proximal.dist import DistributedError, join, leave
    from proximal.errors import ProximalError

    from datetime import timedelta

    from torch.distributed.distributed_c10d import _set_pg_timeout

    as_rank(rank, world_size, port)
    dist = join(60)  # joining may be slow on a busy machine: the test's clock starts once both are in
    _set_pg_timeout(timedelta(seconds=2))  # from here a collective that waits longer than 2 s fails

    def slow() -> str:
        time.sleep(5)
        return "labelled"

    def failing() -> None:
        raise ProximalError("the person closed the page")

    outcome = {"result": dist.on_main(slow)}
    try:
        dist.on_main(failing)
    except (DistributedError, ProximalError) as error:
        outcome["error"] = f"{type(error).__name__}: {error}"
    with open(f"{out}/rank{rank}.json", "w") as file:
        json.dump(outcome, file)
    leave()


def test_ranks_wait_for_rank_0_working_alone_past_the_timeout_and_stop_with_its_error(tmp_path):
    mp.spawn(on_main_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["result"] == ranks[1]["result"] == "labelled"
    assert ranks[0]["error"] == "ProximalError: the person closed the page"
    assert ranks[1]["error"] == "DistributedError: rank 1 of 2: rank 0 stopped (the person closed the page)"

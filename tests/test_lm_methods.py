"""The alternatives to PPO on the LM pipeline: RLOO's leave-one-out advantages and DPO's loss,
each against a hand computation or a brute-force loop, and both stages end to end."""

import json
import math

import numpy as np
import pytest
import torch
from test_lm_pipeline import TINY, run_cli

from lm_helpers import completions_for, tiny_model
from proximal.lm.config import PPOStageConfig
from proximal.lm.dpo import dpo_loss, implicit_accuracy, reference_pair_logprobs, sequence_logprobs
from proximal.lm.labels import pairs_from_records
from proximal.lm.model import ScalarHeadLM
from proximal.lm.reward import RewardModelScorer
from proximal.lm.rollout import collect_rollout, leave_one_out_advantages


def test_leave_one_out_advantages_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3], [-4 / 3, -4 / 3, -4 / 3, 4.0]])
    assert torch.allclose(leave_one_out_advantages(returns), expected)
    # the same as k / (k - 1) times the deviation from the prompt's mean, which sums to 0 per prompt
    k = returns.shape[1]
    assert torch.allclose(leave_one_out_advantages(returns), k / (k - 1) * (returns - returns.mean(1, keepdim=True)))


def test_rloo_rollout_gives_each_response_one_advantage_from_its_own_prompts_group():
    model, tokenizer = tiny_model(0)
    policy, reward_model = ScalarHeadLM(tiny_model(1)[0]), ScalarHeadLM(tiny_model(2)[0], head_bias=0.5)
    torch.nn.init.normal_(reward_model.head.weight, std=1.0)
    prompts = ["12+34=", "12+34=", "12+34=", "5+5=", "5+5=", "5+5="]
    responses, ended = ["46", "4", "463", "10", "1", "10"], [True, True, False, True, True, True]
    completions = completions_for(tokenizer, prompts, responses, ended)
    config = PPOStageConfig(method="rloo", rloo_samples=3, prompts_per_iteration=6, minibatch_size=3, kl_coef=0.2)
    minibatches = [torch.tensor([0, 4, 2]), torch.tensor([1, 3, 5])]
    scorer = RewardModelScorer(reward_model, config.missing_eos_score)
    rollout = collect_rollout(policy, model, scorer, prompts, completions, tokenizer, minibatches, config, config.kl_coef)
    mask = completions.response_mask
    returns = rollout.rewards.sum(-1)  # [6]: score - beta * k1 of each response
    k1 = torch.where(mask, rollout.logprobs - rollout.ref_logprobs, torch.zeros(())).sum(-1)
    assert torch.allclose(returns, rollout.scores - 0.2 * k1, atol=1e-6)
    assert rollout.scores[2] == config.missing_eos_score  # cut without EOS
    for row in range(6):
        group = [i for i in range(6) if i // 3 == row // 3 and i != row]
        expected = returns[row] - returns[group].mean()
        assert torch.allclose(rollout.advantages[row][mask[row]], expected.expand(int(mask[row].sum())), atol=1e-6)
        assert (rollout.advantages[row][~mask[row]] == 0).all()
    assert (rollout.values == 0).all()


def _pairs(tokenizer, labels):
    records = [{"prompt": p, "responses": r, "ended": [True, True], "label": label, "true_returns": [1.0, 0.0],
                "validation": False}
               for p, r, label in zip(["12+34=", "47+38=", "5+5="], [["46", "36"], ["85", "75"], ["10", "1"]], labels)]
    return pairs_from_records(records, tokenizer, "cpu")


def test_sequence_logprobs_match_a_token_by_token_loop():
    model, tokenizer = tiny_model(0)
    pairs = _pairs(tokenizer, [1.0, 1.0, 0.0])
    with torch.no_grad():
        got = sequence_logprobs(model, pairs.first)
    for row, (prompt, response) in enumerate([("12+34=", "46"), ("47+38=", "85"), ("5+5=", "10")]):
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        total = 0.0
        for token in [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            total += float(torch.log_softmax(logits, -1)[token])
            ids.append(token)
        assert math.isclose(float(got[row]), total, abs_tol=1e-4)


def test_dpo_loss_by_hand_and_its_start_at_log_2():
    policy, tokenizer = tiny_model(0)
    reference = tiny_model(1)[0]
    pairs = _pairs(tokenizer, [1.0, 0.0, 0.5])
    ref = reference_pair_logprobs(reference, pairs)
    with torch.no_grad():
        pi_1, pi_2 = sequence_logprobs(policy, pairs.first), sequence_logprobs(policy, pairs.second)
        beta = 0.3
        margin = beta * ((pi_1 - ref[:, 0]) - (pi_2 - ref[:, 1]))  # [3]
        expected = -(torch.nn.functional.logsigmoid(margin[0]) + torch.nn.functional.logsigmoid(-margin[1])
                     + 0.5 * torch.nn.functional.logsigmoid(margin[2]) + 0.5 * torch.nn.functional.logsigmoid(-margin[2])) / 3
        assert torch.allclose(dpo_loss(policy, pairs, ref, beta), expected, atol=1e-6)
        # a policy equal to its reference has implicit rewards 0: the loss is log 2 whatever the labels
        own = reference_pair_logprobs(policy, pairs)
        assert math.isclose(float(dpo_loss(policy, pairs, own, beta)), math.log(2), abs_tol=1e-6)


def test_dpo_steps_raise_the_preferred_response_relative_to_the_reference():
    policy, tokenizer = tiny_model(0)
    reference = tiny_model(0)[0]
    pairs = _pairs(tokenizer, [1.0, 1.0, 1.0])
    ref = reference_pair_logprobs(reference, pairs)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(20):
        loss = dpo_loss(policy, pairs, ref, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert implicit_accuracy(policy, pairs, ref, 0.5)["accuracy"] == 1.0
    with torch.no_grad():
        gain_1, gain_2 = sequence_logprobs(policy, pairs.first) - ref[:, 0], sequence_logprobs(policy, pairs.second) - ref[:, 1]
        assert (gain_1 > gain_2).all()


@pytest.mark.slow
def test_the_rloo_and_dpo_stages_run_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), *TINY, "--ppo.method", "rloo",
                              "--ppo.rloo-samples", "4"], capsys)
    assert code == 0, err
    rows = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    rloo = [*TINY, "--ppo.method", "rloo", "--ppo.rloo-samples", "4"]
    # DPO with settings of its own on the finished run's pairs: the dpo section need not match...
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), *rloo, "--stages", "dpo", "--dpo.beta", "0.5"], capsys)
    assert code == 0, err
    assert out.startswith("dpo: ") and "KL" in out
    assert json.loads((run_dir / "config.json").read_text())["dpo"]["beta"] == 0.5
    # ...and the record stays true when the other stages are continued without dpo flags
    assert run_cli(["rlhf", "--run-dir", str(run_dir), *rloo], capsys)[0] == 0
    assert json.loads((run_dir / "config.json").read_text())["dpo"]["beta"] == 0.5
    # once the dpo stage has run, it is continued only with its own settings
    code, _, err = run_cli(["rlhf", "--run-dir", str(run_dir), *rloo, "--stages", "dpo", "--dpo.beta", "2"], capsys)
    assert code != 0 and "was run with another config" in err
    summary = json.loads((run_dir / "dpo" / "summary.json").read_text())
    assert summary["eval"]["kl_k3"] >= 0 and 0 <= summary["eval"]["gold_greedy"] <= 1
    assert (run_dir / "dpo" / "dpo.png").is_file() and (run_dir / "dpo" / "model" / "config.json").is_file()


def test_rloo_needs_a_batch_its_groups_divide():
    from proximal.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of rloo_samples"):
        PPOStageConfig(method="rloo", rloo_samples=3, prompts_per_iteration=256)


def test_best_of_n_probabilities_by_hand_and_with_ties():
    from proximal.lm.best_of_n import best_of_n_probabilities

    p = np.array([0.5, 0.3, 0.2])
    assert np.allclose(best_of_n_probabilities(p, np.array([0.0, 1.0, 2.0]), 1), p)
    assert np.allclose(best_of_n_probabilities(p, np.array([0.0, 1.0, 2.0]), 2), [0.25, 0.64 - 0.25, 1 - 0.64])
    # a tie at the top: the group's share (1 - 0.5^2) split 3:2, as its members are drawn
    assert np.allclose(best_of_n_probabilities(p, np.array([0.0, 1.0, 1.0]), 2), [0.25, 0.75 * 0.6, 0.75 * 0.4])


def test_best_of_n_matches_drawing_n_and_keeping_the_best_and_respects_the_kl_bound():
    from proximal.lm.best_of_n import analytic_kl_bound, best_of_n_probabilities, kl_divergence

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(12))
    scores = rng.normal(size=12)
    for n in (1, 3, 8):
        exact = best_of_n_probabilities(p, scores, n)
        draws = rng.choice(12, size=(200_000, n), p=p)
        best = np.take_along_axis(draws, scores[draws].argmax(1)[:, None], 1).ravel()
        assert np.allclose(np.bincount(best, minlength=12) / len(best), exact, atol=4e-3)
        assert math.isclose(exact.sum(), 1.0)
        assert kl_divergence(exact, p) <= analytic_kl_bound(n) + 1e-12
    # many equally likely atoms with distinct scores: the bound is reached in the limit
    many = np.full(100_000, 1e-5)
    assert math.isclose(kl_divergence(best_of_n_probabilities(many, np.arange(100_000.0), 4), many),
                        analytic_kl_bound(4), abs_tol=1e-3)


def test_response_support_finds_exact_probabilities_that_sum_to_at_most_one():
    from proximal.lm.best_of_n import best_of_n_curve, response_support
    from proximal.lm.tasks import AdditionTask

    model, tokenizer = tiny_model(0)
    reward_model = ScalarHeadLM(tiny_model(1)[0])
    supports = response_support(model, reward_model, tokenizer, AdditionTask().gold, ["12+34=", "5+5="], 64, 3, -3.0,
                                torch.Generator().manual_seed(0), "cpu")
    for support in supports:
        assert math.isclose(support.probabilities.sum(), 1.0) and (support.probabilities >= 0).all()
        assert support.scores[-1] < support.scores[:-1].min()  # the unseen mass scores lowest
    curve = best_of_n_curve(supports, [1, 4])
    assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-12)
    assert 0 < curve[1]["kl"] <= curve[1]["kl_bound"]


def test_the_gao_fit_recovers_known_coefficients_and_its_peak():
    from proximal.lm.studies import fit_gao, gao_peak

    d = np.linspace(0.0, 3.0, 31)
    gain = d * (0.8 - 0.5 * np.log(np.where(d > 0, d, 1.0)))
    alpha, b = fit_gao(d, gain)
    assert math.isclose(alpha, 0.8, abs_tol=1e-9) and math.isclose(b, 0.5, abs_tol=1e-9)
    peak = gao_peak(alpha, b)  # d (alpha - b log d) has slope alpha - b log d - b = 0 there
    assert math.isclose(alpha - b * math.log(peak) - b, 0.0, abs_tol=1e-9)
    assert gao_peak(0.5, -0.1) == math.inf  # no over-optimisation: it never turns down


@pytest.mark.slow
def test_every_study_runs_on_a_tiny_pipeline_and_writes_its_figure_table_and_numbers(tmp_path):
    from proximal.lm.config import RLHFConfig, StudyConfig
    from proximal.lm.studies import RUNNERS, run_study
    from proximal.run import read_csv_rows

    tiny = RLHFConfig().with_overrides({
        "task": {"demonstrations": 500, "eval_prompts": 40}, "model": {"width": 32, "heads": 2},
        "sft": {"steps": 30, "batch_size": 32}, "reward": {"epochs": 1},
        "ppo": {"prompts_per_iteration": 32, "minibatch_size": 16, "eval_every": 2, "relabel_every": 2,
                "relabel_pairs": 16, "refit_steps": 2}})
    config = StudyConfig(seed=0, label_budgets=(60, 120), betas=(0.0, 0.3), iterations=4, best_of_n=(1, 4),
                         best_of_n_prompts=10, best_of_n_samples=16, dpo_betas=(0.1,), label_noise=(0.0, 0.25))
    lines = []
    results = {name: run_study(name, config, tmp_path / "runs", tmp_path / "out", lines.append, tiny)
               for name in RUNNERS}
    for name in ("overoptimisation", "best_of_n", "methods", "label_noise"):
        for suffix in (".png", ".md", ".json"):
            assert (tmp_path / "out" / f"{name}{suffix}").is_file(), name + suffix
    # the SFT model and each reward model were trained once and shared by copy
    assert sum(line == "sft: sft ..." for line in lines) == 1
    assert sum(line == "rm-120: reward ..." for line in lines) == 1
    points = results["overoptimisation"]["budgets"]["60"]["runs"]["0"]["points"]
    rows = read_csv_rows(tmp_path / "runs" / "rm-60-beta-0" / "ppo" / "metrics.csv")  # 4 iterations: one block
    assert [p["iteration"] for p in points] == [4]
    assert points[0]["gold"] == pytest.approx(np.mean([r["gold"] for r in rows]))
    assert points[0]["kl"] == pytest.approx(max(0.0, np.mean([r["kl_k1"] for r in rows])))
    assert rows[0]["kl_k1"] == 0.0  # the first batch is sampled before any update: the policy is the SFT model
    assert results["best-of-n"]["120"][0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert {"PPO", "RLOO (k = 4)", "DPO (beta 0.1)"} <= set(results["methods"])
    # a rerun finds every variant finished and trains nothing
    lines.clear()
    run_study("methods", config, tmp_path / "runs", tmp_path / "out", lines.append, tiny)
    assert not [line for line in lines if line.endswith("...")]

"""The alternatives to PPO on the LM pipeline: RLOO's leave-one-out advantages and DPO's loss,
each against a hand computation or a brute-force loop, and both stages end to end."""

import json
import math

import pytest
import torch

from lm_helpers import completions_for, tiny_model
from proximal.lm.config import PPOConfig
from proximal.lm.dpo import dpo_loss, implicit_accuracy, reference_pair_logprobs, sequence_logprobs
from proximal.lm.labels import pairs_from_records
from proximal.lm.model import ScalarHeadLM
from proximal.lm.ppo import collect_rollout
from proximal.lm.rollout import leave_one_out_advantages
from test_lm_pipeline import TINY, run_cli


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
    config = PPOConfig(method="rloo", rloo_samples=3, prompts_per_iteration=6, minibatch_size=3, kl_coef=0.2)
    minibatches = [torch.tensor([0, 4, 2]), torch.tensor([1, 3, 5])]
    rollout = collect_rollout(policy, model, reward_model, completions, minibatches, config, config.kl_coef)
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
        assert (sequence_logprobs(policy, pairs.first) - ref[:, 0] > sequence_logprobs(policy, pairs.second) - ref[:, 1]).all()


@pytest.mark.slow
def test_the_rloo_and_dpo_stages_run_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), *TINY, "--ppo.method", "rloo",
                              "--ppo.rloo-samples", "4"], capsys)
    assert code == 0, err
    rows = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), *TINY, "--ppo.method", "rloo", "--ppo.rloo-samples",
                              "4", "--stage", "dpo"], capsys)
    assert code == 0, err
    assert out.startswith("dpo: ") and "KL" in out
    summary = json.loads((run_dir / "dpo" / "summary.json").read_text())
    assert summary["eval"]["kl_k3"] >= 0 and 0 <= summary["eval"]["gold_greedy"] <= 1
    assert (run_dir / "dpo" / "dpo.png").is_file() and (run_dir / "dpo" / "model" / "config.json").is_file()


def test_rloo_needs_a_batch_its_groups_divide():
    from proximal.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of rloo_samples"):
        PPOConfig(method="rloo", rloo_samples=3, prompts_per_iteration=256)

"""GRPO and its variants, each against a hand computation: group-normalised advantages (and Dr.
GRPO's unscaled ones), the loss averaged per token, per sequence or by a constant, the KL as k3
inside the loss, DAPO's asymmetric clip; and the stage end to end."""

import json
import math

import pytest
import torch
from test_lm_pipeline import TINY, run_cli

from lm_helpers import completions_for, tiny_model
from proximal.errors import ConfigError
from proximal.lm.config import PPOStageConfig
from proximal.lm.model import ScalarHeadLM, sample_completions
from proximal.lm.ppo import ppo_update
from proximal.lm.rollout import GROUP_STD_EPS, collect_rollout, group_advantages, policy_outputs
from proximal.losses import clipped_surrogate, kl_k3, masked_aggregate, ratio_statistics


def test_group_advantages_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)  # unbiased: divided by k - 1 = 3
    expected = torch.tensor([[(r - 3) / (std + GROUP_STD_EPS) for r in (1, 2, 3, 6)], [0.0] * 4])
    assert torch.allclose(group_advantages(returns), expected)
    # a planted bug, the population std (divided by k), gives other numbers: the test above would catch it
    population = (returns - returns.mean(1, keepdim=True)) / (returns.std(1, unbiased=False, keepdim=True) + 1e-4)
    assert not torch.allclose(population[0], expected[0], atol=1e-3)
    # a group whose rewards are all equal has nothing to learn: 0, not 0 / 0
    assert torch.equal(group_advantages(returns)[1], torch.zeros(4))
    # Dr. GRPO: the deviation from the group's mean, unscaled (the mean includes the response itself)
    assert torch.allclose(group_advantages(returns, scale=False), torch.tensor([[-2.0, -1.0, 0.0, 3.0], [0.0] * 4]))


def test_the_loss_aggregations_by_hand_and_their_slices_add_up():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    by_hand = {"token": (1 + 2 + 3 + 4 + 6 + 0) / 6,  # every token weighs the same
               "sequence": ((1 + 2 + 3) / 3 + 4 / 1 + (6 + 0) / 2) / 3,  # every response does
               "constant": (1 + 2 + 3 + 4 + 6 + 0) / (3 * 5)}  # responses x max_new_tokens (5)
    for how, expected in by_hand.items():
        whole = masked_aggregate(values, mask, how, rows=3, tokens=6, max_length=5)
        assert float(whole) == pytest.approx(expected), how
        slices = [masked_aggregate(values[rows], mask[rows], how, rows=3, tokens=6, max_length=5)
                  for rows in (slice(0, 1), slice(1, 3))]
        assert float(sum(slices)) == pytest.approx(expected), how  # a micro-batch's share of the batch's loss
    with pytest.raises(ValueError, match="token, sequence, constant"):
        masked_aggregate(values, mask, "mean", 3, 6, 5)


def test_dapos_clip_higher_by_hand():
    logprobs = torch.log(torch.tensor([1.25, 1.25, 0.75, 1.35])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    old = torch.zeros(4)
    symmetric = clipped_surrogate(logprobs, old, advantages, 0.2)
    assert torch.allclose(symmetric, torch.tensor([1.2, -1.25, -0.8, 1.2]))
    higher = clipped_surrogate(logprobs, old, advantages, 0.2, clip_coef_high=0.28)
    assert torch.allclose(higher, torch.tensor([1.25, -1.25, -0.8, 1.28]))  # up to 1.28 now, down still to 0.8
    higher.sum().backward()
    # the gradient flows where the ratio is inside [0.8, 1.28] or the change made things worse, and is 0 where clipped
    assert torch.allclose(logprobs.grad, torch.tensor([1.25, -1.25, 0.0, 0.0]))
    _, fraction = ratio_statistics(logprobs.detach(), old, 0.2, clip_coef_high=0.28)
    assert float(fraction) == pytest.approx(2 / 4)  # 0.75 and 1.35 lie outside [0.8, 1.28]
    _, symmetric_fraction = ratio_statistics(logprobs.detach(), old, 0.2)
    assert float(symmetric_fraction) == pytest.approx(1.0)


def test_kl_k3_by_hand():
    log_ratio = torch.tensor([0.0, math.log(2.0), math.log(0.5)])
    assert torch.allclose(kl_k3(log_ratio), torch.tensor([0.0, 1 - math.log(2.0), -0.5 + math.log(2.0)]))


def _grpo_setup(**overrides):
    _, tokenizer = tiny_model(0)
    policy, reference = ScalarHeadLM(tiny_model(5)[0]), tiny_model(0)[0]
    prompts = ["12+34="] * 3 + ["5+5="] * 3
    completions = completions_for(tokenizer, prompts, ["46", "4", "463", "10", "1", "10"], [True] * 5 + [False])
    config = PPOStageConfig(**{"method": "grpo", "rloo_samples": 3, "prompts_per_iteration": 6, "minibatch_size": 6,
                               "epochs": 1, "max_grad_norm": 1e9, **overrides})

    class Fixed:  # each response's score, whichever pass it is scored in
        table = {("46", True): 1.0, ("4", True): 0.0, ("463", True): 2.0, ("10", True): 3.0, ("1", True): 3.0,
                 ("10", False): 0.0}

        def scores(self, prompts, completions, tokenizer):
            keys = zip(completions.texts(tokenizer), completions.ended.tolist())
            return torch.tensor([self.table.get(key, float(len(key[0]))) for key in keys])  # sampled ones: by length

    return policy, reference, Fixed(), tokenizer, prompts, completions, config


def test_grpo_rollout_normalises_each_prompts_group_and_leaves_the_kl_out_of_the_reward_when_it_is_in_the_loss():
    policy, reference, scorer, tokenizer, prompts, completions, config = _grpo_setup(kl_in="loss", kl_coef=0.3)
    rollout = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer, [torch.arange(6)], config,
                              config.kl_coef)
    mask = completions.response_mask
    assert torch.count_nonzero(rollout.kl_penalty) == 0  # the KL goes into the loss, not the reward
    assert torch.allclose(rollout.rewards.sum(-1), torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0, 0.0]))
    std_a, std_b = math.sqrt((0 + 1 + 1) / 2), math.sqrt((1 + 1 + 4) / 2)  # groups (1, 0, 2) and (3, 3, 0)
    expected = [0 / std_a, -1 / std_a, 1 / std_a, 1 / std_b, 1 / std_b, -2 / std_b]
    for row in range(6):
        assert torch.allclose(rollout.advantages[row][mask[row]],
                              torch.tensor(expected[row] / (1 + GROUP_STD_EPS / (std_a if row < 3 else std_b))),
                              atol=1e-5)
    # with the KL in the reward (k1 per token, as for PPO and RLOO) the returns carry -beta * k1
    in_reward = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer, [torch.arange(6)],
                                _grpo_setup(kl_coef=0.3)[-1], 0.3)
    k1 = torch.where(mask, in_reward.logprobs - in_reward.ref_logprobs, torch.zeros(())).sum(-1)
    assert torch.allclose(in_reward.rewards.sum(-1), rollout.scores - 0.3 * k1, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_grpos_update_is_the_gradient_of_the_loss_written_out_by_hand(aggregation):
    """The update's gradient against autograd on the loss written out independently: at ratio 1
    the surrogate is A * ratio, plus beta * k3 per token, reduced as `aggregation` says."""
    policy, reference, scorer, tokenizer, prompts, completions, config = _grpo_setup(
        kl_in="loss", kl_coef=0.3, loss_aggregation=aggregation)
    rollout = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer, [torch.arange(6)], config,
                              config.kl_coef)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    stats = ppo_update(policy, optimizer, rollout, [torch.arange(6)], config, torch.Generator().manual_seed(0),
                       kl_coef=config.kl_coef)
    assert stats["first_ratio_error"] == 0.0
    gradients = lambda: [torch.zeros_like(p) if p.grad is None else p.grad.clone()  # noqa: E731
                         for p in policy.parameters()]  # the value head has none: GRPO has no critic
    update_gradients = gradients()

    policy.zero_grad(set_to_none=True)
    logprobs, _, _ = policy_outputs(policy, completions, 1.0)
    mask = completions.response_mask
    loss = torch.zeros(())
    rows, lengths = [], mask.sum(-1)
    for row in range(6):
        advantage = rollout.advantages[row, 0]  # one per response, unwhitened for GRPO
        terms = []
        for t in range(int(lengths[row])):
            ratio = torch.exp(logprobs[row, t] - logprobs[row, t].detach())
            log_ref_ratio = rollout.ref_logprobs[row, t] - logprobs[row, t]
            terms.append(-ratio * advantage + 0.3 * (torch.exp(log_ref_ratio) - 1 - log_ref_ratio))
        rows.append(terms)
    if aggregation == "token":
        loss = sum(sum(terms) for terms in rows) / int(lengths.sum())
    elif aggregation == "sequence":
        loss = sum(sum(terms) / len(terms) for terms in rows) / 6
    else:
        loss = sum(sum(terms) for terms in rows) / (6 * config.max_new_tokens)
    loss.backward()
    for gradient, by_hand in zip(update_gradients, gradients()):
        assert torch.allclose(gradient, by_hand, rtol=1e-4, atol=1e-7)
    assert max(float(g.abs().max()) for g in update_gradients) > 1e-4
    assert float(stats["policy_loss"]) == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-7)


def test_grpo_stage_runs_end_to_end_and_bad_settings_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    grpo = [*TINY, "--ppo.method", "grpo", "--ppo.rloo-samples", "4", "--ppo.kl-in", "loss", "--ppo.kl-coef", "0.04",
            "--ppo.loss-aggregation", "sequence", "--ppo.clip-coef-high", "0.28"]
    code, out, err = run_cli(["rlhf", "--run-dir", str(run_dir), *grpo], capsys)
    assert code == 0, err
    rows = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    config = json.loads((run_dir / "config.json").read_text())["ppo"]
    assert (config["method"], config["kl_in"], config["loss_aggregation"]) == ("grpo", "loss", "sequence")
    for flags, message in ((["--ppo.kl-in", "logits"], "--ppo.kl-in must be reward or loss"),
                           (["--ppo.loss-aggregation", "mean"], "--ppo.loss-aggregation must be token or sequence or "
                                                                "constant"),
                           (["--ppo.micro-batch-size", "-1"], "--ppo.micro-batch-size must be an integer >= 0")):
        code, _, err = run_cli(["rlhf", "--run-dir", str(tmp_path / "bad"), *TINY, *flags], capsys)
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ConfigError, match="multiple of rloo_samples"):
        PPOStageConfig(method="grpo", rloo_samples=3, prompts_per_iteration=256)


def test_with_the_kl_in_the_loss_the_rollout_skips_its_policy_pass_and_the_update_is_unchanged():
    """GRPO as TRL runs it (KL in the loss, one minibatch): the update's own passes give the old
    log-probs. The same gradient, old log-probs and statistics as with the rollout's policy pass,
    a first ratio of exactly 1, and one policy pass fewer."""
    results = {}
    for policy_pass in (True, False):
        policy, reference, scorer, tokenizer, prompts, completions, config = _grpo_setup(kl_in="loss", kl_coef=0.3)
        assert config.old_logprobs_in_update
        passes = []
        policy.head.register_forward_hook(lambda *_: passes.append(1))  # the head runs once per policy pass
        first = [torch.tensor([4, 1, 3]), torch.tensor([0, 5, 2])]  # two passes of one minibatch
        rollout = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer, first, config,
                                  config.kl_coef, policy_pass=policy_pass)
        stats = ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), rollout, [torch.cat(first)], config,
                           torch.Generator().manual_seed(0), micro_rows=3, kl_coef=config.kl_coef)
        gradients = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
        results[policy_pass] = (stats, gradients, rollout.logprobs.clone(), len(passes))
    (stats, gradients, logprobs, count), (lazy_stats, lazy_gradients, lazy_logprobs, lazy_count) = results.values()
    assert lazy_stats["first_ratio_error"] == 0.0 and stats["first_ratio_error"] == 0.0
    assert lazy_count == count - 2  # the rollout's two passes
    mask = _grpo_setup()[5].response_mask
    assert torch.allclose(lazy_logprobs[mask], logprobs[mask], atol=1e-6)
    for lazy, eager in zip(lazy_gradients, gradients):
        assert torch.allclose(lazy, eager, rtol=1e-4, atol=1e-7)
    assert lazy_stats["approx_kl"] == pytest.approx(stats["approx_kl"], abs=1e-7)
    # PPO reads values, two minibatches would step in between: no skipping
    for settings in ({"method": "ppo", "kl_in": "loss"}, {"method": "ppo"},
                     {"method": "grpo", "kl_in": "loss", "minibatch_size": 4}, {"method": "rloo", "minibatch_size": 4}):
        assert not PPOStageConfig(**{"prompts_per_iteration": 8, "minibatch_size": 8, **settings}).old_logprobs_in_update


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_with_the_kl_in_the_reward_the_rollout_reads_the_samplers_logprobs_and_the_update_is_unchanged(method):
    """RLOO as the sentiment preset runs it (KL k1 in the reward, one minibatch): no policy pass in
    the rollout; the reward's KL reads the log-probs the sampler drew each token with. The same
    rewards, advantages and gradient as with the pass (to float tolerance: the cached decode sums
    in another order), a first ratio of exactly 1, one policy pass fewer."""
    results = {}
    for policy_pass in (True, False):
        policy, reference, scorer, tokenizer, prompts, _, config = _grpo_setup(kl_coef=0.3, method=method,
                                                                               temperature=0.7)
        assert config.kl_in == "reward" and config.old_logprobs_in_update
        completions = sample_completions(policy.lm, tokenizer, prompts, 4, 0.7, torch.Generator().manual_seed(3), "cpu")
        passes = []
        policy.head.register_forward_hook(lambda *_: passes.append(1))
        first = [torch.tensor([4, 1, 3]), torch.tensor([0, 5, 2])]
        rollout = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer, first, config,
                                  config.kl_coef, policy_pass=policy_pass)
        rewards, advantages = rollout.rewards.clone(), rollout.advantages.clone()
        stats = ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), rollout, [torch.cat(first)], config,
                           torch.Generator().manual_seed(0), micro_rows=3, kl_coef=config.kl_coef)
        gradients = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
        results[policy_pass] = (stats, gradients, rewards, advantages, len(passes), completions.response_mask)
    (stats, gradients, rewards, advantages, count, mask), (lazy_stats, lazy_gradients, lazy_rewards, lazy_advantages,
                                                           lazy_count, _) = results.values()
    assert torch.count_nonzero(rewards[mask] - rewards[mask].sum()) > 0  # the KL is in the reward, token by token
    assert lazy_stats["first_ratio_error"] == 0.0 and stats["first_ratio_error"] == 0.0
    assert lazy_count == count - 2
    assert torch.allclose(lazy_rewards[mask], rewards[mask], atol=1e-5)
    assert torch.allclose(lazy_advantages[mask], advantages[mask], atol=1e-4)
    for lazy, eager in zip(lazy_gradients, gradients):
        assert torch.allclose(lazy, eager, rtol=1e-3, atol=1e-6)

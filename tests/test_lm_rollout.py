"""Where the score lands, the per-token KL, GAE over tokens, the first ratio, the KL estimators."""

import math

import torch

import pytest

from lm_helpers import DEVICES, completions_for, tiny_model
from proximal.losses import clipped_surrogate_loss, masked_mean, masked_whiten
from proximal.lm.config import PPOStageConfig
from proximal.lm.model import ScalarHeadLM, sample_completions, token_logprobs
from proximal.lm.ppo import ppo_update
from proximal.lm.reward import RewardModelScorer
from proximal.lm.rollout import (AdaptiveKLController, KLBudget, collect_rollout, policy_outputs, sequence_kls,
                                 shuffled_groups, token_advantages, token_rewards)

PROMPTS = ["7+5=", "47+38=", "1+99=", "30+4="]
RESPONSES = ["12", "85", "10000", "3"]
ENDED = [True, True, False, True]  # the third is cut at the length limit without EOS


def models(policy_seed=0, reward_seed=1, device="cpu"):
    reference, tokenizer = tiny_model(seed=0)
    policy_lm, _ = tiny_model(seed=policy_seed)
    reward_lm, _ = tiny_model(seed=reward_seed)
    reward_model = ScalarHeadLM(reward_lm)
    torch.nn.init.normal_(reward_model.head.weight)  # a head that gives scores of varied size
    return (ScalarHeadLM(policy_lm).to(device), reference.to(device), reward_model.eval().to(device), tokenizer)


@pytest.mark.parametrize("device", DEVICES)
def test_policy_equal_to_reference_gives_exactly_zero_kl_and_the_bare_score_at_eos(device):
    policy, reference, reward_model, tokenizer = models(policy_seed=0, device=device)  # policy == reference weights
    batch = completions_for(tokenizer, PROMPTS, RESPONSES, ENDED, device)
    minibatches = list(torch.arange(4, device=device).split(2))
    for temperature in (1.0, 0.6):
        config = PPOStageConfig(temperature=temperature, prompts_per_iteration=4, minibatch_size=2, missing_eos_score=-3.0)
        rollout = collect_rollout(policy, reference, RewardModelScorer(reward_model, config.missing_eos_score), PROMPTS,
                                  batch, tokenizer, minibatches, config, kl_coef=0.5)
        assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
        assert torch.count_nonzero(rollout.kl_penalty) == 0
        expected = torch.zeros_like(rollout.rewards)
        for row in range(4):
            expected[row, int(batch.last_index[row])] = rollout.scores[row]
        assert torch.equal(rollout.rewards, expected)


def test_the_score_lands_on_each_eos_and_a_cut_response_gets_the_missing_eos_score():
    policy, reference, reward_model, tokenizer = models()
    batch = completions_for(tokenizer, PROMPTS, RESPONSES, ENDED)
    eos = tokenizer.eos_token_id
    for row, end in enumerate(ENDED):  # last_index is the EOS token where there is one
        if end:
            assert batch.response_ids[row, batch.last_index[row]] == eos
    config = PPOStageConfig(prompts_per_iteration=4, minibatch_size=4, missing_eos_score=-3.0)
    rollout = collect_rollout(policy, reference, RewardModelScorer(reward_model, config.missing_eos_score), PROMPTS, batch,
                              tokenizer, [torch.arange(4)], config, kl_coef=0.0)
    assert rollout.scores[2] == -3.0
    # score by hand: the reward model's scalar at the EOS column of a forward pass over that row alone
    for row in (0, 1, 3):
        single = completions_for(tokenizer, [PROMPTS[row]], [RESPONSES[row]], [True])
        with torch.no_grad():
            _, scalars = reward_model(single)
        assert math.isclose(float(rollout.scores[row]), float(scalars[0, -1]), abs_tol=1e-5)
    nonzero = [torch.nonzero(rollout.rewards[row]).flatten().tolist() for row in range(4)]
    assert nonzero == [[2], [2], [4], [1]]  # "12"+EOS, "85"+EOS, "10000" cut at its 5th token, "3"+EOS


def test_token_rewards_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    kl_penalty, rewards = token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref_logprobs, mask,
                                        torch.tensor([2, 0]), kl_coef=0.1)
    assert torch.allclose(kl_penalty, torch.tensor([[0.05, -0.1, 0.0], [0.02, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-1.02, 0.0, 0.0]]))


def test_a_response_of_no_tokens_gets_no_reward_and_the_others_are_unchanged():
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]]), torch.tensor([[-1.5, -1.0], [-0.5, -0.5]])
    mask = torch.tensor([[True, True], [False, False]])  # the second response is empty (last_index -1)
    kl_penalty, rewards = token_rewards(torch.tensor([2.0, 7.0]), logprobs, ref_logprobs, mask,
                                        torch.tensor([1, -1]), kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1 + 2.0], [0.0, 0.0]]))
    advantages, returns = token_advantages(rewards, torch.zeros(2, 2), mask, torch.tensor([1, -1]), 0.95)
    assert torch.equal(advantages[1], torch.zeros(2)) and torch.equal(returns[1], torch.zeros(2))


def test_nan_on_padding_never_reaches_the_advantages():
    rewards = torch.tensor([[0.1, 1.0, float("nan")]])  # junk on the padding after the last token
    values = torch.tensor([[0.5, 0.3, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    advantages, returns = token_advantages(rewards, values, mask, torch.tensor([1]), gae_lambda=0.9)
    clean, _ = token_advantages(torch.tensor([[0.1, 1.0, 0.0]]), torch.tensor([[0.5, 0.3, 0.0]]), mask,
                                torch.tensor([1]), gae_lambda=0.9)
    assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()
    assert torch.equal(advantages, clean)


def test_with_lambda_one_every_advantage_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 6), torch.randn(5, 6)
    last_index = torch.tensor([5, 0, 3, 2, 4])
    mask = torch.arange(6)[None, :] <= last_index[:, None]
    advantages, returns = token_advantages(rewards * mask, values, mask, last_index, gae_lambda=1.0)
    for row in range(5):
        for t in range(6):
            if t <= last_index[row]:
                reward_to_go = float(sum(rewards[row, k] for k in range(t, int(last_index[row]) + 1)))
                assert math.isclose(float(advantages[row, t]), reward_to_go - float(values[row, t]), abs_tol=1e-5)
                assert math.isclose(float(returns[row, t]), reward_to_go, abs_tol=1e-5)
            else:
                assert advantages[row, t] == 0 and returns[row, t] == 0


def test_gae_over_tokens_matches_a_hand_recursion_for_lambda_below_one():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.5, 0.3, 0.8]])
    lam = 0.9
    mask = torch.ones(1, 3, dtype=torch.bool)
    advantages, _ = token_advantages(rewards, values, mask, torch.tensor([2]), lam)
    delta = [0.1 + 0.3 - 0.5, -0.2 + 0.8 - 0.3, 1.0 - 0.8]  # gamma = 1, terminal after the last token
    expected = [delta[0] + lam * (delta[1] + lam * delta[2]), delta[1] + lam * delta[2], delta[2]]
    assert torch.allclose(advantages[0], torch.tensor(expected))


@pytest.mark.parametrize("device", DEVICES)
def test_on_the_first_minibatch_of_an_update_the_ratio_is_exactly_one(device):
    policy, reference, reward_model, tokenizer = models(policy_seed=5, device=device)
    torch.manual_seed(0)
    config = PPOStageConfig(prompts_per_iteration=16, minibatch_size=4, epochs=2)
    prompts = ["12+34=", "5+6=", "99+1=", "40+44="] * 4
    completions = sample_completions(policy.lm, tokenizer, prompts, 5, 1.0,
                                     torch.Generator(device=device).manual_seed(0), device)
    generator = torch.Generator(device=device).manual_seed(1)
    first = list(torch.randperm(16, generator=generator, device=device).split(4))
    rollout = collect_rollout(policy, reference, RewardModelScorer(reward_model, config.missing_eos_score), prompts,
                              completions, tokenizer, first, config, kl_coef=0.1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stats = ppo_update(policy, optimizer, rollout, first, config, generator)
    assert stats["first_ratio_error"] == 0.0  # so the first minibatch's clip fraction is 0 too
    # and the update moved the policy: later minibatches see ratios away from 1
    with torch.no_grad():
        new_logprobs, _, _ = policy_outputs(policy, completions, 1.0)
    assert (new_logprobs - rollout.logprobs)[completions.response_mask].abs().max() > 0


def test_the_first_minibatchs_shared_forward_pass_changes_no_weight_and_saves_one_pass():
    """The rollout's pass over the first minibatch, kept with its graph, is the update's first
    pass: the weights after the update are those of recomputing it, with one policy pass fewer."""
    prompts = ["12+34=", "5+6=", "99+1=", "40+44="] * 4
    config = PPOStageConfig(prompts_per_iteration=16, minibatch_size=8, epochs=2)
    results = {}
    for share in (False, True):
        policy, reference, reward_model, tokenizer = models(policy_seed=5)
        completions = sample_completions(policy.lm, tokenizer, prompts, 5, 1.0, torch.Generator().manual_seed(0),
                                         "cpu")
        passes = []
        policy.head.register_forward_hook(lambda *_: passes.append(1))  # the head runs once per policy pass
        generator = torch.Generator().manual_seed(1)
        first = list(torch.randperm(16, generator=generator).split(8))
        rollout = collect_rollout(policy, reference, RewardModelScorer(reward_model, config.missing_eos_score),
                                  prompts, completions, tokenizer, first, config, 0.1, share_first_forward=share)
        stats = ppo_update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3), rollout, first, config,
                           generator)
        results[share] = (len(passes), torch.cat([p.detach().flatten() for p in policy.parameters()]), stats)
    assert results[False][0] == 2 + 2 * 2 and results[True][0] == 2 + 2 * 2 - 1  # rollout + 2 epochs of 2
    assert torch.equal(results[True][1], results[False][1])
    assert results[True][2]["first_ratio_error"] == results[False][2]["first_ratio_error"] == 0.0


def test_mean_k1_kl_agrees_with_the_exact_kl_within_its_monte_carlo_error():
    """k1 summed over a sampled response is unbiased for KL(pi || pi_ref) of whole responses; so
    is the exact per-token KL (a sum over the vocabulary) summed along the same samples, and so is
    k3 (per token, E_p[q/p - 1 - log(q/p)] = KL(p || q)). So k1 - exact and k3 - exact have mean 0:
    their means must lie within a few standard errors of 0."""
    policy, reference, _, tokenizer = models(policy_seed=4)
    with torch.no_grad():
        policy.lm.transformer.wte.weight.mul_(4.0)  # sharper next-token distributions: a KL well above 0
    temperature = 1.3
    completions = sample_completions(policy.lm, tokenizer, ["23+45="] * 800 + ["8+9="] * 800, 5, temperature,
                                     torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        logprobs, _, logits = policy_outputs(policy, completions, temperature)
        ref_logits = reference(completions.input_ids, attention_mask=completions.attention_mask,
                               position_ids=(completions.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits
    prompt_length, length = completions.prompt_ids.shape[1], completions.response_ids.shape[1]
    ref_logits = ref_logits[:, prompt_length - 1: prompt_length - 1 + length]
    ref_logprobs = token_logprobs(ref_logits, completions.response_ids, temperature)
    k1, k3 = sequence_kls(logprobs, ref_logprobs, completions.response_mask)
    p_all = torch.log_softmax(logits / temperature, -1)
    q_all = torch.log_softmax(ref_logits / temperature, -1)
    exact_per_token = (p_all.exp() * (p_all - q_all)).sum(-1)  # [B, R]
    exact = torch.where(completions.response_mask, exact_per_token, torch.zeros(())).sum(-1)
    assert float(k1.mean()) >= 0
    assert (k3 >= 0).all()
    for estimate in (k1, k3):
        difference = estimate - exact
        standard_error = float(difference.std()) / math.sqrt(len(difference))
        assert abs(float(difference.mean())) < 4 * standard_error
    assert float(exact.mean()) > 0.2  # the two models do differ


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(initial=0.1, target=1.0, horizon=1000)
    controller.update(current_kl=1.1, batch_size=100)  # error 0.1
    assert math.isclose(controller.value, 0.1 * (1 + 0.1 * 0.1))
    controller.update(current_kl=5.0, batch_size=100)  # error clipped to 0.2
    assert math.isclose(controller.value, 0.1 * 1.01 * 1.02)
    controller.update(current_kl=0.0, batch_size=1000)  # error clipped to -0.2
    assert math.isclose(controller.value, 0.1 * 1.01 * 1.02 * 0.8)


def test_the_kl_budget_is_spent_at_the_first_full_window_whose_mean_reaches_it():
    kls = [3.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]  # window means of 3: 1.17, 0.5, 1.0, 1.5, 2.0
    budget = KLBudget(budget=1.5, window=3)
    assert [budget.spent(kl) for kl in kls] == [False, False, False, False, False, True, True]  # 3.0 alone: not full
    resumed = KLBudget(budget=1.5, window=3, recent=tuple(kls[:4]))  # a checkpoint's window after iteration 4
    assert list(resumed.recent) == [0.0, 0.5, 1.0] and [resumed.spent(kl) for kl in kls[4:]] == [False, True, True]
    assert not any(KLBudget(budget=0.0, window=1).spent(kl) for kl in kls)  # 0: no budget


def test_masked_surrogate_loss_equals_the_plain_loss_on_the_selected_entries():
    torch.manual_seed(0)
    new, old, advantages = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.rand(4, 5) > 0.4
    masked = clipped_surrogate_loss(new, old, advantages, 0.2, mask)
    plain = clipped_surrogate_loss(new[mask], old[mask], advantages[mask], 0.2)
    assert torch.allclose(masked, plain)


def test_masked_mean_and_whiten_ignore_padding_even_if_it_is_nan():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_mean(values, mask) == 3.0
    assert torch.equal(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.5]))
    whitened = masked_whiten(values, mask)
    selected = torch.tensor([1.0, 2.0, 3.0, 6.0])
    expected = (selected - selected.mean()) / selected.std(unbiased=False)
    assert torch.allclose(whitened[mask], expected, atol=1e-6)
    assert torch.equal(whitened[~mask], torch.zeros(2))


def test_sequence_kls_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    k1, k3 = sequence_kls(logprobs, ref, mask)
    assert math.isclose(float(k1), 0.5 - 1.0, abs_tol=1e-6)
    expected_k3 = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)
    assert math.isclose(float(k3), expected_k3, abs_tol=1e-6)


def test_shuffled_groups_keep_each_block_of_k_rows_together_and_in_order():
    order = shuffled_groups(12, 4, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(12))
    for block in order.view(3, 4).tolist():
        assert block[0] % 4 == 0 and block == list(range(block[0], block[0] + 4))
    assert torch.equal(shuffled_groups(12, 1, torch.Generator().manual_seed(0)),
                       torch.randperm(12, generator=torch.Generator().manual_seed(0)))  # k = 1: a permutation

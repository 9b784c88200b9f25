"""PPO for a language model, with a per-token KL penalty to the SFT model (Ziegler et al. 2019,
Ouyang et al. 2022), one iteration read top to bottom in `ppo_iteration`:

  sample B responses from the policy (KV cache)                  model.sample_completions
  old log-probs, values, reference log-probs, scores             collect_rollout
  per-token rewards: -beta * k1 everywhere, the score at EOS     rollout.token_rewards
  GAE over the response tokens, gamma = 1                        rollout.token_advantages -> compute_gae
  K epochs of minibatches: Eq. 7 + value loss                    ppo_update -> clipped_surrogate_loss
  adapt beta to the measured KL                                  rollout.AdaptiveKLController

`--ppo.method rloo` swaps in the critic-free alternative at two lines and changes nothing else:
k responses to each of B / k prompts, and leave-one-out advantages
(rollout.leave_one_out_advantages) instead of GAE; the update is the same Eq. 7 without the
value loss.

The value function is a linear head on the policy's last hidden state (one forward pass gives
logits and values: half the FLOPs of a separate critic, which matters on a CPU). The first
epoch's minibatches are drawn before the rollout's own forward passes, which run on exactly
those minibatches: the same rows, shapes and weights give the same floats, so the first
minibatch's ratio is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from proximal.agent import clipped_surrogate_loss, ratio_statistics
from proximal.lm.config import PPOConfig
from proximal.lm.model import (Completions, ScalarHeadLM, response_logits, response_logprobs, sample_completions,
                               token_entropy, token_logprobs)
from proximal.lm.reward import scores_or_missing_eos
from proximal.lm.rollout import LMRollout, leave_one_out_advantages, sequence_kls, token_advantages, token_rewards
from proximal.utils import explained_variance, masked_mean, masked_whiten


def policy_outputs(policy: ScalarHeadLM, completions: Completions, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [B, R], values [B, R], response logits [B, R, V]) of the responses: the value of
    s_t (prompt + tokens before t) is read where token t is predicted."""
    logits, scalars = policy(completions.input_ids, completions.attention_mask)
    prompt_length, response_length = completions.prompt_ids.shape[1], completions.response_ids.shape[1]
    logits = response_logits(logits, prompt_length, response_length)
    values = scalars[:, prompt_length - 1: prompt_length - 1 + response_length]
    return token_logprobs(logits, completions.response_ids, temperature), values, logits


@torch.no_grad()
def collect_rollout(policy: ScalarHeadLM, reference: nn.Module, reward_model: ScalarHeadLM,
                    completions: Completions, minibatches: list[torch.Tensor], config: PPOConfig,
                    kl_coef: float) -> LMRollout:
    """Score sampled `completions` and build their per-token rewards and advantages. The forward
    passes run on `minibatches` (index tensors covering the batch): the first epoch's."""
    batch, length = completions.response_ids.shape
    logprobs = torch.zeros(batch, length, device=completions.response_ids.device)
    ref_logprobs, values = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    scores = torch.zeros(batch, device=logprobs.device)
    for index in minibatches:
        part = completions.select(index)
        logprobs[index], values[index], _ = policy_outputs(policy, part, config.temperature)
        ref_logprobs[index] = response_logprobs(reference, part, config.temperature)
        scores[index] = scores_or_missing_eos(reward_model, part, config.missing_eos_score)
    mask, last_index = completions.response_mask, completions.last_index
    kl_penalty, rewards = token_rewards(scores, logprobs, ref_logprobs, mask, last_index, kl_coef)
    if config.method == "ppo":
        advantages, returns = token_advantages(rewards, values, mask, last_index, config.gae_lambda)
    else:  # rloo: rows are k responses per prompt, in blocks of k
        values = torch.zeros_like(values)
        sequence_advantages = leave_one_out_advantages(rewards.sum(-1).view(-1, config.rloo_samples)).view(-1)  # [B]
        advantages = torch.where(mask, sequence_advantages[:, None], torch.zeros(()))  # [B, R]
        returns = advantages
    return LMRollout(completions, logprobs, ref_logprobs, torch.where(mask, values, torch.zeros(())), scores,
                     kl_penalty, rewards, advantages, returns)


def ppo_update(policy: ScalarHeadLM, optimizer: torch.optim.Optimizer, rollout: LMRollout,
               first_minibatches: list[torch.Tensor], config: PPOConfig, generator: torch.Generator
               ) -> dict[str, float]:
    """`config.epochs` passes over the rollout; returns the statistics averaged over minibatches,
    plus `first_ratio_error` (max |ratio - 1| on the very first minibatch: 0 when the old
    log-probs are computed as the update computes them)."""
    mask = rollout.mask
    advantages = masked_whiten(rollout.advantages, mask)  # over the whole batch, once
    history, first_ratio_error = [], None
    for epoch in range(config.epochs):
        minibatches = first_minibatches if epoch == 0 else torch.randperm(
            len(mask), generator=generator, device=generator.device).split(config.minibatch_size)
        for index in minibatches:
            batch_mask = mask[index]
            logprobs, values, logits = policy_outputs(policy, rollout.completions.select(index), config.temperature)
            old_logprobs = rollout.logprobs[index]
            policy_loss = clipped_surrogate_loss(logprobs, old_logprobs, advantages[index], config.clip_coef,
                                                 batch_mask)
            value_loss = 0.5 * masked_mean((values - rollout.returns[index]).pow(2), batch_mask)
            loss = policy_loss + config.vf_coef * value_loss if config.method == "ppo" else policy_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                if first_ratio_error is None:
                    ratio_error = ((logprobs - old_logprobs).exp() - 1).abs()
                    first_ratio_error = float(torch.where(batch_mask, ratio_error, torch.zeros(())).max())
                history.append(torch.stack([
                    policy_loss.detach(), value_loss.detach(),
                    masked_mean(token_entropy(logits, config.temperature), batch_mask),
                    *ratio_statistics(logprobs, old_logprobs, config.clip_coef, batch_mask),
                ]))
    means = torch.stack(history).mean(0).tolist()
    stats = dict(zip(("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"), means))
    stats["first_ratio_error"] = first_ratio_error
    stats["explained_variance"] = explained_variance(rollout.values[mask], rollout.returns[mask])
    return stats


@dataclass
class IterationResult:
    prompts: list[str]  # [B] the prompt of each response
    rollout: LMRollout
    stats: dict[str, float]


def ppo_iteration(policy: ScalarHeadLM, reference: nn.Module, reward_model: ScalarHeadLM, tokenizer,
                  optimizer: torch.optim.Optimizer, prompts: list[str], config: PPOConfig, kl_coef: float,
                  generator: torch.Generator, device: str) -> IterationResult:
    """Sample, score, update: one iteration on B = len(`prompts`) responses: one per prompt
    (ppo), or k for each of the first B / k prompts (rloo)."""
    if config.method == "rloo":
        prompts = [prompt for prompt in prompts[:len(prompts) // config.rloo_samples]
                   for _ in range(config.rloo_samples)]
    completions = sample_completions(policy.lm, tokenizer, prompts, config.max_new_tokens, config.temperature,
                                     generator, device)
    first_minibatches = torch.randperm(len(prompts), generator=generator,
                                       device=generator.device).to(device).split(config.minibatch_size)
    rollout = collect_rollout(policy, reference, reward_model, completions, first_minibatches, config, kl_coef)
    stats = ppo_update(policy, optimizer, rollout, first_minibatches, config, generator)
    k1, k3 = sequence_kls(rollout.logprobs, rollout.ref_logprobs, rollout.mask)
    stats.update(score=float(rollout.scores.mean()), kl_k1=float(k1.mean()), kl_k3=float(k3.mean()),
                 kl_coef=kl_coef, response_length=float(rollout.mask.sum(-1).float().mean()),
                 eos_rate=float(completions.ended.float().mean()))
    return IterationResult(prompts, rollout, stats)

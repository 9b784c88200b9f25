"""One PPO rollout of a language model, and the per-token rewards and advantages built from it.

The language model as an agent (the course's section 1): the state is the prompt plus the
tokens so far, the action is the next token, and the episode ends at EOS (or at the length
limit). The reward is the reward model's score for the whole response, given at its last token,
and at every token a KL penalty that leashes the policy to the SFT (reference) model:

  kl_penalty_t = beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))       (k1, inside the reward)
  r_t          = -kl_penalty_t + [t = last token] * score

Advantages, PPO: GAE over the response tokens with gamma = 1 (`proximal.losses.compute_gae`, the
same function the control tasks use), the last token terminal. RLOO (Ahmadian et al. 2024): no
critic; each prompt has k responses, a response's return is the sum of its rewards (score -
beta * KL), and its advantage, the same at every one of its tokens, is that return minus the
mean return of the other k - 1 responses to the prompt (a baseline that does not depend on the
response itself, so the gradient stays unbiased). GRPO (Shao et al. 2024): the same groups, the
return minus the group's mean, divided by the group's standard deviation.

With the KL in the loss instead (`--ppo.kl-in loss`, GRPO's convention in TRL), the rewards hold
the score alone and the update adds beta * k3(pi_ref / pi) per token to the loss.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from proximal.lm.config import PPOStageConfig
from proximal.lm.loading import release_weights
from proximal.lm.memory import inference_rows
from proximal.lm.model import (Completions, ScalarHeadLM, response_logits, response_logits_kept, response_logprobs,
                               token_logprobs)
from proximal.losses import compute_gae, kl_k3, masked_whiten


GROUP_STD_EPS = 1e-4  # TRL's epsilon under a group's reward std


@dataclass
class LMRollout:
    """B responses, their old log-probs and values, and what the reward is made of."""

    completions: Completions
    logprobs: torch.Tensor  # [B, R] log pi_old(a_t|s_t) at the sampling temperature
    ref_logprobs: torch.Tensor  # [B, R] log pi_ref(a_t|s_t), same temperature
    values: torch.Tensor  # [B, R] V_old(s_t), 0 outside the response
    scores: torch.Tensor  # [B] reward-model score, or the missing-EOS score for a response cut short
    kl_penalty: torch.Tensor  # [B, R] beta * (logprobs - ref_logprobs), 0 outside the response
    rewards: torch.Tensor  # [B, R] -kl_penalty, plus the score at the last token
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R] advantages + values: the value head's target
    # (logprobs, values, logits) of the first minibatch with their graph, for the update's first step
    first_outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    logprobs_pending: bool = False  # `logprobs` are filled in by the update's first epoch (`old_logprobs_in_update`)

    @property
    def mask(self) -> torch.Tensor:
        return self.completions.response_mask


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  response_mask: torch.Tensor, last_index: torch.Tensor, kl_coef: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl_penalty [B, R], rewards [B, R]): the k1 penalty on every response token and the score
    added at each response's last token (`last_index` [B]); 0 on padding. A response of no tokens
    (`last_index` -1) has no action to credit: its row stays 0."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl_penalty = torch.where(response_mask, kl_coef * (logprobs - ref_logprobs), zero)  # [B, R]
    rewards = -kl_penalty
    has_tokens = last_index >= 0  # [B]
    credited = torch.where(has_tokens, scores.to(rewards.dtype), zero)  # [B]
    rewards = rewards.scatter_add(1, last_index.clamp_min(0)[:, None], credited[:, None])
    return kl_penalty, rewards


def token_advantages(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                     last_index: torch.Tensor, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, R], returns [B, R]) by GAE with gamma = 1 over each response; the episode
    terminates at its last token (no bootstrap past EOS or the cut)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(response_mask, values, zero)
    rewards = torch.where(response_mask, rewards, zero)  # whatever sits on padding (NaN too) never reaches GAE
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # V(s_{t+1}) [B, R]
    positions = torch.arange(rewards.shape[1], device=rewards.device)
    terminated = positions[None, :] >= last_index[:, None]  # [B, R]: the last token and the padding after it
    advantages, returns = compute_gae(rewards.T, values.T, next_values.T, terminated.T, torch.zeros_like(terminated.T),
                                      gamma=1.0, lam=gae_lambda)  # compute_gae works on [T, N]
    return torch.where(response_mask, advantages.T, zero), torch.where(response_mask, returns.T, zero)


def leave_one_out_advantages(returns: torch.Tensor) -> torch.Tensor:
    """RLOO's advantages [P, K] of K responses to each of P prompts with `returns` [P, K]:
    A_i = R_i - (1 / (K - 1)) sum_{j != i} R_j."""
    k = returns.shape[1]
    return returns - (returns.sum(1, keepdim=True) - returns) / (k - 1)


def group_advantages(returns: torch.Tensor, scale: bool = True, eps: float = GROUP_STD_EPS) -> torch.Tensor:
    """GRPO's advantages [P, K] of K responses to each of P prompts with `returns` [P, K] (Shao et
    al. 2024): A_i = (R_i - mean_j R_j) / (std_j R_j + eps), the std unbiased as in TRL; with
    `scale` False, A_i = R_i - mean_j R_j (Dr. GRPO, Liu et al. 2025: no bias towards groups whose
    rewards barely differ). The mean includes R_i itself, unlike RLOO's baseline."""
    centred = returns - returns.mean(1, keepdim=True)
    return centred / (returns.std(1, keepdim=True) + eps) if scale else centred


def update_advantages(advantages: torch.Tensor, response_mask: torch.Tensor, method: str,
                      moments: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The advantages [B, R] the update weighs log-probs by: whitened by the whole batch's
    `moments` (PPO, RLOO), or GRPO's as they are (already normalised within each group)."""
    if method == "grpo":
        return advantages
    return masked_whiten(advantages, response_mask, moments=moments)


def sequence_kls(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response KL(pi || pi_ref) estimates [B], summed over the response's tokens:
    k1 = sum(log pi - log pi_ref) (unbiased, any sign per sample) and
    k3 = sum((ratio - 1) - log ratio) with ratio = pi_ref / pi (unbiased and >= 0 per token)."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = ref_logprobs - logprobs  # [B, R]
    k1 = torch.where(response_mask, -log_ratio, zero).sum(-1)
    k3 = torch.where(response_mask, kl_k3(log_ratio), zero).sum(-1)
    return k1, k3


class AdaptiveKLController:
    """Ziegler et al. 2019, Section 2.2: beta moves towards the KL target,
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),  beta_{t+1} = beta_t (1 + K_beta e_t),
    with K_beta = (responses in this batch) / horizon."""

    def __init__(self, initial: float, target: float, horizon: int):
        self.value, self.target, self.horizon = initial, target, horizon

    def update(self, current_kl: float, batch_size: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * batch_size / self.horizon


class KLBudget:
    """When RL stops short of its iterations: once the mean KL to the start model (nats per
    response) of the last `window` iterations' samples reaches `budget` (0: never). The samples
    are drawn before each iteration's update, so the final policy sits one update past the last
    figure in the window."""

    def __init__(self, budget: float, window: int, recent: tuple[float, ...] = ()):
        self.budget = budget
        self.recent = deque(recent, maxlen=window)  # the last `window` iterations' sample KLs

    def spent(self, sample_kl: float) -> bool:
        """Record one iteration's sample KL; True when the budget is now spent."""
        self.recent.append(sample_kl)
        window_full = len(self.recent) == self.recent.maxlen
        return self.budget > 0 and window_full and sum(self.recent) / len(self.recent) >= self.budget


# -- collecting a rollout: the policy, the reference and the scorer on sampled responses ----------

class Scorer(Protocol):
    """What scores a response for PPO: `RewardModelScorer` or a `RewardFunction`."""

    def scores(self, prompts: list[str], completions: Completions, tokenizer) -> torch.Tensor: ...


def policy_outputs(policy: ScalarHeadLM, completions: Completions, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [B, R], values [B, R], response logits [B, R, V]) of the responses: the value of
    s_t (prompt + tokens before t) is read where token t is predicted. Logits and values are 0 at
    padded positions, whatever the model gives there (`response_logits`: a NaN there would pass
    the loss's masks but turn its gradient NaN, 0 x NaN in the backward pass of exp and pow)."""
    logits, scalars = policy(completions, response_logits_kept(completions))
    prompt_length, response_length = completions.prompt_ids.shape[1], completions.response_ids.shape[1]
    logits = response_logits(logits, completions)  # [B, R, V]
    values = torch.where(completions.response_mask, scalars[:, prompt_length - 1: prompt_length - 1 + response_length],
                         torch.zeros((), dtype=scalars.dtype, device=scalars.device))  # [B, R]
    return token_logprobs(logits, completions.response_ids, temperature), values, logits


def shuffled_groups(rows: int, group: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of `rows` rows [rows] that keeps each block of `group` rows (the k samples
    of a prompt) together and in order: a pass over a block reads its prompt once
    (`completions_forward`). With `group` 1, a plain permutation."""
    order = torch.randperm(rows // group, generator=generator, device=generator.device)  # [rows / group]
    return (order[:, None] * group + torch.arange(group, device=order.device)).flatten()


def micro_batches(minibatches: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """The forward/backward passes over `minibatches` (index tensors): each minibatch's rows,
    `rows` at a time, in order."""
    return [part for index in minibatches for part in index.split(rows)]


@torch.no_grad()
def collect_rollout(policy: ScalarHeadLM, reference: nn.Module, scorer: Scorer, prompts: list[str],
                    completions: Completions, tokenizer, passes: list[torch.Tensor], config: PPOStageConfig,
                    kl_coef: float, share_first_forward: bool = False, policy_pass: bool = True) -> LMRollout:
    """Score sampled `completions` of `prompts` and build their per-token rewards and advantages.
    The forward passes run on `passes` (index tensors covering the batch): the update's first
    epoch's passes, so that its first ratios are computed on the same rows, shapes and weights.
    With `share_first_forward`, the first pass keeps its graph for the update's first step
    (`LMRollout.first_outputs`): one forward pass fewer (with one pass an iteration: two forward
    passes and a backward instead of three and a backward). Without `policy_pass` (see
    `PPOStageConfig.old_logprobs_in_update`) the policy makes no pass here: the KL in the reward
    reads the log-probs the sampler drew the tokens with, and the update's first passes give the
    old log-probs of the ratio."""
    batch, length = completions.response_ids.shape
    logprobs = torch.zeros(batch, length, device=completions.response_ids.device)  # [B, R]
    if not policy_pass and config.kl_in == "reward":
        if completions.sampled_logprobs is None:
            raise ValueError("a KL in the reward without a policy pass needs the sampler's log-probs")
        logprobs = completions.sampled_logprobs.clone()
    ref_logprobs, values = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    scores = torch.zeros(batch, device=logprobs.device)
    first_outputs = None
    if policy_pass:
        for index in passes:
            keep_graph = share_first_forward and first_outputs is None
            with torch.set_grad_enabled(keep_graph):
                outputs = policy_outputs(policy, completions.select(index), config.temperature)
            if keep_graph:
                first_outputs = outputs
            logprobs[index], values[index] = outputs[0].detach(), outputs[1].detach()
    else:  # the reference and the scorer are free to take larger passes than a training pass
        passes = torch.arange(batch, device=logprobs.device).split(inference_rows(
            policy.lm, batch, completions.input_ids.shape[1], response_logits_kept(completions), config.group_size))
    for index in passes:  # with a policy pass, the same passes: a policy equal to the reference is at a KL of 0
        ref_logprobs[index] = response_logprobs(reference, completions.select(index), config.temperature)
    release_weights(reference)  # a reference that can load again lets go of its weights before the scorer loads
    for index in passes:
        scores[index] = scorer.scores([prompts[i] for i in index.tolist()], completions.select(index), tokenizer)
    mask, last_index = completions.response_mask, completions.last_index
    reward_kl_coef = kl_coef if config.kl_in == "reward" else 0.0  # else beta * k3 joins the loss (ppo_update)
    kl_penalty, rewards = token_rewards(scores, logprobs, ref_logprobs, mask, last_index, reward_kl_coef)
    if config.method == "ppo":
        advantages, returns = token_advantages(rewards, values, mask, last_index, config.gae_lambda)
    else:  # rloo, grpo: rows are k responses per prompt, in blocks of k
        values = torch.zeros_like(values)
        group_returns = rewards.sum(-1).view(-1, config.group_size)  # [P, k]
        sequence_advantages = (leave_one_out_advantages(group_returns) if config.method == "rloo"
                               else group_advantages(group_returns, config.group_std)).view(-1)  # [B]
        advantages = torch.where(mask, sequence_advantages[:, None], torch.zeros(()))  # [B, R]
        returns = advantages
    return LMRollout(completions, logprobs, ref_logprobs, torch.where(mask, values, torch.zeros(())), scores,
                     kl_penalty, rewards, advantages, returns, first_outputs, logprobs_pending=not policy_pass)

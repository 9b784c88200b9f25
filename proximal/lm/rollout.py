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

import torch

from proximal.lm.model import Completions
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

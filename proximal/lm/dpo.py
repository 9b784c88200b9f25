"""DPO (Rafailov et al. 2023): the SFT model fitted to the preference pairs directly, with no
reward model, no sampling and no RL.

The policy defines an implicit reward, r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (Eq. 5 solved
for r; the partition function cancels between the two responses of a pair). Put into the
Bradley-Terry model, it gives the DPO loss (Eq. 7), which is therefore `bradley_terry_loss`, the
very function the reward model is fitted with, applied to the implicit rewards:

  L = -E[ mu log sigmoid(r1 - r2) + (1 - mu) log sigmoid(r2 - r1) ]

so a tie (mu = 0.5) pulls the two responses' implicit rewards together. The policy is fitted by
`reward.fit_reward_model` with this loss: "your language model is secretly a reward model".

Data flow: comparisons.jsonl -> PairBatch -> reference log-probs of both sides, once -> minibatches
-> dpo_loss -> AdamW.
"""

from __future__ import annotations

import torch
from torch import nn

from proximal.lm.labels import PairBatch
from proximal.lm.model import Completions, response_logprobs
from proximal.lm.reward import pair_agreement
from proximal.reward_model import bradley_terry_loss


def sequence_logprobs(model: nn.Module, completions: Completions) -> torch.Tensor:
    """log pi(response | prompt) [B] at temperature 1: the response tokens' log-probs summed."""
    logprobs = response_logprobs(model, completions, 1.0)  # [B, R]
    return torch.where(completions.response_mask, logprobs, torch.zeros(())).sum(-1)


@torch.no_grad()
def reference_pair_logprobs(reference: nn.Module, pairs: PairBatch, batch_size: int = 512) -> torch.Tensor:
    """log pi_ref of both sides of every pair [M, 2], computed once before training."""
    parts = []
    for index in torch.arange(pairs.size, device=pairs.labels.device).split(batch_size):
        batch = pairs.select(index)
        parts.append(torch.stack([sequence_logprobs(reference, batch.first),
                                  sequence_logprobs(reference, batch.second)], dim=-1))
    return torch.cat(parts)


def implicit_rewards(policy: nn.Module, pairs: PairBatch, reference_logprobs: torch.Tensor, beta: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1 [M], r2 [M]): beta * (log pi - log pi_ref) of each side."""
    r1 = beta * (sequence_logprobs(policy, pairs.first) - reference_logprobs[:, 0])
    r2 = beta * (sequence_logprobs(policy, pairs.second) - reference_logprobs[:, 1])
    return r1, r2


def dpo_loss(policy: nn.Module, pairs: PairBatch, reference_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """Rafailov et al. 2023, Eq. 7, with the labeller's mu (ties included)."""
    return bradley_terry_loss(*implicit_rewards(policy, pairs, reference_logprobs, beta), pairs.labels, 0.0)


@torch.no_grad()
def implicit_accuracy(policy: nn.Module, pairs: PairBatch, reference_logprobs: torch.Tensor, beta: float
                      ) -> dict[str, float]:
    """`reward.pair_accuracy` of the implicit reward: agreement with the labeller and with gold on
    strict pairs, and the loss."""
    return pair_agreement(*implicit_rewards(policy, pairs, reference_logprobs, beta), pairs)

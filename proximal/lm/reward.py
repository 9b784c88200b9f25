"""The reward model: the SFT network with a scalar head, read at the response's last token (its
EOS), fitted to the labelled pairs with the Bradley-Terry loss of `proximal.reward_model`.

  P[response 1 > response 2] = sigmoid(r(prompt, response 1) - r(prompt, response 2))

After fitting, the head is shifted and scaled so that the scores of SFT samples have mean 0 and
standard deviation 1: the KL coefficient then means the same thing on every seed, and a fixed
score for a response that never ends sits at a known distance below the SFT average.
"""

from __future__ import annotations

import math

import torch

from proximal.lm.labels import PairBatch
from proximal.lm.model import Completions, ScalarHeadLM
from proximal.reward_model import bradley_terry_loss


def reward_scores(model: ScalarHeadLM, completions: Completions) -> torch.Tensor:
    """The score [B] of each response: the head's output at its last token (its EOS)."""
    _, scalars = model(completions.input_ids, completions.attention_mask)  # [B, P + R]
    last = completions.prompt_ids.shape[1] + completions.last_index  # [B]
    return scalars.gather(1, last[:, None]).squeeze(1)


def scores_or_missing_eos(model: ScalarHeadLM, completions: Completions, missing_eos_score: float) -> torch.Tensor:
    """`reward_scores` [B], with `missing_eos_score` for a response cut at the length limit."""
    scores = reward_scores(model, completions)
    return torch.where(completions.ended, scores, torch.full_like(scores, missing_eos_score))


def pair_scores(model: ScalarHeadLM, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return reward_scores(model, pairs.first), reward_scores(model, pairs.second)


@torch.no_grad()
def pair_accuracy(model: ScalarHeadLM, pairs: PairBatch) -> dict[str, float]:
    """On strict pairs: agreement with the labeller's answer, and with the gold ordering."""
    return pair_agreement(*pair_scores(model, pairs), pairs)


def pair_agreement(score_1: torch.Tensor, score_2: torch.Tensor, pairs: PairBatch) -> dict[str, float]:
    """Accuracy of scores [M] of both sides against the labels and the gold (strict pairs only),
    and the Bradley-Terry loss."""
    prefers_first = score_1 > score_2
    strict = pairs.labels != 0.5
    gold_strict = pairs.gold[:, 0] != pairs.gold[:, 1]
    return {
        "accuracy": float((prefers_first == (pairs.labels == 1.0))[strict].float().mean()) if strict.any() else math.nan,
        "gold_accuracy": (float((prefers_first == (pairs.gold[:, 0] > pairs.gold[:, 1]))[gold_strict].float().mean())
                          if gold_strict.any() else math.nan),
        "loss": float(bradley_terry_loss(score_1, score_2, pairs.labels, 0.0)),
    }


def reward_loss(model: ScalarHeadLM, pairs: PairBatch) -> torch.Tensor:
    """Bradley-Terry cross-entropy (Christiano et al. 2017, Eq. 1, no uniform-answer term)."""
    return bradley_terry_loss(*pair_scores(model, pairs), pairs.labels, 0.0)


@torch.no_grad()
def standardise_scores(model: ScalarHeadLM, sft_samples: Completions, batch_size: int) -> tuple[float, float]:
    """Shift and scale the head so the scores of `sft_samples` have mean 0, std 1; returns the
    (mean, std) removed."""
    scores = torch.cat([reward_scores(model, sft_samples.select(index))
                        for index in torch.arange(len(sft_samples.ended), device=sft_samples.ended.device).split(batch_size)])
    mean, std = float(scores.mean()), float(scores.std().clamp_min(1e-6))
    model.head.weight /= std
    model.head.bias.sub_(mean).div_(std)
    return mean, std


def fit_reward_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pairs: PairBatch, steps: int,
                     batch_size: int, generator: torch.Generator, on_step=None, loss_of=None) -> None:
    """`steps` AdamW steps on minibatches of `pairs`, passing over them in shuffled order
    (a new shuffle each pass); `on_step(step, loss)` after each. `loss_of(index)` is the loss
    of the pairs at `index` [b]: `reward_loss` by default; DPO fits the policy as its own
    reward model by passing its loss here."""
    if loss_of is None:
        loss_of = lambda index: reward_loss(model, pairs.select(index))  # noqa: E731
    model.train()
    order = torch.zeros(0, dtype=torch.long)
    for step in range(1, steps + 1):
        if len(order) == 0:
            order = torch.randperm(pairs.size, generator=generator, device=generator.device)
        index, order = order[:batch_size], order[batch_size:]
        loss = loss_of(index)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()

"""DPO (Rafailov et al. 2023): the SFT model fitted to the preference pairs directly, with no
reward model, no sampling and no RL.

The policy defines an implicit reward, r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (Eq. 5 solved
for r; the partition function cancels between the two responses of a pair). Put into the
Bradley-Terry model, it gives the DPO loss (Eq. 7), which is therefore `bradley_terry_loss`, the
very function the reward model is fitted with, applied to the implicit rewards:

  L = -E[ mu log sigmoid(r1 - r2) + (1 - mu) log sigmoid(r2 - r1) ]

so a tie (mu = 0.5) pulls the two responses' implicit rewards together. The policy is fitted by
`reward.fit_reward_model` with this loss: "your language model is secretly a reward model".

Data flow (`run_dpo`): the reward stage's comparisons.jsonl, or the user's --data.preferences
-> PairBatch -> reference log-probs of both sides, once -> minibatches -> dpo_loss -> AdamW ->
RUN_DIR/dpo/model.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from proximal.lm.labels import COMPARISONS_NAME, PairBatch, read_records
from proximal.lm.loading import save_pretrained, trainable_parameters
from proximal.lm.model import Completions, response_logprobs
from proximal.lm.reward import fit_on_pairs, labelled_pairs, pair_agreement, require_finite
from proximal.lm.stage import MODEL_DIR, StageContext, finish
from proximal.losses import bradley_terry_loss


def sequence_logprobs(model: nn.Module, completions: Completions) -> torch.Tensor:
    """log pi(response | prompt) [B] at temperature 1: the response tokens' log-probs summed."""
    logprobs = response_logprobs(model, completions, 1.0)  # [B, R]
    return torch.where(completions.response_mask, logprobs, torch.zeros(())).sum(-1)


def pair_logprobs(model: nn.Module, pairs: PairBatch) -> torch.Tensor:
    """`sequence_logprobs` of both sides of every pair [M, 2], from one pass over both sides
    (`PairBatch.sides`: each pair's prompt read once)."""
    return sequence_logprobs(model, pairs.sides()).view(-1, 2)


@torch.no_grad()
def reference_pair_logprobs(reference: nn.Module, pairs: PairBatch, batch_size: int = 512) -> torch.Tensor:
    """log pi_ref of both sides of every pair [M, 2], computed once before training."""
    return torch.cat([pair_logprobs(reference, pairs.select(index))
                      for index in torch.arange(pairs.size, device=pairs.labels.device).split(batch_size)])


def implicit_rewards(policy: nn.Module, pairs: PairBatch, reference_logprobs: torch.Tensor, beta: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1 [M], r2 [M]): beta * (log pi - log pi_ref) of each side."""
    rewards = beta * (pair_logprobs(policy, pairs) - reference_logprobs)  # [M, 2]
    return rewards[:, 0], rewards[:, 1]


def dpo_loss(policy: nn.Module, pairs: PairBatch, reference_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """Rafailov et al. 2023, Eq. 7, with the labeller's mu (ties included)."""
    return bradley_terry_loss(*implicit_rewards(policy, pairs, reference_logprobs, beta), pairs.labels, 0.0)


@torch.no_grad()
def implicit_accuracy(policy: nn.Module, pairs: PairBatch, reference_logprobs: torch.Tensor, beta: float
                      ) -> dict[str, float]:
    """`reward.pair_accuracy` of the implicit reward: agreement with the labeller and with gold on
    strict pairs, and the loss."""
    return pair_agreement(*implicit_rewards(policy, pairs, reference_logprobs, beta), pairs)


def run_dpo(ctx: StageContext) -> dict[str, Any]:
    config, stage_dir = ctx.config.dpo, ctx.stage_dir("dpo")
    if ctx.dist.is_main:
        stage_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    policy, reference, tokenizer = ctx.load_policy()
    comparisons = ctx.stage_dir("reward") / COMPARISONS_NAME
    records = read_records(comparisons) if comparisons.exists() else ctx.data.preferences
    train_pairs, val_pairs = labelled_pairs(ctx, records, tokenizer)
    train_reference = reference_pair_logprobs(reference, train_pairs)  # [M, 2], once
    val_reference = reference_pair_logprobs(reference, val_pairs)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=config.learning_rate, weight_decay=0.0)
    validation = fit_on_pairs(
        ctx, "dpo", policy, optimizer, train_pairs, config.epochs, config.batch_size,
        (lambda: implicit_accuracy(policy, val_pairs, val_reference, config.beta)) if val_pairs.size else None,
        lambda index: dpo_loss(policy, train_pairs.select(index), train_reference[index], config.beta))
    require_finite(policy, "the DPO policy")
    seconds = time.perf_counter() - started
    policy.eval()
    evaluation = ctx.evaluate(policy, tokenizer, reference)

    def finished() -> dict[str, Any]:  # rank 0
        save_pretrained(policy, tokenizer, stage_dir / MODEL_DIR)
        summary = {"seconds": seconds, "train_pairs": train_pairs.size, "validation_pairs": val_pairs.size,
                   "validation": validation, "eval": evaluation}
        from proximal.lm.plots import plot_reward

        plot_reward(stage_dir, "dpo.png")
        return finish(stage_dir, summary)

    return ctx.dist.on_main(finished)

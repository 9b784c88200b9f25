"""Best-of-n: draw n responses from the SFT model and keep the one the reward model scores highest.
No training at all; the price is n samples and n scores per prompt, and a KL to the SFT model
that is at most log n - (n - 1) / n (Stiennon et al. 2020, Appendix G; tight when no two
responses share a score).

Measured exactly here, not by drawing n samples: for each prompt the SFT model's responses are
found by sampling many times (each distinct response's exact probability p comes from the model),
and ordered by score. Best-of-n returns y when the best of its n draws scores like y, so

  P_n(score group g) = F(g)^n - F(g-)^n,   F(g) = the SFT mass of responses scoring at most g's,

shared within a group of equal scores in proportion to p. The gold reward, the proxy score and
KL(best-of-n || SFT) = sum P_n log(P_n / p) are then sums over the responses, free of sampling
noise. The mass the draws never found is one extra response scored below all the others (the
least likely to be chosen: its share is (missing mass)^n) with gold 0.

Data flow: prompts -> `response_support` (samples, unique responses, exact log-probs, scores, gold)
-> `best_of_n_probabilities` per n -> `best_of_n_curve` (gold, proxy, KL per n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from proximal.lm.dpo import sequence_logprobs
from proximal.lm.evaluation import Gold
from proximal.lm.model import ScalarHeadLM, encode_completions, sample_completions
from proximal.lm.reward import scores_or_missing_eos


def analytic_kl_bound(n: int) -> float:
    """log n - (n - 1) / n: best-of-n's KL to its base policy when all scores differ."""
    return math.log(n) - (n - 1) / n


def best_of_n_probabilities(probabilities: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """P_n [U] of each of U responses with base `probabilities` [U] (summing to 1) and `scores`
    [U]: the chance that the highest-scoring of n independent draws is that response."""
    result = np.zeros_like(probabilities, dtype=float)
    below = 0.0  # F(g-): the mass of every lower-scoring group
    for score in np.unique(scores):  # ascending
        group = scores == score
        mass = probabilities[group].sum()
        group_share = (below + mass) ** n - below ** n
        result[group] = group_share * probabilities[group] / mass if mass > 0 else 0.0
        below += mass
    return result


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) over a finite set, 0 log 0 = 0."""
    support = p > 0
    return float((p[support] * np.log(p[support] / q[support])).sum())


@dataclass
class PromptSupport:
    """The distinct responses found for one prompt, plus one atom for the mass never drawn."""

    probabilities: np.ndarray  # [U + 1] exact SFT probabilities; the last entry is the unseen mass
    scores: np.ndarray  # [U + 1] reward-model scores; the unseen atom below every other
    gold: np.ndarray  # [U + 1] gold reward; 0 for the unseen atom


@torch.no_grad()
def response_support(reference: nn.Module, reward_model: ScalarHeadLM, tokenizer, gold: Gold,
                     prompts: list[str], samples: int, max_new_tokens: int, missing_eos_score: float,
                     generator: torch.Generator, device: str) -> list[PromptSupport]:
    """`samples` SFT samples (temperature 1) per prompt, reduced to each prompt's distinct
    responses with their exact probabilities, scores (the missing-EOS score for a response cut
    at the length limit, as in PPO) and gold."""
    drawn: list[set[tuple[str, bool]]] = [set() for _ in prompts]
    for _ in range(samples):
        completions = sample_completions(reference, tokenizer, prompts, max_new_tokens, 1.0, generator, device)
        for found, text, end in zip(drawn, completions.texts(tokenizer), completions.ended.tolist()):
            found.add((text, end))
    rows = [(prompt, text, end) for prompt, found in zip(prompts, drawn) for text, end in sorted(found)]
    row_prompts, row_texts, row_ended = ([row[i] for row in rows] for i in range(3))
    completions = encode_completions(tokenizer, row_prompts, row_texts, row_ended, device)
    logprobs, scores = [], []
    for index in torch.arange(len(rows), device=device).split(1024):
        part = completions.select(index)
        logprobs.append(sequence_logprobs(reference, part))
        scores.append(scores_or_missing_eos(reward_model, part, missing_eos_score))
    probabilities = torch.cat(logprobs).double().exp().cpu().numpy()
    all_scores = torch.cat(scores).double().cpu().numpy()
    gold_of_rows = gold(row_prompts, row_texts, row_ended)
    supports, start = [], 0
    for found in drawn:
        span = slice(start, start + len(found))
        start += len(found)
        seen = probabilities[span]
        unseen = max(0.0, 1.0 - float(seen.sum()))
        supports.append(PromptSupport(np.append(seen, unseen) / (seen.sum() + unseen),
                                      np.append(all_scores[span], all_scores[span].min() - 1.0),
                                      np.append(gold_of_rows[span], 0.0)))
    return supports


def best_of_n_curve(supports: list[PromptSupport], ns: list[int]) -> list[dict[str, float]]:
    """For each n: best-of-n's expected gold and proxy score, and its exact KL to the SFT model,
    averaged over the prompts; the analytic bound beside it."""
    curve = []
    for n in ns:
        gold, proxy, kl = [], [], []
        for support in supports:
            chosen = best_of_n_probabilities(support.probabilities, support.scores, n)
            gold.append(float(chosen @ support.gold))
            proxy.append(float(chosen @ support.scores))
            kl.append(max(0.0, kl_divergence(chosen, support.probabilities)))  # >= 0, bar rounding
        curve.append({"n": n, "gold": float(np.mean(gold)), "score": float(np.mean(proxy)), "kl": float(np.mean(kl)),
                      "kl_bound": analytic_kl_bound(n)})
    return curve

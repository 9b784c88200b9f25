"""How good a policy is on the held-out prompts: greedy and sampled responses, their gold score
(when the task has one) overall and on each of the task's named slices, their length, EOS rate
and KL to a reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from proximal.lm.model import response_logprobs, sample_completions
from proximal.lm.rollout import sequence_kls

Gold = Callable[[list[str], list[str], torch.Tensor], np.ndarray]  # (prompts, texts, ended) -> gold [B]


@torch.no_grad()
def evaluate_policy(model: nn.Module, tokenizer, prompts: list[str], gold: Gold | None,
                    slices: dict[str, np.ndarray], max_new_tokens: int, temperature: float, seed: int, device: str,
                    reference: nn.Module | None = None) -> dict[str, float]:
    """Gold of greedy and sampled (one sample per prompt at `temperature`) responses, overall and
    on each slice (`gold_{slice}_{mode}`); the sampled responses' length (EOS included) and EOS
    rate; with a `reference`, the sampled responses' KL to it (k1 and k3 per response, averaged):
    the one KL measurement every method (PPO, RLOO, DPO, best-of-n) is compared on."""
    stats: dict[str, float] = {}
    generator = torch.Generator(device=device).manual_seed(seed)
    for mode in ("greedy", "sampled"):
        completions = sample_completions(model, tokenizer, prompts, max_new_tokens, temperature, generator, device,
                                         greedy=mode == "greedy")
        if gold is not None:
            scores = gold(prompts, completions.texts(tokenizer), completions.ended)
            stats[f"gold_{mode}"] = float(scores.mean())
            for name, members in slices.items():
                stats[f"gold_{name}_{mode}"] = float(scores[members].mean()) if members.any() else float("nan")
        if mode == "sampled":
            stats["response_length"] = float(completions.response_mask.sum(-1).float().mean())
            stats["eos_rate"] = float(completions.ended.float().mean())
            if reference is not None:
                mask = completions.response_mask
                k1, k3 = sequence_kls(response_logprobs(model, completions, temperature),
                                      response_logprobs(reference, completions, temperature), mask)
                stats.update(kl_k1=float(k1.mean()), kl_k3=float(k3.mean()))
    return stats

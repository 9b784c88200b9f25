"""How good a policy is, by the gold reward, on the held-out prompts: greedy and sampled, over
all prompts and over the task's hard slice (the prompts the demonstrations' noise hits)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from proximal.lm.model import response_logprobs, sample_completions
from proximal.lm.rollout import sequence_kls
from proximal.lm.tasks import AdditionTask


def gold_scores(task: AdditionTask, prompts: list[str], texts: list[str], ended: Sequence[bool] | torch.Tensor
                ) -> np.ndarray:
    """The gold reward [B] of each response (`ended`: it emitted EOS)."""
    ended = ended.tolist() if isinstance(ended, torch.Tensor) else ended
    return np.array([task.gold(prompt, text, bool(end)) for prompt, text, end in zip(prompts, texts, ended)])


@torch.no_grad()
def evaluate_policy(model: nn.Module, tokenizer, task: AdditionTask, prompts: list[str], max_new_tokens: int,
                    temperature: float, seed: int, device: str, reference: nn.Module | None = None
                    ) -> dict[str, float]:
    """Gold reward of greedy and sampled (one sample per prompt at `temperature`) responses,
    overall and on the hard slice; the sampled responses' length (EOS included) and EOS rate;
    with a `reference`, the sampled responses' KL to it (k1 and k3 per response, averaged): the
    one KL measurement every method (PPO, RLOO, DPO, best-of-n) is compared on."""
    hard = np.array([task.is_hard(prompt) for prompt in prompts])
    stats: dict[str, float] = {}
    generator = torch.Generator(device=device).manual_seed(seed)
    for mode in ("greedy", "sampled"):
        completions = sample_completions(model, tokenizer, prompts, max_new_tokens, temperature, generator, device,
                                         greedy=mode == "greedy")
        gold = gold_scores(task, prompts, completions.texts(tokenizer), completions.ended)
        stats[f"gold_{mode}"] = float(gold.mean())
        stats[f"gold_hard_{mode}"] = float(gold[hard].mean()) if hard.any() else float("nan")
        if mode == "sampled":
            stats["response_length"] = float(completions.response_mask.sum(-1).float().mean())
            stats["eos_rate"] = float(completions.ended.float().mean())
            if reference is not None:
                mask = completions.response_mask
                k1, k3 = sequence_kls(response_logprobs(model, completions, temperature),
                                      response_logprobs(reference, completions, temperature), mask)
                stats.update(kl_k1=float(k1.mean()), kl_k3=float(k3.mean()))
    return stats

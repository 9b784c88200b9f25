"""How good a policy is on the held-out prompts: greedy and sampled responses, their gold score
(when the task has one) overall and on each of the task's named slices, their length, EOS rate
and KL to a reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from proximal.dist import DistContext
from proximal.lm.memory import inference_rows
from proximal.lm.model import response_logits_kept, response_logprobs, sample_completions
from proximal.lm.rollout import sequence_kls

Gold = Callable[[list[str], list[str], torch.Tensor], np.ndarray]  # (prompts, texts, ended) -> gold [B]


@torch.no_grad()
def evaluation_rows(model: nn.Module, tokenizer, prompts: list[str], gold: Gold | None, max_new_tokens: int,
                    temperature: float, seed: int, device: str, reference: nn.Module | None = None,
                    dist: DistContext = DistContext()) -> dict[str, np.ndarray]:
    """Per-prompt figures, in prompt order [N] each: the gold of the greedy and of one sampled
    response per prompt at `temperature` (`gold_greedy`, `gold_sampled`, when the task has one);
    the sampled response's length (EOS included) and whether it ended; with a `reference`, its KL
    to it (`kl_k1`, `kl_k3`, per response). On K processes each rank answers its 1/K of the prompts
    (sampling from its own stream) and every rank returns the rows of all of them."""
    mine = dist.shard(torch.arange(len(prompts)))
    prompts = [prompts[i] for i in mine.tolist()]
    shared = torch.Generator(device=device).manual_seed(seed)
    generator = dist.rank_generator(shared, seed)
    rows: dict[str, np.ndarray] = {}  # per-prompt values of this rank's prompts, gathered below
    for mode in ("greedy", "sampled"):
        completions = sample_completions(model, tokenizer, prompts, max_new_tokens, temperature, generator, device,
                                         greedy=mode == "greedy")
        if gold is not None:
            texts = completions.texts(tokenizer)
            rows[f"gold_{mode}"] = np.asarray(gold(prompts, texts, completions.ended), dtype=float)
        if mode == "sampled":
            rows["response_length"] = completions.response_mask.sum(-1).float().cpu().numpy()
            rows["eos_rate"] = completions.ended.float().cpu().numpy()
            if reference is not None:
                per_pass = inference_rows(model, len(prompts), completions.input_ids.shape[1],
                                          response_logits_kept(completions))
                k1, k3 = sequence_kls(response_logprobs(model, completions, temperature, per_pass),
                                      response_logprobs(reference, completions, temperature, per_pass),
                                      completions.response_mask)
                rows.update(kl_k1=k1.cpu().numpy(), kl_k3=k3.cpu().numpy())
    gathered = zip(*dist.gather_objects(list(rows.values())))  # every rank's, in prompt order
    return {name: np.concatenate(parts) for name, parts in zip(rows, gathered)}


def summarise_rows(rows: dict[str, np.ndarray], slices: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean of each per-prompt figure, and of each gold figure on each slice (`gold_{slice}_{mode}`)."""
    stats: dict[str, float] = {}
    for name, values in rows.items():
        stats[name] = float(values.mean())
        if name.startswith("gold_"):
            for slice_name, members in slices.items():
                stats[f"gold_{slice_name}_{name[len('gold_'):]}"] = (float(values[members].mean()) if members.any()
                                                                      else float("nan"))
    return stats


def evaluate_policy(model: nn.Module, tokenizer, prompts: list[str], gold: Gold | None,
                    slices: dict[str, np.ndarray], max_new_tokens: int, temperature: float, seed: int, device: str,
                    reference: nn.Module | None = None, dist: DistContext = DistContext()) -> dict[str, float]:
    """Gold of greedy and sampled (one sample per prompt at `temperature`) responses, overall and
    on each slice (`gold_{slice}_{mode}`); the sampled responses' length (EOS included) and EOS
    rate; with a `reference`, the sampled responses' KL to it (k1 and k3 per response, averaged):
    the one KL measurement every method (PPO, RLOO, DPO, best-of-n) is compared on."""
    return summarise_rows(evaluation_rows(model, tokenizer, prompts, gold, max_new_tokens, temperature, seed, device,
                                          reference, dist), slices)

"""Supervised fine-tuning: next-token cross-entropy on prompt + demonstration, counted on the
response tokens only (the prompt is given, not something to imitate).

Data flow: demonstrations (prompt, response) -> one padded tensor batch (`encode_prompts` +
`encode_responses`) -> minibatches -> `sft_loss` -> AdamW.
"""

from __future__ import annotations

import torch
from torch import nn

from proximal.lm.model import Completions, encode_prompts, encode_responses, response_logprobs
from proximal.utils import masked_mean


def sft_loss(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
             response_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (EOS included) given the prompt."""
    logprobs = response_logprobs(model, Completions(prompt_ids, prompt_mask, response_ids, response_mask, None), 1.0)
    return -masked_mean(logprobs, response_mask)  # logprobs [B, R]


def encode_demonstrations(tokenizer, prompts: list[str], responses: list[str], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_ids [N, P], prompt_mask [N, P], response_ids [N, R], response_mask [N, R]); every
    demonstration ends with EOS."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    response_ids, response_mask = encode_responses(tokenizer, responses, [True] * len(responses), device)
    return prompt_ids, prompt_mask, response_ids, response_mask

"""Small models and hand-built batches shared by the LM tests."""

import torch

from proximal.lm.model import Completions, build_char_tokenizer, build_tiny_gpt2, encode_prompts, encode_responses


def tiny_model(seed: int = 0, width: int = 32):
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    return build_tiny_gpt2(tokenizer, width=width, layers=2, heads=2, context=16).eval(), tokenizer


def completions_for(tokenizer, prompts, responses, ended) -> Completions:
    """A padded batch of given prompts and responses (EOS appended where `ended`)."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")
    response_ids, response_mask = encode_responses(tokenizer, responses, ended, "cpu")
    return Completions(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor(ended))

"""Small models and hand-built batches shared by the LM tests."""

import pytest
import torch

from proximal.lm.loading import build_char_tokenizer, build_tiny_gpt2
from proximal.lm.model import Completions, encode_completions
from proximal.lm.tasks import AdditionTask


def tiny_model(seed: int = 0, width: int = 32):
    tokenizer = build_char_tokenizer(AdditionTask.alphabet)
    torch.manual_seed(seed)
    return build_tiny_gpt2(tokenizer, width=width, layers=2, heads=2, context=16).eval(), tokenizer


# The exactness tests run on every device there is: CUDA where torch sees one, else skipped.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def completions_for(tokenizer, prompts, responses, ended, device: str = "cpu") -> Completions:
    """A padded batch of given prompts and responses (EOS appended where `ended`)."""
    return encode_completions(tokenizer, prompts, responses, ended, device)


def tiny_llama(seed: int = 0):
    """Another architecture (rotary positions, RMSNorm, gated MLP) behind the same interface."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer(AdditionTask.alphabet)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def tiny_gemma3(seed: int = 0):
    """Gemma 3's text model (the second family the real-model task runs): scaled embeddings,
    sliding-window and full attention by block (`layer_types`), norms around each sublayer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = build_char_tokenizer(AdditionTask.alphabet)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=16,
                              sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    return Gemma3ForCausalLM(config).eval(), tokenizer


ARCHITECTURES = {"gpt2": tiny_model, "llama": tiny_llama, "gemma3": tiny_gemma3}

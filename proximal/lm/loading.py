"""Loading and saving language models: the tiny GPT-2 with its character tokenizer, any local
Hugging Face causal LM (a directory or a GGUF file, dequantised once), LoRA adapters, and the
reference model (`AdaptersOff`: the LoRA model with its adapters disabled; `ReloadedReference`:
the start model loaded again from its directory only while it is used).

Any Hugging Face causal LM with its tokenizer, saved in a local directory or as a GGUF file, is a
policy here (`load_pretrained(PATH)`); the default is a GPT-2 of a few layers built from a local
config with a character tokenizer, trained from scratch. Nothing is downloaded. What a model
does with a batch (forward passes, log-probs, sampling) is in model.py.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import pickle
import struct
import warnings
from pathlib import Path

import torch
from torch import nn

from proximal.errors import CheckpointError, ConfigError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}


def build_char_tokenizer(alphabet: str):
    """A character tokenizer over `alphabet` (a task's characters) plus <pad>, <bos>, <eos>, as a
    Hugging Face fast tokenizer (so it saves and loads with save_pretrained / from_pretrained like
    any other)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS.values(), *alphabet])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tokenizer.decoder = decoders.Fuse()  # and joined back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_tiny_gpt2(tokenizer, width: int, layers: int, heads: int, context: int) -> nn.Module:
    """A GPT-2 from a local config, randomly initialised, dropout off (RL needs the same
    log-probs on every call)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def _quiet_transformers() -> None:
    """Our own progress bars and one-line errors speak for us: transformers' info messages and
    its per-file progress bars would interleave with them."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _require_package(name: str, purpose: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise ConfigError(f'{purpose} needs the {name} package: pip install -e ".[real]"')


def _unloadable(path: Path, error: Exception) -> CheckpointError:
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return CheckpointError(f"{path} holds no loadable causal LM and tokenizer ({reason})")


def _source(path: Path) -> dict:
    """from_pretrained's arguments for a local directory, or for a GGUF file (its folder plus
    `gguf_file`); never a hub, never the model's own code."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        _require_package("gguf", "reading a GGUF file")
        return {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name, "local_files_only": True,
                "trust_remote_code": False}
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} holds no Hugging Face model (no config.json in it)")
    return {"pretrained_model_name_or_path": path, "local_files_only": True, "trust_remote_code": False}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a foreign, truncated or unsafe model file raises while loading: each becomes one line."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError, EOFError, pickle.UnpicklingError,
            SafetensorError, struct.error, IndexError)  # struct.error, IndexError: a GGUF file cut short


def load_tokenizer(path: str | Path):
    """The tokenizer of a local Hugging Face model directory or GGUF file: it must have an EOS
    token; a missing pad token becomes EOS (padding is masked by lengths, never by the pad id)."""
    path = Path(path)
    source = _source(path)
    if "gguf_file" not in source and not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty GPT-2 tokenizer that encodes every prompt as nothing
        raise CheckpointError(f"{path} holds no loadable causal LM and tokenizer (no tokenizer file: none of "
                              f"{', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(**source)
    except _load_errors() as error:
        raise _unloadable(path, error) from None
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"the tokenizer in {path} has no EOS token; a response could never end")
    if tokenizer.pad_token_id is None:  # GPT-2-style tokenizers: padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dequantised(path: Path, source: dict, dtype: torch.dtype) -> nn.Module:
    """A GGUF file's model as a plain Hugging Face model: transformers dequantises the weights but
    keeps a quantizer flag that makes the model refuse save_pretrained; its weights are moved
    into a model built from the same config without the quantization settings."""
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' bar for this step ignores its verbosity
        loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=dtype)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict())  # every tensor, or a one-line error naming the missing ones
    return plain


def load_pretrained(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a local directory holding a Hugging Face causal LM and its tokenizer,
    or from a GGUF file (dequantised: fp32 on the CPU, bf16 on CUDA). Never reaches a hub: a
    missing or foreign path is a CheckpointError."""
    tokenizer = load_tokenizer(path)
    return load_model(path, device), tokenizer


def load_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """The model of `load_pretrained` without its tokenizer."""
    path = Path(path)
    source = _source(path)
    from transformers import AutoModelForCausalLM

    try:
        if "gguf_file" in source:
            model = _dequantised(path, source, torch.bfloat16 if device == "cuda" else torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(**source)
    except _load_errors() as error:
        raise _unloadable(path, error) from None
    return model.to(device).eval()


def with_lora(model: nn.Module, rank: int, alpha: float, top_layers: int = 0) -> nn.Module:
    """`model` with LoRA adapters (Hu et al. 2021) on every linear layer of its top `top_layers`
    blocks (0: all) through peft: only the adapters train, and they start at zero, so the outputs
    are unchanged. Below the lowest adapted block nothing needs a gradient: the backward pass
    stops there."""
    _require_package("peft", "LoRA (--model.lora-rank)")
    from peft import LoraConfig, get_peft_model

    from transformers.pytorch_utils import Conv1D

    blocks = model.config.num_hidden_layers
    layers = list(range(blocks - top_layers, blocks)) if 0 < top_layers < blocks else None
    output = model.get_output_embeddings()
    linear = sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                     if isinstance(module, (nn.Linear, Conv1D)) and module is not output})  # q_proj, ... or c_attn, ...
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=linear, bias="none",
                        layers_to_transform=layers)
    with warnings.catch_warnings():  # peft asks transformers a question transformers 5 calls deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


class AdaptersOff(nn.Module):
    """The start model inside a LoRA model: the same weights with the adapters disabled, so the
    reference costs no second copy in memory. Owns no parameters (the policy's are not frozen
    through it)."""

    def __init__(self, lora_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "lora_model", lora_model)  # not a submodule: parameters() stays empty

    def get_base_model(self) -> nn.Module:
        return self.lora_model.get_base_model()

    def forward(self, **inputs):
        with self.lora_model.disable_adapter():
            return self.lora_model(**inputs)


class ReloadedReference(nn.Module):
    """The start model as a frozen reference that holds its weights only while they are used:
    loaded from its directory when first called, dropped by `release` (before an update, whose
    passes need the room: a second copy of every weight is the largest thing the RL stage holds
    besides the policy and its AdamW moments), and loaded again when next called. Each load is the
    same file, so the reference is exactly the same model every time. Owns no parameters."""

    def __init__(self, path: Path, device: str):
        super().__init__()
        self.path, self.device_name = Path(path), device
        object.__setattr__(self, "loaded", None)  # not a submodule: parameters() stays empty

    def get_base_model(self) -> nn.Module:
        if self.loaded is None:
            model = load_model(self.path, self.device_name).requires_grad_(False)
            object.__setattr__(self, "loaded", model)
        return self.loaded

    def forward(self, **inputs):
        return self.get_base_model()(**inputs)

    def release(self) -> None:
        object.__setattr__(self, "loaded", None)


def release_weights(*holders) -> None:
    """Let each of `holders` drop the weights it can load again (a ReloadedReference, a reward
    model's scorer built to reload it); any other keeps them."""
    for holder in holders:
        release = getattr(holder, "release", None)
        if release is not None:
            release()


def bottom_blocks(lm: nn.Module, blocks: int) -> nn.Module:
    """`lm` cut to its bottom `blocks` transformer blocks (0 or at least its depth: unchanged), its
    final norm and heads kept; the config says the new depth, so it saves and loads as such a model."""
    depth = lm.config.num_hidden_layers
    if blocks == 0 or blocks >= depth:
        return lm
    body = lm.base_model
    name = next(name for name, module in body.named_children()
                if isinstance(module, nn.ModuleList) and len(module) == depth)  # Llama's layers, GPT-2's h
    setattr(body, name, getattr(body, name)[:blocks])
    lm.config.num_hidden_layers = blocks
    if isinstance(getattr(lm.config, "layer_types", None), list):  # Gemma 3: one attention kind per block
        lm.config.layer_types = lm.config.layer_types[:blocks]
    return lm


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def save_pretrained(model: nn.Module, tokenizer, path: Path) -> None:
    """A plain Hugging Face directory: a LoRA model is saved with its adapters merged (into a
    copy: the model itself keeps training or serving as the reference)."""
    _quiet_transformers()
    if hasattr(model, "merge_and_unload"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def model_context_length(path: str | Path) -> int | None:
    """The longest sequence a local model's position embeddings allow (None: no fixed limit),
    read from its config alone."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(**_source(Path(path)))
    except _load_errors() as error:
        raise _unloadable(Path(path), error) from None
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

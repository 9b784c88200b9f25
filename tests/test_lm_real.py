"""A real pretrained model's path, on models the tests write themselves (CI downloads nothing):
a tiny random Llama with a byte-level BPE tokenizer and a chat template, written to a GGUF file
as llama.cpp lays it out; the sentiment task; LoRA and its adapters-off reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("peft")
pytest.importorskip("vaderSentiment")

from proximal.cli import main  # noqa: E402
from proximal.errors import CheckpointError  # noqa: E402
from test_lm_pipeline import run_cli  # noqa: E402
from proximal.lm.config import RLHFConfig  # noqa: E402
from proximal.lm.loading import (AdaptersOff, load_pretrained, save_pretrained, trainable_parameters,  # noqa: E402
                                 with_lora)
from proximal.lm.model import encode_completions, response_logprobs, sample_completions  # noqa: E402
from proximal.lm.tasks import HELD_OUT_THINGS, TEMPLATES, THINGS, DataSizes, SentimentTask, vader_scores  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def byte_level_tokenizer():
    """A byte-level BPE of ~300 tokens trained on two sentences, with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["Describe a pizza place in one sentence.", "The bakery is a wonderful gem!"] * 20,
                                  trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a q or k projection (the rotary halves interleaved per head)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(model, tokenizer, path) -> None:
    """`model` (a LlamaForCausalLM with tied embeddings) and its tokenizer as an F32 GGUF file."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    special = set(tokenizer.all_special_ids)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", array)
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", array)
        elif name.startswith("model.layers."):
            _, _, block, *rest = name.split(".")
            key = ".".join(rest[:-1])
            if key == "self_attn.q_proj":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif key == "self_attn.k_proj":
                array = llama_cpp_permute(array, config.num_key_value_heads)
            writer.add_tensor(f"blk.{block}.{GGUF_NAMES[key]}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(the original model, its tokenizer, the path of its GGUF file)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_gguf(model, tokenizer, path)
    return model, tokenizer, path


def test_a_gguf_file_loads_as_the_model_that_wrote_it(tiny_llama, tmp_path):
    original, tokenizer, path = tiny_llama
    model, loaded_tokenizer = load_pretrained(path)
    text = "Describe a pizza place in one sentence."
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.eos_token == "<|im_end|>" and loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    messages = [{"role": "user", "content": "hi"}]
    assert loaded_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = original(ids).logits
        assert torch.equal(model(ids).logits, expected)  # F32 in, F32 out: exact
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    save_pretrained(model, loaded_tokenizer, tmp_path / "plain")  # a GGUF-loaded model would refuse this
    reloaded, _ = load_pretrained(tmp_path / "plain")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_a_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_pretrained(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointError, match="junk.gguf holds no loadable causal LM"):
        load_pretrained(tmp_path / "junk.gguf")


@pytest.mark.parametrize("kept", [0, 4, 100, 0.5])
def test_a_gguf_file_cut_short_is_one_line(tiny_llama, tmp_path, kept):
    """A download cut short: a struct.error from the header's reader (100 bytes) or a reshape
    error from the tensor data (half the file) was a traceback."""
    data = tiny_llama[2].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(kept * len(data)) if isinstance(kept, float) else kept])
    with pytest.raises(CheckpointError, match="cut.gguf holds no loadable causal LM") as raised:
        load_pretrained(cut)
    assert "\n" not in str(raised.value)


def test_lora_reference_is_the_start_model_exactly_and_stays_so(tiny_llama):
    original, tokenizer, _ = tiny_llama
    from transformers import LlamaForCausalLM

    start = LlamaForCausalLM(original.config)
    start.load_state_dict(original.state_dict())
    policy = with_lora(start, rank=4, alpha=8.0)
    reference = AdaptersOff(policy)
    assert list(reference.parameters()) == []  # freezing the reference cannot freeze the policy
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    prompts = [SentimentTask.render(tokenizer, "Describe a pizza place in one sentence.")] * 3
    completions = sample_completions(policy, tokenizer, prompts, 6, 1.0, torch.Generator().manual_seed(0), "cpu")
    mask = completions.response_mask
    with torch.no_grad():
        before = response_logprobs(original, completions, 1.0)
        assert torch.equal(response_logprobs(policy, completions, 1.0)[mask], before[mask])  # KL exactly 0
        assert torch.equal(response_logprobs(reference, completions, 1.0)[mask], before[mask])
    optimizer = torch.optim.SGD(trainable_parameters(policy), lr=1.0)
    for _ in range(2):  # the first step moves only lora_B (lora_A's gradient is 0 while B is 0)
        optimizer.zero_grad()
        (-response_logprobs(policy, completions, 1.0)[mask].sum()).backward()
        optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(response_logprobs(policy, completions, 1.0)[mask], before[mask])
        assert torch.equal(response_logprobs(reference, completions, 1.0)[mask], before[mask])


def test_lora_on_the_top_blocks_only_and_saved_merged(tiny_llama, tmp_path):
    original, tokenizer, _ = tiny_llama
    from transformers import LlamaForCausalLM

    start = LlamaForCausalLM(original.config)
    start.load_state_dict(original.state_dict())
    policy = with_lora(start, rank=4, alpha=8.0, top_layers=1)
    adapted = {name.split(".layers.")[1].split(".")[0] for name, p in policy.named_parameters() if p.requires_grad}
    assert adapted == {"1"}  # the top block of two
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    save_pretrained(policy, tokenizer, tmp_path / "merged")
    merged, _ = load_pretrained(tmp_path / "merged")
    completions = encode_completions(tokenizer, ["The bakery"], [" is a gem"], [True], "cpu")
    with torch.no_grad():
        expected = response_logprobs(policy, completions, 1.0)
        assert torch.allclose(response_logprobs(merged, completions, 1.0), expected, atol=1e-5)
        assert not torch.allclose(response_logprobs(original, completions, 1.0), expected, atol=1e-3)
    assert hasattr(policy, "peft_config")  # saving merged a copy: the policy keeps its adapters


def test_sentiment_gold_is_vader_and_held_out_things_never_train():
    task = SentimentTask()
    positive, negative, neutral = "What a wonderful, lovely place!", "A terrible, awful mess.", "It is a door."
    gold = task.gold(["p"] * 3, [positive, negative, neutral], [True, False, True])
    assert gold[0] > 0.5 and gold[1] < -0.5 and gold[2] == 0.0
    assert list(gold) == vader_scores(["p"] * 3, [positive, negative, neutral])  # cut or not: the text decides
    train, held_out = task.questions(seed=0)
    assert len(held_out) == HELD_OUT_THINGS * len(TEMPLATES) and len(train) + len(held_out) == len(THINGS) * len(TEMPLATES)
    thing_of = lambda question: next(t for t in THINGS if t in question)  # noqa: E731
    assert not {thing_of(q) for q in train} & {thing_of(q) for q in held_out}
    assert task.questions(seed=1)[1] != held_out and task.questions(seed=0)[1] == held_out
    data = task.data(0, DataSizes(0, 20, 50, 32, 0.2), tokenizer=None)
    assert (data.sft_prompts, data.sft_completions) == ([], [])
    assert len(data.preference_prompts) == 20 and len(data.rl) == 50 and len(data.evaluation) == 32
    rendered_held_out = {f"Question: {question}\nAnswer:" for question in held_out}  # no chat template
    assert set(data.evaluation) <= rendered_held_out
    assert not (set(data.rl) | set(data.preference_prompts)) & rendered_held_out


def test_sentiment_prompts_use_the_chat_template_with_a_short_system_prompt(tiny_llama):
    _, tokenizer, _ = tiny_llama
    data = SentimentTask().data(0, DataSizes(0, 2, 2, 2, 0.2), tokenizer)
    prompt = data.evaluation[0]
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant. Answer in one short sentence.")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_the_sentiment_preset_is_the_start_and_flags_override_it():
    config = RLHFConfig.for_task("sentiment")
    assert config.task.name == "sentiment" and config.model.lora_rank == 0 and config.ppo.method == "rloo"
    assert config.reward.pooling == "mean" and config.reward.blocks == 10
    assert config.ppo.cut_response_score is None  # scored as it stands, as TRL does
    overridden = config.with_overrides({"ppo": {"iterations": 3}, "model": {"lora_rank": 16}})
    assert overridden.ppo.iterations == 3 and overridden.model.lora_rank == 16 and overridden.ppo.method == "rloo"
    assert RLHFConfig.for_task("addition") == RLHFConfig()  # the defaults were tuned on addition


@pytest.mark.slow
def test_rlhf_sentiment_from_a_gguf_file_end_to_end(tiny_llama, tmp_path, capsys):
    _, _, path = tiny_llama
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["rlhf", "sentiment", "--model.path", str(path), "--run-dir", str(run_dir),
                     "--reward.labels", "16", "--reward.standardise-samples", "8", "--task.eval-prompts", "4",
                     "--ppo.iterations", "2", "--ppo.prompts-per-iteration", "8", "--ppo.minibatch-size", "8",
                     "--ppo.max-new-tokens", "6", "--ppo.eval-every", "1", "--model.lora-rank", "16",
                     "--model.lora-layers", "1", "--reward.blocks", "1", "--threads", "1"], capsys)
    assert code == 0, err
    # a random model's 6 bytes rarely hold a word VADER scores, so a "every answer was a tie" warning may come
    stages = [line.split(":")[0] for line in out.splitlines() if not line.startswith("reward: warning")]
    assert stages == ["reward", "ppo", "run directory"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["lora_rank"] == 16 and config["ppo"]["method"] == "rloo"
    assert (run_dir / "start" / "model" / "config.json").is_file()  # dequantised once
    reward_config = json.loads((run_dir / "reward" / "model" / "config.json").read_text())
    assert reward_config["num_hidden_layers"] == 1  # the start model's bottom block, saved and read back as such
    summary = json.loads((run_dir / "ppo" / "summary.json").read_text())
    assert np.isfinite(summary["eval"]["gold_sampled"]) and -1 <= summary["eval"]["gold_sampled"] <= 1
    model, tokenizer = load_pretrained(run_dir / "ppo" / "model")  # a plain HF directory, adapters merged
    assert not hasattr(model, "peft_config")
    rows = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3


def test_a_gguf_start_model_is_dequantised_once_per_run(tiny_llama, tmp_path, capsys, monkeypatch):
    """The up-front check loads it, the run keeps that plain copy in RUN_DIR/start, and SFT starts
    from the copy (SFT dequantised the file a second time)."""
    import proximal.lm.loading as model_module

    calls = []
    real = model_module._dequantised
    monkeypatch.setattr(model_module, "_dequantised", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    example = Path(__file__).resolve().parent.parent / "examples" / "positive_words"
    code, out, err = run_cli(["rlhf", "--model.path", str(tiny_llama[2]), "--run-dir", str(tmp_path / "run"),
                              "--data.sft", str(example / "sft.jsonl"), "--stages", "sft", "--sft.steps", "2",
                              "--sft.batch-size", "4", "--ppo.max-new-tokens", "4", "--threads", "1"], capsys)
    assert code == 0, err
    assert len(calls) == 1 and (tmp_path / "run" / "sft" / "summary.json").is_file()


def test_the_sentiment_task_without_a_model_says_where_to_get_one(capsys):
    try:
        code = main(["rlhf", "sentiment"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code != 0 and "has no demonstrations to train one: pass a pretrained one with --model.path" in err
    assert len(err.strip().splitlines()) == 1

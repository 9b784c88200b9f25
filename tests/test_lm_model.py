"""The LM layer: padding invariance, sampling with a KV cache, the temperature, loading from a directory."""

import pytest
import torch

from lm_helpers import ARCHITECTURES, DEVICES, completions_for, tiny_model
from proximal.errors import CheckpointError
from proximal.lm.loading import load_pretrained, save_pretrained
from proximal.lm.model import (ScalarHeadLM, completions_forward, lm_forward, response_logprobs, rows_per_prompt,
                               sample_completions, sample_tokens, token_entropy, token_logprobs)
from proximal.lm.rollout import policy_outputs


def unpadded_logprobs(model, tokenizer, prompt, response_ids, temperature, device="cpu"):
    """Brute force: the sequence alone, no padding, no mask; log softmax(logits / T) by hand."""
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"] + response_ids
    logits = model(torch.tensor([ids], device=device)).logits[0]  # [L, V]
    start = len(ids) - len(response_ids)
    out = []
    for t, token in enumerate(response_ids):
        row = logits[start - 1 + t] / temperature
        out.append(float(row[token] - torch.logsumexp(row, 0)))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_sequence_has_the_same_logprobs_alone_and_inside_a_padded_batch(temperature, architecture, device):
    model, tokenizer = ARCHITECTURES[architecture]()
    model = model.to(device)
    policy = ScalarHeadLM(model).to(device)
    prompts, responses, ended = ["7+5=", "47+38=", "1+99="], ["12", "85", "1001"], [True, True, False]
    batch = completions_for(tokenizer, prompts, responses, ended, device)
    with torch.no_grad():
        logprobs, _, _ = policy_outputs(policy, batch, temperature)
    for row, (prompt, response, end) in enumerate(zip(prompts, responses, ended)):
        ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if end else [])
        with torch.no_grad():
            alone = unpadded_logprobs(model, tokenizer, prompt, ids, temperature, device)
        assert batch.response_mask[row].sum() == len(ids)
        assert torch.allclose(logprobs[row, :len(ids)].cpu(), torch.tensor(alone), atol=1e-5)


def test_token_logprobs_and_entropy_apply_the_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    for temperature in (1.0, 0.5, 2.0):
        probs = torch.softmax(logits / temperature, -1)
        assert torch.allclose(token_logprobs(logits, torch.tensor([[0]]), temperature), probs[..., 0].log())
        assert torch.allclose(token_entropy(logits, temperature), -(probs * probs.log()).sum(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_kv_cache_sampling_gives_what_a_full_recomputation_gives(architecture, device):
    """Greedy decoding with the cache against a loop that recomputes the whole sequence each step;
    a prompt asked by several rows (read once, its cache copied) as well."""
    model, tokenizer = ARCHITECTURES[architecture](seed=3)
    model = model.to(device)
    prompts = ["3+4=", "58+67=", "3+4=", "9+90=", "58+67=", "3+4="]
    cached = sample_completions(model, tokenizer, prompts, 5, 1.0, None, device, greedy=True)
    for row, prompt in enumerate(prompts):
        ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        generated = []
        for _ in range(5):
            with torch.no_grad():
                token = int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax())
            generated.append(token)
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
        length = int(cached.response_mask[row].sum())
        assert cached.response_ids[row, :length].tolist() == generated
        assert bool(cached.ended[row]) == (generated[-1] == tokenizer.eos_token_id)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_samplers_logprobs_are_a_full_forward_pass_logprobs(architecture, temperature):
    """What the sampler keeps of each drawn token (the RL rollout's KL reads it in place of a
    policy pass) against `response_logprobs` on the finished completions: the same numbers to
    float rounding, at the sampling temperature, 0 on padding."""
    model, tokenizer = ARCHITECTURES[architecture](seed=4)
    prompts = ["3+4=", "58+67=", "3+4=", "9+90="]
    completions = sample_completions(model, tokenizer, prompts, 6, temperature, torch.Generator().manual_seed(1), "cpu")
    mask = completions.response_mask
    assert not mask.all()  # some rows ended early: their padding must hold 0
    expected = response_logprobs(model, completions, temperature)  # [B, R]
    assert torch.allclose(completions.sampled_logprobs[mask], expected[mask], atol=1e-5)
    assert torch.equal(completions.sampled_logprobs[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(completions.select(torch.tensor([2, 0])).sampled_logprobs, completions.sampled_logprobs[[2, 0]])


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_a_prompt_asked_by_several_rows_is_read_once(architecture):
    """The prefill runs on the distinct prompts alone, then one token a row; every row keeps its
    own prompt (what its tokens are is the test above's)."""
    model, tokenizer = ARCHITECTURES[architecture](seed=5)
    prompts = ["3+4=", "3+4=", "58+67=", "3+4=", "58+67=", "9+90="]
    inputs = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: inputs.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    completions = sample_completions(model, tokenizer, prompts, 6, 1.0, torch.Generator().manual_seed(2), "cpu")
    hook.remove()
    longest = max(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts) + 1  # + BOS
    assert inputs[0] == (3, longest)
    assert all(shape == (len(prompts), 1) for shape in inputs[1:])
    expected = sample_completions(model, tokenizer, list(dict.fromkeys(prompts)), 1, 1.0, None, "cpu").prompt_ids
    assert torch.equal(completions.prompt_ids, expected[torch.tensor([0, 0, 1, 0, 1, 2])])


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_rows_that_share_a_prompt_read_it_once_and_get_what_whole_rows_get(architecture):
    """`completions_forward` (runs of m rows of one prompt read it once, then their responses read
    its KV cache) against `lm_forward` over each whole row: the same logits at every number of
    kept positions, the same last hidden states, and the same gradient through the cache; rows
    that are not such runs take the one pass over whole rows."""
    model, tokenizer = ARCHITECTURES[architecture](seed=6)
    prompts = ["3+4=", "3+4=", "58+67=", "58+67=", "9+90=", "9+90="]  # 3 prompts, 2 rows each
    responses = ["7", "1234", "125", "12", "99", "0"]
    completions = completions_for(tokenizer, prompts, responses, [True, False, True, True, False, True])
    assert rows_per_prompt(completions) == 2
    for uneven in ([0, 1, 2, 4, 5], [0, 2, 3, 1], [0, 2, 4]):  # runs of 2, 2, 1 / a prompt apart / all apart
        assert rows_per_prompt(completions.select(torch.tensor(uneven))) == 1
    inputs = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: inputs.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    with torch.no_grad():
        completions_forward(model, completions)
        completions_forward(model, completions.select(torch.tensor([0, 1, 2, 4, 5])))
    hook.remove()
    prompt_width, response_width = completions.prompt_ids.shape[1], completions.response_ids.shape[1]
    assert inputs == [(3, prompt_width), (6, response_width), (5, prompt_width + response_width)]
    mask = completions.attention_mask  # [B, P + R]: padded positions hold junk in both
    for kept in (0, 1, response_width, response_width + 1, response_width + 3):
        with torch.no_grad():
            shared, shared_hidden = completions_forward(model, completions, with_hidden=True, logits_to_keep=kept)
            whole, whole_hidden = lm_forward(model, completions.input_ids, completions.attention_mask,
                                             with_hidden=True, logits_to_keep=kept)
        assert shared.shape == whole.shape
        real = mask[:, -shared.shape[1]:]
        assert torch.allclose(shared[real], whole[real], atol=1e-5)
        assert torch.allclose(shared_hidden[mask], whole_hidden[mask], atol=1e-5)

    def gradient(forward) -> list[torch.Tensor]:
        model.zero_grad()
        logits, _ = forward()
        (logits[:, :-1].log_softmax(-1)[..., 0] * completions.response_mask).sum().backward()  # [B, R]
        return [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]

    kept = response_width + 1
    shared = gradient(lambda: completions_forward(model, completions, logits_to_keep=kept))
    whole = gradient(lambda: lm_forward(model, completions.input_ids, completions.attention_mask,
                                        logits_to_keep=kept))
    assert len(shared) == len(whole) and len(whole) > 0
    for a, b in zip(shared, whole):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_sampling_stops_each_row_at_eos_and_masks_what_follows():
    model, tokenizer = tiny_model(seed=1)
    completions = sample_completions(model, tokenizer, ["1+1="] * 64, 5, 3.0, torch.Generator().manual_seed(0), "cpu")
    for ids, mask, ended in zip(completions.response_ids, completions.response_mask, completions.ended):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # one contiguous run from the start
        eos_positions = (ids[:length] == tokenizer.eos_token_id).nonzero().flatten().tolist()
        assert eos_positions == ([length - 1] if ended else [])
        assert (ids[length:] == tokenizer.pad_token_id).all()


def test_sample_tokens_inverts_the_cumulative_distribution_of_each_row():
    """Against a loop over the tokens with the same uniform draws: the first token whose running
    probability exceeds u; zero-probability tokens are never drawn; frequencies match."""
    logits = torch.tensor([[0.0, -float("inf"), 1.0, 2.0, -float("inf")], [3.0, 0.0, -float("inf"), 0.0, 0.0]] * 2000)
    drawn = sample_tokens(logits, torch.Generator().manual_seed(3))  # [B]
    uniforms = torch.rand(len(logits), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    probabilities = torch.softmax(logits, -1).double()
    expected = []
    for row, u in zip(probabilities.tolist(), uniforms[:, 0].tolist()):
        total, running = sum(row), 0.0
        expected.append(next(token for token, p in enumerate(row) if (running := running + p) > u * total))
    assert drawn.tolist() == expected
    assert not bool((probabilities[torch.arange(len(drawn)), drawn] == 0).any())
    for row in (0, 1):
        frequency = torch.bincount(drawn[row::2], minlength=5).double() / 2000
        assert torch.allclose(frequency, probabilities[row], atol=4 * (0.25 / 2000) ** 0.5)  # 4 standard errors


def test_sampling_is_repeatable_with_a_seeded_generator():
    model, tokenizer = tiny_model()
    draw = lambda: sample_completions(model, tokenizer, ["12+34="] * 8, 5, 1.0,  # noqa: E731
                                      torch.Generator().manual_seed(7), "cpu").response_ids
    assert torch.equal(draw(), draw())


def test_a_saved_model_loads_back_from_its_directory(tmp_path):
    model, tokenizer = tiny_model()
    save_pretrained(model, tokenizer, tmp_path / "model")
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "model")
    ids = torch.tensor([[1, 5, 6, 13, 7, 14]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tokenizer("47+38=", add_special_tokens=False)["input_ids"] == \
        tokenizer("47+38=", add_special_tokens=False)["input_ids"]
    assert loaded_tokenizer.decode([10, 11, loaded_tokenizer.eos_token_id], skip_special_tokens=True) == "78"


def test_a_directory_without_a_causal_lm_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no Hugging Face model"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(CheckpointError, match="no loadable causal LM"):
        load_pretrained(tmp_path)

"""Micro-batches: an update cut into forward/backward passes of a few rows computes the same
gradients as one pass over the minibatch, keeps the first ratio exactly 1, and never builds the
whole batch's [rows, tokens, vocabulary] logits; and a stage's peak memory is its own."""

import copy
import math

import pytest
import torch

from lm_helpers import completions_for, tiny_model
from proximal.lm import memory
from proximal.lm.config import PPOStageConfig
from proximal.lm.memory import inference_rows, micro_batch_rows, pass_bytes
from proximal.lm.model import ScalarHeadLM, response_logits_kept, sample_completions
from proximal.lm.ppo import ppo_iteration, ppo_update
from proximal.lm.rollout import collect_rollout, micro_batches
from proximal.lm.reward import RewardModelScorer

PROMPTS = ["12+34=", "5+6=", "99+1=", "40+44="]


def _setup(config: PPOStageConfig, rows: int, seed: int = 5):
    """A policy, its reference, a reward model and `rows` sampled completions (k per prompt for
    the grouped methods)."""
    policy, tokenizer = tiny_model(seed=seed)
    reference, _ = tiny_model(seed=0)
    reward_lm, _ = tiny_model(seed=1)
    reward_model = ScalarHeadLM(reward_lm)
    torch.nn.init.normal_(reward_model.head.weight)
    prompts = [prompt for prompt in (PROMPTS * rows)[:rows // config.group_size] for _ in range(config.group_size)]
    completions = sample_completions(policy, tokenizer, prompts, 5, 1.0, torch.Generator().manual_seed(0), "cpu")
    scorer = RewardModelScorer(reward_model.eval(), config.missing_eos_score)
    return ScalarHeadLM(policy), reference, scorer, tokenizer, prompts, completions


def _update(config, policy, reference, scorer, tokenizer, prompts, completions, micro_rows, share=True):
    """One iteration's rollout and update on one minibatch of every row, in passes of
    `micro_rows` (0: one pass); returns (stats, each trainable parameter's gradient)."""
    first = [torch.randperm(len(prompts), generator=torch.Generator().manual_seed(1))]
    passes = micro_batches(first, micro_rows or len(prompts))
    rollout = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer, passes, config,
                              config.kl_coef, share_first_forward=share)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # the weights stay: only the gradients are compared
    stats = ppo_update(policy, optimizer, rollout, first, config, torch.Generator().manual_seed(2),
                       micro_rows=micro_rows, kl_coef=config.kl_coef)
    return stats, [parameter.grad.clone() for parameter in policy.parameters() if parameter.grad is not None]


VARIANTS = {
    "ppo": {"method": "ppo"},
    "rloo": {"method": "rloo", "rloo_samples": 4},
    "grpo, KL in the loss, per sequence": {"method": "grpo", "rloo_samples": 4, "kl_in": "loss",
                                           "loss_aggregation": "sequence"},
    "grpo, Dr. GRPO, clip-higher": {"method": "grpo", "rloo_samples": 4, "loss_aggregation": "constant",
                                    "group_std": False, "clip_coef_high": 0.28},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("micro_rows", [1, 3, 5])
def test_passes_of_a_few_rows_give_the_gradient_of_one_pass_and_a_first_ratio_of_exactly_one(variant, micro_rows):
    """12 rows in passes of 1, 3 or 5 (5, 5, 2: uneven) against one pass over all 12: the
    gradients agree to float tolerance, the statistics too, and the first ratio is exactly 1."""
    config = PPOStageConfig(prompts_per_iteration=12, minibatch_size=12, epochs=1, max_grad_norm=1e9, kl_coef=0.2,
                            **VARIANTS[variant])
    setup = _setup(config, 12)
    one_pass = copy.deepcopy(setup)
    stats, gradients = _update(config, *setup, micro_rows=micro_rows)
    whole_stats, whole_gradients = _update(config, *one_pass, micro_rows=0)
    assert stats["first_ratio_error"] == 0.0 and whole_stats["first_ratio_error"] == 0.0
    assert len(gradients) == len(whole_gradients) > 0
    for gradient, whole in zip(gradients, whole_gradients):
        assert torch.allclose(gradient, whole, rtol=1e-4, atol=1e-7)
    assert max(float(g.abs().max()) for g in whole_gradients) > 1e-4  # a real gradient, not zeros on both sides
    for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
        assert stats[name] == pytest.approx(whole_stats[name], rel=1e-4, abs=1e-7), name


def test_without_the_shared_first_pass_micro_batches_still_start_at_a_ratio_of_exactly_one():
    """The update recomputes every pass: its first ratios are exact because the rollout ran the
    same rows in the same passes."""
    config = PPOStageConfig(method="rloo", rloo_samples=4, prompts_per_iteration=12, minibatch_size=12, epochs=2)
    stats, _ = _update(config, *_setup(config, 12), micro_rows=5, share=False)
    assert stats["first_ratio_error"] == 0.0


@pytest.mark.parametrize("settings", [{"method": "ppo"}, {"method": "rloo"}, {"method": "grpo", "kl_in": "loss"}])
def test_an_iteration_in_passes_of_a_few_rows_starts_at_a_ratio_of_exactly_one(settings):
    """ppo_iteration with --ppo.micro-batch-size 5 over 12 rows, 2 epochs: the rollout and the
    update cut the batch alike (a first ratio of exactly 1), and the policy runs once per pass:
    PPO 3 rollout passes (its values; the first kept for the update) + 2 + 3; RLOO (the KL in the
    reward read from the sampler) and GRPO (the KL in the loss) no rollout pass + 3 + 3."""
    config = PPOStageConfig(rloo_samples=4, prompts_per_iteration=12, minibatch_size=12, epochs=2,
                            micro_batch_size=5, max_new_tokens=5, **settings)
    policy, reference, scorer, tokenizer, _, _ = _setup(config, 12)
    passes = []
    policy.head.register_forward_hook(lambda *_: passes.append(1))
    result = ppo_iteration(policy, reference, scorer, tokenizer, torch.optim.AdamW(policy.parameters(), lr=1e-3),
                           PROMPTS * 3, config, 0.1, torch.Generator().manual_seed(0), "cpu")
    assert result.stats["first_ratio_error"] == 0.0
    assert len(passes) == (8 if settings["method"] == "ppo" else 6)


def test_a_large_vocabulary_never_gets_the_whole_batchs_logits(monkeypatch):
    """A tiny Llama with Gemma 3's 262,144-token vocabulary under a budget of 64 MiB: the
    automatic micro-batch keeps each pass's logits within it, and no LM-head output ever has the
    whole batch's rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", 64 * 2**20)
    _, tokenizer = tiny_model()
    torch.manual_seed(0)
    vocab, rows = 262_144, 16

    def lm():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).eval()

    policy, reference = ScalarHeadLM(lm()), lm()
    prompts = [prompt for prompt in PROMPTS for _ in range(rows // len(PROMPTS))]
    completions = completions_for(tokenizer, prompts, ["46", "11", "100", "84"] * (rows // len(PROMPTS)),
                                  [True] * rows)
    width, kept = completions.input_ids.shape[1], response_logits_kept(completions)
    chosen = micro_batch_rows(policy.lm, rows, width, kept)
    assert chosen == memory.ACTIVATION_BUDGET // pass_bytes(policy.lm.config, width, kept)
    assert chosen == 4  # the vocabulary alone: 5 kept positions x 262,144 x 3 floats is ~15 MiB a row
    seen = []
    for model in (policy.lm, reference):
        model.get_output_embeddings().register_forward_hook(lambda module, args, output: seen.append(output.shape))

    def score(prompts, completions, tokenizer):
        return torch.arange(len(prompts), dtype=torch.float32)

    score.scores = score
    config = PPOStageConfig(method="rloo", rloo_samples=4, prompts_per_iteration=rows, minibatch_size=rows, epochs=1)
    first = [torch.arange(rows)]
    rollout = collect_rollout(policy, reference, score, prompts, completions, tokenizer, micro_batches(first, chosen),
                              config, 0.1, share_first_forward=True)
    stats = ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), rollout, first, config,
                       torch.Generator().manual_seed(0), micro_rows=chosen)
    assert stats["first_ratio_error"] == 0.0
    assert seen and max(shape[0] for shape in seen) == chosen
    # the head runs on response positions only (and a shared prompt's last), never on the whole batch
    assert all(shape[-1] == vocab and shape[1] <= kept for shape in seen)


def test_the_automatic_micro_batch_follows_the_budget_and_a_flag_overrides_it(monkeypatch):
    model, _ = tiny_model()
    per_row = pass_bytes(model.config, 16, 6)
    assert per_row == 4 * (16 * model.config.n_layer * memory.FLOATS_PER_HIDDEN * model.config.n_embd
                           + 6 * model.config.vocab_size * memory.LOGIT_COPIES)
    assert micro_batch_rows(model, 128, 16, 6) == 128  # a tiny model: the whole minibatch in one pass
    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", 10 * per_row + 1)
    assert micro_batch_rows(model, 128, 16, 6) == 10
    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", 1)
    assert micro_batch_rows(model, 128, 16, 6) == 1  # never below one row
    assert micro_batch_rows(model, 128, 16, 6, requested=7) == 7  # --ppo.micro-batch-size
    assert micro_batch_rows(model, 4, 16, 6, requested=7) == 4


def test_a_pass_over_blocks_that_share_a_prompt_counts_the_prompt_once_and_takes_whole_blocks(monkeypatch):
    """Rows of 16 tokens whose first 10 are a prompt shared by blocks of 4 rows: a pass of 4 rows
    holds 4 x 6 + 10 = 34 tokens (not 64) and 4 x 6 kept logits; a pass never straddles blocks."""
    model, _ = tiny_model()
    four_shared = pass_bytes(model.config, 4 * 6 + 10, 4 * 6)
    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", four_shared)
    assert micro_batch_rows(model, 64, 16, 6, prompt_width=10, group=4) == 4
    assert micro_batch_rows(model, 64, 16, 6) == four_shared // pass_bytes(model.config, 16, 6)  # unshared: 2
    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", four_shared - 1)
    assert micro_batch_rows(model, 64, 16, 6, prompt_width=10, group=4) == 2  # 3 would straddle two blocks
    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", pass_bytes(model.config, 8 * 6 + 2 * 10, 8 * 6))
    assert micro_batch_rows(model, 64, 16, 6, prompt_width=10, group=4) == 8  # two blocks, two prompts


def test_passes_without_gradients_take_whole_blocks_of_a_prompts_rows(monkeypatch):
    """`inference_rows` with blocks of 4 rows that share a prompt: of the 13 rows the budget fits,
    12 (three whole blocks); of 3, 2 (half a block); without blocks, all 13."""
    model, _ = tiny_model()
    per_row = pass_bytes(model.config, 16, 6, training=False)
    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", 13 * per_row)
    assert inference_rows(model, 64, 16, 6) == 13
    assert inference_rows(model, 64, 16, 6, group=4) == 12
    monkeypatch.setattr(memory, "ACTIVATION_BUDGET", 3 * per_row)
    assert inference_rows(model, 64, 16, 6, group=4) == 2


@pytest.mark.skipif(not memory.reset_peak(), reason="the OS offers no reset of the peak resident size")
def test_the_peak_is_reset_between_stages():
    memory.reset_peak()
    big = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
    peak_with = memory.peak_gb()
    del big
    memory.reset_peak()
    assert memory.peak_gb() < peak_with - 0.3


@pytest.mark.parametrize("settings", [{"method": "rloo"}, {"method": "grpo", "kl_in": "loss"}])
def test_the_reference_and_reward_model_hold_no_weights_during_the_update_and_change_nothing(
        settings, tmp_path, monkeypatch):
    """A ReloadedReference (the RL stage's reference when every weight trains) is read from its
    directory for the rollout and dropped before the update, and so is a reward model the stage
    never refits (a RewardModelScorer given `reload`): two iterations give the statistics
    and weights of a reference and a reward model kept in memory throughout, to float rounding."""
    from proximal.lm import ppo
    from proximal.lm.loading import ReloadedReference, save_pretrained

    config = PPOStageConfig(rloo_samples=4, prompts_per_iteration=8, minibatch_size=8, max_new_tokens=5, **settings)
    _, kept, kept_scorer, tokenizer, _, _ = _setup(config, 8)
    save_pretrained(kept, tokenizer, tmp_path / "start")
    reloaded = ReloadedReference(tmp_path / "start", "cpu")
    loads = []
    reloading_scorer = RewardModelScorer(None, config.missing_eos_score,
                                         reload=lambda: loads.append(1) or copy.deepcopy(kept_scorer.model))
    held_during_update = []
    real_update = ppo.ppo_update
    monkeypatch.setattr(ppo, "ppo_update", lambda *a, **k: (
        held_during_update.append((reloaded.loaded is not None, reloading_scorer.model is not None)),
        real_update(*a, **k))[1])
    runs = []
    for reference, scorer in ((kept, kept_scorer), (reloaded, reloading_scorer)):
        policy = _setup(config, 8)[0]
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        stats = [ppo_iteration(policy, reference, scorer, tokenizer, optimizer, PROMPTS * 2, config, 0.1, generator,
                               "cpu").stats for _ in range(2)]
        runs.append((stats, [parameter.detach().clone() for parameter in policy.parameters()]))
    # the same up to float rounding: a model loaded from its files runs the cached (shared-prompt) pass
    # of `completions_forward` with other rounding than its twin in memory, ~1e-7 in a log-prob
    for kept_stats, reloaded_stats in zip(*(stats for stats, _ in runs)):
        assert kept_stats.keys() == reloaded_stats.keys()
        assert all(math.isclose(kept_stats[key], reloaded_stats[key], rel_tol=1e-5, abs_tol=1e-6) for key in kept_stats)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1]))
    assert held_during_update == [(False, False)] * 4 and list(reloaded.parameters()) == []
    assert len(loads) == 2 and kept_scorer.model is not None  # loaded once an iteration; one without `reload` keeps it

"""A NaN that a user's model puts at padded positions never reaches the weights, and an update
whose gradient is not finite is refused before its step, in one line naming the iteration."""

import copy

import pytest
import torch

from lm_helpers import completions_for
from proximal.errors import TrainingDiverged
from proximal.lm.config import PPOStageConfig
from test_lm_memory import _setup, _update
from test_lm_pipeline import TINY, run_cli

RESPONSES = ["46", "1", "100", "84"]  # + EOS, right-padded to 4 tokens: padding in three rows of four


def _minus_infinity_at_padding(module, args, output):
    """A forward hook on the policy (ScalarHeadLM): its logits and values plus log(attention mask),
    -inf wherever the mask is 0, as a model that masks its own outputs might give. log_softmax of
    a row of -inf is NaN, and an addition passes the gradient through unchanged: a NaN that the
    backward pass carries back from the loss reaches the weights."""
    attention_mask = args[0].attention_mask.float()  # [B, L]
    logits, scalars = output
    kept = attention_mask[:, -logits.shape[1]:]  # [B, K] of the kept logits' positions
    return logits + kept.log()[..., None], scalars + attention_mask.log()


@pytest.mark.parametrize("method", ["ppo", "rloo"])
def test_nan_log_probs_and_infinite_values_at_padded_positions_leave_the_gradient_as_it_was(method):
    config = PPOStageConfig(method=method, rloo_samples=4, prompts_per_iteration=8, minibatch_size=8, epochs=1,
                            max_grad_norm=1e9)
    policy, reference, scorer, tokenizer, _, _ = _setup(config, 8)
    prompts = ["12+34="] * 4 + ["5+6="] * 4  # two groups of 4 (RLOO's k)
    completions = completions_for(tokenizer, prompts, RESPONSES * 2, [True] * 8)
    assert not completions.response_mask.all() and not completions.prompt_mask.all()  # padding on both sides
    clean = copy.deepcopy((policy, reference, scorer))
    policy.register_forward_hook(_minus_infinity_at_padding)
    stats, gradients = _update(config, policy, reference, scorer, tokenizer, prompts, completions, micro_rows=0)
    _, clean_gradients = _update(config, *clean[:3], tokenizer, prompts, completions, micro_rows=0)
    assert all(bool(torch.isfinite(gradient).all()) for gradient in gradients)
    for gradient, expected in zip(gradients, clean_gradients):
        assert torch.equal(gradient, expected)
    assert stats["first_ratio_error"] == 0.0 and all(value == value for value in stats.values())  # no NaN


def test_a_nan_gradient_from_a_finite_loss_is_refused_before_the_step():
    config = PPOStageConfig(method="rloo", rloo_samples=4, prompts_per_iteration=8, minibatch_size=8, epochs=1)
    policy, reference, scorer, tokenizer, prompts, completions = _setup(config, 8)
    before = [parameter.detach().clone() for parameter in policy.parameters()]
    policy.lm.transformer.wte.weight.register_hook(lambda gradient: gradient * float("nan"))  # the loss stays finite
    with pytest.raises(TrainingDiverged, match="^the PPO gradient became NaN or infinite although the loss was finite$"):
        _update(config, policy, reference, scorer, tokenizer, prompts, completions, micro_rows=0)
    assert all(torch.equal(parameter, old) for parameter, old in zip(policy.parameters(), before))


@pytest.mark.slow
def test_a_diverged_rlhf_update_names_its_iteration_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    import proximal.lm.ppo as ppo

    clip, calls = ppo.clip_gradients, []

    def nan_in_iteration_3(parameters, max_norm, what):  # TINY: 2 epochs x 2 minibatches of 16 an iteration
        calls.append(what)
        if len(calls) == 2 * 4 + 1:
            raise TrainingDiverged(f"the {what} gradient became NaN or infinite although the loss was finite")
        clip(parameters, max_norm, what)

    monkeypatch.setattr(ppo, "clip_gradients", nan_in_iteration_3)
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["rlhf", "--run-dir", str(run_dir), *TINY], capsys)
    checkpoint = run_dir / "ppo" / "checkpoint.pt"
    assert code != 0 and err.strip().splitlines() == [
        f"proximal rlhf: error: the PPO gradient became NaN or infinite although the loss was finite at iteration 3; "
        f"last good checkpoint kept: {checkpoint}"]
    assert checkpoint.is_file() and not (run_dir / "ppo" / "summary.json").exists()

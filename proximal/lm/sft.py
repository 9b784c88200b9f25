"""Supervised fine-tuning: next-token cross-entropy on prompt + demonstration, counted on the
response tokens only (the prompt is given, not something to imitate).

Data flow: demonstrations (prompt, response) -> one padded tensor batch (`encode_prompts` +
`encode_responses`) -> random minibatches -> `sft_loss` -> AdamW (linear warm-up, linear decay)
-> RUN_DIR/sft/model. `run_sft` is the stage: resumable from checkpoint.pt every
--sft.checkpoint-every steps. On K processes each step's minibatch is drawn alike on every rank
and each rank takes its share of the rows; the gradients are averaged weighted by response
tokens, so the step is the one-process step on the whole minibatch.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from proximal.checkpoint import CHECKPOINT_NAME, save_checkpoint
from proximal.dist import DistContext
from proximal.errors import TrainingDiverged
from proximal.optim import clip_gradients
from proximal.lm.loading import build_tiny_gpt2, save_pretrained, trainable_parameters
from proximal.lm.model import Completions, encode_prompts, encode_responses, response_logprobs
from proximal.lm.stage import MODEL_DIR, StageContext, finish
from proximal.losses import masked_mean
from proximal.run import CsvLog, restore_states

COLUMNS = ("step", "loss", "learning_rate", "wall_seconds")


def sft_loss(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
             response_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (EOS included) given the prompt: a
    mean over tokens, so `DistContext.average_gradients` weighs each rank by its token count."""
    logprobs = response_logprobs(model, Completions(prompt_ids, prompt_mask, response_ids, response_mask, None), 1.0)
    return -masked_mean(logprobs, response_mask)  # logprobs [B, R]


def sft_step(model: nn.Module, optimizer: torch.optim.Optimizer, rows: list[torch.Tensor], max_grad_norm: float,
             dist: DistContext = DistContext()) -> tuple[torch.Tensor, float]:
    """One AdamW step on this rank's `rows` (prompt ids, prompt mask, response ids, response mask)
    of a minibatch, the gradient averaged over the ranks weighted by response tokens; returns
    (this rank's loss, its response tokens)."""
    loss = sft_loss(model, *rows)
    optimizer.zero_grad()
    loss.backward()
    tokens = float(rows[3].sum())  # what the loss averaged over
    if not dist.average_gradients(trainable_parameters(model), tokens, loss):
        raise TrainingDiverged("the SFT loss became NaN or infinite")
    clip_gradients(model.parameters(), max_grad_norm, "SFT")
    optimizer.step()
    return loss, tokens


def encode_demonstrations(tokenizer, prompts: list[str], responses: list[str], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_ids [N, P], prompt_mask [N, P], response_ids [N, R], response_mask [N, R]); every
    demonstration ends with EOS."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    response_ids, response_mask = encode_responses(tokenizer, responses, [True] * len(responses), device)
    return prompt_ids, prompt_mask, response_ids, response_mask


def initial_model(ctx: StageContext):
    """The model SFT starts from: the user's (a local HF directory, or the plain copy of a GGUF
    file the run made in RUN_DIR/start: it is dequantised once per run), or a fresh tiny GPT-2
    over the task's characters."""
    model_config = ctx.config.model
    if model_config.path:
        return ctx.load_start_model()
    tokenizer = ctx.tokenizer
    torch.manual_seed(ctx.config.run.seed)
    model = build_tiny_gpt2(tokenizer, model_config.width, model_config.layers, model_config.heads,
                            model_config.context).to(ctx.device)
    return model, tokenizer


def run_sft(ctx: StageContext) -> dict[str, Any]:
    config, stage_dir, dist = ctx.config.sft, ctx.stage_dir("sft"), ctx.dist
    if dist.is_main:
        stage_dir.mkdir(exist_ok=True)
    model, tokenizer = initial_model(ctx)
    data = encode_demonstrations(tokenizer, ctx.data.sft_prompts, ctx.data.sft_completions, ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, config.steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - step / config.steps))
    generator = torch.Generator(device=ctx.device).manual_seed(ctx.config.run.seed)
    checkpoint_path = stage_dir / CHECKPOINT_NAME
    state = restore_states(checkpoint_path, model=model, optimizer=optimizer, schedule=schedule, generator=generator)
    start, elapsed = (0, 0.0) if state is None else (int(state["step"]), float(state["wall_seconds"]))
    log = CsvLog(stage_dir / "metrics.csv", COLUMNS, "step", start if start else None) if dist.is_main else None
    model.train()
    started = time.perf_counter() - elapsed
    with ctx.progress("sft", config.steps, start) as progress:
        for step in range(start, config.steps):
            index = torch.randint(len(ctx.data.sft_prompts), (config.batch_size,), generator=generator,
                                  device=generator.device)  # the same on every rank
            loss, tokens = sft_step(model, optimizer, [tensor[dist.shard(index)] for tensor in data],
                                    config.max_grad_norm, dist)
            schedule.step()
            if (step + 1) % 10 == 0 or step + 1 == config.steps:
                mean_loss = dist.weighted_mean(loss, tokens)
                if log is not None:
                    log.log({"step": step + 1, "loss": mean_loss, "learning_rate": schedule.get_last_lr()[0],
                             "wall_seconds": time.perf_counter() - started})
                progress.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)
            progress.update()
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps and dist.is_main:
                save_checkpoint(checkpoint_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "generator": generator.get_state(), "step": step + 1,
                    "wall_seconds": time.perf_counter() - started})
    seconds = time.perf_counter() - started
    model.eval()
    evaluation = ctx.evaluate(model, tokenizer)
    return dist.on_main(lambda: _finish_sft(ctx, model, tokenizer, log, seconds, evaluation))


def _finish_sft(ctx: StageContext, model: nn.Module, tokenizer, log: CsvLog, seconds: float,
                evaluation: dict[str, float]) -> dict[str, Any]:
    """Rank 0: the model saved, the curve plotted, the stage marked finished."""
    stage_dir = ctx.stage_dir("sft")
    log.close()
    save_pretrained(model, tokenizer, stage_dir / MODEL_DIR)
    summary = {"seconds": seconds, "steps": ctx.config.sft.steps, "demonstrations": len(ctx.data.sft_prompts),
               "eval": evaluation}
    from proximal.lm.plots import plot_sft

    plot_sft(stage_dir)
    finish(stage_dir, summary)
    (stage_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    return summary

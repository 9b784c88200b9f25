"""`proximal rlhf`: the order of the stages, the checks made before any file is written, and resume.

  RUN_DIR/config.json   the RLHFConfig (a resumed run must match it)
  RUN_DIR/sft/          model/ (HF format), metrics.csv, sft.png, summary.json
  RUN_DIR/reward/       comparisons.jsonl, model/ + head.pt, metrics.csv, reward.png, summary.json
  RUN_DIR/ppo/          model/, metrics.csv, ppo.png, samples.md, comparisons.jsonl, summary.json
  RUN_DIR/dpo/          (only when asked) model/, metrics.csv, dpo.png, summary.json

Each stage is one function that owns its loop (`STAGES`); a finished stage (its summary.json
exists) is skipped, a killed one continues from its checkpoint. The default stages follow the
data: SFT when there are demonstrations, the reward model unless a reward function replaces it,
then PPO. A stage reads only the folders of the stages before it, so it also runs alone
(`--stages ppo`) on a run directory whose earlier stages finished, or from a model of the user's
own (`--model.path DIR --stages reward,ppo`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from proximal.checkpoint import CHECKPOINT_NAME, load_checkpoint
from proximal.dist import DistContext
from proximal.errors import CheckpointError, ConfigError
from proximal.human.server import check_can_serve
from proximal.lm.config import RLHFConfig
from proximal.lm.dpo import run_dpo
from proximal.lm.loading import model_context_length
from proximal.lm.model import prompt_lengths
from proximal.lm.memory import reset_peak
from proximal.lm.ppo import run_ppo
from proximal.lm.reward import run_reward
from proximal.lm.sft import run_sft
from proximal.lm.stage import START_DIR, StageContext, is_finished, open_context, read_summary
from proximal.run import locked_run_dir, unique_run_dir, write_json_atomic

STAGES = {"sft": run_sft, "reward": run_reward, "ppo": run_ppo, "dpo": run_dpo}  # in the order they run


def default_stages(ctx: StageContext) -> tuple[str, ...]:
    """SFT if there is something to imitate, the reward model unless a function replaces it, PPO."""
    function_rewards = ctx.reward_function is not None and ctx.config.reward.function_role == "reward"
    return (*(("sft",) if ctx.data.sft_prompts else ()), *(() if function_rewards else ("reward",)), "ppo")


def new_run_dir(config: RLHFConfig) -> Path:
    return unique_run_dir(config.run.runs_dir, f"rlhf-{config.task.name}__{config.run.seed}")


def _check_order(ctx: StageContext, stages: tuple[str, ...]) -> None:
    """Each stage has what it reads: a model to start from, demonstrations, pairs or a labeller."""
    config, done = ctx.config, {s for s in STAGES if ctx.run_dir is not None and is_finished(ctx.stage_dir(s))}
    function_rewards = ctx.reward_function is not None and config.reward.function_role == "reward"
    for stage in stages:
        if stage == "sft" and not ctx.data.sft_prompts:
            raise ConfigError("the sft stage needs demonstrations: pass --data.sft FILE, or leave sft out of "
                              "--stages and start from your model with --model.path")
        if stage != "sft" and "sft" not in done and not config.model.path:
            if not ctx.data.sft_prompts:
                raise ConfigError(f"stage {stage} needs a model to start from, and this task has no demonstrations "
                                  "to train one: pass a pretrained one with --model.path DIR or FILE.gguf "
                                  "(docs/lm_real_model.md fetches SmolLM2-135M-Instruct)")
            raise ConfigError(f"stage {stage} needs a model to start from: a finished sft stage in --run-dir, or "
                              "--model.path DIR, or run --stages sft first")
        if stage == "reward" and ctx.data.preferences is None and config.reward.labeller == "synthetic" \
                and not ctx.has_gold:
            raise ConfigError("the reward stage needs labelled pairs: --data.preferences FILE, a --reward.function "
                              "(--reward.function-role labeller) to label sampled pairs, or --reward.labeller human")
        if stage == "ppo" and not function_rewards and "reward" not in done:
            raise ConfigError("stage ppo needs a finished reward stage in --run-dir (run --stages reward first), "
                              "or a --reward.function to optimise")
        if stage == "ppo" and not ctx.data.rl:
            raise ConfigError("stage ppo needs prompts: pass --data.prompts FILE")
        standardised_on = len(ctx.data.rl[:config.reward.standardise_samples])
        if stage == "reward" and standardised_on < 2:
            raise ConfigError(f"the reward stage sets its scores' mean and std on the start model's samples of "
                              f"the training prompts and needs at least 2 of them, got {standardised_on}: add "
                              "prompts (--data.prompts) or raise --reward.standardise-samples")
        if stage == "dpo" and "reward" not in done and ctx.data.preferences is None:
            raise ConfigError("stage dpo needs pairs: a finished reward stage in --run-dir, or --data.preferences FILE")
        done.add(stage)


def _check_lengths(ctx: StageContext, tokenizer) -> None:
    """Every prompt plus --ppo.max-new-tokens, and every demonstration and pair, within the
    model's context; refused (never truncated) with where the first one is and how many are."""
    if not ctx.config.model.path and not ctx.data.sft_prompts:
        return  # no model at all (and none SFT could build): _check_order says so
    limit = model_context_length(ctx.config.model.path) if ctx.config.model.path else ctx.config.model.context
    if limit is None:
        return
    data, new_tokens = ctx.data, ctx.config.ppo.max_new_tokens
    length = lambda texts: prompt_lengths(tokenizer, texts)  # noqa: E731
    prompt_plus = f"prompt plus --ppo.max-new-tokens {new_tokens}"
    checks = [(kind, texts, [n + new_tokens for n in length(texts)], prompt_plus)
              for kind, texts in (("evaluation", data.evaluation), ("rl", data.rl))]
    if data.sft_prompts:
        whole = [p + c for p, c in zip(data.sft_prompts, data.sft_completions)]
        checks.append(("sft", data.sft_prompts, [n + 1 for n in length(whole)], "prompt plus completion plus EOS"))
    if data.preferences:
        longest = [max(record["responses"], key=len) for record in data.preferences]
        whole = [record["prompt"] + response for record, response in zip(data.preferences, longest)]
        checks.append(("preferences", [r["prompt"] for r in data.preferences], [n + 1 for n in length(whole)],
                       "prompt plus the longer response plus EOS"))
    for kind, texts, lengths, what in checks:
        over = [index for index, n in enumerate(lengths) if n > limit]
        if over:
            first = over[0]
            raise ConfigError(f"{data.origin(kind, first, texts[first])}: {what} is {lengths[first]} tokens, more "
                              f"than the model's context of {limit} ({len(over)} of {len(texts)} such records are "
                              "refused, not truncated: raise --model.context, or shorten them)")


def check(ctx: StageContext, stages: tuple[str, ...]) -> RLHFConfig:
    """Everything about the input that can be wrong, checked before any file is written: lengths
    against the context, the order of the stages, the reward function on two prompts, the
    checkpoints a resumed stage would read, and an existing run's config. Returns the config to
    record in the run's config.json."""
    _check_lengths(ctx, ctx.tokenizer)
    _check_order(ctx, stages)
    if ctx.reward_function is not None:
        prompts = (ctx.data.rl or ctx.data.evaluation)[:2]
        ctx.reward_function(prompts, (ctx.data.sft_completions[:2] + ["", ""])[:len(prompts)])
    config = ctx.config
    finished = {stage for stage in STAGES if ctx.run_dir is not None and is_finished(ctx.stage_dir(stage))}
    if "reward" in stages and "reward" not in finished and config.reward.labeller == "human" and ctx.dist.is_main:
        check_can_serve(config.reward.host, config.reward.port)  # a busy port: now, not after SFT
    if not set(stages) <= finished:  # a finished run's stages read no start model
        ctx.check_start_model()
    if ctx.run_dir is None:
        return config
    for stage in stages:
        if (ctx.stage_dir(stage) / CHECKPOINT_NAME).exists() and stage not in finished:
            load_checkpoint(ctx.stage_dir(stage) / CHECKPOINT_NAME)  # a corrupt one fails here
    config_path = ctx.run_dir / "config.json"
    if not config_path.exists():
        return config
    try:
        saved = RLHFConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{config_path} is not a readable RLHF config ({error})") from None
    # The dpo section is read by the dpo stage alone: it has to match only once that stage has
    # begun, so DPO can be tried on a finished run's pairs with settings of its own.
    dpo_begun = "dpo" in stages and ctx.stage_dir("dpo").exists()
    if _as_resumed(saved, config, dpo_begun) != config and any(_begun(ctx.stage_dir(s)) for s in STAGES):
        raise ConfigError(f"{ctx.run_dir} was run with another config; continue it with the same flags, "
                          "or start a new run directory")
    if "dpo" not in stages:
        return dataclasses.replace(config, dpo=saved.dpo)  # the record of a dpo stage stays true
    return config


def _as_resumed(saved: RLHFConfig, config: RLHFConfig, dpo_begun: bool) -> RLHFConfig:
    """`saved` with what a resumed run may change taken from `config`: where the person's page is
    served (--reward.host, --reward.port), and the dpo section until the dpo stage has begun."""
    reward = dataclasses.replace(saved.reward, host=config.reward.host, port=config.reward.port)
    return dataclasses.replace(saved, reward=reward, dpo=saved.dpo if dpo_begun else config.dpo)


def _begun(stage_dir: Path) -> bool:
    """Whether a stage left anything made under the recorded config (a checkpoint, labels, a
    model): a run directory with no stage begun takes a corrected config, as if it were new."""
    return stage_dir.is_dir() and any(stage_dir.iterdir())


def check_world_size(config: RLHFConfig, world_size: int) -> None:
    """K processes share every batch evenly: each batch size a multiple of K (RLOO, GRPO: its prompt
    groups), refused in one line on every rank before any rank waits."""
    if world_size == 1:
        return
    ppo = config.ppo
    groups = ppo.prompts_per_iteration // ppo.group_size
    sizes = [("--sft.batch-size", config.sft.batch_size), ("--reward.batch-size", config.reward.batch_size),
             ("--dpo.batch-size", config.dpo.batch_size), ("--ppo.minibatch-size", ppo.minibatch_size),
             ("--ppo.prompts-per-iteration" + (" / --ppo.rloo-samples" if ppo.group_size > 1 else ""), groups)]
    for flag, size in sizes:
        if size % world_size:
            raise ConfigError(f"{flag} {size} does not split over {world_size} processes: use a multiple of "
                              f"{world_size} (each rank takes 1/{world_size} of every batch)")


def run_pipeline(config: RLHFConfig, run_dir: Path | None, stages: tuple[str, ...] | None = None,
                 show_progress: bool = False, report=None, dist: DistContext = DistContext()) -> Path:
    """Run `stages` (None: `default_stages`; finished ones skipped) into `run_dir` (new if None);
    `report(stage, summary, skipped)` is called after each (on rank 0). On K processes (`dist`)
    every rank runs every stage; rank 0 alone creates, locks and writes the run directory."""
    torch.set_num_threads(config.run.threads)
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    ctx = open_context(config, run_dir, show_progress, dist=dist)
    stages = default_stages(ctx) if stages is None else stages
    recorded = check(ctx, stages)  # nothing is written if this fails
    ctx.run_dir = Path(dist.broadcast_object(
        (new_run_dir(config) if run_dir is None else Path(run_dir)) if dist.is_main else None))
    with locked_run_dir(ctx.run_dir) if dist.is_main else contextlib.nullcontext():  # one run writes a directory

        def prepared() -> None:
            config_path = ctx.run_dir / "config.json"
            if config_path.exists() and RLHFConfig.from_dict(json.loads(config_path.read_text())).model != config.model:
                shutil.rmtree(ctx.stage_dir(START_DIR), ignore_errors=True)  # a corrected --model.*: its own copy
            write_json_atomic(config_path, json.loads(recorded.to_json()))
            ctx.prepare_start_model()

        dist.on_main(prepared)
        for stage in stages:
            skipped = dist.broadcast_object(is_finished(ctx.stage_dir(stage)))
            if not skipped:
                reset_peak()  # the stage's summary records its own peak (`finish`)
            summary = read_summary(ctx.stage_dir(stage)) if skipped else STAGES[stage](ctx)
            if report is not None and dist.is_main:
                report(stage, summary, skipped)
    return ctx.run_dir

"""PPO for a language model, with a per-token KL penalty to the SFT model (Ziegler et al. 2019,
Ouyang et al. 2022), one iteration read top to bottom in `ppo_iteration`:

  sample B responses from the policy (KV cache)                  model.sample_completions
  old log-probs, values, reference log-probs, scores             rollout.collect_rollout (a reward
                                                                 model's score, or --reward.function's;
                                                                 RLOO's and GRPO's old log-probs: the
                                                                 sampler's, then the update's own)
  per-token rewards: -beta * k1 everywhere, the score at EOS     rollout.token_rewards
  GAE over the response tokens, gamma = 1                        rollout.token_advantages -> compute_gae
  K epochs of minibatches: Eq. 7 + value loss                    ppo_update -> clipped_surrogate
  adapt beta to the measured KL                                  rollout.AdaptiveKLController

`--ppo.method rloo` swaps in the critic-free alternative at two lines and changes nothing else:
k responses to each of B / k prompts, and leave-one-out advantages
(rollout.leave_one_out_advantages) instead of GAE; the update is the same Eq. 7 without the
value loss. `--ppo.method grpo` baselines the same groups by their mean and scales by their std
(rollout.group_advantages), and usually goes with the KL as k3 in the loss (`--ppo.kl-in loss`),
a per-sequence mean (`--ppo.loss-aggregation sequence`, or `constant` for Dr. GRPO) and, for
DAPO, a higher upper clip (`--ppo.clip-coef-high`).

Memory: a minibatch runs through the model in passes of a few rows (`--ppo.micro-batch-size`,
chosen by lm/memory.py when 0), each pass's loss its share of the minibatch's, so the gradients
add up to one pass's over the whole minibatch while only one pass's activations and logits are
ever held: the [rows, tokens, vocabulary] logits of a whole batch are never built.

The value function is a linear head on the policy's last hidden state (one forward pass gives
logits and values: half the FLOPs of a separate critic, which matters on a CPU). The first
epoch's minibatches are drawn before the rollout's own forward passes, which run on exactly
those minibatches: the same rows, shapes and weights give the same floats, so the first
minibatch's ratio is exactly 1, and that minibatch's pass (kept with its graph) is the update's
first forward pass too, not computed twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from proximal.checkpoint import CHECKPOINT_NAME, save_checkpoint
from proximal.dist import DistContext
from proximal.errors import ConfigError, TrainingDiverged
from proximal.optim import clip_gradients
from proximal.lm.config import PPOStageConfig
from proximal.lm.labels import COMPARISONS_NAME, read_records, write_records
from proximal.lm.memory import micro_batch_rows, release_freed_memory
from proximal.lm.loading import release_weights, save_pretrained, trainable_parameters
from proximal.lm.model import ScalarHeadLM, response_logits_kept, sample_completions, token_entropy
from proximal.lm.reward import RewardModelScorer, load_reward_model, refit_on_policy_samples
from proximal.lm.rollout import (AdaptiveKLController, KLBudget, LMRollout, Scorer, collect_rollout, micro_batches,
                                 policy_outputs, sequence_kls, shuffled_groups, update_advantages)
from proximal.lm.snapshots import (SNAPSHOT_SEED, SNAPSHOTS_NAME, append_snapshot, keep_snapshots_until,
                                   snapshot_prompts, snapshot_record, take_snapshot)
from proximal.lm.stage import MODEL_DIR, RL_SEED, StageContext, finish
from proximal.losses import (clipped_surrogate, explained_variance, kl_k3, masked_aggregate, masked_mean,
                             ratio_statistics)
from proximal.run import CsvLog, restore_states


def pass_loss(policy: ScalarHeadLM, rollout: LMRollout, part: torch.Tensor, advantages: torch.Tensor, rows: int,
              tokens: int, config: PPOStageConfig, kl_coef: float, outputs: tuple | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One forward pass over the rows `part` of a minibatch of `rows` rows and `tokens` response
    tokens (`outputs`: the rollout's pass over them, with its graph, when it is the first): (its
    share of the minibatch's loss, its share of the minibatch's statistics [5], its largest
    |ratio - 1|). The shares of a minibatch's passes add up to its loss and its token means."""
    mask = rollout.mask[part]
    share = mask.sum() / max(tokens, 1)  # of the minibatch's tokens (1.0 for one pass)
    logprobs, values, logits = outputs or policy_outputs(policy, rollout.completions.select(part), config.temperature)
    if rollout.logprobs_pending:  # the first epoch's own passes give the old log-probs (a ratio of exactly 1)
        rollout.logprobs[part] = logprobs.detach()
    old_logprobs = rollout.logprobs[part]
    token_losses = -clipped_surrogate(logprobs, old_logprobs, advantages[part], config.clip_coef,
                                      config.clip_high)  # [b, R]: Eq. 7 per token, negated
    if config.kl_in == "loss":  # beta * k3 of KL(pi || pi_ref) per token (GRPO as TRL has it)
        token_losses = token_losses + kl_coef * kl_k3(rollout.ref_logprobs[part] - logprobs)
    policy_loss = masked_aggregate(token_losses, mask, config.loss_aggregation, rows, tokens, config.max_new_tokens)
    value_loss = 0.5 * masked_mean((values - rollout.returns[part]).pow(2), mask) * share
    loss = policy_loss + config.vf_coef * value_loss if config.method == "ppo" else policy_loss
    with torch.no_grad():
        statistics = torch.stack([
            policy_loss, value_loss, masked_mean(token_entropy(logits, config.temperature), mask) * share,
            *(statistic * share for statistic in ratio_statistics(logprobs, old_logprobs, config.clip_coef, mask,
                                                                  config.clip_high))])
        ratio_error = float(torch.where(mask, ((logprobs - old_logprobs).exp() - 1).abs(), torch.zeros(())).max())
    return loss, statistics, ratio_error


def ppo_update(policy: ScalarHeadLM, optimizer: torch.optim.Optimizer, rollout: LMRollout,
               first_minibatches: list[torch.Tensor], config: PPOStageConfig, generator: torch.Generator,
               moments: tuple[torch.Tensor, torch.Tensor] | None = None, dist: DistContext = DistContext(),
               micro_rows: int = 0, kl_coef: float = 0.0) -> dict[str, float]:
    """`config.epochs` passes over the rollout; returns this rank's statistics averaged over
    minibatches, plus `first_ratio_error` (max |ratio - 1| on the very first minibatch: 0 when the
    old log-probs are computed as the update computes them). The advantages are whitened by their
    `moments` (mean, variance) over the whole batch, all ranks' rows (computed here when None;
    GRPO's are used as they are). A minibatch runs in forward/backward passes of `micro_rows`
    rows (0: all at once), the first epoch's as `micro_batches` cut them for the rollout, and
    each pass's gradient is its share of the minibatch's (`pass_loss`). `kl_coef` is beta for
    `--ppo.kl-in loss`. On K processes each minibatch is this rank's share of a global one and
    its gradient is averaged over the ranks, weighted by tokens."""
    mask = rollout.mask
    moments = dist.masked_moments(rollout.advantages, mask) if moments is None else moments
    advantages = update_advantages(rollout.advantages, mask, config.method, moments)  # over the whole batch, once
    parameters = trainable_parameters(policy)
    history, first_ratio_error = [], None
    first_outputs, rollout.first_outputs = rollout.first_outputs, None  # its graph is spent by one backward
    for epoch in range(config.epochs):
        minibatches = first_minibatches if epoch == 0 else shuffled_groups(
            len(mask), config.group_size, generator).split(config.minibatch_size // dist.world_size)
        for index in minibatches:
            rows, tokens = len(index), int(mask[index].sum())
            statistics, loss, ratio_errors = torch.zeros(5, device=mask.device), torch.zeros((), device=mask.device), []
            optimizer.zero_grad()
            for part in index.split(micro_rows or rows):
                release_freed_memory()
                part_loss, part_statistics, ratio_error = pass_loss(policy, rollout, part, advantages, rows, tokens,
                                                                    config, kl_coef, first_outputs)
                first_outputs = None
                part_loss.backward()
                loss, statistics = loss + part_loss.detach(), statistics + part_statistics
                ratio_errors.append(ratio_error)
            if not dist.average_gradients(parameters, float(tokens), loss):  # weighted by this rank's tokens
                raise TrainingDiverged("the PPO loss became NaN or infinite")
            clip_gradients(policy.parameters(), config.max_grad_norm, "PPO")
            optimizer.step()
            rollout.logprobs_pending = False
            first_ratio_error = max(ratio_errors) if first_ratio_error is None else first_ratio_error
            history.append(statistics)
    means = torch.stack(history).mean(0).tolist()
    stats = dict(zip(("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"), means))
    stats["first_ratio_error"] = first_ratio_error
    stats["explained_variance"] = explained_variance(rollout.values[mask], rollout.returns[mask])
    return stats


@dataclass
class IterationResult:
    prompts: list[str]  # [B] the prompt of each response
    rollout: LMRollout
    stats: dict[str, float]
    snapshot: tuple | None = None  # (the snapshot rows' rollout, the batch's advantage moments), when asked


def ppo_iteration(policy: ScalarHeadLM, reference: nn.Module, scorer: Scorer, tokenizer,
                  optimizer: torch.optim.Optimizer, prompts: list[str], config: PPOStageConfig, kl_coef: float,
                  generator: torch.Generator, device: str, snapshot_prompts: list[str] | None = None,
                  snapshot_seed: int = 0, dist: DistContext = DistContext()) -> IterationResult:
    """Sample, score, update: one iteration on B = len(`prompts`) responses: one per prompt
    (ppo), or k for each of the first B / k prompts (rloo, grpo). On K processes every rank is given
    the same `prompts` and takes its B / K rows of them (whole RLOO groups), sampled from its own
    `generator`; the statistics returned are the global batch's. With `snapshot_prompts`, their
    rows are rolled out beside the batch (lm/snapshots.py), never trained on."""
    group = config.group_size
    prompts = [prompt for prompt in prompts[:len(prompts) // group] for _ in range(group)]
    prompts = [prompts[i] for i in dist.shard(torch.arange(len(prompts))).tolist()]  # this rank's rows
    completions = sample_completions(policy.lm, tokenizer, prompts, config.max_new_tokens, config.temperature,
                                     generator, device)
    minibatch_rows = config.minibatch_size // dist.world_size
    first_minibatches = shuffled_groups(len(prompts), group, generator).to(device).split(minibatch_rows)
    micro_rows = micro_batch_rows(policy.lm, minibatch_rows, completions.input_ids.shape[1],
                                  response_logits_kept(completions), config.micro_batch_size,
                                  completions.prompt_ids.shape[1], group)
    rollout = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer,
                              micro_batches(first_minibatches, micro_rows), config, kl_coef, share_first_forward=True,
                              policy_pass=not config.old_logprobs_in_update)
    moments = dist.masked_moments(rollout.advantages, rollout.mask)  # of the global batch (GRPO's stay unwhitened)
    snapshot = (take_snapshot(policy, reference, scorer, tokenizer, snapshot_prompts, config, kl_coef, moments,
                              snapshot_seed, device) if snapshot_prompts else None)
    release_weights(reference, scorer)  # the update's passes get their room; loaded again when next asked
    stats = ppo_update(policy, optimizer, rollout, first_minibatches, config, generator, moments, dist,
                       micro_rows=micro_rows, kl_coef=kl_coef)
    optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free until the next update
    k1, k3 = sequence_kls(rollout.logprobs, rollout.ref_logprobs, rollout.mask)
    stats.update(score=float(rollout.scores.mean()), kl_k1=float(k1.mean()), kl_k3=float(k3.mean()),
                 response_length=float(rollout.mask.sum(-1).float().mean()),
                 eos_rate=float(completions.ended.float().mean()))
    first_ratio_error = max(dist.gather_objects(stats.pop("first_ratio_error")))
    stats = dist.mean_of(stats)  # every rank holds B / K rows: the mean of the ranks' means is the batch's
    stats.update(first_ratio_error=first_ratio_error, kl_coef=kl_coef)
    return IterationResult(prompts, rollout, stats, snapshot)


# -- the stage ---------------------------------------------------------------------------------------

BASE_COLUMNS = ("iteration", "responses", "score", "gold", "kl_k1", "kl_k3", "kl_coef", "entropy", "response_length",
                "eos_rate", "policy_loss", "value_loss", "approx_kl", "clip_fraction", "explained_variance",
                "labels", "rm_policy_accuracy", "win_rate")


def metrics_columns(ctx: StageContext) -> tuple[str, ...]:
    """metrics.csv's columns: the gold ones only where there is a gold score, one pair per slice."""
    gold = [f"eval_gold_{name}{mode}" for name in ("", *(f"{s}_" for s in ctx.task.slices(ctx.data.evaluation)))
            for mode in ("greedy", "sampled")] if ctx.has_gold else []
    base = BASE_COLUMNS if ctx.has_gold else tuple(c for c in BASE_COLUMNS if c != "gold")
    return (*base, *gold, "eval_kl_k1", "eval_kl_k3", "eval_seconds", "wall_seconds")


def run_ppo(ctx: StageContext) -> dict[str, Any]:
    """PPO (or RLOO) from the start model against the reward model, or the reward function. On K
    processes every rank draws the same prompts from the shared `generator` and samples its share
    from its own (`sampler`); rank 0 alone labels the relabelling rounds' pairs and writes, every
    rank refits the reward model on them and evaluates its share of the held-out prompts."""
    config, stage_dir, dist = ctx.config.ppo, ctx.stage_dir("ppo"), ctx.dist
    if dist.is_main:
        stage_dir.mkdir(exist_ok=True)
    learned = ctx.reward_function is None or ctx.config.reward.function_role != "reward"
    relabel_every = config.relabel_every if learned and ctx.has_gold else 0  # relabelling needs a labeller
    reward_model = load_reward_model(ctx) if learned else None  # loaded now: a bad file stops the stage here
    scorer = (RewardModelScorer(reward_model, config.cut_response_score,
                                reload=None if relabel_every else lambda: load_reward_model(ctx))
              if learned else ctx.reward_function)
    if not relabel_every:
        reward_model = None  # never refitted: the scorer alone holds it, only while it scores
    policy_lm, reference, tokenizer = ctx.load_policy()
    policy = ScalarHeadLM(policy_lm).to(ctx.device)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=config.learning_rate, weight_decay=0.0)
    reward_optimizer = (torch.optim.AdamW(reward_model.parameters(), lr=ctx.config.reward.learning_rate,
                                          weight_decay=0.0) if relabel_every else None)
    kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    generator = torch.Generator(device=ctx.device).manual_seed(ctx.config.run.seed + RL_SEED)  # prompts: shared
    sampler = dist.rank_generator(generator, ctx.config.run.seed + RL_SEED)  # samples, minibatches: this rank's
    records = read_records(ctx.stage_dir("reward") / COMPARISONS_NAME) if learned else []
    sft_samples = dist.on_main(lambda: ctx.sft_samples(reference, tokenizer)) if relabel_every else None
    checkpoint_path = stage_dir / CHECKPOINT_NAME
    stateful = {"policy": policy, "optimizer": optimizer, "generator": generator}
    if relabel_every:
        stateful.update(reward_model=reward_model, reward_optimizer=reward_optimizer)
    state = restore_states(checkpoint_path, **stateful)
    start, elapsed, eval_seconds = ((0, 0.0, 0.0) if state is None else
                                    (int(state["iteration"]), float(state["wall_seconds"]),
                                     float(state.get("eval_seconds", 0.0))))
    kl_budget = KLBudget(config.kl_budget, config.kl_budget_window,
                         () if state is None else tuple(state.get("recent_kls", ())))
    if state is not None:
        kl_controller.value = float(state["kl_coef"])
        restore_rank_generator(state, sampler, dist, checkpoint_path)
    policy_records_path = stage_dir / COMPARISONS_NAME
    if relabel_every:
        policy_records = ([record for record in read_records(policy_records_path) if record["iteration"] <= start]
                          if start and policy_records_path.exists() else [])
        if dist.is_main:
            write_records(policy_records_path, policy_records)  # drops answers a killed run gave after its checkpoint
        records.extend(policy_records)
    fixed = snapshot_prompts(ctx.data.rl, config.snapshot_prompts, config.group_size)
    log = None
    if dist.is_main:
        keep_snapshots_until(stage_dir / SNAPSHOTS_NAME, start)
        log = CsvLog(stage_dir / "metrics.csv", metrics_columns(ctx), "iteration", start if start else None)
    started = time.perf_counter() - elapsed
    prompts, evaluation = ctx.data.rl, None
    with ctx.progress("ppo", config.iterations, start) as progress:
        for iteration in range(start + 1, config.iterations + 1):
            index = torch.randint(len(prompts), (config.prompts_per_iteration,), generator=generator,
                                  device=generator.device).tolist()
            batch_prompts = [prompts[i] for i in index]
            policy.train()
            snapshot_now = dist.is_main and config.snapshot_every and (
                iteration == 1 or iteration % config.snapshot_every == 0)
            try:
                result = ppo_iteration(policy, reference, scorer, tokenizer, optimizer, batch_prompts, config,
                                       kl_controller.value, sampler, ctx.device, fixed if snapshot_now else None,
                                       ctx.config.run.seed + SNAPSHOT_SEED + iteration, dist)
            except TrainingDiverged as error:
                kept = (f"last good checkpoint kept: {checkpoint_path}" if checkpoint_path.exists()
                        else "no checkpoint had been written yet")
                raise TrainingDiverged(f"{error} at iteration {iteration}; {kept}") from None
            stats, batch_prompts = result.stats, result.prompts  # this rank's rows
            if config.adaptive_kl:
                kl_controller.update(stats["kl_k1"], config.prompts_per_iteration)
            completions = result.rollout.completions
            texts, ended = completions.texts(tokenizer), completions.ended
            if ctx.has_gold:
                stats.update(dist.mean_of({"gold": float(ctx.gold(batch_prompts, texts, ended).mean())}))
            stats.update(iteration=iteration, responses=iteration * config.prompts_per_iteration)
            if relabel_every and iteration % relabel_every == 0:
                pairs = min(config.relabel_pairs, config.prompts_per_iteration)
                rows = [row for part in dist.gather_objects(list(zip(batch_prompts, texts, ended.tolist())))
                        for row in part][:pairs]  # the global batch's first rows, in rank order
                stats.update(refit_on_policy_samples(
                    ctx, iteration, *(list(column) for column in zip(*rows)), reference, tokenizer, reward_model,
                    reward_optimizer, records, sft_samples, generator, sampler))
            budget_spent = kl_budget.spent(stats["kl_k1"])  # the same on every rank: a global batch mean
            last = budget_spent or iteration == config.iterations
            if iteration % config.eval_every == 0 or last:
                policy.eval()
                evaluation_started = time.perf_counter()
                evaluation = ctx.evaluate(policy.lm, tokenizer, reference)
                eval_seconds += time.perf_counter() - evaluation_started
                stats.update({f"eval_{key}": value for key, value in evaluation.items()})
            if result.snapshot is not None:
                append_snapshot(stage_dir / SNAPSHOTS_NAME, snapshot_record(
                    iteration, fixed, *result.snapshot, policy, tokenizer, config, stats["kl_coef"], stats,
                    ctx.gold if ctx.has_gold else None))
            stats.update(eval_seconds=eval_seconds, wall_seconds=time.perf_counter() - started)  # evaluations included
            if log is not None:
                log.log(stats)
            progress.set_postfix(score=f"{stats['score']:.2f}", kl=f"{stats['kl_k1']:.2f}", refresh=False)
            progress.update()
            if iteration % config.eval_every == 0 and not last:
                rank_generators = dist.gather_objects(sampler.get_state()) if dist.distributed else None
                if dist.is_main:
                    save_checkpoint(checkpoint_path, {
                        **{name: obj.state_dict() for name, obj in stateful.items() if name != "generator"},
                        "generator": generator.get_state(), "rank_generators": rank_generators,
                        "kl_coef": kl_controller.value, "recent_kls": list(kl_budget.recent),
                        "iteration": iteration, "eval_seconds": eval_seconds,
                        "wall_seconds": time.perf_counter() - started})
            if budget_spent:
                break
    seconds = time.perf_counter() - started
    policy.eval()

    def finished() -> dict[str, Any]:  # rank 0
        log.close()
        save_pretrained(policy.lm, tokenizer, stage_dir / MODEL_DIR)
        summary = {"seconds": seconds, "eval_seconds": eval_seconds, "iterations": iteration,
                   "kl_budget_spent": budget_spent, "final_kl_coef": kl_controller.value, "labels": len(records),
                   "eval": evaluation, "last_iteration": stats}  # the last iteration's evaluation is the final one
        from proximal.lm.plots import plot_ppo, write_samples

        plot_ppo(stage_dir)
        write_samples(stage_dir / "samples.md", ctx, reference, policy.lm, tokenizer)
        finish(stage_dir, summary)
        checkpoint_path.unlink(missing_ok=True)
        return summary

    return dist.on_main(finished)


def restore_rank_generator(state: dict[str, Any], sampler: torch.Generator, dist: DistContext, path) -> None:
    """Each rank's own random stream, from a checkpoint of K processes (one process: it is the
    shared generator, already restored)."""
    saved = state.get("rank_generators")
    written_by = 1 if saved is None else len(saved)
    if written_by != dist.world_size:
        raise ConfigError(f"{path} was written by {written_by} process(es); resume it with "
                          f"torchrun --nproc-per-node {written_by} (or as one process when 1)")
    if dist.distributed:
        sampler.set_state(saved[dist.rank])

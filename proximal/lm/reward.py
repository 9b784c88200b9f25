"""The reward model: the start (SFT) network (or its bottom --reward.blocks blocks) with a scalar
head, read at the response's last token (its EOS) or averaged over its tokens (--reward.pooling),
fitted to the labelled pairs with the Bradley-Terry loss (`proximal.losses`).

  P[response 1 > response 2] = sigmoid(r(prompt, response 1) - r(prompt, response 2))

After fitting, the head is shifted and scaled so that the scores of SFT samples have mean 0 and
standard deviation 1: the KL coefficient then means the same thing on every seed, and a fixed
score for a response that never ends sits at a known distance below the SFT average.

The stage (`run_reward`): the pairs (the user's --data.preferences, or pairs of SFT samples the
labeller answers) -> `fit_on_pairs` -> standardise -> RUN_DIR/reward/model + head.pt. During PPO,
`refit_on_policy_samples` labels the policy's own samples and refits.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from proximal.checkpoint import load_checkpoint, save_checkpoint
from proximal.dist import DistContext
from proximal.errors import CheckpointError, ConfigError, ProximalError
from proximal.labellers import make_labeller
from proximal.lm.labels import (COMPARISONS_NAME, PairBatch, append_records, ask_person, label_records,
                                pairs_from_records, read_records, teaches_something, write_records)
from proximal.lm.loading import bottom_blocks, load_pretrained, save_pretrained, trainable_parameters
from proximal.lm.memory import inference_rows
from proximal.lm.model import Completions, ScalarHeadLM, sample_completions, sample_texts
from proximal.lm.reward_function import with_missing_eos
from proximal.lm.stage import MODEL_DIR, PREFERENCE_PROMPT_SEED, StageContext, finish
from proximal.losses import bradley_terry_loss, masked_mean
from proximal.run import CsvLog

HEAD_NAME = "head.pt"
COLUMNS = ("step", "epoch", "train_loss", "val_loss", "val_accuracy", "val_gold_accuracy", "wall_seconds")


def reward_scores(model: ScalarHeadLM, completions: Completions) -> torch.Tensor:
    """The score [B] of each response: the head's output at its last token (its EOS), or with
    `model.pooling` "mean" its mean over the response's tokens (the head of their mean hidden
    state: the head is linear)."""
    _, scalars = model(completions, logits_to_keep=1)  # [B, P + R]
    prompt_length = completions.prompt_ids.shape[1]
    if model.pooling == "mean":
        return masked_mean(scalars[:, prompt_length:], completions.response_mask, dim=1)
    last = prompt_length + completions.last_index  # [B]
    return scalars.gather(1, last[:, None]).squeeze(1)


def scores_or_missing_eos(model: ScalarHeadLM, completions: Completions, missing_eos_score: float | None
                          ) -> torch.Tensor:
    """`reward_scores` [B], with `missing_eos_score` for a response cut at the length limit."""
    return with_missing_eos(reward_scores(model, completions), completions.ended, missing_eos_score)


class RewardModelScorer:
    """PPO's score [B] from a reward model (what `RewardFunction.scores` is for a function). Given
    `reload` (a function that loads it) instead of a model, it holds the model only while it is
    used, as lm/loading.py's ReloadedReference holds the reference: loaded when first asked for
    scores, dropped by `release` before an update, whose passes get its room. Only for a reward
    model the RL stage never refits (every load reads the same files)."""

    def __init__(self, model: ScalarHeadLM | None, missing_eos_score: float | None,
                 reload: Callable[[], ScalarHeadLM] | None = None):
        self.model, self.missing_eos_score, self.reload = model, missing_eos_score, reload

    def scores(self, prompts: list[str], completions: Completions, tokenizer) -> torch.Tensor:
        if self.model is None:
            self.model = self.reload()
        return scores_or_missing_eos(self.model, completions, self.missing_eos_score)

    def release(self) -> None:
        if self.reload is not None:
            self.model = None


def pair_scores(model: ScalarHeadLM, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores [M] of each pair's first and second response, from one pass over both sides
    (`PairBatch.sides`: each pair's prompt read once)."""
    scores = reward_scores(model, pairs.sides()).view(-1, 2)  # [M, 2]
    return scores[:, 0], scores[:, 1]


@torch.no_grad()
def pair_accuracy(model: ScalarHeadLM, pairs: PairBatch) -> dict[str, float]:
    """On strict pairs: agreement with the labeller's answer, and with the gold ordering. Scored
    in passes of `inference_rows` pairs: one pass over all 210 validation pairs of the sentiment
    preset took 19.4 s here, passes of 8-16 rows 14.7 s (the same scores)."""
    rows = max(1, inference_rows(model.lm, 2 * pairs.size, pairs.first.input_ids.shape[1], kept=1) // 2)  # pairs
    parts = [pair_scores(model, pairs.select(part))
             for part in torch.arange(pairs.size, device=pairs.labels.device).split(rows)]
    return pair_agreement(torch.cat([first for first, _ in parts]), torch.cat([second for _, second in parts]), pairs)


def pair_agreement(score_1: torch.Tensor, score_2: torch.Tensor, pairs: PairBatch) -> dict[str, float]:
    """Accuracy of scores [M] of both sides against the labels and the gold (strict pairs only),
    and the Bradley-Terry loss."""
    prefers_first = score_1 > score_2
    strict = pairs.labels != 0.5
    gold_strict = (pairs.gold[:, 0] != pairs.gold[:, 1]) & torch.isfinite(pairs.gold).all(-1)  # NaN: no gold
    return {
        "accuracy": float((prefers_first == (pairs.labels == 1.0))[strict].float().mean()) if strict.any() else math.nan,
        "gold_accuracy": (float((prefers_first == (pairs.gold[:, 0] > pairs.gold[:, 1]))[gold_strict].float().mean())
                          if gold_strict.any() else math.nan),
        "loss": float(bradley_terry_loss(score_1, score_2, pairs.labels, 0.0)),
    }


def reward_loss(model: ScalarHeadLM, pairs: PairBatch) -> torch.Tensor:
    """Bradley-Terry cross-entropy (Christiano et al. 2017, Eq. 1, no uniform-answer term)."""
    return bradley_terry_loss(*pair_scores(model, pairs), pairs.labels, 0.0)


@torch.no_grad()
def standardise_scores(model: ScalarHeadLM, sft_samples: Completions, batch_size: int) -> tuple[float, float]:
    """Shift and scale the head so the scores of `sft_samples` have mean 0, std 1; returns the
    (mean, std) removed."""
    scores = torch.cat([reward_scores(model, sft_samples.select(index))
                        for index in torch.arange(len(sft_samples.ended), device=sft_samples.ended.device).split(batch_size)])
    mean, std = float(scores.mean()), float(scores.std().clamp_min(1e-6))
    model.head.weight /= std
    model.head.bias.sub_(mean).div_(std)
    return mean, std


def fit_reward_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pairs: PairBatch, steps: int,
                     batch_size: int, generator: torch.Generator, on_step=None, loss_of=None,
                     dist: DistContext = DistContext()) -> None:
    """`steps` AdamW steps on minibatches of `pairs`, passing over them in shuffled order
    (a new shuffle each pass); `on_step(step, loss)` after each. `loss_of(index)` is the mean
    loss of the pairs at `index` [b]: `reward_loss` by default; DPO fits the policy as its own
    reward model by passing its loss here. On K processes every rank draws the same order and
    fits its share of each minibatch, the gradients averaged weighted by pairs."""
    if loss_of is None:
        loss_of = lambda index: reward_loss(model, pairs.select(index))  # noqa: E731
    parameters = trainable_parameters(model)
    model.train()
    order = torch.zeros(0, dtype=torch.long)
    for step in range(1, steps + 1):
        if len(order) == 0:
            order = torch.randperm(pairs.size, generator=generator, device=generator.device)
        index, order = order[:batch_size], order[batch_size:]
        local = dist.shard(index)  # empty on some ranks when a pass's last minibatch has fewer than K pairs
        optimizer.zero_grad()
        loss = loss_of(local) if len(local) else torch.zeros(())
        if len(local):
            loss.backward()
        dist.average_gradients(parameters, len(local), loss)  # a NaN reaches every rank: require_finite says so
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(step, dist.weighted_mean(loss, len(local)))
    model.eval()


def require_finite(model: torch.nn.Module, what: str) -> None:
    """A fit whose loss turned NaN leaves NaN weights: refused in one line, the stage unfinished."""
    if not all(bool(torch.isfinite(parameter).all()) for parameter in trainable_parameters(model)):
        raise ProximalError(f"{what}'s weights turned NaN or infinite during the fit (a learning rate too high, "
                            "or a NaN in the data); the stage is not marked finished")


# -- the stage ---------------------------------------------------------------------------------------

def labelled_pairs(ctx: StageContext, records: list[dict], tokenizer) -> tuple[PairBatch, PairBatch]:
    """(training pairs, validation pairs) of the records that teach something."""
    pairs = pairs_from_records([record for record in records if teaches_something(record)], tokenizer, ctx.device)
    train_pairs = pairs.select(torch.nonzero(~pairs.is_validation).squeeze(-1))
    if train_pairs.size == 0:
        raise ConfigError("no labelled pair is left to train on; raise --reward.labels")
    return train_pairs, pairs.select(torch.nonzero(pairs.is_validation).squeeze(-1))


def fit_on_pairs(ctx: StageContext, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_pairs: PairBatch, epochs: int, batch_size: int, validate, loss_of=None, validations: int = 20,
                 keep_best: bool = False) -> dict[str, float] | None:
    """`epochs` passes of `fit_reward_model` (its loss, or `loss_of`) with the training loss
    logged to the stage's metrics.csv and `validate()` (None: no held-out pairs) `validations`
    times, the last at the end; returns the last validation, or with `keep_best` puts the model
    back as it was at its most accurate validation (the later on a tie) and returns that one, its
    `step` and the fit's `steps` included (rank 0 validates and logs, on every rank's behalf; every
    rank keeps its own copy of the weights that train, frozen ones being the same at every check).
    Minutes of work: a killed fit is redone from the start."""
    dist = ctx.dist
    generator = torch.Generator(device=ctx.device).manual_seed(ctx.config.run.seed + PREFERENCE_PROMPT_SEED)
    steps_per_epoch = -(-train_pairs.size // batch_size)
    total = epochs * steps_per_epoch
    log = CsvLog(ctx.stage_dir(stage) / "metrics.csv", COLUMNS, "step", None) if dist.is_main else None
    started = time.perf_counter()
    validation: dict[str, float] | None = None  # the latest held-out check; the last one is the fit's
    best: tuple[dict[str, float], list[torch.Tensor]] | None = None  # keep_best: (its check, trained weights)
    trained = trainable_parameters(model)

    def validated() -> dict[str, float]:
        model.eval()
        result = validate()
        model.train()
        return result

    def on_step(step: int, loss: float) -> None:
        nonlocal validation, best
        row = {"step": step, "epoch": step / steps_per_epoch, "train_loss": loss,
               "wall_seconds": time.perf_counter() - started}
        if validate is not None and (step % max(1, total // validations) == 0 or step == total):
            validation = {**dist.on_main(validated), "step": step}
            if keep_best and (best is None or not validation["accuracy"] < best[0]["accuracy"]):
                best = validation, [parameter.detach().clone() for parameter in trained]
            row.update(val_loss=validation["loss"], val_accuracy=validation["accuracy"],
                       val_gold_accuracy=validation["gold_accuracy"])
        if log is not None:
            log.log(row)
        progress.update()

    with ctx.progress(stage, total) as progress:
        fit_reward_model(model, optimizer, train_pairs, total, batch_size, generator, on_step, loss_of, dist)
    if log is not None:
        log.close()
    if best is not None:
        validation = best[0]
        with torch.no_grad():
            for parameter, weights in zip(trained, best[1]):
                parameter.copy_(weights)
    return None if validation is None else {**validation, "steps": total}


def sampled_sides(ctx: StageContext, model, tokenizer) -> tuple[list[str], list[bool], list[str], list[bool]]:
    """Two start-model samples for each preference prompt, (first, its ended, second, its ended):
    of `samples_per_prompt` samples, the first and the first one that differs from it (two
    identical responses would teach the reward model nothing). On K processes each rank samples
    its share of the prompts from its own stream, and every rank gets all of them, in order."""
    config, seed, dist = ctx.config.reward, ctx.config.run.seed, ctx.dist
    prompts = [ctx.data.preference_prompts[i] for i in dist.shard(torch.arange(len(ctx.data.preference_prompts)))]
    shared = torch.Generator(device=ctx.device).manual_seed(seed + PREFERENCE_PROMPT_SEED)
    generator = dist.rank_generator(shared, seed + PREFERENCE_PROMPT_SEED)
    k = config.samples_per_prompt
    asked = [prompt for prompt in prompts for _ in range(k)]  # a prompt's k samples side by side: one prefill
    with ctx.progress("reward: sampling pairs", len(asked), unit="sample") as bar:
        texts, ended = sample_texts(model, tokenizer, asked, ctx.config.ppo.max_new_tokens, config.sample_temperature,
                                    generator, ctx.device, bar)
    rows = []
    for query in range(len(prompts)):
        candidates = list(zip(texts[query * k:(query + 1) * k], ended[query * k:(query + 1) * k]))
        second = next((c for c in candidates[1:] if c != candidates[0]), candidates[1 % len(candidates)])
        rows.append((*candidates[0], *second))
    rows = [row for part in dist.gather_objects(rows) for row in part]  # rank order is prompt order
    first, ended_1, second, ended_2 = (list(column) for column in zip(*rows))
    return first, ended_1, second, ended_2


def labelled_sides(ctx: StageContext, first: list[str], ended_1: list[bool], second: list[str], ended_2: list[bool]
                   ) -> list[dict]:
    """The pairs of `sampled_sides`, answered by the synthetic labeller (or a person)."""
    config, seed, prompts = ctx.config.reward, ctx.config.run.seed, ctx.data.preference_prompts
    person = config.labeller == "human"
    records = label_records(prompts, first, second, ended_1, ended_2, ctx.judge(prompts, first, ended_1),
                            ctx.judge(prompts, second, ended_2),
                            None if person else make_labeller(config, np.random.default_rng(seed)),
                            config.validation_fraction, np.random.default_rng(seed + PREFERENCE_PROMPT_SEED))
    if person:
        from tqdm import tqdm

        records = ask_person(records, ctx.stage_dir("reward"), config.host, config.port,
                             f"{ctx.task.name}: {ctx.task.instructions}", seed, announce=tqdm.write)
    return records


def comparison_records(ctx: StageContext, model, tokenizer) -> list[dict]:
    """The reward stage's labelled pairs, on every rank, written to reward/comparisons.jsonl once
    (read back when there): the user's own (--data.preferences), or sampled here (every rank its
    share) and labelled (rank 0 alone)."""
    path, dist = ctx.stage_dir("reward") / COMPARISONS_NAME, ctx.dist
    sample = ctx.data.preferences is None and not dist.broadcast_object(path.exists())
    sides = sampled_sides(ctx, model, tokenizer) if sample else None

    def labelled() -> list[dict]:  # rank 0
        path.parent.mkdir(exist_ok=True)
        if path.exists():
            return read_records(path)
        if sides is not None:
            records = labelled_sides(ctx, *sides)
        else:
            records = [dict(record) for record in ctx.data.preferences]
            if ctx.has_gold:  # a reward function given beside the pairs: how far it agrees with them
                prompts, ended = [record["prompt"] for record in records], [True] * len(records)
                golds = [ctx.gold(prompts, [record["responses"][side] for record in records], ended) for side in (0, 1)]
                for record, first, second in zip(records, *golds):
                    record["true_returns"] = [float(first), float(second)]
        write_records(path, records)
        return records

    return dist.on_main(labelled)


def run_reward(ctx: StageContext) -> dict[str, Any]:
    """The pairs (each rank samples its share, rank 0 labels them), the fit (each rank its share of
    each minibatch), the scores standardised and everything written (rank 0)."""
    config, dist = ctx.config.reward, ctx.dist
    lm, tokenizer = ctx.load_start_model()
    started = time.perf_counter()
    records = comparison_records(ctx, lm, tokenizer)
    sft_samples = dist.on_main(lambda: ctx.sft_samples(lm, tokenizer))  # before the fit: the model shares lm's weights
    train_pairs, val_pairs = labelled_pairs(ctx, records, tokenizer)
    model = ScalarHeadLM(ctx.trainable(bottom_blocks(lm, config.blocks)), pooling=config.pooling).to(ctx.device)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=config.learning_rate, weight_decay=0.0)
    validation = fit_on_pairs(ctx, "reward", model, optimizer, train_pairs, config.epochs, config.batch_size,
                              (lambda: pair_accuracy(model, val_pairs)) if val_pairs.size else None,
                              validations=config.validations, keep_best=config.keep_best)
    require_finite(model, "the reward model")
    return dist.on_main(lambda: _finish_reward(ctx, model, tokenizer, records, sft_samples, train_pairs, val_pairs,
                                               validation, started))


def _finish_reward(ctx: StageContext, model: ScalarHeadLM, tokenizer, records: list[dict], sft_samples: Completions,
                   train_pairs: PairBatch, val_pairs: PairBatch, validation: dict[str, float] | None, started: float
                   ) -> dict[str, Any]:
    """Rank 0: the head standardised on the start model's samples, the model written, the stage
    marked finished."""
    stage_dir = ctx.stage_dir("reward")
    mean, std = standardise_scores(model, sft_samples, 256)
    save_pretrained(model.lm, tokenizer, stage_dir / MODEL_DIR)
    save_checkpoint(stage_dir / HEAD_NAME, {"head": model.head.state_dict(), "pooling": model.pooling})
    labels = torch.tensor([r["label"] if r["label"] is not None else float("nan") for r in records])
    summary = {
        "seconds": time.perf_counter() - started, "labels": len(records),
        "strict_labels": int(((labels == 0) | (labels == 1)).sum()), "equal_labels": int((labels == 0.5).sum()),
        "train_pairs": train_pairs.size, "validation_pairs": val_pairs.size,
        "validation": validation,  # before standardising, which keeps the ranking (accuracy)
        "score_shift": {"mean": mean, "std": std},
    }
    from proximal.lm.plots import plot_reward

    plot_reward(stage_dir)
    return finish(stage_dir, summary)


def load_reward_model(ctx: StageContext) -> ScalarHeadLM:
    stage_dir = ctx.stage_dir("reward")
    lm, _ = load_pretrained(stage_dir / MODEL_DIR, ctx.device)
    try:
        saved = load_checkpoint(stage_dir / HEAD_NAME)
        model = ScalarHeadLM(lm, pooling=saved.get("pooling", "last")).to(ctx.device)
        model.head.load_state_dict(saved["head"])
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(f"{stage_dir / HEAD_NAME} holds no reward head ({error})") from None
    return model.eval()


def refit_on_policy_samples(ctx: StageContext, iteration: int, prompts: list[str], policy_texts: list[str],
                            policy_ended: list[bool], reference, tokenizer, reward_model: ScalarHeadLM,
                            reward_optimizer, records: list[dict], sft_samples: Completions,
                            generator: torch.Generator, sampler: torch.Generator) -> dict[str, float]:
    """One round of labels on the policy's own samples: each compared with an SFT sample for
    the same prompt. The reward model's accuracy on these fresh answers is measured before it
    sees them (a held-out check on the distribution it is now scoring), then it is refitted
    on every label so far and its scores re-standardised on the SFT samples; the new records
    are appended to ppo/comparisons.jsonl. Every rank calls it: rank 0 samples (from `sampler`)
    and labels, every rank fits its share (the order from the shared `generator`), so the
    ranks' reward models stay identical."""
    config = ctx.config

    def labelled() -> tuple[list[dict], dict[str, float]]:  # rank 0
        sft = sample_completions(reference, tokenizer, prompts, config.ppo.max_new_tokens,
                                 config.reward.sample_temperature, sampler, ctx.device)
        sft_texts, sft_ended = sft.texts(tokenizer), sft.ended.tolist()
        new = label_records(prompts, policy_texts, sft_texts, policy_ended, sft_ended,
                            ctx.judge(prompts, policy_texts, policy_ended), ctx.judge(prompts, sft_texts, sft_ended),
                            make_labeller(config.reward, np.random.default_rng(config.run.seed + 1000 * iteration)),
                            0.0, np.random.default_rng(0))
        for offset, record in enumerate(new):
            record.update(query=len(records) + offset, iteration=iteration, responses_from=["policy", "sft"])
        check = pair_accuracy(reward_model, pairs_from_records(new, tokenizer, ctx.device))
        append_records(ctx.stage_dir("ppo") / COMPARISONS_NAME, new)
        return new, check

    new, check = ctx.dist.on_main(labelled)
    records.extend(new)
    training = [record for record in records if not record["validation"] and teaches_something(record)]
    fit_reward_model(reward_model, reward_optimizer, pairs_from_records(training, tokenizer, ctx.device),
                     config.ppo.refit_steps, config.reward.batch_size, generator, dist=ctx.dist)
    standardise_scores(reward_model, sft_samples, 256)
    answered = [record["label"] for record in new if record["label"] is not None]
    return {"rm_policy_accuracy": check["accuracy"], "labels": len(records),
            "win_rate": sum(answered) / len(answered) if answered else None}  # ties count half

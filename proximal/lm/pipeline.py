"""`proximal rlhf`: SFT -> reward model -> PPO, one folder per stage inside one run directory.

  RUN_DIR/config.json          the RLHFConfig (a resumed run must match it)
  RUN_DIR/sft/                 model/ (HF format), metrics.csv, sft.png, summary.json
  RUN_DIR/reward/              comparisons.jsonl, model/ + head.pt, metrics.csv, reward.png, summary.json
  RUN_DIR/ppo/                 model/, metrics.csv, ppo.png, samples.md, summary.json
  RUN_DIR/dpo/                 (only with --stage dpo) model/, metrics.csv, dpo.png, summary.json
A stage is finished when its summary.json exists; while it runs, checkpoint.pt (atomic) holds
where it is, so `proximal rlhf --run-dir RUN_DIR` continues a killed stage from there and skips
finished ones. Each stage reads only the previous stage's folder, so it also runs alone
(`--stage reward`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from proximal.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from proximal.errors import CheckpointError, ConfigError
from proximal.lm.config import RLHFConfig, prompt_budget
from proximal.lm.dpo import dpo_loss, implicit_accuracy, reference_pair_logprobs
from proximal.lm.evaluation import evaluate_policy, gold_scores
from proximal.lm.labels import (COMPARISONS_NAME, PairBatch, append_records, ask_person, label_records, make_labeller,
                                pairs_from_records, read_records, teaches_something, write_records)
from proximal.lm.model import (ScalarHeadLM, build_char_tokenizer, build_tiny_gpt2, context_length, encode_prompts,
                               load_pretrained, sample_completions, save_pretrained)
from proximal.lm.ppo import ppo_iteration
from proximal.lm.reward import fit_reward_model, pair_accuracy, standardise_scores
from proximal.lm.rollout import AdaptiveKLController
from proximal.lm.sft import encode_demonstrations, sft_loss
from proximal.lm.tasks import PromptSplits, make_task
from proximal.run import CsvLog, restore_states, unique_run_dir, write_json_atomic

STAGES = ("sft", "reward", "ppo")  # `proximal rlhf` runs these; dpo only when asked (--stage dpo)
PREVIOUS_STAGE = {"reward": "sft", "ppo": "reward", "dpo": "reward"}
SUMMARY_NAME = "summary.json"
MODEL_DIR = "model"
HEAD_NAME = "head.pt"
SFT_COLUMNS = ("step", "loss", "learning_rate", "wall_seconds")
REWARD_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "val_accuracy", "val_gold_accuracy", "wall_seconds")
PPO_COLUMNS = ("iteration", "responses", "score", "gold", "kl_k1", "kl_k3", "kl_coef", "entropy", "response_length",
               "eos_rate", "policy_loss", "value_loss", "approx_kl", "clip_fraction", "explained_variance",
               "labels", "rm_policy_accuracy", "win_rate", "eval_gold_greedy", "eval_gold_sampled",
               "eval_gold_hard_greedy", "eval_gold_hard_sampled", "eval_kl_k1", "eval_kl_k3", "wall_seconds")
PREFERENCE_PROMPT_SEED, RL_SEED, EVAL_SEED = 1, 2, 3  # offsets from the run's seed, one per random stream


def new_run_dir(config: RLHFConfig) -> Path:
    return unique_run_dir(config.run.runs_dir, f"rlhf-{config.task.name}__{config.run.seed}")


def is_finished(stage_dir: Path) -> bool:
    return (stage_dir / SUMMARY_NAME).is_file()


def read_summary(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / SUMMARY_NAME).read_text())


class Pipeline:
    """The data every stage shares (task, prompt splits, tokenizer), and the stages."""

    def __init__(self, config: RLHFConfig, run_dir: Path | None, show_progress: bool):
        self.config, self.show_progress = config, show_progress
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.device = config.run.device
        self.task = make_task(config.task.name, config.task.carry_noise)
        self.splits: PromptSplits = self.task.splits(
            config.run.seed, config.task.demonstrations, config.reward.labels, prompt_budget(config),
            config.task.eval_prompts)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def _progress(self, stage: str, total: int, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, desc=stage, unit="step", disable=not self.show_progress,
                    dynamic_ncols=True, leave=False)

    def _evaluate(self, model: torch.nn.Module, tokenizer, reference: torch.nn.Module | None = None
                  ) -> dict[str, float]:
        return evaluate_policy(model, tokenizer, self.task, self.splits.evaluation, self.config.ppo.max_new_tokens,
                               self.config.ppo.temperature, self.config.run.seed + EVAL_SEED, self.device, reference)

    def check(self, stages: tuple[str, ...]) -> RLHFConfig:
        """Everything about the input that can be wrong, checked before any file is written: the
        model directory, prompt + response length against the context, the previous stage's
        output, the checkpoints a resumed stage would read, and an existing run's config.
        Returns the config to record in the run's config.json."""
        if self.config.model.path:
            model, tokenizer = load_pretrained(self.config.model.path)
            limit = context_length(model)
        else:
            tokenizer, limit = build_char_tokenizer(), self.config.model.context
        longest = int(encode_prompts(tokenizer, self.splits.evaluation + self.splits.sft[:1000], "cpu")[1].sum(-1).max())
        if limit is not None and longest + self.config.ppo.max_new_tokens > limit:
            raise ConfigError(f"a prompt of {longest} tokens plus --ppo.max-new-tokens "
                              f"{self.config.ppo.max_new_tokens} exceeds the model's context of {limit} tokens")
        if stages[0] != "sft":
            previous = PREVIOUS_STAGE[stages[0]]
            if self.run_dir is None or not is_finished(self.stage_dir(previous)):
                raise ConfigError(f"stage {stages[0]} needs a finished {previous} stage: pass --run-dir of a run "
                                  f"whose {previous} stage finished, or run --stage {previous} first")
        if self.run_dir is None:
            return self.config
        for stage in stages:
            if (self.stage_dir(stage) / CHECKPOINT_NAME).exists() and not is_finished(self.stage_dir(stage)):
                load_checkpoint(self.stage_dir(stage) / CHECKPOINT_NAME)  # a corrupt one fails here
        config_path = self.run_dir / "config.json"
        if config_path.exists():
            try:
                saved = RLHFConfig.from_dict(json.loads(config_path.read_text()))
            except (json.JSONDecodeError, TypeError) as error:
                raise CheckpointError(f"{config_path} is not a readable RLHF config ({error})") from None
            # The dpo section is read by the dpo stage alone: it has to match only once that stage has
            # begun, so DPO can be tried on a finished run's pairs with settings of its own.
            dpo_begun = "dpo" in stages and self.stage_dir("dpo").exists()
            if (saved if dpo_begun else dataclasses.replace(saved, dpo=self.config.dpo)) != self.config:
                raise ConfigError(f"{self.run_dir} was run with another config; continue it with the same flags, "
                                  "or start a new run directory")
            if "dpo" not in stages:
                return dataclasses.replace(self.config, dpo=saved.dpo)  # the record of a dpo stage stays true
        return self.config

    # -- stage 1 -------------------------------------------------------------------------------------

    def initial_model(self):
        """The model SFT starts from: the user's local HF directory, or a fresh tiny GPT-2."""
        model_config = self.config.model
        if model_config.path:
            model, tokenizer = load_pretrained(model_config.path, self.device)
        else:
            tokenizer = build_char_tokenizer()
            torch.manual_seed(self.config.run.seed)
            model = build_tiny_gpt2(tokenizer, model_config.width, model_config.layers, model_config.heads,
                                    model_config.context).to(self.device)
        return model, tokenizer

    def run_sft(self) -> dict[str, Any]:
        config, stage_dir = self.config.sft, self.stage_dir("sft")
        stage_dir.mkdir(exist_ok=True)
        model, tokenizer = self.initial_model()
        rng = np.random.default_rng(self.config.run.seed)
        demonstrations = [self.task.demonstration(prompt, rng) for prompt in self.splits.sft]
        data = encode_demonstrations(tokenizer, self.splits.sft, demonstrations, self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98),
                                      weight_decay=config.weight_decay)
        warmup = min(100, config.steps // 10 + 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - step / config.steps))
        generator = torch.Generator(device=self.device).manual_seed(self.config.run.seed)
        checkpoint_path = stage_dir / CHECKPOINT_NAME
        state = restore_states(checkpoint_path, model=model, optimizer=optimizer, schedule=schedule,
                               generator=generator)
        start, elapsed = (0, 0.0) if state is None else (int(state["step"]), float(state["wall_seconds"]))
        log = CsvLog(stage_dir / "metrics.csv", SFT_COLUMNS, "step", start if start else None)
        model.train()
        started = time.perf_counter() - elapsed
        with self._progress("sft", config.steps, start) as progress:
            for step in range(start, config.steps):
                index = torch.randint(len(demonstrations), (config.batch_size,), generator=generator,
                                      device=generator.device)
                loss = sft_loss(model, *(tensor[index] for tensor in data))
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                progress.update()
                if (step + 1) % 10 == 0 or step + 1 == config.steps:
                    log.log({"step": step + 1, "loss": loss.item(), "learning_rate": schedule.get_last_lr()[0],
                             "wall_seconds": time.perf_counter() - started})
                    progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if (step + 1) % 200 == 0 and step + 1 < config.steps:
                    save_checkpoint(checkpoint_path, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "generator": generator.get_state(), "step": step + 1,
                        "wall_seconds": time.perf_counter() - started})
        log.close()
        seconds = time.perf_counter() - started
        model.eval()
        save_pretrained(model, tokenizer, stage_dir / MODEL_DIR)
        summary = {"seconds": seconds, "steps": config.steps, "demonstrations": len(demonstrations),
                   "eval": self._evaluate(model, tokenizer)}
        from proximal.lm.plots import plot_sft

        plot_sft(stage_dir)
        write_json_atomic(stage_dir / SUMMARY_NAME, summary)
        checkpoint_path.unlink(missing_ok=True)
        return summary

    # -- stage 2 -------------------------------------------------------------------------------------

    def _comparisons(self, model, tokenizer, stage_dir: Path) -> list[dict]:
        """Pairs of SFT samples for the preference prompts, labelled (or read back if labelled before).
        Of `samples_per_prompt` samples, the first and the first one that differs from it are
        compared: two identical responses would teach the reward model nothing."""
        path = stage_dir / COMPARISONS_NAME
        if path.exists():
            return read_records(path)
        config, seed = self.config.reward, self.config.run.seed
        prompts = self.splits.preference
        generator = torch.Generator(device=self.device).manual_seed(seed + PREFERENCE_PROMPT_SEED)
        samples = []  # samples_per_prompt rounds of one sample per prompt: (texts, ended)
        for _ in range(config.samples_per_prompt):
            completions = sample_completions(model, tokenizer, prompts, self.config.ppo.max_new_tokens,
                                             config.sample_temperature, generator, self.device)
            samples.append((completions.texts(tokenizer), completions.ended.tolist()))
        sides: list[tuple[list[str], list[bool]]] = [([], []), ([], [])]
        for query in range(len(prompts)):
            candidates = [(texts[query], ended[query]) for texts, ended in samples]
            second = next((c for c in candidates[1:] if c != candidates[0]), candidates[1 % len(candidates)])
            for side, (text, end) in zip(sides, (candidates[0], second)):
                side[0].append(text)
                side[1].append(end)
        (first, ended_1), (second, ended_2) = sides
        gold_1 = gold_scores(self.task, prompts, first, ended_1).tolist()
        gold_2 = gold_scores(self.task, prompts, second, ended_2).tolist()
        person = config.labeller == "human"
        records = label_records(prompts, first, second, ended_1, ended_2, gold_1, gold_2,
                                None if person else make_labeller(config, seed),
                                config.validation_fraction, np.random.default_rng(seed + PREFERENCE_PROMPT_SEED))
        if person:
            records = ask_person(records, stage_dir, config.host, config.port,
                                 f"{self.task.name}: {self.task.instructions}", seed,
                                 announce=lambda line: tqdm.write(line))
        write_records(path, records)
        return records

    def sft_samples(self, sft_model: torch.nn.Module, tokenizer):
        """1,024 samples of the SFT model at the PPO temperature: the scores' reference point."""
        generator = torch.Generator(device=self.device).manual_seed(self.config.run.seed + EVAL_SEED)
        return sample_completions(sft_model, tokenizer, self.splits.rl[:1024], self.config.ppo.max_new_tokens,
                                  self.config.ppo.temperature, generator, self.device)

    def _labelled_pairs(self, records: list[dict], tokenizer) -> tuple[PairBatch, PairBatch]:
        """(training pairs, validation pairs) of the records that teach something."""
        pairs = pairs_from_records([record for record in records if teaches_something(record)], tokenizer, self.device)
        train_pairs = pairs.select(torch.nonzero(~pairs.is_validation).squeeze(-1))
        if train_pairs.size == 0:
            raise ConfigError("no labelled pair is left to train on; raise --reward.labels")
        return train_pairs, pairs.select(torch.nonzero(pairs.is_validation).squeeze(-1))

    def _fit_on_pairs(self, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      train_pairs: PairBatch, epochs: int, batch_size: int, validate, loss_of=None
                      ) -> dict[str, float] | None:
        """`epochs` passes of `fit_reward_model` (its loss, or `loss_of`) with the training loss
        logged to the stage's metrics.csv and `validate()` (None: no held-out pairs) 20 times;
        returns the last validation. Minutes of work: a killed fit is redone from the start."""
        generator = torch.Generator(device=self.device).manual_seed(self.config.run.seed + PREFERENCE_PROMPT_SEED)
        steps_per_epoch = -(-train_pairs.size // batch_size)
        total = epochs * steps_per_epoch
        log = CsvLog(self.stage_dir(stage) / "metrics.csv", REWARD_COLUMNS, "step", None)
        started = time.perf_counter()
        validation: dict[str, float] | None = None  # the latest held-out check; the last one is the fit's

        def on_step(step: int, loss: float) -> None:
            nonlocal validation
            row = {"step": step, "epoch": step / steps_per_epoch, "train_loss": loss,
                   "wall_seconds": time.perf_counter() - started}
            if validate is not None and (step % max(1, total // 20) == 0 or step == total):
                model.eval()
                validation = validate()
                model.train()
                row.update(val_loss=validation["loss"], val_accuracy=validation["accuracy"],
                           val_gold_accuracy=validation["gold_accuracy"])
            log.log(row)
            progress.update()

        with self._progress(stage, total, 0) as progress:
            fit_reward_model(model, optimizer, train_pairs, total, batch_size, generator, on_step, loss_of)
        log.close()
        return validation

    def run_reward(self) -> dict[str, Any]:
        config, stage_dir = self.config.reward, self.stage_dir("reward")
        sft_dir = self.stage_dir("sft")
        stage_dir.mkdir(exist_ok=True)
        lm, tokenizer = load_pretrained(sft_dir / MODEL_DIR, self.device)
        started = time.perf_counter()
        records = self._comparisons(lm, tokenizer, stage_dir)
        sft_samples = self.sft_samples(lm, tokenizer)  # before training: the reward model shares lm's weights
        train_pairs, val_pairs = self._labelled_pairs(records, tokenizer)
        model = ScalarHeadLM(lm).to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
        validation = self._fit_on_pairs("reward", model, optimizer, train_pairs, config.epochs, config.batch_size,
                                        (lambda: pair_accuracy(model, val_pairs)) if val_pairs.size else None)
        mean, std = standardise_scores(model, sft_samples, 256)
        save_pretrained(model.lm, tokenizer, stage_dir / MODEL_DIR)
        save_checkpoint(stage_dir / HEAD_NAME, {"head": model.head.state_dict()})
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
        write_json_atomic(stage_dir / SUMMARY_NAME, summary)
        return summary

    def load_reward_model(self) -> ScalarHeadLM:
        stage_dir = self.stage_dir("reward")
        lm, _ = load_pretrained(stage_dir / MODEL_DIR, self.device)
        model = ScalarHeadLM(lm).to(self.device)
        try:
            model.head.load_state_dict(load_checkpoint(stage_dir / HEAD_NAME)["head"])
        except (KeyError, RuntimeError) as error:
            raise CheckpointError(f"{stage_dir / HEAD_NAME} holds no reward head ({error})") from None
        return model.eval()

    # -- stage 3 -------------------------------------------------------------------------------------

    def _relabel(self, iteration: int, prompts: list[str], policy_texts: list[str], policy_ended: list[bool],
                 reference, tokenizer, reward_model: ScalarHeadLM, reward_optimizer, records: list[dict],
                 sft_samples, generator: torch.Generator) -> dict[str, float]:
        """One round of labels on the policy's own samples: each compared with an SFT sample for
        the same prompt. The reward model's accuracy on these fresh answers is measured before it
        sees them (a held-out check on the distribution it is now scoring), then it is refitted
        on every label so far and its scores re-standardised on the SFT samples."""
        config = self.config
        sft = sample_completions(reference, tokenizer, prompts, config.ppo.max_new_tokens,
                                 config.reward.sample_temperature, generator, self.device)
        sft_texts, sft_ended = sft.texts(tokenizer), sft.ended.tolist()
        new = label_records(prompts, policy_texts, sft_texts, policy_ended, sft_ended,
                            gold_scores(self.task, prompts, policy_texts, policy_ended).tolist(),
                            gold_scores(self.task, prompts, sft_texts, sft_ended).tolist(),
                            make_labeller(config.reward, config.run.seed + 1000 * iteration),
                            0.0, np.random.default_rng(0))
        for offset, record in enumerate(new):
            record.update(query=len(records) + offset, iteration=iteration, responses_from=["policy", "sft"])
        check = pair_accuracy(reward_model, pairs_from_records(new, tokenizer, self.device))
        records.extend(new)
        append_records(self.stage_dir("ppo") / COMPARISONS_NAME, new)
        training = [record for record in records if not record["validation"] and teaches_something(record)]
        fit_reward_model(reward_model, reward_optimizer, pairs_from_records(training, tokenizer, self.device),
                         config.ppo.refit_steps, config.reward.batch_size, generator)
        standardise_scores(reward_model, sft_samples, 256)
        answered = [record["label"] for record in new if record["label"] is not None]
        return {"rm_policy_accuracy": check["accuracy"], "labels": len(records),
                "win_rate": sum(answered) / len(answered) if answered else None}  # ties count half

    def run_ppo(self) -> dict[str, Any]:
        config, stage_dir = self.config.ppo, self.stage_dir("ppo")
        sft_dir = self.stage_dir("sft")
        stage_dir.mkdir(exist_ok=True)
        reward_model = self.load_reward_model()
        reference, tokenizer = load_pretrained(sft_dir / MODEL_DIR, self.device)
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        policy_lm, _ = load_pretrained(sft_dir / MODEL_DIR, self.device)
        policy = ScalarHeadLM(policy_lm).to(self.device)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=0.0)
        reward_optimizer = torch.optim.AdamW(reward_model.parameters(), lr=self.config.reward.learning_rate,
                                             weight_decay=0.0)
        kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        generator = torch.Generator(device=self.device).manual_seed(self.config.run.seed + RL_SEED)
        records = read_records(self.stage_dir("reward") / COMPARISONS_NAME)
        sft_samples = self.sft_samples(reference, tokenizer)
        checkpoint_path = stage_dir / CHECKPOINT_NAME
        state = restore_states(checkpoint_path, policy=policy, optimizer=optimizer, reward_model=reward_model,
                               reward_optimizer=reward_optimizer, generator=generator)
        start, elapsed = (0, 0.0) if state is None else (int(state["iteration"]), float(state["wall_seconds"]))
        if state is not None:
            kl_controller.value = float(state["kl_coef"])
        policy_records_path = stage_dir / COMPARISONS_NAME
        policy_records = ([record for record in read_records(policy_records_path) if record["iteration"] <= start]
                          if start and policy_records_path.exists() else [])
        write_records(policy_records_path, policy_records)  # drops answers a killed run gave after its checkpoint
        records.extend(policy_records)
        log = CsvLog(stage_dir / "metrics.csv", PPO_COLUMNS, "iteration", start if start else None)
        started = time.perf_counter() - elapsed
        prompts = self.splits.rl
        with self._progress("ppo", config.iterations, start) as progress:
            for iteration in range(start + 1, config.iterations + 1):
                index = torch.randint(len(prompts), (config.prompts_per_iteration,), generator=generator,
                                      device=generator.device).tolist()
                batch_prompts = [prompts[i] for i in index]
                policy.train()
                result = ppo_iteration(policy, reference, reward_model, tokenizer, optimizer, batch_prompts, config,
                                       kl_controller.value, generator, self.device)
                stats, batch_prompts = result.stats, result.prompts
                if config.adaptive_kl:
                    kl_controller.update(stats["kl_k1"], config.prompts_per_iteration)
                completions = result.rollout.completions
                texts, ended = completions.texts(tokenizer), completions.ended
                stats["gold"] = float(gold_scores(self.task, batch_prompts, texts, ended).mean())
                stats.update(iteration=iteration, responses=iteration * config.prompts_per_iteration)
                if config.relabel_every and iteration % config.relabel_every == 0:
                    pairs = min(config.relabel_pairs, config.prompts_per_iteration)
                    stats.update(self._relabel(iteration, batch_prompts[:pairs], texts[:pairs], ended[:pairs].tolist(),
                                               reference, tokenizer, reward_model, reward_optimizer, records,
                                               sft_samples, generator))
                if iteration % config.eval_every == 0 or iteration == config.iterations:
                    policy.eval()
                    stats.update({f"eval_{key}": value
                                  for key, value in self._evaluate(policy.lm, tokenizer, reference).items()})
                stats["wall_seconds"] = time.perf_counter() - started
                log.log(stats)
                progress.update()
                progress.set_postfix(score=f"{stats['score']:.2f}", kl=f"{stats['kl_k1']:.2f}", refresh=False)
                if iteration % config.eval_every == 0 and iteration < config.iterations:
                    save_checkpoint(checkpoint_path, {
                        "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                        "reward_model": reward_model.state_dict(), "reward_optimizer": reward_optimizer.state_dict(),
                        "generator": generator.get_state(), "kl_coef": kl_controller.value, "iteration": iteration,
                        "wall_seconds": time.perf_counter() - started})
        log.close()
        seconds = time.perf_counter() - started
        policy.eval()
        save_pretrained(policy.lm, tokenizer, stage_dir / MODEL_DIR)
        final = self._evaluate(policy.lm, tokenizer, reference)
        summary = {"seconds": seconds, "iterations": config.iterations, "final_kl_coef": kl_controller.value,
                   "labels": len(records), "eval": final, "last_iteration": stats}
        from proximal.lm.plots import plot_ppo, write_samples

        plot_ppo(stage_dir)
        write_samples(stage_dir / "samples.md", self.splits.evaluation[:12], reference, policy.lm, tokenizer,
                      self.task, config.max_new_tokens, self.device)
        write_json_atomic(stage_dir / SUMMARY_NAME, summary)
        checkpoint_path.unlink(missing_ok=True)
        return summary

    # -- optional stage: DPO in place of reward model + PPO ------------------------------------------

    def run_dpo(self) -> dict[str, Any]:
        config, stage_dir = self.config.dpo, self.stage_dir("dpo")
        stage_dir.mkdir(exist_ok=True)
        started = time.perf_counter()
        reference, tokenizer = load_pretrained(self.stage_dir("sft") / MODEL_DIR, self.device)
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        policy, _ = load_pretrained(self.stage_dir("sft") / MODEL_DIR, self.device)
        train_pairs, val_pairs = self._labelled_pairs(
            read_records(self.stage_dir("reward") / COMPARISONS_NAME), tokenizer)
        train_reference = reference_pair_logprobs(reference, train_pairs)  # [M, 2], once
        val_reference = reference_pair_logprobs(reference, val_pairs)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=0.0)
        validation = self._fit_on_pairs(
            "dpo", policy, optimizer, train_pairs, config.epochs, config.batch_size,
            (lambda: implicit_accuracy(policy, val_pairs, val_reference, config.beta)) if val_pairs.size else None,
            lambda index: dpo_loss(policy, train_pairs.select(index), train_reference[index], config.beta))
        seconds = time.perf_counter() - started
        policy.eval()
        save_pretrained(policy, tokenizer, stage_dir / MODEL_DIR)
        summary = {"seconds": seconds, "train_pairs": train_pairs.size, "validation_pairs": val_pairs.size,
                   "validation": validation, "eval": self._evaluate(policy, tokenizer, reference)}
        from proximal.lm.plots import plot_reward

        plot_reward(stage_dir, "dpo.png")
        write_json_atomic(stage_dir / SUMMARY_NAME, summary)
        return summary


def run_pipeline(config: RLHFConfig, run_dir: Path | None, stages: tuple[str, ...] = STAGES,
                 show_progress: bool = False, report=None) -> Path:
    """Run `stages` (skipping finished ones) into `run_dir` (new if None); `report(stage,
    summary, skipped)` is called after each."""
    torch.set_num_threads(config.run.threads)
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    pipeline = Pipeline(config, run_dir, show_progress)
    recorded = pipeline.check(stages)  # nothing is written if this fails
    pipeline.run_dir = new_run_dir(config) if run_dir is None else Path(run_dir)
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(pipeline.run_dir / "config.json", json.loads(recorded.to_json()))
    for stage in stages:
        stage_dir = pipeline.stage_dir(stage)
        skipped = is_finished(stage_dir)
        summary = read_summary(stage_dir) if skipped else getattr(pipeline, f"run_{stage}")()
        if report is not None:
            report(stage, summary, skipped)
    return pipeline.run_dir

"""What `proximal rlhf`, `study`, `generate` and `inspect` do with their arguments (the parser
that reads them is proximal/cli.py's). Heavy imports (torch, transformers) wait inside each
command, so `proximal train` never pays for them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any

from proximal.errors import ConfigError
from proximal.flags import check_output_dir, check_output_file, check_seed, given_settings


def require_lm_dependencies() -> None:
    """The LM commands need Hugging Face transformers (the `lm` extra); say so in one line."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None:
        raise ConfigError("this command needs transformers and tokenizers: python3 -m pip install -e \".[lm]\" "
                          "(after torch==2.13.0)")


def rlhf_config(args: argparse.Namespace, sizes: list[str] | None = None):
    """The RLHFConfig of `proximal rlhf`'s arguments: the task's preset, under --config FILE's
    settings, under the flags given; on --data.* files, what was not given sized by passes over
    them (`sized_to_files`, whose lines are appended to `sizes`)."""
    from proximal.lm.config import FILE_TASK, SECTIONS, RLHFConfig

    overrides = given_settings(args, SECTIONS)
    has_files = any(value is not None for name, value in overrides["data"].items() if name != "eval_fraction")
    task = (args.task if args.task is not None else overrides["task"].pop("name", None)
            or (FILE_TASK if has_files else "addition"))
    overrides["task"].pop("name", None)
    config = RLHFConfig.for_task(task, overrides)  # validated: nothing is written if this fails
    if task != FILE_TASK:
        return config
    from proximal.lm.data import sized_to_files

    config, lines = sized_to_files(config, overrides)
    if sizes is not None:
        sizes += lines
    return config


def rlhf_command(args: argparse.Namespace) -> int:
    require_lm_dependencies()
    sizes: list[str] = []
    config = rlhf_config(args, sizes)
    from proximal.lm.pipeline import run_pipeline

    from proximal.dist import join, launched_world_size, leave
    from proximal.lm.pipeline import check_world_size

    check_output_dir(config.run.runs_dir, "--runs-dir")
    if args.run_dir is not None:
        check_output_dir(args.run_dir, "--run-dir")
    if not math.isfinite(args.dist_timeout) or args.dist_timeout <= 0:
        raise ConfigError(f"--dist-timeout must be a finite number of seconds > 0, got {args.dist_timeout:g}")
    check_world_size(config, launched_world_size())  # every rank says so, before any rank waits
    dist = join(args.dist_timeout, config.run.device, "rlhf")  # one process unless launched by torchrun
    if dist.is_main:
        for line in sizes:  # what each stage takes of the user's files
            print(line, flush=True)
    try:
        run_dir = run_pipeline(config, None if args.run_dir is None else Path(args.run_dir), args.stages,
                               show_progress=True, report=report_stage, dist=dist)
    finally:
        leave()
    if dist.is_main:
        print(f"run directory: {run_dir}")
    return 0


def _peak(summary: dict[str, Any]) -> str:
    """' (peak 3.1 GB)': the stage's peak resident memory, where its summary has it (runs from
    before it was recorded do not)."""
    return f" (peak {summary['peak_memory_gb']:.1f} GB)" if "peak_memory_gb" in summary else ""


def report_stage(stage: str, summary: dict[str, Any], skipped: bool) -> None:
    """One line per stage of `proximal rlhf`: its time, and what it measured on held-out prompts."""
    done = " (finished before; skipped)" if skipped else ""
    if stage == "reward":
        validation = summary["validation"] or {}
        accuracy = validation.get("accuracy", math.nan)
        held_out = f"held-out accuracy {accuracy:.3f}" if math.isfinite(accuracy) else "no strict held-out pair"
        if "steps" in validation and validation["step"] != validation["steps"]:  # keep-best kept an earlier one
            held_out += f" (the model of step {validation['step']} of {validation['steps']}, its best check)"
        print(f"reward: {summary['labels']:,} labelled pairs ({summary['strict_labels']:,} strict), {held_out}, "
              f"{summary['seconds']:.1f} s{_peak(summary)}{done}", flush=True)
        if summary["strict_labels"] == 0:
            print("reward: warning: every answer was a tie or unanswered, so the reward model learned no preference "
                  "and PPO will follow noise: sample more varied pairs (a longer --sft.steps, a higher "
                  "--reward.sample-temperature) or label them yourself", flush=True)
        return
    held_out = summary["eval"]
    slices = [key[len("gold_"):-len("_greedy")] for key in held_out if key.startswith("gold_")
              and key.endswith("_greedy") and key != "gold_greedy"]
    parts = [f"{stage}: {summary['seconds']:.1f} s{_peak(summary)}"]
    if "gold_greedy" in held_out:
        by_slice = "".join(f" ({name} {held_out[f'gold_{name}_greedy']:.3f})" for name in slices)
        parts.append(f"held-out gold greedy {held_out['gold_greedy']:.3f}{by_slice}, sampled "
                     f"{held_out['gold_sampled']:.3f}")
    else:
        parts.append(f"held-out responses {held_out['response_length']:.1f} tokens, "
                     f"EOS rate {held_out['eos_rate']:.2f}")
    if "kl_k1" in held_out:
        parts.append(f"KL {held_out['kl_k1']:.2f} nats")
    if stage == "ppo":
        parts.append(f"beta {summary['final_kl_coef']:.3f}, {summary['labels']:,} labels in all")
        if summary.get("kl_budget_spent"):
            parts.append(f"stopped after {summary['iterations']} iterations: the KL budget was spent")
    print("; ".join(parts[:2]) + "".join(f", {part}" for part in parts[2:]) + done, flush=True)


def study_command(args: argparse.Namespace) -> int:
    from proximal.lm.config import StudyConfig

    require_lm_dependencies()
    values = {dest.partition(".")[2]: tuple(value) if isinstance(value, list) else value
              for dest, value in vars(args).items() if dest.startswith("study.")}
    config = StudyConfig(**values)  # validated: nothing is written if this fails
    study_dir = args.study_dir if args.study_dir is not None else f"runs/studies/seed-{config.seed}"
    check_output_dir(study_dir, "--study-dir")
    check_output_dir(args.out, "--out")
    from proximal.lm.studies import run_study

    run_study(args.name, config, Path(study_dir), Path(args.out), report=lambda line: print(line, flush=True))
    return 0


GENERATE_NEW_TOKENS = 64  # a few sentences from a real model


def _generate_length(args: argparse.Namespace, stage_dir: Path, prompt_lengths: list[int], context: int | None) -> int:
    """--max-new-tokens, or the run's own ppo.max_new_tokens for a stage folder, or
    GENERATE_NEW_TOKENS cut to what the model's context leaves after the longest prompt."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # not a stage folder of a run
        return int(json.loads((stage_dir.parent / "config.json").read_text(encoding="utf-8"))["ppo"]["max_new_tokens"])
    room = GENERATE_NEW_TOKENS if context is None else context - max(prompt_lengths)
    return max(1, min(GENERATE_NEW_TOKENS, room))  # a prompt leaving no room is refused below


def generate_command(args: argparse.Namespace) -> int:
    if args.samples <= 0 or (args.max_new_tokens is not None and args.max_new_tokens <= 0):
        raise ConfigError("--samples and --max-new-tokens must be positive integers")
    if not (0.01 <= args.temperature < float("inf")):
        raise ConfigError(f"--temperature must be a finite number >= 0.01 (--greedy takes the most probable "
                          f"token), got {args.temperature}")
    check_seed(args.seed)
    require_lm_dependencies()
    import torch

    from proximal.lm.loading import load_pretrained, model_context_length
    from proximal.lm.model import prompt_lengths, sample_completions

    stage_dir = model_dir = Path(args.model_dir)
    if (model_dir / "model" / "config.json").is_file():  # a stage folder: its model/ inside
        model_dir = model_dir / "model"
    torch.set_num_threads(1)
    model, tokenizer = load_pretrained(model_dir)
    texts = args.prompts
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"--chat needs a chat template, and the tokenizer of {args.model_dir} has none "
                              f"(a base model: give the prompt as plain text)")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True) for prompt in args.prompts]
    context, lengths = model_context_length(model_dir), prompt_lengths(tokenizer, texts)
    new_tokens = _generate_length(args, stage_dir, lengths, context)
    for prompt, length in zip(args.prompts, lengths):
        if context is not None and length + new_tokens > context:
            raise ConfigError(f"the prompt {prompt[:60]!r} is {length} tokens: with --max-new-tokens "
                              f"{new_tokens} that is more than the model's context of {context} tokens")
    samples = 1 if args.greedy else args.samples
    shown = [prompt for prompt in args.prompts for _ in range(samples)]
    completions = sample_completions(model, tokenizer, [text for text in texts for _ in range(samples)], new_tokens,
                                     args.temperature, torch.Generator().manual_seed(args.seed), "cpu",
                                     greedy=args.greedy)
    for prompt, text, ended in zip(shown, completions.texts(tokenizer), completions.ended.tolist()):
        print(f"{prompt}{' -> ' if args.chat else ''}{text}"
              + ("" if ended else f"  [no EOS within {new_tokens} new tokens]"))
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.out is not None:
        check_output_file(args.out, "--out")
    from proximal.lm.inspector import PageServer, write_page

    out = write_page(Path(args.run_dir), None if args.out is None else Path(args.out))
    print(f"wrote {out}", flush=True)
    if args.serve:
        import threading

        server = PageServer(out.read_text(encoding="utf-8"), port=args.port)
        print(f"open {server.start()}  (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()  # until Ctrl-C (rc 130) or SIGTERM (rc 143), as every command stops
        finally:
            server.stop()
    return 0

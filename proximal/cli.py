"""The `proximal` command: train, eval, bench, prefs, presets, plot, rlhf, study, generate, inspect.

The settings flags of train, prefs and rlhf are generated from the fields of their config
dataclasses (config.py, lm/config.py) by one builder, so the config stays the single source of
truth: `--SECTION.FIELD` sets that section's field (`--ppo.learning-rate` sets
`PPOConfig.learning_rate`), and the run section's are bare (`--seed`, `--threads`) in every
command. The preset (ENV_ID's, or the task's) is taken first, then only the flags given override it.

Errors the user can fix arrive as `ProximalError`, caught once here and printed as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from proximal.config import (PREFS_SECTIONS, RENAMED, TRAIN_SECTIONS, PrefsConfig, TrainConfig, in_section,
                             section_from_dict)
from proximal.errors import ConfigError, ProximalError, Terminated, naming
from proximal.presets import prefs_preset_for, preset_for


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    """The command-line spelling of a name: input_clip -> --input-clip."""
    return "--" + name.replace("_", "-")


def section_flag(section: str, name: str) -> str:
    """The flag of a config field: --SECTION.FIELD (ppo, clip_coef -> --ppo.clip-coef); the run
    section's without a prefix (--seed, --threads), the same in every command."""
    return _flag(name) if section == "run" else f"--{section}.{_flag(name)[2:]}"


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """An output file's folder must exist and be writable: checked before any work is done."""
    if not str(path):
        raise ConfigError(f"{flag} needs a file name")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag} {path}: directory {folder} is not writable")
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A directory that will be created (or reused) for output: non-empty, and its nearest
    existing ancestor a writable directory. Checked before any work is done."""
    if str(path).strip() == "":
        raise ConfigError(f"{flag} must be a non-empty path")
    path = Path(path)
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise ConfigError(f"{flag} {path}: {ancestor} is not writable")
    return path


def optional_float(text: str) -> float | None:
    """A flag value that may be switched off: "none" or "off" -> None, else a float."""
    return None if text.lower() in ("none", "off") else float(text)


def optional_int(text: str) -> int | None:
    """A flag value that may be switched off: "none" or "off" -> None, else an int."""
    return None if text.lower() in ("none", "off") else int(text)


def _add_field_flag(parser: argparse.ArgumentParser, config_field: dataclasses.Field, flag: str, dest: str,
                    help_text: str) -> None:
    """The flag of one config field, defaulting to 'not given': a --x/--no-x switch for a bool, a
    typed value otherwise (parsed by the field's type; validation is the dataclass's)."""
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if config_field.type == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif config_field.type in ("tuple[int, ...]", "tuple[float, ...]"):
        is_int = "int" in config_field.type
        metavar = "WIDTH" if config_field.name == "hidden_sizes" else "N" if is_int else "X"
        parser.add_argument(flag, type=int if is_int else float, nargs="+", metavar=metavar, **kwargs)
    elif config_field.type == "float | None":
        parser.add_argument(flag, type=optional_float, metavar="FLOAT|none", **kwargs)
    elif config_field.type == "int | None":
        parser.add_argument(flag, type=optional_int, metavar="N|none", **kwargs)
    else:
        parser.add_argument(flag, type={"int": int, "float": float, "str": str}[config_field.type],
                            metavar={"int": "N", "float": "X", "str": "TEXT"}[config_field.type], **kwargs)


POSITIONALS = (("env", "env_id"), ("task", "name"))  # fields set by a command's positional argument


def _add_section_flags(parser: argparse.ArgumentParser, sections: dict[str, type], default: str = "default") -> None:
    """One flag per config field (`section_flag`), grouped by section in --help with its default
    (said as `default`), each defaulting to 'not given' (a preset's value stays unless typed)."""
    for section, section_cls in sections.items():
        group = parser.add_argument_group(f"--{section}.*" if section != "run" else "run",
                                          " ".join((section_cls.__doc__ or "").split("\n\n")[0].split()))
        for config_field in dataclasses.fields(section_cls):
            if (section, config_field.name) not in POSITIONALS:
                _add_field_flag(group, config_field, section_flag(section, config_field.name),
                                f"{section}.{config_field.name}",
                                f"{config_field.metadata['help']} ({default}: {config_field.default})")


def _add_config_file_flag(parser: argparse.ArgumentParser, reproduces: str) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"settings by section, as the flags name them, in a .toml or .json file ({reproduces}); "
                             "the flags given override it")


def given_settings(args: argparse.Namespace, sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of --config FILE's settings under the flags typed (lists as tuples)."""
    given: dict[str, dict[str, Any]] = {section: {} for section in sections}
    if getattr(args, "config", None) is not None:
        for section, values in read_config_file(args.config, sections).items():
            given[section].update({name: tuple(value) if isinstance(value, list) else value
                                   for name, value in values.items()})
    for dest, value in vars(args).items():
        section, _, name = dest.partition(".")
        if section in sections and name:
            given[section][name] = tuple(value) if isinstance(value, list) else value
    return given


def retired_flags(sections: dict[str, type]) -> dict[str, str]:
    """{flat flag of an earlier version: its flag now} for a control command's settings
    (--clip-coef -> --ppo.clip-coef, --reward-learning-rate -> --reward.learning-rate), and
    --resume -> --run-dir: refused with the new name, never taken silently."""
    retired = {"--resume": "--run-dir"}
    for section, section_cls in sections.items():
        old_name = {new: old for old, new in RENAMED.get(section, {}).items()}
        for config_field in dataclasses.fields(section_cls):
            if (section, config_field.name) in POSITIONALS:
                continue
            old = _flag(old_name.get(config_field.name, config_field.name))
            new = section_flag(section, config_field.name)
            if old != new:
                retired[old] = new
                if config_field.type == "bool":
                    retired["--no-" + old[2:]] = "--no-" + new[2:]
    return retired


def _refuse_retired(argv: Sequence[str]) -> str | None:
    """The one-line error for a flag of the flat dialect given to train or prefs, else None."""
    if not argv or argv[0] not in ("train", "prefs"):
        return None
    retired = retired_flags(TRAIN_SECTIONS if argv[0] == "train" else PREFS_SECTIONS)
    for token in argv[1:]:
        if token == "--":
            break
        flag = token.partition("=")[0]
        if flag in retired:
            return f"proximal {argv[0]}: error: {flag} is now {retired[flag]} (see proximal {argv[0]} --help)"
    return None


def _stage_list(text: str) -> tuple[str, ...]:
    from proximal.lm.pipeline import STAGES

    stages = tuple(part.strip() for part in text.split(","))
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or len(set(stages)) != len(stages):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of distinct stages from {','.join(STAGES)}")
    return tuple(stage for stage in STAGES if stage in stages)  # in the order they run


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="proximal", description="PPO from scratch in PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    train = commands.add_parser("train", help="train PPO on a Gymnasium environment",
                                description="Train PPO. ENV_ID picks a preset of hyperparameters; flags override it.")
    train.add_argument("env_id", nargs="?", default=None, metavar="ENV_ID",
                       help="Gymnasium environment id (default: CartPole-v1)")
    train.add_argument("--run-dir", metavar="RUN_DIR", default=None,
                       help="run in RUN_DIR (new or empty; default: a new folder in --runs-dir), or continue the run "
                            "it holds from its last checkpoint (only --ppo.total-timesteps may change)")
    _add_config_file_flag(train, "a run's config.json reproduces that run")
    _add_section_flags(train, TRAIN_SECTIONS, "without a preset")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="greedy evaluation of a trained run")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a checkpoint file")
    evaluate.add_argument("--episodes", type=int, default=100, help="episodes to evaluate (default: 100)")
    evaluate.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's seed)")
    evaluate.add_argument("--gif", metavar="OUT.gif", default=None, help="also render one greedy episode to a GIF")
    evaluate.set_defaults(handler=_eval)

    bench = commands.add_parser("bench", help="time to solve, over seeds (protocol: proximal/bench.py)")
    bench.add_argument("env_id", nargs="?", default="CartPole-v1", metavar="ENV_ID",
                       help="Gymnasium environment id (default: CartPole-v1)")
    bench.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1, one after another (default: 10)")
    bench.add_argument("--threshold", type=float, default=None,
                       help="greedy mean return that counts as solved (default: the env's reward_threshold)")
    bench.add_argument("--eval-every", type=int, default=5, help="iterations between evaluations (default: 5)")
    bench.add_argument("--out", default=None, metavar="DIR", help="write bench.json, bench.md, bench.png there")
    bench.set_defaults(handler=_bench)

    prefs = commands.add_parser(
        "prefs", help="PPO on a reward learned from pairwise preferences (Christiano et al. 2017)",
        description="Learn the reward from a labeller's preferences between pairs of clips, and train PPO on it. "
                    "ENV_ID picks the PPO preset; flags override it and set the preference learning.")
    prefs.add_argument("env_id", nargs="?", default=None, metavar="ENV_ID",
                       help="Gymnasium environment id (default: Pendulum-v1)")
    prefs.add_argument("--run-dir", metavar="RUN_DIR", default=None,
                       help="run in RUN_DIR (new or empty; default: a new folder in --runs-dir), or continue the "
                            "killed preference run it holds with every answer it recorded (the reward model "
                            "refitted from them, PPO from its checkpoint)")
    _add_config_file_flag(prefs, "a run's config.json gives its env, ppo and run sections, its prefs.json the "
                                 "reward section's fields")
    _add_section_flags(prefs, PREFS_SECTIONS, "without a preset")
    prefs.set_defaults(handler=_prefs)

    presets = commands.add_parser("presets", help="list the tuned hyperparameter presets")
    presets.set_defaults(handler=_presets)

    rlhf = commands.add_parser(
        "rlhf", help="SFT -> reward model -> PPO with a KL penalty, on a tiny language model or yours, "
                     "on a built-in task or your data",
        description="The InstructGPT pipeline: SFT on demonstrations, a reward model from a labeller's pairwise "
                    "preferences (or a reward function), PPO against it with a per-token KL penalty to the SFT "
                    "model. Your own data: --data.prompts, --data.sft, --data.preferences (docs/your_data.md). "
                    "Stage flags are named after their stage: --sft.steps, --ppo.kl-coef.")
    from proximal.lm.tasks import TASKS

    rlhf.add_argument("task", nargs="?", default=None, metavar="TASK",
                      help=f"the built-in task: {', '.join(TASKS)} (default: addition; sentiment starts from its "
                           "preset, listed by `proximal presets`; left out with --data.* files)")
    rlhf.add_argument("--stages", type=_stage_list, default=None, metavar="LIST",
                      help="the stages to run, in order, comma-separated from sft,reward,ppo,dpo (default: sft if "
                           "there are demonstrations, reward unless --reward.function replaces it, ppo; dpo only "
                           "when asked). A stage reads the earlier stages' output in --run-dir, or starts from "
                           "--model.path")
    rlhf.add_argument("--run-dir", default=None, metavar="RUN_DIR",
                      help="run (or continue) in RUN_DIR: finished stages are skipped, a killed stage resumes")
    rlhf.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                      help="launched by torchrun: seconds a rank waits for the others to join, or in a collective "
                           "(rank 0's labelling, evaluating and writing are waited for without limit)")
    _add_config_file_flag(rlhf, "a run's config.json reproduces that run")
    from proximal.lm.config import SECTIONS

    _add_section_flags(rlhf, SECTIONS)
    rlhf.set_defaults(handler=_rlhf)

    from proximal.lm.config import STUDIES, StudyConfig

    study = commands.add_parser(
        "study", help="rerun an RLHF study on the LM pipeline, with the gold reward as the truth",
        description="Run the variants of one study into --study-dir (resumable: a rerun skips finished ones) and "
                    "write its figure, table and numbers to --out. The studies: overoptimisation (PPO at fixed betas "
                    "against reward models from few and many labels), best-of-n, methods (PPO, RLOO, DPO), "
                    "label-noise. Needs pip install -e \".[lm]\".")
    study.add_argument("name", choices=STUDIES, metavar="STUDY", help=f"one of: {', '.join(STUDIES)}")
    study.add_argument("--study-dir", default=None, metavar="DIR",
                       help="where the variants' run directories go (default: runs/studies/seed-SEED)")
    study.add_argument("--out", default="docs/lm_studies", metavar="DIR",
                       help="where STUDY.png, STUDY.md and STUDY.json go (default: docs/lm_studies)")
    for config_field in dataclasses.fields(StudyConfig):
        _add_field_flag(study, config_field, _flag(config_field.name), f"study.{config_field.name}",
                        f"{config_field.metadata['help']} (default: {config_field.default})")
    study.set_defaults(handler=_study)

    generate = commands.add_parser("generate", help="print a trained stage's completions for given prompts")
    generate.add_argument("model_dir", metavar="MODEL_DIR",
                          help="a stage folder of an rlhf run (RUN_DIR/sft, RUN_DIR/ppo) or any local HF model directory")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT")
    generate.add_argument("--samples", type=int, default=1, help="samples per prompt (default: 1; ignored with --greedy)")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    generate.add_argument("--greedy", action="store_true", help="the most probable token at each step")
    generate.add_argument("--max-new-tokens", type=int, default=None,
                          help=f"length limit of a response (default: the length its run trained with, for a stage "
                               f"folder; else {GENERATE_NEW_TOKENS}, within the model's context)")
    generate.add_argument("--chat", action="store_true",
                          help="send each prompt as a user message through the model's chat template")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    generate.set_defaults(handler=_generate)

    inspect = commands.add_parser(
        "inspect", help="a web page of what PPO saw token by token in an rlhf run (KL penalty, reward, value, "
                        "advantage, ratio)",
        description="Write one self-contained HTML page (no network needed) of the PPO stage's snapshots and print "
                    "its path; --serve also shows it on 127.0.0.1 behind a token.")
    inspect.add_argument("run_dir", metavar="RUN_DIR", help="an rlhf run directory (or its ppo folder)")
    inspect.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/ppo/inspect.html)")
    inspect.add_argument("--serve", action="store_true", help="also serve it on 127.0.0.1 until Ctrl-C")
    inspect.add_argument("--port", type=int, default=8766, help="--serve: the port (default: 8766; 0: any free)")
    inspect.set_defaults(handler=_inspect)

    plot = commands.add_parser("plot", help="learning curves of several runs in one PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default="learning_curves.png", help="output PNG (default: learning_curves.png)")
    plot.set_defaults(handler=_plot)
    return parser


def _run_dir(given: str | None, holds_run: tuple[str, ...], command: str) -> tuple[Path | None, bool]:
    """(the --run-dir to write, whether it holds a run to continue): a new or empty folder starts
    a run there; one holding `holds_run` files continues it; anything else is refused."""
    if given is None:
        return None, False
    run_dir = check_output_dir(given, "--run-dir")  # a file, or no writable folder above it, fails here
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not all((run_dir / name).is_file() for name in holds_run):
            raise ConfigError(f"--run-dir {run_dir} holds no proximal {command} run (no {' and '.join(holds_run)} "
                              "in it); give a new or empty directory to start one")
        return run_dir, True
    return run_dir, False


def _start_in(run_dir: Path | None) -> Path | None:
    """A new run's --run-dir, created (0700, as a run folder in --runs-dir is) once the config is valid."""
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return run_dir


def _train_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None, Path | None]:
    """The config to run, the checkpoint to resume from (None for a new run) and its run directory
    (None: a new one in --runs-dir)."""
    from proximal.checkpoint import CHECKPOINT_NAME, load_checkpoint, resolve_checkpoint_path

    given = given_settings(args, TRAIN_SECTIONS)
    env_id = args.env_id or given["env"].pop("env_id", None)  # ENV_ID, else --config FILE's
    run_dir, continuing = _run_dir(args.run_dir, (CHECKPOINT_NAME,), "train")
    if not continuing:
        config = preset_for(env_id or "CartPole-v1").with_overrides(given)
        check_output_dir(config.run.runs_dir, "--runs-dir")
        return config, None, _start_in(run_dir)
    if env_id is not None:
        raise ConfigError(f"--run-dir {run_dir} continues its run's own environment; drop ENV_ID")
    changed = sorted(section_flag(section, name) for section, values in given.items() for name in values
                     if (section, name) not in (("ppo", "total_timesteps"), ("run", "dist_timeout")))
    if changed:
        raise ConfigError(f"--run-dir {run_dir} continues its run with the run's config; only --ppo.total-timesteps "
                          f"(or --dist-timeout) may change, not {', '.join(changed)}")
    with naming("--run-dir"):
        checkpoint_path = resolve_checkpoint_path(run_dir)
    payload = load_checkpoint(checkpoint_path)
    try:
        config = TrainConfig.from_dict(json.loads(payload["config"])).with_overrides(given)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{checkpoint_path} holds no readable config ({error})") from None
    _refuse_finished(str(run_dir), payload, config, run_dir)
    return config, payload, run_dir


def _refuse_finished(given: str, payload: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """A run to resume must have training left, or be missing its final evaluation (a kill
    between the last checkpoint and eval.json: resuming completes the evaluation and plot)."""
    from proximal.train import EVAL_NAME

    finished = bool(payload.get("reached", False)) or int(payload["iteration"]) >= config.num_iterations
    if finished and (run_dir / EVAL_NAME).exists():
        if payload.get("reached", False):
            raise ConfigError(f"{given} already finished: it reached --stop-return {config.run.stop_return:g}")
        raise ConfigError(f"{given} already finished its {config.ppo.total_timesteps} steps; "
                          "pass a larger --ppo.total-timesteps to train on")


def _train(args: argparse.Namespace) -> int:
    config, resume, run_dir = _train_config(args)  # validated: nothing is written if this fails
    from proximal.dist import join, launched_world_size, leave
    from proximal.run import locked_run_dir
    from proximal.train import check_world_size, train

    check_world_size(config, launched_world_size())  # every rank says so, before any rank waits
    dist = join(config.run.dist_timeout)  # one process unless launched by torchrun with K > 1
    try:
        writer = dist.is_main
        with locked_run_dir(run_dir) if run_dir is not None and writer else contextlib.nullcontext():
            result = train(config, run_dir=run_dir, resume=resume, show_progress=writer,
                           dist=dist)
    finally:
        leave()
    if not writer:
        return 0
    returns = result.eval_returns
    print(f"{config.env.env_id}: {result.global_step:,} env steps in {result.train_seconds:.2f} s "
          f"of training ({result.global_step / result.train_seconds:,.0f} steps/s)")
    if result.reached_stop_return:
        print(f"stopped early: the greedy mean reached --stop-return {config.run.stop_return:g} "
              f"(budget was {config.ppo.total_timesteps:,} steps)")
    print(f"greedy evaluation, {len(returns)} episodes: mean {returns.mean():.1f} ± {returns.std():.1f}, "
          f"min {returns.min():.1f}")
    print(f"run directory: {result.run_dir}")
    return 0


# What continuing a `proximal prefs` run may change: the budget, and how the person's page is served.
PREFS_RESUME_CHANGES = (("ppo", "total_timesteps"), ("reward", "host"), ("reward", "port"), ("reward", "human_pace"),
                        ("reward", "human_queue_size"))


def _prefs_config(args: argparse.Namespace
                  ) -> tuple[TrainConfig, PrefsConfig, dict[str, Any] | None, Path | None, bool]:
    """The PPO and preference configs to run, the checkpoint to resume from (None: PPO starts
    afresh), the run directory (None: a new one in --runs-dir) and whether it holds a run to
    continue."""
    from proximal.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, load_checkpoint
    from proximal.preferences import PREFS_CONFIG_NAME

    given = given_settings(args, PREFS_SECTIONS)
    prefs_given = given.pop("reward")
    env_id = args.env_id or given["env"].pop("env_id", None)  # ENV_ID, else --config FILE's
    run_dir, continuing = _run_dir(args.run_dir, (CONFIG_NAME, PREFS_CONFIG_NAME), "prefs")
    if not continuing:
        env_id = env_id or "Pendulum-v1"
        config = preset_for(env_id).with_overrides(given)
        prefs = _with_reward_settings(prefs_preset_for(env_id), prefs_given, config)
        check_output_dir(config.run.runs_dir, "--runs-dir")
        return config, prefs, None, _start_in(run_dir), False
    if env_id is not None:
        raise ConfigError(f"--run-dir {run_dir} continues its run's own environment; drop ENV_ID")
    payload = load_checkpoint(run_dir) if (run_dir / CHECKPOINT_NAME).exists() else None
    try:
        config_text = payload["config"] if payload is not None else (run_dir / CONFIG_NAME).read_text()
        recorded_config = TrainConfig.from_dict(json.loads(config_text))
        recorded_prefs = section_from_dict("reward", PrefsConfig, json.loads((run_dir / PREFS_CONFIG_NAME).read_text()))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{run_dir} holds no readable config ({error})") from None
    recorded = {**{section: getattr(recorded_config, section) for section in TRAIN_SECTIONS}, "reward": recorded_prefs}
    changed = sorted(section_flag(section, name) for section, values in {**given, "reward": prefs_given}.items()
                     for name, value in values.items()
                     if (section, name) not in PREFS_RESUME_CHANGES and value != getattr(recorded[section], name))
    if changed:
        allowed = ", ".join(section_flag(section, name) for section, name in PREFS_RESUME_CHANGES)
        raise ConfigError(f"--run-dir {run_dir} continues its run with the run's config; only {allowed} may change, "
                          f"not {', '.join(changed)}")
    config = recorded_config.with_overrides(given)
    prefs = _with_reward_settings(recorded_prefs, prefs_given, config)
    if prefs.labeller == "replay":
        raise ConfigError("a replayed run is reproduced by running it again, not resumed")
    if payload is not None:
        _refuse_finished(str(run_dir), payload, config, run_dir)
    return config, prefs, payload, run_dir, True


def _with_reward_settings(prefs: PrefsConfig, settings: dict[str, Any], config: TrainConfig) -> PrefsConfig:
    """`prefs` with the --reward.* flags given, checked against the PPO config; a refused
    value's error names its flag."""
    with in_section("reward"):
        prefs = dataclasses.replace(prefs, **settings)
        prefs.check_against(config)  # validated: nothing is written if this fails
    return prefs


def _prefs(args: argparse.Namespace) -> int:
    config, prefs, resume, run_dir, continuing = _prefs_config(args)  # validated: nothing is written if this fails
    from proximal.preferences import train_from_preferences
    from proximal.run import locked_run_dir

    with locked_run_dir(run_dir) if run_dir is not None else contextlib.nullcontext():
        result, fit = train_from_preferences(config, prefs, show_progress=True, resume=resume,
                                             run_dir=run_dir, continuing=continuing,
                                             announce=lambda line: print(line, flush=True))
    returns = result.eval_returns
    print(f"{config.env.env_id}: {result.global_step:,} env steps in {result.train_seconds:.2f} s of training, "
          f"PPO on the learned reward, {fit['labels']} labels")
    print(f"greedy evaluation on the true reward, {len(returns)} episodes: mean {returns.mean():.1f} ± "
          f"{returns.std():.1f}, min {returns.min():.1f}")
    if fit["pearson"] is not None:
        print(f"learned vs true return on {fit['held_out_clips']} held-out clips: Pearson {fit['pearson']:.3f}, "
              f"Spearman {fit['spearman']:.3f}")
    print(f"run directory: {result.run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.episodes <= 0:
        raise ConfigError(f"--episodes must be a positive integer, got {args.episodes}")
    _require_seed(args.seed)
    if args.gif is not None:
        check_output_file(args.gif, "--gif")
    import torch

    from proximal.agent import PPOAgent
    from proximal.evaluate import evaluate, render_gif

    torch.set_num_threads(1)
    agent = PPOAgent.load(args.run_dir)
    env_id = agent.config.env.env_id
    seed = agent.config.run.seed if args.seed is None else args.seed
    returns = evaluate(agent, env_id, args.episodes, seed)
    print(f"{env_id}: greedy evaluation, {len(returns)} episodes: mean {returns.mean():.1f} ± "
          f"{returns.std():.1f}, min {returns.min():.1f}, max {returns.max():.1f}")
    if args.gif:
        frames = render_gif(agent, env_id, Path(args.gif), seed)
        print(f"wrote {args.gif} ({frames} frames)")
    return 0


def _require_seed(seed: int | None) -> None:
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed}")


def _bench(args: argparse.Namespace) -> int:
    for name in ("seeds", "eval_every"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ConfigError(f"--threshold must be a finite number, got {args.threshold}")
    from proximal import bench
    from proximal.envs import make_vector_env

    make_vector_env(args.env_id, 1).close()  # an unknown or unsupported env fails here, before any work
    threshold = bench.reward_threshold(args.env_id) if args.threshold is None else args.threshold
    bench.bench_config(args.env_id, 0, threshold, args.eval_every, "runs")  # validates, writes nothing
    out_dir = None if args.out is None else check_output_dir(args.out, "--out")
    runs_dir, temporary = bench.bench_runs_dir(out_dir)
    print(f"proximal bench {args.env_id}: seeds 0-{args.seeds - 1}, solved = greedy 100-episode mean >= {threshold:g}")

    def report(result: bench.SeedResult) -> None:
        print(f"seed {result.seed}: {'solved' if result.solved else 'NOT solved'} after {result.env_steps:,} env steps, "
              f"{result.train_seconds:.2f} s training, {result.process_seconds:.2f} s whole process", flush=True)

    try:
        results = bench.run_bench(args.env_id, args.seeds, threshold, args.eval_every, runs_dir, report)
    finally:
        if temporary is not None:
            temporary.cleanup()
    totals = bench.summary(results)
    print(f"solved {totals['solved']}/{totals['seeds']}; training seconds median {totals['median_train_seconds']:.2f}, "
          f"max {totals['max_train_seconds']:.2f}; env steps median {totals['median_env_steps']:,.0f}, "
          f"max {totals['max_env_steps']:,.0f}; whole process median {totals['median_process_seconds']:.2f} s")
    if out_dir is not None:
        bench.write_outputs(out_dir, args.env_id, threshold, results)
        print(f"wrote {out_dir / 'bench.json'}, bench.md, bench.png")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from proximal.presets import PRESETS, SENTIMENT_PRESET, describe_preset

    for env_id, preset in PRESETS.items():
        print(f"{env_id} (v{preset.version}): {describe_preset(preset.config)}")
        print(f"    measured: {preset.measured}")
        prefs_flags = [f"{section_flag('reward', f.name)} {'none' if value is None else value}"
                       for f in dataclasses.fields(PrefsConfig)
                       if (value := getattr(preset.prefs, f.name)) != f.default]
        if prefs_flags:
            print("    proximal prefs starts from: " + " ".join(prefs_flags))
    print("any other env id trains with the generic defaults: " + describe_preset(TrainConfig()))
    flags = []
    for section, settings in SENTIMENT_PRESET.items():
        for name, value in settings.items():
            flag = section_flag(section, name)
            flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    print("proximal rlhf sentiment starts from: " + " ".join(flags))
    return 0


def _require_lm_dependencies() -> None:
    """The LM commands need Hugging Face transformers (the `lm` extra); say so in one line."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None:
        raise ConfigError("this command needs transformers and tokenizers: python3 -m pip install -e \".[lm]\" "
                          "(after torch==2.13.0)")


def _peak(summary: dict[str, Any]) -> str:
    """' (peak 3.1 GB)': the stage's peak resident memory, where its summary has it (runs from
    before it was recorded do not)."""
    return f" (peak {summary['peak_memory_gb']:.1f} GB)" if "peak_memory_gb" in summary else ""


def _report_stage(stage: str, summary: dict[str, Any], skipped: bool) -> None:
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


def read_config_file(path: str, sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of a .toml or .json config file, each section and field checked
    against `sections` (the values are checked by the config itself, as a flag's are)."""
    import tomllib

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8-sig")
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ConfigError(f"--config {path}: not a readable {file.suffix.lstrip('.') or 'JSON'} file "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the sections {', '.join(sections)} are expected, got a {type(data).__name__}")
    for section, values in data.items():
        if section not in sections or not isinstance(values, dict):
            raise ConfigError(f"--config {path}: {section!r} is not a section ({', '.join(sections)})")
        data[section] = values = {RENAMED.get(section, {}).get(name, name): value for name, value in values.items()}
        known = {f.name for f in dataclasses.fields(sections[section])}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"--config {path}: no setting {section}.{unknown[0]} (--{section}.* flags name them)")
    return data


def rlhf_config(args: argparse.Namespace):
    """The RLHFConfig of `proximal rlhf`'s arguments: the task's preset, under --config FILE's
    settings, under the flags given."""
    from proximal.lm.config import FILE_TASK, SECTIONS, RLHFConfig

    overrides = given_settings(args, SECTIONS)
    has_files = any(value is not None for name, value in overrides["data"].items() if name != "eval_fraction")
    task = (args.task if args.task is not None else overrides["task"].pop("name", None)
            or (FILE_TASK if has_files else "addition"))
    overrides["task"].pop("name", None)
    return RLHFConfig.for_task(task, overrides)  # validated: nothing is written if this fails


def _rlhf(args: argparse.Namespace) -> int:
    _require_lm_dependencies()
    config = rlhf_config(args)
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
    try:
        run_dir = run_pipeline(config, None if args.run_dir is None else Path(args.run_dir), args.stages,
                               show_progress=True, report=_report_stage, dist=dist)
    finally:
        leave()
    if dist.is_main:
        print(f"run directory: {run_dir}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from proximal.lm.config import StudyConfig

    _require_lm_dependencies()
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


def _generate(args: argparse.Namespace) -> int:
    if args.samples <= 0 or (args.max_new_tokens is not None and args.max_new_tokens <= 0):
        raise ConfigError("--samples and --max-new-tokens must be positive integers")
    if not (0.01 <= args.temperature < float("inf")):
        raise ConfigError(f"--temperature must be a finite number >= 0.01 (--greedy takes the most probable "
                          f"token), got {args.temperature}")
    _require_seed(args.seed)
    _require_lm_dependencies()
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


def _inspect(args: argparse.Namespace) -> int:
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


def _plot(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    from proximal.plots import plot_runs

    print(f"wrote {plot_runs([Path(run_dir) for run_dir in args.run_dirs], Path(args.out))}")
    return 0


def _as_typed(error: ProximalError, command: str) -> str:
    """The error's message with the config field it begins with said as the flag that sets it
    ("kl_coef must be >= 0" -> "--ppo.kl-coef must be >= 0"): the field's own flag, else the one
    flag of the command whose field it is in whatever section."""
    field = getattr(error, "field", None)
    message = str(error)
    if field is None:
        return message
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    dests = {action.dest: action.option_strings[0] for action in commands.choices[command]._actions
             if action.option_strings}
    name = field.rpartition(".")[2]
    in_some_section = [flag for dest, flag in dests.items() if "." not in field and dest.endswith("." + name)]
    flag = dests.get(field) or (in_some_section[0] if len(in_some_section) == 1 else None)
    return message.replace(name, flag, 1) if flag is not None and message.startswith(name) else message


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    retired = _refuse_retired(sys.argv[1:] if argv is None else list(argv))
    if retired is not None:
        print(retired, file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    import signal

    # Installed before anything else can take SIGTERM: SDL (under pygame, drawing the labelling
    # page's clips) installs a handler of its own when it finds the default one, and then the
    # process would keep serving after `kill PID`.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command not in ("train", "rlhf"):
            from proximal.dist import launched_world_size

            if launched_world_size() > 1:
                raise ConfigError("only `proximal train` and `proximal rlhf` run on several processes (torchrun); "
                                  f"run `proximal {args.command}` as one process")
        return args.handler(args)
    except ProximalError as error:
        print(f"proximal {args.command}: error: {_as_typed(error, args.command)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        how = "stopped by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"proximal {args.command}: {how}; the last checkpoint written is kept", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(interrupt, Terminated) else 130
    except BrokenPipeError:  # output piped into a reader that stopped early, e.g. `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())

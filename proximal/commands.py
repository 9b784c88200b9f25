"""What `proximal train`, `prefs`, `eval`, `bench`, `presets` and `plot` do with their arguments
(the parser that reads them is proximal/cli.py's; the LM commands' are in lm/commands.py). A
command checks everything it was given before it writes anything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from proximal.config import PREFS_SECTIONS, TRAIN_SECTIONS, PrefsConfig, TrainConfig
from proximal.errors import ConfigError, naming
from proximal.flags import check_output_dir, check_output_file, check_seed, given_settings, section_flag
from proximal.presets import prefs_preset_for, preset_for
from proximal.sections import in_section, section_from_dict


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


def train_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None, Path | None]:
    """The config to run, the checkpoint to resume from (None for a new run) and its run directory
    (None: a new one in --runs-dir)."""
    from proximal.checkpoint import CHECKPOINT_NAME, load_checkpoint, resolve_checkpoint_path

    given = given_settings(args, TRAIN_SECTIONS)
    from_file = given["env"].pop("env_id", None)
    env_id = args.env_id if args.env_id is not None else from_file  # ENV_ID, else --config FILE's
    run_dir, continuing = _run_dir(args.run_dir, (CHECKPOINT_NAME,), "train")
    if not continuing:
        config = preset_for("CartPole-v1" if env_id is None else env_id).with_overrides(given)
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


def train_command(args: argparse.Namespace) -> int:
    config, resume, run_dir = train_config(args)  # validated: nothing is written if this fails
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


PrefsStart = tuple[TrainConfig, PrefsConfig, dict[str, Any] | None, Path | None, bool]


def prefs_config(args: argparse.Namespace) -> PrefsStart:
    """The PPO and preference configs to run, the checkpoint to resume from (None: PPO starts
    afresh), the run directory (None: a new one in --runs-dir) and whether it holds a run to
    continue."""
    from proximal.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, load_checkpoint
    from proximal.preferences import PREFS_CONFIG_NAME

    given = given_settings(args, PREFS_SECTIONS)
    prefs_given = given.pop("reward")
    from_file = given["env"].pop("env_id", None)
    env_id = args.env_id if args.env_id is not None else from_file  # ENV_ID, else --config FILE's
    run_dir, continuing = _run_dir(args.run_dir, (CONFIG_NAME, PREFS_CONFIG_NAME), "prefs")
    if not continuing:
        env_id = "Pendulum-v1" if env_id is None else env_id
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


def prefs_command(args: argparse.Namespace) -> int:
    config, prefs, resume, run_dir, continuing = prefs_config(args)  # validated: nothing is written if this fails
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


def eval_command(args: argparse.Namespace) -> int:
    if args.episodes <= 0:
        raise ConfigError(f"--episodes must be a positive integer, got {args.episodes}")
    check_seed(args.seed)
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


def bench_command(args: argparse.Namespace) -> int:
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


def presets_command(args: argparse.Namespace) -> int:
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


def plot_command(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    from proximal.plots import plot_runs

    print(f"wrote {plot_runs([Path(run_dir) for run_dir in args.run_dirs], Path(args.out))}")
    return 0

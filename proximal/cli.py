"""The `proximal` command line: the parser of train, eval, bench, prefs, presets, plot, rlhf, study,
generate and inspect, and `main`, which runs the command asked for (commands.py and lm/commands.py
say what each does with its arguments).

The settings flags of train, prefs and rlhf are generated from the fields of their config
dataclasses (config.py, lm/config.py) by one builder, so the config stays the single source of
truth: `--SECTION.FIELD` sets that section's field (`--ppo.learning-rate` sets
`PPOConfig.learning_rate`), and the run section's are bare (`--seed`, `--threads`) in every
command. The preset (ENV_ID's, or the task's) is taken first, then only the flags given override it.

Errors the user can fix arrive as `ProximalError`, caught once here and printed as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

from proximal.commands import (bench_command, eval_command, plot_command, prefs_command, presets_command,
                               train_command)
from proximal.config import PREFS_SECTIONS, TRAIN_SECTIONS
from proximal.errors import ConfigError, ProximalError, Terminated
from proximal.flags import add_config_file_flag, add_field_flag, add_section_flags, as_typed, bare_flag, refuse_retired
from proximal.lm.commands import GENERATE_NEW_TOKENS, generate_command, inspect_command, rlhf_command, study_command
from proximal.presets import PRESETS


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
                       help=f"Gymnasium environment id (default: CartPole-v1); tuned presets: {', '.join(PRESETS)} "
                            "(`proximal presets` says what each measured), any other id starts from the defaults below")
    train.add_argument("--run-dir", metavar="RUN_DIR", default=None,
                       help="run in RUN_DIR (new or empty; default: a new folder in --runs-dir), or continue the run "
                            "it holds from its last checkpoint (only --ppo.total-timesteps may change)")
    add_config_file_flag(train, "a run's config.json reproduces that run")
    add_section_flags(train, TRAIN_SECTIONS, "without a preset")
    train.set_defaults(handler=train_command)

    evaluate = commands.add_parser("eval", help="greedy evaluation of a trained run")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a checkpoint file")
    evaluate.add_argument("--episodes", type=int, default=100, help="episodes to evaluate (default: 100)")
    evaluate.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's seed)")
    evaluate.add_argument("--gif", metavar="OUT.gif", default=None, help="also render one greedy episode to a GIF")
    evaluate.set_defaults(handler=eval_command)

    bench = commands.add_parser("bench", help="time to solve, over seeds (protocol: proximal/bench.py)")
    bench.add_argument("env_id", nargs="?", default="CartPole-v1", metavar="ENV_ID",
                       help="Gymnasium environment id (default: CartPole-v1)")
    bench.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1, one after another (default: 10)")
    bench.add_argument("--threshold", type=float, default=None,
                       help="greedy mean return that counts as solved (default: the env's reward_threshold)")
    bench.add_argument("--eval-every", type=int, default=5, help="iterations between evaluations (default: 5)")
    bench.add_argument("--out", default=None, metavar="DIR", help="write bench.json, bench.md, bench.png there")
    bench.set_defaults(handler=bench_command)

    prefs = commands.add_parser(
        "prefs", help="PPO on a reward learned from pairwise preferences (Christiano et al. 2017)",
        description="Learn the reward from a labeller's preferences between pairs of clips, and train PPO on it. "
                    "ENV_ID picks the PPO preset; flags override it and set the preference learning.")
    prefs.add_argument("env_id", nargs="?", default=None, metavar="ENV_ID",
                       help=f"Gymnasium environment id (default: Pendulum-v1); its PPO preset as in train: "
                            f"{', '.join(PRESETS)}")
    prefs.add_argument("--run-dir", metavar="RUN_DIR", default=None,
                       help="run in RUN_DIR (new or empty; default: a new folder in --runs-dir), or continue the "
                            "killed preference run it holds with every answer it recorded (the reward model "
                            "refitted from them, PPO from its checkpoint)")
    add_config_file_flag(prefs, "a run's config.json gives its env, ppo and run sections, its prefs.json the "
                                "reward section's fields")
    add_section_flags(prefs, PREFS_SECTIONS, "without a preset")
    prefs.set_defaults(handler=prefs_command)

    presets = commands.add_parser("presets", help="list the tuned hyperparameter presets")
    presets.set_defaults(handler=presets_command)

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
    add_config_file_flag(rlhf, "a run's config.json reproduces that run")
    from proximal.lm.config import SECTIONS

    add_section_flags(rlhf, SECTIONS)
    rlhf.set_defaults(handler=rlhf_command)

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
        add_field_flag(study, config_field, bare_flag(config_field.name), f"study.{config_field.name}",
                       f"{config_field.metadata['help']} (default: {config_field.default})")
    study.set_defaults(handler=study_command)

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
    generate.set_defaults(handler=generate_command)

    inspect = commands.add_parser(
        "inspect", help="a web page of what PPO saw token by token in an rlhf run (KL penalty, reward, value, "
                        "advantage, ratio)",
        description="Write one self-contained HTML page (no network needed) of the PPO stage's snapshots and print "
                    "its path; --serve also shows it on 127.0.0.1 behind a token.")
    inspect.add_argument("run_dir", metavar="RUN_DIR", help="an rlhf run directory (or its ppo folder)")
    inspect.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/ppo/inspect.html)")
    inspect.add_argument("--serve", action="store_true", help="also serve it on 127.0.0.1 until Ctrl-C")
    inspect.add_argument("--port", type=int, default=8766, help="--serve: the port (default: 8766; 0: any free)")
    inspect.set_defaults(handler=inspect_command)

    plot = commands.add_parser("plot", help="learning curves of several runs in one PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default="learning_curves.png", help="output PNG (default: learning_curves.png)")
    plot.set_defaults(handler=plot_command)
    return parser


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    retired = refuse_retired(sys.argv[1:] if argv is None else list(argv))
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
        print(f"proximal {args.command}: error: {as_typed(error, args.command, build_parser())}", file=sys.stderr)
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

"""How much of a held-out figure is the evaluation's own noise: proximal's `evaluate_policy` on
the same held-out prompts, repeated over several sampling seeds, for each policy given (a run's
start model, its trained models). A run's own evaluation draws one sample per prompt from one
seed (the run's seed + 3); this script draws from seeds 1000, 1001, ... (or from `--first-seed`)
and reports each repeat, then the mean and standard deviation over repeats (the mean over R
repeats is R samples a prompt).
It also asks the run's labeller, for each prompt and repeat, which of two sampled responses is
better: each policy's or the first policy's (give the start model first). Its win rate is the
figure a user has where this task's gold is a person's judgement (labels of the policy's samples
against the start model's), so a setting is chosen on it, never on the gold itself.

Optional, never needed by the tests. Usage (seed 100's held-out runs of docs/lm_real_model.md):

  python3 benchmarks/eval_repeats.py --run RUN_DIR --repeats 8 \\
      --policy start=RUN_DIR/start/model --policy trained=RUN_DIR/ppo/model --out repeats.json

Every policy is measured against the run's start model (RUN_DIR/start/model) as the KL's reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from proximal.lm.config import RLHFConfig
from proximal.labellers import make_labeller
from proximal.lm.evaluation import evaluation_rows, summarise_rows
from proximal.lm.loading import load_pretrained
from proximal.lm.stage import open_context

FIGURES = ("gold_greedy", "gold_sampled", "kl_k1", "response_length", "eos_rate", "win_rate")


def labeller_win_rate(labeller, gold: np.ndarray, baseline_gold: np.ndarray) -> float:
    """The share of prompts on which the labeller prefers the response of gold `gold` to the one of
    gold `baseline_gold` (the same prompt, the same repeat); "equally good" counts half."""
    answers = [labeller.answer(float(mine), float(theirs)) for mine, theirs in zip(gold, baseline_gold)]
    return float(np.mean([answer for answer in answers if answer is not None]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `proximal rlhf` run directory")
    parser.add_argument("--policy", action="append", required=True, metavar="NAME=DIR", help="a model directory")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=1000,
                        help="the first repeat's sampling seed (then +1, +2, ...)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write every repeat here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RLHFConfig.from_dict(json.loads((args.run / "config.json").read_text()))  # its seed picks the prompts
    ctx = open_context(config, args.run)
    reference, tokenizer = load_pretrained(args.run / "start" / "model")
    prompts, ppo = ctx.data.evaluation, config.ppo
    labeller = make_labeller(config.reward, np.random.default_rng(config.run.seed + 2000))
    results: dict[str, list[dict[str, float]]] = {}
    baseline: list[np.ndarray] = []  # the first policy's per-prompt sampled gold [N], one per repeat
    for name, directory in (entry.split("=", 1) for entry in args.policy):
        model, _ = load_pretrained(directory)
        results[name] = []
        for repeat in range(args.repeats):
            rows = evaluation_rows(model, tokenizer, prompts, ctx.gold, ppo.max_new_tokens, ppo.temperature,
                                   args.first_seed + repeat, ctx.device, reference)
            if len(baseline) < args.repeats:
                baseline.append(rows["gold_sampled"])
            stats = summarise_rows(rows, {})
            stats["win_rate"] = labeller_win_rate(labeller, rows["gold_sampled"], baseline[repeat])
            results[name].append({figure: stats[figure] for figure in FIGURES})
            print(name, args.first_seed + repeat, " ".join(f"{figure} {stats[figure]:.3f}" for figure in FIGURES),
                  flush=True)
    print(f"\n{len(prompts)} held-out prompts, {args.repeats} repeats: mean (standard deviation over repeats)")
    for name, rows in results.items():
        print(name, " ".join(f"{figure} {np.mean([r[figure] for r in rows]):.3f} ({np.std([r[figure] for r in rows], ddof=1):.3f})"
                             for figure in FIGURES))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

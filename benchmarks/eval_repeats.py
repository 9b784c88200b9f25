"""How much of a held-out figure is the evaluation's own noise: proximal's `evaluate_policy` on
the same held-out prompts, repeated over several sampling seeds, for each policy given (a run's
start model, its trained models). A run's own evaluation draws one sample per prompt from one
seed (the run's seed + 3); this script draws from seeds 1000, 1001, ... and reports each repeat,
then the mean and standard deviation over repeats (the mean over R repeats is R samples a prompt).

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
from proximal.lm.evaluation import evaluate_policy
from proximal.lm.model import load_pretrained
from proximal.lm.stage import open_context

FIGURES = ("gold_greedy", "gold_sampled", "kl_k1", "response_length", "eos_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `proximal rlhf` run directory")
    parser.add_argument("--policy", action="append", required=True, metavar="NAME=DIR", help="a model directory")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write every repeat here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RLHFConfig.from_dict(json.loads((args.run / "config.json").read_text()))  # its seed picks the prompts
    ctx = open_context(config, args.run)
    reference, tokenizer = load_pretrained(args.run / "start" / "model")
    prompts, ppo = ctx.data.evaluation, config.ppo
    results: dict[str, list[dict[str, float]]] = {}
    for name, directory in (entry.split("=", 1) for entry in args.policy):
        model, _ = load_pretrained(directory)
        results[name] = []
        for repeat in range(args.repeats):
            stats = evaluate_policy(model, tokenizer, prompts, ctx.gold, {}, ppo.max_new_tokens, ppo.temperature,
                                    1000 + repeat, ctx.device, reference)
            results[name].append({figure: stats[figure] for figure in FIGURES})
            print(name, 1000 + repeat, " ".join(f"{figure} {stats[figure]:.3f}" for figure in FIGURES), flush=True)
    print(f"\n{len(prompts)} held-out prompts, {args.repeats} repeats: mean (standard deviation over repeats)")
    for name, rows in results.items():
        print(name, " ".join(f"{figure} {np.mean([r[figure] for r in rows]):.3f} ({np.std([r[figure] for r in rows], ddof=1):.3f})"
                             for figure in FIGURES))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

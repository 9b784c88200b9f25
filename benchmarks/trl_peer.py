"""proximal against a peer, Hugging Face TRL, side by side: one task, one SFT model, one reward
model, the same number of sampled completions, one machine, interleaved rounds at each thread setting.

Optional, never needed by the package or the tests. TRL pulls in accelerate and datasets; keep
the project's torch by installing it into a venv that sees the system packages:

  python3 -m venv --system-site-packages /tmp/trlenv
  /tmp/trlenv/bin/pip install trl==1.16.0 torch==2.13.0 transformers==5.24.0
  /tmp/trlenv/bin/python benchmarks/trl_peer.py --run-dir RUN_DIR --out docs/lm_studies

RUN_DIR is a `proximal rlhf` run whose sft and reward stages have finished (`--stages reward`).
What runs, each from RUN_DIR's SFT model against RUN_DIR's reward model (fixed: no relabelling),
for --iterations x 256 completions at temperature 1, the same fixed beta, learning rate (constant),
clip range, gradient-norm clip and 2 passes of minibatch 128 over each batch of 256:

  proximal PPO     value head, GAE over tokens              proximal rlhf --stages ppo
  proximal RLOO    k = 4 responses per prompt               proximal rlhf --stages ppo --ppo.method rloo
  TRL RLOOTrainer  k = 4, the same reward (score - beta * sequence k1), advantages normalised

Every result is measured by proximal's own `evaluate_policy` (gold on the held-out prompts, KL to
the SFT model on held-out samples). TRL 1.16 has no PPO trainer (it was removed after 0.11).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proximal.lm.config import RLHFConfig  # noqa: E402
from proximal.lm.model import encode_completions, load_pretrained  # noqa: E402
from proximal.lm.pipeline import run_pipeline  # noqa: E402
from proximal.lm.reward import load_reward_model  # noqa: E402
from proximal.lm.stage import MODEL_DIR, open_context, read_summary  # noqa: E402
from proximal.lm.reward import scores_or_missing_eos  # noqa: E402


def proximal_run(run_dir: Path, work: Path, method: str, overrides: dict, threads: int) -> dict:
    """proximal's RL stage (`method`) in a copy of `run_dir`'s sft and reward stages."""
    target = work / f"proximal-{method}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for stage in ("sft", "reward"):
        shutil.copytree(run_dir / stage, target / stage)
    config = RLHFConfig.from_dict(json.loads((run_dir / "config.json").read_text())).with_overrides(
        {"ppo": {**overrides, "method": method}, "run": {"threads": threads}})
    started = time.perf_counter()
    run_pipeline(config, target, ("ppo",))
    summary = read_summary(target / "ppo")
    return {"eval": summary["eval"], "train_seconds": summary["seconds"],
            "total_seconds": time.perf_counter() - started}


def trl_rloo_run(run_dir: Path, work: Path, overrides: dict, iterations: int, threads: int) -> dict:
    from datasets import Dataset
    from tokenizers import processors
    from trl import RLOOConfig, RLOOTrainer

    config = RLHFConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    ctx = open_context(config, run_dir)
    reward_model = load_reward_model(ctx)
    started = time.perf_counter()
    model, tokenizer = load_pretrained(run_dir / "sft" / MODEL_DIR)
    reference, _ = load_pretrained(run_dir / "sft" / MODEL_DIR)
    # TRL tokenises the prompt text itself: make the tokenizer put BOS first, as proximal's batches do
    trl_tokenizer = load_pretrained(run_dir / "sft" / MODEL_DIR)[1]
    trl_tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", trl_tokenizer.bos_token_id)])
    trl_tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id

    @torch.no_grad()
    def reward(prompts, completions, completion_ids, **_):
        ended = [eos in ids for ids in completion_ids]
        texts = [tokenizer.decode([t for t in ids if t != eos]) for ids in completion_ids]
        batch = encode_completions(tokenizer, list(prompts), texts, ended, "cpu")
        return scores_or_missing_eos(reward_model, batch, config.ppo.missing_eos_score).tolist()

    args = RLOOConfig(
        output_dir=str(work / "trl-rloo"), per_device_train_batch_size=128, steps_per_generation=2,
        num_generations=4, num_iterations=2, max_steps=iterations * 4, max_completion_length=config.ppo.max_new_tokens,
        temperature=1.0, learning_rate=overrides["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        beta=overrides["kl_coef"], epsilon=config.ppo.clip_coef, normalize_advantages=True, max_grad_norm=1.0,
        weight_decay=0.0, logging_steps=20, save_strategy="no", report_to=[], use_cpu=True, seed=config.run.seed,
        disable_tqdm=True, dataloader_num_workers=0,
        # RLOOConfig 1.16 defaults to gradient checkpointing and bf16 autocast; on a CPU without bf16
        # instructions (this VM: AVX2 only) bf16 matmuls are emulated: 134 s of training, not 33. fp32, as proximal.
        gradient_checkpointing=False, bf16=False)
    torch.set_num_threads(threads)
    trainer = RLOOTrainer(model=model, reward_funcs=[reward], args=args, processing_class=trl_tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": ctx.data.rl}))
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    model = trainer.model.eval()
    final = ctx.evaluate(model, tokenizer, reference)
    return {"eval": final, "train_seconds": train_seconds, "total_seconds": time.perf_counter() - started}


def median_and_range(values: list[float], digits: int) -> str:
    """'median (min-max)' of a few measurements; the median alone where they agree."""
    if min(values) == max(values):
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summary_rows(runs: list[dict], header: str) -> list[str]:
    """One row per thread setting and trainer: medians and ranges over the repeats."""
    rows = [header, "", "| threads | trainer | runs | gold greedy | gold sampled | carry greedy | KL k1 | "
            "training s | total s |", "|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((run["threads"], run["trainer"]) for run in runs))
    for threads, trainer in sorted(keys, key=lambda key: (key[0], keys.index(key))):
        group = [run for run in runs if run["trainer"] == trainer and run["threads"] == threads]
        cells = [median_and_range([run["eval"][name] for run in group], 3)
                 for name in ("gold_greedy", "gold_sampled", "gold_carry_greedy")]
        cells.append(median_and_range([run["eval"]["kl_k1"] for run in group], 2))
        cells += [median_and_range([run[name] for run in group], 1) for name in ("train_seconds", "total_seconds")]
        rows.append(f"| {threads} | {trainer} | {len(group)} | {' | '.join(cells)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a proximal rlhf run with finished sft and reward")
    parser.add_argument("--iterations", type=int, default=150, help="batches of 256 completions (default: 150)")
    parser.add_argument("--kl-coef", type=float, default=0.3, help="fixed beta for all three (default: 0.3)")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="for all three (default: 2e-4)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread settings, each measured (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every trainer and setting (default: 3)")
    parser.add_argument("--only", nargs="+", default=["ppo", "rloo", "trl-rloo"], help="which to run")
    parser.add_argument("--out", type=Path, default=None, help="write trl_peer.json and trl_peer.md here")
    args = parser.parse_args()
    overrides = {"iterations": args.iterations, "relabel_every": 0, "adaptive_kl": False, "kl_coef": args.kl_coef,
                 "learning_rate": args.learning_rate}
    names = {"trl-rloo": "TRL 1.16 RLOOTrainer", "ppo": "proximal PPO", "rloo": "proximal RLOO"}
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        # interleaved: every round runs each trainer at each setting, the order rotated per round so
        # that no trainer always runs first (a warm cache) or last (a machine drifting busier)
        for repeat in range(args.repeats):
            order = args.only[repeat % len(args.only):] + args.only[:repeat % len(args.only)]
            for threads in args.threads:
                for name in order:
                    if name == "trl-rloo":
                        result = trl_rloo_run(args.run_dir, work, overrides, args.iterations, threads)
                    else:
                        result = proximal_run(args.run_dir, work, name, overrides, threads)
                    runs.append({"trainer": names[name], "threads": threads, "repeat": repeat, **result})
                    print(json.dumps(runs[-1]), flush=True)
    header = (f"{args.iterations} x 256 completions, beta {args.kl_coef:g} fixed, lr {args.learning_rate:g}; "
              f"{args.repeats} interleaved rounds; median (range) where the runs differ")
    rows = summary_rows(runs, header)
    print("\n".join(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trl_peer.json").write_text(json.dumps(runs, indent=2))
        (args.out / "trl_peer.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

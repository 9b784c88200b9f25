"""GRPO against GRPO: proximal's and TRL's GRPOTrainer at equal arguments, completions per second,
achieved GFLOP/s and peak resident memory, on a real model (SmolLM2-135M-Instruct, a GGUF file).

Optional, never needed by the package or the tests. TRL goes into a venv that keeps the
project's torch:

  python3 -m venv --system-site-packages /tmp/trlenv
  /tmp/trlenv/bin/pip install trl==1.16.0 torch==2.13.0 transformers==5.25.0
  /tmp/trlenv/bin/python benchmarks/grpo_speed.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out docs/lm_real_model

Both arms, from the same dequantised start model, on the sentiment task's prompts with VADER as
the reward function: every weight trains in fp32; k = 4 completions a prompt, 16 or 64 a step, 32
new tokens at temperature 1; lr 1e-5 (constant), beta 0.04 with the KL as k3 in the loss, one
optimizer step per batch (TRL's num_iterations 1), clip 0.2, TRL's default loss aggregation and
reward scaling mapped onto proximal's (`--ppo.loss-aggregation`, `--ppo.group-std`); a cut
completion is scored as it stands (TRL's way). Each arm runs in a process of its own (a clean
peak), after one step of warm-up, for --steps timed steps; the arms are interleaved within each of
--rounds rounds, and the median and range over rounds are reported.

FLOPs: a completion of ~67 tokens (prompt and response) costs ~90 GFLOP here, the convention of the
issue that asked for this page: sampling, the policy's forward pass, the reference's, and the
backward pass at twice a forward (2 x params per token each, 134.5M parameters); the matmul peak
is measured here on a [1024, 576] x [576, 1536] product, SmolLM2's MLP shape, on the same threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proximal.lm.config import RLHFConfig  # noqa: E402
from proximal.lm.memory import peak_gb, reset_peak  # noqa: E402
from proximal.lm.loading import load_pretrained, save_pretrained, trainable_parameters  # noqa: E402
from proximal.lm.model import ScalarHeadLM  # noqa: E402
from proximal.lm.stage import open_context  # noqa: E402
from proximal.lm.tasks import vader_scores  # noqa: E402

GROUP, NEW_TOKENS, LEARNING_RATE, BETA = 4, 32, 1e-5, 0.04
GFLOP_PER_COMPLETION = 90.0
TRL_AGGREGATION = {"grpo": "sequence", "dr_grpo": "constant", "dapo": "token", "bnpo": "token"}


def trl_defaults() -> tuple[str, bool]:
    """(loss aggregation, group std) of TRL's GRPOConfig defaults, in proximal's terms."""
    from trl import GRPOConfig

    fields = GRPOConfig.__dataclass_fields__
    loss_type, scale = fields["loss_type"].default, fields["scale_rewards"].default
    if loss_type not in TRL_AGGREGATION or scale not in ("group", True, "none", False):
        raise SystemExit(f"TRL's defaults loss_type={loss_type!r}, scale_rewards={scale!r} have no proximal twin")
    return TRL_AGGREGATION[loss_type], scale in ("group", True)


def prompts(model_dir: Path, count: int) -> list[str]:
    config = RLHFConfig.for_task("sentiment", {"model": {"path": str(model_dir)}})
    return open_context(config, None).data.rl[:count]


def proximal_arm(model_dir: Path, size: int, steps: int, threads: int, aggregation: str, group_std: bool) -> dict:
    from proximal.lm.ppo import ppo_iteration
    from proximal.lm.reward_function import RewardFunction

    torch.set_num_threads(threads)
    reset_peak()
    policy_lm, tokenizer = load_pretrained(model_dir)
    reference, _ = load_pretrained(model_dir)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    config = RLHFConfig.for_task("sentiment", {"ppo": {
        "method": "grpo", "rloo_samples": GROUP, "prompts_per_iteration": size, "minibatch_size": size, "epochs": 1,
        "max_new_tokens": NEW_TOKENS, "learning_rate": LEARNING_RATE, "kl_coef": BETA, "kl_in": "loss",
        "loss_aggregation": aggregation, "group_std": group_std, "score_cut_responses": True}}).ppo
    policy = ScalarHeadLM(policy_lm)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=LEARNING_RATE, weight_decay=0.0)
    scorer = RewardFunction("proximal.lm.tasks:vader_scores", config.cut_response_score)
    generator = torch.Generator().manual_seed(0)
    pool = prompts(model_dir, (steps + 1) * size)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        ppo_iteration(policy, reference, scorer, tokenizer, optimizer, pool[step * size:(step + 1) * size], config,
                      BETA, generator, "cpu")
        times.append(time.perf_counter() - started)
    return {"step_seconds": times[1:], "peak_gb": peak_gb()}


def trl_arm(model_dir: Path, size: int, steps: int, threads: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    reset_peak()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stamps = []

    class Stamps(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            stamps.append(time.perf_counter()) if not stamps else None

        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    def reward(prompts, completions, **kwargs):
        return [float(score) for score in vader_scores(prompts, completions)]

    with tempfile.TemporaryDirectory() as scratch:
        args = GRPOConfig(
            output_dir=scratch, per_device_train_batch_size=size, num_generations=GROUP, max_steps=steps + 1,
            max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant", beta=BETA, epsilon=0.2, num_iterations=1, gradient_accumulation_steps=1,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
            dataloader_num_workers=0,
            gradient_checkpointing=False, bf16=False)  # fp32 without checkpointing, as proximal runs
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts(model_dir, (steps + 1) * size)}),
                              callbacks=[Stamps()])
        trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"step_seconds": times[1:], "peak_gb": peak_gb()}


def matmul_peak(threads: int, repeats: int = 50) -> float:
    """GFLOP/s of a [1024, 576] x [576, 1536] fp32 product on `threads` threads, the best of 3."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * 1024 * 576 * 1536 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def run_arm(arm: str, model_dir: Path, size: int, steps: int, threads: int) -> dict:
    """One arm in a fresh process: its own peak memory, no allocator state from another arm."""
    output = subprocess.run([sys.executable, __file__, "--arm", arm, "--model-dir", str(model_dir), "--size",
                             str(size), "--steps", str(steps), "--threads", str(threads)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file or a Hugging Face directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64], help="completions a step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps an arm, after one of warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=["proximal", "trl"], choices=["proximal", "trl"])
    parser.add_argument("--out", type=Path, help="a folder for grpo_speed.json and grpo_speed.md")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm == "proximal":
        aggregation, group_std = trl_defaults()
        print(json.dumps(proximal_arm(args.model_dir, args.size, args.steps, args.threads, aggregation, group_std)))
        return
    if args.arm == "trl":
        print(json.dumps(trl_arm(args.model_dir, args.size, args.steps, args.threads)))
        return
    aggregation, group_std = trl_defaults()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "start"
        model, tokenizer = load_pretrained(args.model)
        save_pretrained(model, tokenizer, model_dir)
        del model
        peak = matmul_peak(args.threads)
        runs = {f"{arm}@{size}": [] for size in args.sizes for arm in args.arms}
        for round_ in range(args.rounds):
            for size in args.sizes:
                for arm in args.arms:
                    result = run_arm(arm, model_dir, size, args.steps, args.threads)
                    result["completions_per_second"] = size * len(result["step_seconds"]) / sum(result["step_seconds"])
                    runs[f"{arm}@{size}"].append(result)
                    print(f"round {round_ + 1} {arm}@{size}: {result['completions_per_second']:.3f} completions/s, "
                          f"peak {result['peak_gb']:.2f} GB", flush=True)
    rows = ["| arm | completions a step | completions/s, median (range) | GFLOP/s | share of the matmul peak | "
            "peak GB, median |", "|---|---|---|---|---|---|"]
    for name, results in runs.items():
        rates = [result["completions_per_second"] for result in results]
        median = statistics.median(rates)
        arm, size = name.split("@")
        rows.append(f"| {arm} | {size} | {median:.3f} ({min(rates):.3f}-{max(rates):.3f}) | "
                    f"{median * GFLOP_PER_COMPLETION:.0f} | {median * GFLOP_PER_COMPLETION / peak:.0%} | "
                    f"{statistics.median(r['peak_gb'] for r in results):.2f} |")
    summary = {"matmul_peak_gflops": peak, "aggregation": aggregation, "group_std": group_std, "runs": runs,
               "rounds": args.rounds, "steps": args.steps, "threads": args.threads}
    text = "\n".join([f"matmul peak {peak:.0f} GFLOP/s ({args.threads} threads); TRL's loss aggregation as "
                      f"proximal's {aggregation!r}, group std {group_std}", "", *rows])
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "grpo_speed.json").write_text(json.dumps(summary, indent=2))
        (args.out / "grpo_speed.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

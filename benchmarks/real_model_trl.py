"""proximal against TRL on a real pretrained chat model, side by side in one script: SmolLM2-135M-
Instruct (a GGUF file), the sentiment task's prompts, VADER's compound score as the reward function
for both, the same completion length and temperature, one machine, one run after another.

Optional, never needed by the package or the tests (TRL pulls in datasets; see trl_peer.py for a
venv that keeps the project's torch). Usage:

  python3 benchmarks/real_model_trl.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out docs/lm_real_model

What runs, each from the same dequantised start model (converted once into the scratch folder):

  TRL 1.16 GRPOTrainer   every weight trains; 4 prompts x 4 completions per step, lr 1e-5, beta 0.04
                         (the anchor of docs/lm_real_model.md)
  proximal RLOO (LoRA)   `proximal rlhf sentiment --reward.function proximal.lm.tasks:vader_scores`
                         with the task's first preset (LoRA r16 on the top 10 blocks, k = 4, 32
                         completions a step, lr 2e-4, beta 0.05), the function as the reward
  proximal RLOO (full)   the same with TRL's arguments where proximal has them: every weight trains,
                         4 prompts x 4 completions per iteration, lr 1e-5, beta 0.04 (on proximal's
                         per-token k1 in the reward, not GRPO's k3 in the loss), one step per batch:
                         what is left between it and TRL is the library (and GRPO against RLOO)
  proximal RLOO (tuned)  the same at proximal's own learning rate, 2e-5 (chosen on seed 0), evaluated
                         every 2 iterations

All are measured by proximal's `evaluate_policy` on the same 32 held-out prompts (greedy and one
sample per prompt at temperature 1; VADER of the text; KL to the start model on the samples).
proximal evaluates every --eval-every iterations, so its metrics.csv says when (seconds of
training, its evaluations' seconds taken out) it first reached TRL's final held-out sampled VADER.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proximal.lm.config import RLHFConfig  # noqa: E402
from proximal.lm.model import load_pretrained  # noqa: E402
from proximal.lm.pipeline import run_pipeline  # noqa: E402
from proximal.lm.stage import MODEL_DIR, START_DIR, open_context, read_summary  # noqa: E402
from proximal.lm.tasks import vader_scores  # noqa: E402

FUNCTION = "proximal.lm.tasks:vader_scores"
ARMS = ("lora", "full", "tuned", "trl")


# TRL GRPO's arguments (the anchor's), and proximal RLOO given the same where proximal has them
TRL_GRPO = {"completions_per_step": 16, "generations": 4, "learning_rate": 1e-5, "beta": 0.04}
TRL_MATCHED = {"model": {"lora_rank": 0, "lora_layers": 0},
               "ppo": {"prompts_per_iteration": TRL_GRPO["completions_per_step"],
                       "rloo_samples": TRL_GRPO["generations"], "minibatch_size": TRL_GRPO["completions_per_step"],
                       "epochs": 1,
                       "learning_rate": TRL_GRPO["learning_rate"], "kl_coef": TRL_GRPO["beta"]}}
# The sentiment task's first preset (LoRA rank 16 on the top 10 blocks, 32 completions a step, lr 2e-4)
LORA = {"model": {"lora_rank": 16, "lora_layers": 10},
        "ppo": {"prompts_per_iteration": 32, "minibatch_size": 32, "learning_rate": 2e-4, "kl_coef": 0.05}}
# The same with proximal's own learning rate, chosen on seed 0 (the tuning seed): 2e-5 had reached a held-out
# sampled VADER of 0.458 after 8 iterations where 1e-5 had 0.354 after 10
TUNED = {"model": TRL_MATCHED["model"], "ppo": {**TRL_MATCHED["ppo"], "learning_rate": 2e-5}}


def sentiment_config(model: str, seed: int, threads: int, overrides: dict, model_overrides: dict | None = None
                     ) -> RLHFConfig:
    return RLHFConfig.for_task("sentiment").with_overrides(
        {"model": {"path": model, **(model_overrides or {})},
         "reward": {"function": FUNCTION, "function_role": "reward"},
         "run": {"seed": seed, "threads": threads},
         "ppo": {"kl_budget": 0.0, **overrides}})  # every arm runs all its iterations, as TRL's does


def proximal_run(model: str, work: Path, seed: int, threads: int, overrides: dict, model_overrides: dict | None,
                 name: str) -> dict:
    run_dir = work / name
    shutil.copytree(work / "proximal" / START_DIR, run_dir / START_DIR)  # dequantised once, by start_model_eval
    config = sentiment_config(model, seed, threads, overrides, model_overrides)
    started = time.perf_counter()
    run_pipeline(config, run_dir, ("ppo",))
    summary = read_summary(run_dir / "ppo")
    with open(run_dir / "ppo" / "metrics.csv") as handle:
        curve = [{key: float(value) for key, value in row.items() if value not in ("", None)}
                 for row in csv.DictReader(handle)]
    return {"eval": summary["eval"], "train_seconds": summary["seconds"],
            "total_seconds": time.perf_counter() - started, "curve": curve, "run_dir": str(run_dir),
            "completions": summary["iterations"] * config.ppo.prompts_per_iteration}


def start_model_eval(model: str, work: Path, seed: int, threads: int) -> dict:
    """The start model on the same held-out prompts: the 'before' of both."""
    ctx = open_context(sentiment_config(model, seed, threads, {}), work / "proximal")
    ctx.prepare_start_model()
    start, tokenizer = load_pretrained(work / "proximal" / START_DIR / MODEL_DIR)
    started = time.perf_counter()
    final = ctx.evaluate(start, tokenizer, start)
    return {"eval": final, "train_seconds": 0.0, "total_seconds": time.perf_counter() - started, "completions": 0}


def trl_grpo_run(model: str, work: Path, seed: int, threads: int, steps: int) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = sentiment_config(model, seed, threads, {})
    ctx = open_context(config, work / "proximal")  # the same prompts, held-out prompts and start model
    start_dir = work / "proximal" / START_DIR / MODEL_DIR
    started = time.perf_counter()
    policy, tokenizer = load_pretrained(start_dir)
    reference, _ = load_pretrained(start_dir)

    def reward(prompts, completions, **_):
        return vader_scores(prompts, completions)

    args = GRPOConfig(
        output_dir=str(work / "trl-grpo"), per_device_train_batch_size=TRL_GRPO["completions_per_step"],
        num_generations=TRL_GRPO["generations"], max_steps=steps, max_completion_length=config.ppo.max_new_tokens,
        temperature=1.0, learning_rate=TRL_GRPO["learning_rate"], beta=TRL_GRPO["beta"],
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
        dataloader_num_workers=0,
        # GRPOConfig 1.16 defaults to gradient checkpointing and bf16 autocast; on a CPU without bf16
        # instructions (this VM: AVX2 only) bf16 matmuls are emulated, ~13x slower per step. fp32, as proximal.
        gradient_checkpointing=False, bf16=False)
    torch.set_num_threads(threads)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": ctx.data.rl}))
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    final = ctx.evaluate(trainer.model.eval(), tokenizer, reference)
    return {"eval": final, "train_seconds": train_seconds, "total_seconds": time.perf_counter() - started,
            "completions": steps * TRL_GRPO["completions_per_step"]}


def training_seconds(row: dict) -> float:
    """Seconds of a metrics.csv row's training: its wall time less its held-out evaluations (TRL's
    training time has none)."""
    return row["wall_seconds"] - row.get("eval_seconds", 0.0)


def summary_rows(results: dict, seed: int, threads: int) -> list[str]:
    """The table of every arm, then when each proximal arm first reached TRL's final sampled VADER."""
    rows = [f"seed {seed}, {threads} threads, 32 new tokens at temperature 1, VADER compound as the reward", "",
            "| trainer | completions | held-out VADER greedy | sampled | KL k1 | EOS rate | training s | "
            "held-out evaluations during training s | total s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        e = result["eval"]
        evaluations = result["curve"][-1].get("eval_seconds", 0.0) if "curve" in result else 0.0
        rows.append(f"| {name} | {result['completions']} | {e['gold_greedy']:.3f} | {e['gold_sampled']:.3f} | "
                    f"{e['kl_k1']:.2f} | {e['eos_rate']:.2f} | {result['train_seconds'] - evaluations:.0f} | "
                    f"{evaluations:.0f} | {result['total_seconds']:.0f} |")
    if "TRL 1.16 GRPOTrainer" not in results:
        return rows
    target = results["TRL 1.16 GRPOTrainer"]["eval"]["gold_sampled"]
    rows.append("")
    for name, result in results.items():
        if "curve" not in result:
            continue
        reached = next((row for row in result["curve"] if row.get("eval_gold_sampled", -2) >= target), None)
        rows.append(f"{name} first reached TRL's final held-out sampled VADER ({target:.3f}) "
                    + (f"at iteration {reached['iteration']:.0f}, {training_seconds(reached):.0f} s of training "
                       f"({reached['wall_seconds']:.0f} s with its evaluations)" if reached else "at no evaluation")
                    + "  ")
    return rows


def plot_race(results: dict, seed: int, path: Path) -> None:
    """Held-out sampled VADER against seconds of training (evaluations out): each proximal arm's
    evaluations as a curve, TRL's final evaluation as a point, the start model at 0."""
    from proximal.plots import plt

    figure, axis = plt.subplots(figsize=(7, 4))
    start = results["start model"]["eval"]["gold_sampled"]
    for name, result in results.items():
        if "curve" in result:
            points = [(training_seconds(row), row["eval_gold_sampled"]) for row in result["curve"]
                      if "eval_gold_sampled" in row]
            axis.plot([0] + [x for x, _ in points], [start] + [y for _, y in points], marker="o", label=name)
        elif name != "start model":
            axis.plot([0, result["train_seconds"]], [start, result["eval"]["gold_sampled"]], "--", marker="s",
                      label=f"{name} (start and end)")
    if "TRL 1.16 GRPOTrainer" in results:
        trl = results["TRL 1.16 GRPOTrainer"]
        axis.axhline(trl["eval"]["gold_sampled"], color="grey", linewidth=0.8)
        axis.axvline(trl["train_seconds"] / 2, color="grey", linewidth=0.8, linestyle=":",
                     label="half of TRL's training time")
    axis.set(xlabel="seconds of training (held-out evaluations taken out)", ylabel="held-out VADER, sampled",
             title=f"SmolLM2-135M-Instruct, VADER as the reward, seed {seed}, this 2-core CPU")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (docs/lm_real_model.md)")
    parser.add_argument("--seed", type=int, default=100, help="the sentiment task's seed (default: 100, held out)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--trl-steps", type=int, default=29, help="GRPO steps of 16 completions (default: 29)")
    parser.add_argument("--iterations", type=int, default=20, help="proximal RLOO iterations (default: 20)")
    parser.add_argument("--eval-every", type=int, default=5, help="proximal's evaluation interval (default: 5)")
    parser.add_argument("--full-iterations", type=int, default=29,
                        help="proximal RLOO (full) iterations of 16 completions (default: 29, TRL's steps)")
    parser.add_argument("--tuned-iterations", type=int, default=16,
                        help="proximal RLOO (full, lr 2e-5) iterations of 16 completions (default: 16)")
    parser.add_argument("--tuned-eval-every", type=int, default=2,
                        help="its evaluation interval (default: 2: when it first reaches TRL's VADER)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="which to run after the start model (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write real_model_trl.json and .md here")
    args = parser.parse_args()
    arms = {
        "lora": ("proximal RLOO (LoRA)", lambda work: proximal_run(
            args.model, work, args.seed, args.threads,
            {**LORA["ppo"], "iterations": args.iterations, "eval_every": args.eval_every}, LORA["model"],
            name="proximal-lora")),
        "full": ("proximal RLOO (full, TRL's arguments)", lambda work: proximal_run(
            args.model, work, args.seed, args.threads,
            {**TRL_MATCHED["ppo"], "iterations": args.full_iterations, "eval_every": args.eval_every},
            TRL_MATCHED["model"], name="proximal-full")),
        "tuned": ("proximal RLOO (full, lr 2e-5)", lambda work: proximal_run(
            args.model, work, args.seed, args.threads,
            {**TUNED["ppo"], "iterations": args.tuned_iterations, "eval_every": args.tuned_eval_every},
            TUNED["model"], name="proximal-tuned")),
        "trl": ("TRL 1.16 GRPOTrainer", lambda work: trl_grpo_run(args.model, work, args.seed, args.threads,
                                                                   args.trl_steps)),
    }
    results = {}

    def save() -> None:  # after every arm: a crash keeps what was measured
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "real_model_trl.json").write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        results["start model"] = start_model_eval(args.model, work, args.seed, args.threads)  # converts the GGUF once
        print("start", json.dumps(results["start model"]["eval"]), flush=True)
        for arm in args.arms:
            name, run = arms[arm]
            results[name] = run(work)
            print(name, json.dumps(results[name]["eval"]), flush=True)
            save()
    rows = summary_rows(results, args.seed, args.threads)
    print("\n".join(rows))
    if args.out is not None:
        (args.out / "real_model_trl.md").write_text("\n".join(rows) + "\n")
        plot_race(results, args.seed, args.out / "real_model_trl.png")


if __name__ == "__main__":
    main()

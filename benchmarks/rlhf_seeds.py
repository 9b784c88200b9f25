"""`proximal rlhf` on several seeds, one after the other: the per-seed table (SFT vs RLHF) and
curves of reward-model score, gold reward and KL over PPO iterations, all seeds in one figure.

    python3 benchmarks/rlhf_seeds.py --seeds 100 101 102 --out docs/lm_rlhf     # the reported seeds
    python3 benchmarks/rlhf_seeds.py --seeds 0 --out /tmp/tune -- --ppo.kl-target 1.0   # flags after --

Each seed is a fresh process (`proximal rlhf --seed S`, defaults unless flags are passed after
--), timed from start to exit. Writes RUN table rows to OUT/table.md, OUT/results.json and the
figure OUT/curves.png. Gap closed = (gold_rlhf - gold_sft) / (1 - gold_sft).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from proximal.run import read_csv_rows  # noqa: E402


def run_seed(seed: int, runs_dir: Path, extra: list[str]) -> dict:
    run_dir = runs_dir / f"seed{seed}"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "proximal", "rlhf", "--seed", str(seed), "--run-dir", str(run_dir), *extra],
                   check=True)
    seconds = time.perf_counter() - started
    sft, reward, ppo = (json.loads((run_dir / stage / "summary.json").read_text()) for stage in ("sft", "reward", "ppo"))
    last_rows = [row for row in read_csv_rows(run_dir / "ppo" / "metrics.csv")][-10:]
    mean = lambda key: sum(row[key] for row in last_rows) / len(last_rows)  # noqa: E731
    return {"seed": seed, "run_dir": str(run_dir), "wall_seconds": seconds, "sft": sft["eval"], "ppo": ppo["eval"],
            "reward_accuracy": reward["validation"]["accuracy"], "labels": ppo["labels"],
            "kl_k1": mean("kl_k1"), "kl_k3": mean("kl_k3"), "score": mean("score"),
            "stage_seconds": {"sft": sft["seconds"], "reward": reward["seconds"], "ppo": ppo["seconds"]}}


def gap_closed(before: float, after: float) -> float:
    return (after - before) / (1.0 - before) if before < 1.0 else float("nan")


def table(results: list[dict]) -> str:
    lines = ["| seed | policy | gold greedy (carry) | gold sampled (carry) | gap closed greedy / sampled | "
             "RM score | KL k1 / k3 (nats) | length | EOS rate | RM held-out acc. | labels | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        sft, ppo = r["sft"], r["ppo"]
        lines.append(f"| {r['seed']} | SFT | {sft['gold_greedy']:.3f} ({sft['gold_carry_greedy']:.3f}) | "
                     f"{sft['gold_sampled']:.3f} ({sft['gold_carry_sampled']:.3f}) | | 0 (by construction) | 0 | "
                     f"{sft['response_length']:.2f} | {sft['eos_rate']:.3f} | | | |")
        lines.append(f"| {r['seed']} | RLHF | {ppo['gold_greedy']:.3f} ({ppo['gold_carry_greedy']:.3f}) | "
                     f"{ppo['gold_sampled']:.3f} ({ppo['gold_carry_sampled']:.3f}) | "
                     f"{gap_closed(sft['gold_greedy'], ppo['gold_greedy']):.0%} / "
                     f"{gap_closed(sft['gold_sampled'], ppo['gold_sampled']):.0%} | {r['score']:.2f} | "
                     f"{r['kl_k1']:.2f} / {r['kl_k3']:.2f} | {ppo['response_length']:.2f} | {ppo['eos_rate']:.3f} | "
                     f"{r['reward_accuracy']:.3f} | {r['labels']:,} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> None:
    panels = [("reward-model score (rollouts)", "score"), ("gold reward, held-out, greedy", "eval_gold_greedy"),
              ("gold reward, held-out, sampled", "eval_gold_sampled"), ("KL(pi || SFT) per response, k1", "kl_k1"),
              ("RM accuracy on fresh policy-sample labels", "rm_policy_accuracy"),
              ("labeller's win rate, policy vs SFT", "win_rate")]
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for r in results:
        rows = read_csv_rows(Path(r["run_dir"]) / "ppo" / "metrics.csv")
        for axis, (title, key) in zip(axes.flat, panels):
            points = [(row["iteration"], row[key]) for row in rows if row.get(key) is not None]
            axis.plot(*zip(*points), label=f"seed {r['seed']}", marker="o" if len(points) < 30 else None, markersize=3)
            axis.set_title(title, fontsize=10)
    for axis, (_, key) in zip(axes.flat, panels):
        if key.startswith("eval_gold"):
            for r in results:
                axis.axhline(r["sft"][key.removeprefix("eval_")], linestyle=":", color="gray", linewidth=1)
        axis.set_xlabel("PPO iteration")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle("proximal rlhf (addition, carry-dropping demonstrations); dotted: the SFT policy", fontsize=11)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/rlhf_seeds"))
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args.runs_dir, extra))
        print(f"seed {seed}: {results[-1]['wall_seconds']:.0f} s, gold greedy {results[-1]['sft']['gold_greedy']:.3f} "
              f"-> {results[-1]['ppo']['gold_greedy']:.3f}, sampled {results[-1]['sft']['gold_sampled']:.3f} -> "
              f"{results[-1]['ppo']['gold_sampled']:.3f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(table(results))
    plot(results, args.out / "curves.png")
    print(table(results))


if __name__ == "__main__":
    main()

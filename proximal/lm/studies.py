"""The studies a learner reruns on the LM pipeline, with the gold reward as the truth:
`proximal study NAME`, one command per study, resumable (a rerun skips finished variants).

  overoptimisation  reward models from few and from many labels; PPO at fixed betas, 0 included;
                    gold and proxy reward against d = sqrt(KL) along training, and Gao et al.'s
                    R(d) = d (alpha - b log d) fitted to the gold points (2023, Figure 1)
  best-of-n         the same two reward models, n = 1 ... 64, KL exact (best_of_n.py) beside
                    the analytic log n - (n - 1) / n
  methods           PPO, RLOO (critic-free) and DPO from one SFT model and one set of pairs:
                    gold against KL, and wall time
  label-noise       the labeller answers by a coin flip 0%, 10%, 25% of the time: reward-model
                    accuracy and final gold after the whole pipeline

How the data flows: every variant is an ordinary `proximal rlhf` run directory inside STUDY_DIR,
made by `run_pipeline` with a few overrides of the study's base config; the stages a variant
shares with another (SFT; a reward model) are copied from the run that made them, never retrained.
Each study then reads the variants' summary.json and metrics.csv and writes NAME.png, NAME.md
(a table) and NAME.json into the output folder.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proximal.lm.config import RLHFConfig, StudyConfig
from proximal.lm.pipeline import run_pipeline
from proximal.lm.stage import MODEL_DIR, is_finished, open_context, read_summary
from proximal.run import locked_run_dir, read_csv_rows, save_figure_atomic, write_json_atomic, write_text_atomic


def reward_settings(labels: int, noise: float = 0.0) -> dict[str, Any]:
    """The reward section's overrides of a reward model from `labels` labels at coin-flip rate `noise`."""
    if not noise:
        return {"labels": labels}
    return {"labels": labels, "labeller_noise": "uniform", "labeller_error_rate": noise}


@dataclass
class Study:
    """One study directory of pipeline runs, and the folder its figure and table go to."""

    config: StudyConfig
    study_dir: Path
    out_dir: Path
    report: Any = None  # report(line): progress lines for the terminal
    pipeline: RLHFConfig = field(default_factory=RLHFConfig)  # every variant's config before its overrides

    def __post_init__(self) -> None:
        self.base = self.pipeline.with_overrides({"run": {"seed": self.config.seed, "threads": self.config.threads,
                                                          "runs_dir": str(self.study_dir)}})

    def _say(self, line: str) -> None:
        if self.report is not None:
            self.report(line)

    def run(self, name: str, overrides: dict[str, dict[str, Any]], stage: str,
            copy_from: dict[str, str] | None = None) -> Path:
        """Variant `name`: `stage` of the base config with `overrides`, after copying the finished
        stages in `copy_from` ({stage: variant}) from the variants that made them."""
        run_dir = self.study_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        for shared, source in (copy_from or {}).items():
            if not (run_dir / shared).exists():
                shutil.copytree(self.study_dir / source / shared, run_dir / shared)
        if not is_finished(run_dir / stage):
            self._say(f"{name}: {stage} ...")
        run_pipeline(self.base.with_overrides(overrides), run_dir, (stage,))
        return run_dir

    def sft(self) -> str:
        self.run("sft", {}, "sft")
        return "sft"

    def reward_model(self, labels: int, noise: float = 0.0) -> str:
        """The variant holding a reward model from `labels` labels at coin-flip rate `noise`."""
        name = f"rm-{labels}" + (f"-noise-{noise:g}" if noise else "")
        self.run(name, {"reward": reward_settings(labels, noise)}, "reward", {"sft": self.sft()})
        return name

    def write(self, name: str, figure, table: str, results: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_figure_atomic(figure, self.out_dir / f"{name}.png")
        import matplotlib.pyplot as plt

        plt.close(figure)
        write_text_atomic(self.out_dir / f"{name}.md", table)
        write_json_atomic(self.out_dir / f"{name}.json", results)
        self._say(f"wrote {self.out_dir / name}.png, .md, .json")


MARKERS = "osD^v<>p"  # one per reward model, in figures that overlay them


# -- reading a run -----------------------------------------------------------------------------------

def trajectory(run_dir: Path, window: int = 10) -> list[dict[str, float]]:
    """The RL stage's held-out evaluations (every eval_every iterations): gold (sampled), KL (k1,
    held-out samples) and the proxy score (the reward model's, averaged over the `window`
    training iterations up to the evaluation), starting from the SFT model's own evaluation."""
    rows = read_csv_rows(run_dir / "ppo" / "metrics.csv")
    sft = read_summary(run_dir / "sft")["eval"]
    points = [{"iteration": 0, "gold": sft["gold_sampled"], "gold_greedy": sft["gold_greedy"], "kl": 0.0,
               "score": float(np.mean([row["score"] for row in rows[:1]]))}]
    for index, row in enumerate(rows):
        if row.get("eval_gold_sampled") is None:
            continue
        recent = rows[max(0, index - window + 1): index + 1]
        points.append({"iteration": row["iteration"], "gold": row["eval_gold_sampled"],
                       "gold_greedy": row["eval_gold_greedy"], "kl": max(0.0, row["eval_kl_k1"]),
                       "score": float(np.mean([r["score"] for r in recent])), "seconds": row["wall_seconds"]})
    return points


def training_curve(run_dir: Path, block: int = 5) -> list[dict[str, float]]:
    """The RL stage's on-policy samples, iteration by iteration, averaged over blocks of `block`
    iterations: gold and proxy score of the 256 training samples, and their KL (k1) to the SFT
    model. Finer than the held-out evaluations, which at a small beta come after the policy has
    already moved a long way (KL 1.7 nats by iteration 10)."""
    rows = read_csv_rows(run_dir / "ppo" / "metrics.csv")
    points = []
    for start in range(0, len(rows), block):
        part = rows[start:start + block]
        points.append({"iteration": part[-1]["iteration"], "gold": float(np.mean([r["gold"] for r in part])),
                       "kl": max(0.0, float(np.mean([r["kl_k1"] for r in part]))),
                       "score": float(np.mean([r["score"] for r in part]))})
    return points


def fit_gao(d: np.ndarray, gain: np.ndarray) -> tuple[float, float]:
    """Least squares (alpha, b) of gain = d (alpha - b log d), Gao et al. 2023's form for RL
    (linear in alpha and b); points at d = 0 carry no information and are dropped."""
    keep = d > 0
    design = np.stack([d[keep], -d[keep] * np.log(d[keep])], axis=1)
    (alpha, b), *_ = np.linalg.lstsq(design, gain[keep], rcond=None)
    return float(alpha), float(b)


def gao_peak(alpha: float, b: float) -> float:
    """d* = exp(alpha / b - 1), where d (alpha - b log d) peaks (b > 0), else inf."""
    return math.exp(alpha / b - 1.0) if b > 0 else math.inf


# -- the studies ---------------------------------------------------------------------------------------

def overoptimisation(study: Study) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    config = study.config
    results: dict[str, Any] = {"budgets": {}}
    budgets = sorted(config.label_budgets)
    figure, axes = plt.subplots(1, len(budgets) + 1, figsize=(5 * (len(budgets) + 1), 4.2), squeeze=False)
    axes = axes[0]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(config.betas)))
    rows = ["| labels | RM held-out acc. | beta | peak gold (at d) | final: KL | gold | proxy score | "
            "held-out gold sampled / greedy |", "|---|---|---|---|---|---|---|---|"]
    for panel, labels in enumerate(budgets):
        rm = study.reward_model(labels)
        validation = read_summary(study.study_dir / rm / "reward")["validation"] or {}
        budget: dict[str, Any] = {"validation": validation, "runs": {}}
        all_d, all_gain = [], []
        sft_gold = None
        for color, beta in zip(colors, config.betas):
            run_dir = study.run(f"{rm}-beta-{beta:g}", {
                "reward": reward_settings(labels),
                "ppo": {"kl_coef": beta, "adaptive_kl": False, "relabel_every": 0, "iterations": config.iterations}},
                "ppo", {"sft": "sft", "reward": rm})
            points = training_curve(run_dir)
            sft_gold = read_summary(study.study_dir / "sft" / "sft")["eval"]["gold_sampled"]
            d = np.sqrt([p["kl"] for p in points])
            gold = np.array([p["gold"] for p in points])
            score = np.array([p["score"] for p in points])
            all_d.extend(d)
            all_gain.extend(gold - sft_gold)
            axes[panel].plot(d, gold, "o-", color=color, markersize=3, label=f"beta {beta:g}")
            axes[-1].plot(d, score, MARKERS[panel % len(MARKERS)] + "-", color=color, markersize=3,
                          label=f"{labels:,} labels, beta {beta:g}")
            peak = int(np.argmax(gold))
            budget["runs"][f"{beta:g}"] = {"points": points}
            final = read_summary(run_dir / "ppo")["eval"]
            budget["runs"][f"{beta:g}"]["eval"] = final
            rows.append(f"| {labels:,} | {validation.get('accuracy', math.nan):.3f} | {beta:g} | "
                        f"{gold[peak]:.3f} (d={d[peak]:.2f}) | {points[-1]['kl']:.2f} | {points[-1]['gold']:.3f} | "
                        f"{points[-1]['score']:.2f} | {final['gold_sampled']:.3f} / {final['gold_greedy']:.3f} |")
        alpha, b = fit_gao(np.array(all_d), np.array(all_gain))
        budget["fit"] = {"alpha": alpha, "b": b, "peak_d": gao_peak(alpha, b), "sft_gold": sft_gold}
        grid = np.linspace(1e-3, max(all_d), 200)
        axes[panel].plot(grid, sft_gold + grid * (alpha - b * np.log(grid)), "k:", lw=2,
                         label=f"fit: d({alpha:.2f} - {b:.2f} log d)")
        axes[panel].axhline(sft_gold, color="grey", lw=1, ls="--", label="SFT (held-out)")
        axes[panel].set_title(f"gold: RM from {labels:,} labels (held-out acc. "
                              f"{validation.get('accuracy', math.nan):.2f})", fontsize=10)
        axes[panel].set_ylabel("gold reward of the policy's samples")
        results["budgets"][str(labels)] = budget
    for axis in axes:
        axis.set_xlabel("d = sqrt(KL(pi || SFT))  [sqrt(nats)]")
        axis.grid(alpha=0.3)
    for axis in axes[:-1]:
        axis.legend(fontsize=7)
    axes[-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1.0), loc="upper left")
    axes[-1].set_title("proxy: reward-model score (training samples)", fontsize=10)
    figure.tight_layout()
    fits = [f"- {labels} labels: gold gain = d ({budget['fit']['alpha']:.3f} - {budget['fit']['b']:.3f} log d), "
            f"peak at d* = {budget['fit']['peak_d']:.2f} (KL {budget['fit']['peak_d'] ** 2:.2f} nats)"
            for labels, budget in results["budgets"].items()]
    study.write("overoptimisation", figure, "\n".join(rows + [""] + fits) + "\n", results)
    return results


def best_of_n(study: Study) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    from proximal.lm.best_of_n import best_of_n_curve, response_support
    from proximal.lm.loading import load_pretrained
    from proximal.lm.reward import load_reward_model

    config = study.config
    results: dict[str, Any] = {}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = ["| labels | n | gold (exact) | proxy score | KL exact | KL bound log n - (n-1)/n |",
            "|---|---|---|---|---|---|"]
    for index, labels in enumerate(sorted(config.label_budgets)):
        marker = MARKERS[index % len(MARKERS)] + "-"
        rm = study.reward_model(labels)
        run_config = study.base.with_overrides({"reward": reward_settings(labels)})
        ctx = open_context(run_config, study.study_dir / rm)
        reference, tokenizer = load_pretrained(ctx.stage_dir("sft") / MODEL_DIR, run_config.run.device)
        supports = response_support(reference, load_reward_model(ctx), tokenizer, ctx.gold,
                                    ctx.data.evaluation[:config.best_of_n_prompts], config.best_of_n_samples,
                                    run_config.ppo.max_new_tokens, run_config.ppo.cut_response_score,
                                    torch.Generator().manual_seed(config.seed), run_config.run.device)
        curve = best_of_n_curve(supports, list(config.best_of_n))
        results[str(labels)] = curve
        d = np.sqrt([point["kl"] for point in curve])
        color = f"C{index}"
        axes[0].plot(d, [point["gold"] for point in curve], marker, color=color,
                     label=f"best-of-n, RM from {labels:,} labels")
        axes[1].plot(d, [point["score"] for point in curve], marker, color=color, label=f"RM from {labels:,} labels")
        # on the same axes: the PPO runs of the over-optimisation study against this reward model, where made
        ppo_runs = [study.study_dir / f"{rm}-beta-{beta:g}" for beta in config.betas]
        ppo_points = [p for run_dir in ppo_runs if is_finished(run_dir / "ppo") for p in training_curve(run_dir)]
        if ppo_points:
            axes[0].scatter(np.sqrt([p["kl"] for p in ppo_points]), [p["gold"] for p in ppo_points], s=5,
                            color=color, alpha=0.25, label="PPO at fixed betas, same RM")
        for point in curve:
            rows.append(f"| {labels:,} | {point['n']} | {point['gold']:.3f} | {point['score']:.2f} | "
                        f"{point['kl']:.3f} | {point['kl_bound']:.3f} |")
    axes[0].plot(np.sqrt([c["kl_bound"] for c in curve]), [results[str(config.most_labels)][0]["gold"]] * len(curve),
                 "|", color="grey", markersize=12, label="where the analytic KL bound would put n = 1, 2, 4, ...")
    axes[0].set_xlim(-0.05, 1.9)
    for axis, title, corner in zip(axes, ("gold of best-of-n (exact expectation)", "proxy: reward-model score"),
                                   ("lower left", "lower right")):
        axis.set_xlabel("d = sqrt(KL(policy || SFT))")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc=corner)
    figure.tight_layout()
    study.write("best_of_n", figure, "\n".join(rows) + "\n", results)
    return results


def methods(study: Study) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    config = study.config
    rm = study.reward_model(config.most_labels)
    shared = {"sft": "sft", "reward": rm}
    reward = reward_settings(config.most_labels)
    rl = {"iterations": config.iterations, "relabel_every": 0}
    runs = {"PPO": study.run(f"{rm}-ppo", {"reward": reward, "ppo": rl}, "ppo", shared),
            "RLOO (k = 4)": study.run(f"{rm}-rloo", {"reward": reward, "ppo": {**rl, "method": "rloo"}}, "ppo", shared)}
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    rows = ["| method | gold greedy | gold sampled | carry greedy | KL k1 (held-out samples) | wall s |",
            "|---|---|---|---|---|---|"]
    results: dict[str, Any] = {}
    sft = read_summary(study.study_dir / "sft" / "sft")["eval"]
    rows.append(f"| SFT | {sft['gold_greedy']:.3f} | {sft['gold_sampled']:.3f} | {sft['gold_carry_greedy']:.3f} "
                "| 0 | |")
    for label, run_dir in runs.items():
        points = trajectory(run_dir)
        summary = read_summary(run_dir / "ppo")
        axis.plot(np.sqrt([p["kl"] for p in points]), [p["gold"] for p in points], "o-", markersize=3, label=label)
        results[label] = {"eval": summary["eval"], "seconds": summary["seconds"], "points": points}
    for beta in config.dpo_betas:
        run_dir = study.run(f"{rm}-dpo-{beta:g}", {"reward": reward, "dpo": {"beta": beta}}, "dpo", shared)
        summary = read_summary(run_dir / "dpo")
        results[f"DPO (beta {beta:g})"] = {"eval": summary["eval"], "seconds": summary["seconds"]}
        axis.plot([math.sqrt(max(0.0, summary["eval"]["kl_k1"]))], [summary["eval"]["gold_sampled"]], "D",
                  markersize=8, label=f"DPO, beta {beta:g}")
    for label, result in results.items():
        e = result["eval"]
        rows.append(f"| {label} | {e['gold_greedy']:.3f} | {e['gold_sampled']:.3f} | {e['gold_carry_greedy']:.3f} | "
                    f"{e['kl_k1']:.2f} | {result['seconds']:.0f} |")
    axis.set_xlabel("d = sqrt(KL(pi || SFT))")
    axis.set_ylabel("gold reward (held-out, sampled)")
    axis.set_title(f"PPO vs RLOO vs DPO: one SFT model, one RM / one set of {config.most_labels:,} labels",
                   fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    study.write("methods", figure, "\n".join(rows) + "\n", results)
    return results


def label_noise(study: Study) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    config = study.config
    rows = ["| coin-flip rate | RM held-out acc. vs labeller | vs gold | gold greedy | gold sampled | KL k1 |",
            "|---|---|---|---|---|---|"]
    results: dict[str, Any] = {}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for noise in config.label_noise:
        rm = study.reward_model(config.most_labels, noise)
        run_dir = study.run(f"{rm}-pipeline", {"reward": reward_settings(config.most_labels, noise),
                                               "ppo": {"iterations": config.iterations}}, "ppo",
                            {"sft": "sft", "reward": rm})
        validation = read_summary(run_dir / "reward")["validation"]
        final = read_summary(run_dir / "ppo")["eval"]
        points = trajectory(run_dir)
        results[f"{noise:g}"] = {"validation": validation, "eval": final, "points": points}
        axes[0].plot([p["iteration"] for p in points], [p["gold"] for p in points], "o-", markersize=3,
                     label=f"{noise:.0%} coin flips")
        rows.append(f"| {noise:.0%} | {validation['accuracy']:.3f} | {validation['gold_accuracy']:.3f} | "
                    f"{final['gold_greedy']:.3f} | {final['gold_sampled']:.3f} | {final['kl_k1']:.2f} |")
    noises = list(results)
    axes[1].bar([f"{float(n):.0%}" for n in noises], [results[n]["validation"]["gold_accuracy"] for n in noises],
                color="tab:blue", alpha=0.6, label="RM held-out accuracy vs gold")
    for mode, style in (("greedy", "ko-"), ("sampled", "ks--")):
        axes[1].plot([f"{float(n):.0%}" for n in noises], [results[n]["eval"][f"gold_{mode}"] for n in noises], style,
                     label=f"final gold, {mode}")
    axes[1].set_ylim(0.5, 1.1)
    axes[0].set_xlabel("PPO iteration")
    axes[0].set_ylabel("gold reward (held-out, sampled)")
    axes[1].set_xlabel("labeller coin-flip rate")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8, ncol=3, loc="upper center")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    study.write("label_noise", figure, "\n".join(rows) + "\n", results)
    return results


RUNNERS = {"overoptimisation": overoptimisation, "best-of-n": best_of_n, "methods": methods,
           "label-noise": label_noise}


def run_study(name: str, config: StudyConfig, study_dir: Path, out_dir: Path, report=None,
              pipeline: RLHFConfig | None = None) -> dict[str, Any]:
    """Run study `name`'s variants of `pipeline` (default: the pipeline's defaults) and write its
    figure, table and numbers into `out_dir`."""
    torch.set_num_threads(config.threads)
    study = Study(config, Path(study_dir), Path(out_dir), report, pipeline or RLHFConfig())
    with locked_run_dir(study.study_dir):  # one process at a time writes into a study
        return RUNNERS[name](study)

"""One PNG per LM stage, drawn from its metrics.csv, and samples.md (completions before and after)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from proximal.lm.model import sample_completions  # noqa: E402
from proximal.run import read_csv_rows, save_figure_atomic, write_text_atomic  # noqa: E402


def _series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    rows = [row for row in rows if row.get(y) is not None]
    return [row[x] for row in rows], [row[y] for row in rows]


def _grid(stage_dir: Path, x: str, panels: list[tuple[str, list[tuple[str, str]]]], out_name: str) -> Path:
    """One panel per (title, [(column, label), ...]), all against column `x`; a panel none of
    whose columns hold a value (a task without gold has no gold columns) is left out."""
    rows = read_csv_rows(stage_dir / "metrics.csv")
    panels = [(title, series) for title, series in panels if any(_series(rows, x, column)[0] for column, _ in series)]
    columns = max(1, min(3, len(panels)))
    figure_rows = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(figure_rows, columns, figsize=(4.2 * columns, 3.0 * figure_rows), squeeze=False)
    for axis, (title, series) in zip(axes.flat, panels):
        for column, label in series:
            xs, ys = _series(rows, x, column)
            if xs:
                axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(x)
        axis.grid(alpha=0.3)
        if len(series) > 1:
            axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    out = save_figure_atomic(figure, stage_dir / out_name)
    plt.close(figure)
    return out


def plot_sft(stage_dir: Path) -> Path:
    return _grid(stage_dir, "step", [("SFT loss (response tokens)", [("loss", "loss")]),
                                     ("learning rate", [("learning_rate", "lr")])], "sft.png")


def plot_reward(stage_dir: Path, file_name: str = "reward.png") -> Path:
    """The fit of a reward model, or of DPO's implicit reward (dpo.png): the same columns."""
    return _grid(stage_dir, "step", [
        ("Bradley-Terry loss", [("train_loss", "train (minibatch)"), ("val_loss", "validation")]),
        ("held-out accuracy (strict pairs)", [("val_accuracy", "vs labeller"), ("val_gold_accuracy", "vs gold")]),
    ], file_name)


def plot_ppo(stage_dir: Path) -> Path:
    header = (stage_dir / "metrics.csv").read_text().split("\n", 1)[0].split(",")
    slices = [c[len("eval_gold_"):-len("_greedy")] for c in header if c.startswith("eval_gold_") and
              c.endswith("_greedy") and c != "eval_gold_greedy"]
    return _grid(stage_dir, "iteration", [
        ("score (sampled): reward model or function", [("score", "score")]),
        ("gold reward", [("gold", "rollout (sampled)"), ("eval_gold_sampled", "held-out sampled"),
                         ("eval_gold_greedy", "held-out greedy"),
                         *((f"eval_gold_{name}_greedy", f"held-out greedy, {name}") for name in slices)]),
        ("KL(pi || SFT) per response", [("kl_k1", "k1"), ("kl_k3", "k3"), ("eval_kl_k1", "held-out k1")]),
        ("beta (KL coefficient)", [("kl_coef", "beta")]),
        ("entropy per token", [("entropy", "entropy")]),
        ("response length (tokens, EOS incl.)", [("response_length", "length")]),
        ("clip fraction / approx KL", [("clip_fraction", "clip fraction"), ("approx_kl", "approx KL (new vs old)")]),
        ("explained variance (value head)", [("explained_variance", "EV")]),
        ("EOS rate", [("eos_rate", "EOS rate")]),
    ], "ppo.png")


@torch.no_grad()
def write_samples(path: Path, ctx, before: torch.nn.Module, after: torch.nn.Module, tokenizer,
                  count: int = 12) -> None:
    """A markdown table: the first `count` held-out prompts' greedy completions by the start
    model and by the trained policy, with their gold score and slices where the task has them."""
    prompts = ctx.data.evaluation[:count]
    slices = ctx.task.slices(prompts)
    answers = []
    for model in (before, after):
        completions = sample_completions(model, tokenizer, prompts, ctx.config.ppo.max_new_tokens, 1.0, None,
                                         ctx.device, greedy=True)
        texts, ended = completions.texts(tokenizer), completions.ended.tolist()
        answers.append((texts, ended, ctx.gold(prompts, texts, ended) if ctx.has_gold else None))
    header = ["prompt", *slices, "start model (greedy)", "trained (greedy)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, prompt in enumerate(prompts):
        cells = [_code(prompt), *("yes" if members[index] else "no" for members in slices.values())]
        for texts, ended, gold in answers:
            score = "" if gold is None else f" ({gold[index]:g})"
            cells.append(f"{_code(texts[index])}{'' if ended[index] else ' (no EOS)'}{score}")
        lines.append("| " + " | ".join(cells) + " |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def _code(text: str) -> str:
    """Text in a markdown table cell: in backticks, newlines and pipes kept visible."""
    return "`" + text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") + "`"

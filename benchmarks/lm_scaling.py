"""Wall time of the LM pipeline (`proximal rlhf`, addition task) on one machine: 1 process on 1
thread, 1 process on 2 threads, and 2 processes (`torchrun --nproc-per-node 2`, gloo) on 1 thread
each. Writes lm_scaling.json and lm_scaling.md into --out.

    python3 benchmarks/lm_scaling.py --out docs/scaling

The stages are the preset's with fewer steps (FLAGS): the per-step work is the preset's (SFT
minibatches of 128, reward minibatches of 64 pairs, PPO batches of 256 responses in minibatches of
128), so seconds per step carry over. Each (mode, repeat) is a fresh run, the modes interleaved:
this VM's identical runs differ by 10-30%, so the table gives the median and the range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ["--sft.steps", "400", "--reward.labels", "4000", "--reward.epochs", "2", "--ppo.iterations", "20",
         "--ppo.eval-every", "10"]
MODES = {
    "1 process, 1 thread": (1, 1),
    "1 process, 2 threads": (1, 2),
    "2 processes (torchrun), 1 thread each": (2, 1),
}
STAGES = ("sft", "reward", "ppo")


def run(processes: int, threads: int, run_dir: Path) -> dict[str, float]:
    """One pipeline run; the seconds of each stage (from its summary) and of the whole command."""
    proximal = ["-m", "proximal", "rlhf", *FLAGS, "--threads", str(threads), "--run-dir", str(run_dir)]
    command = [sys.executable, *proximal] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", *proximal]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    seconds = {"command": time.perf_counter() - started}
    for stage in STAGES:
        seconds[stage] = json.loads((run_dir / stage / "summary.json").read_text())["seconds"]
    ppo_rows = (run_dir / "ppo" / "metrics.csv").read_text().splitlines()
    seconds["ppo_iterations"] = len(ppo_rows) - 1
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/scaling"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for mode, (processes, threads) in MODES.items():
                seconds = run(processes, threads, Path(scratch) / f"{repeat}-{processes}-{threads}")
                results[mode].append(seconds)
                print(f"repeat {repeat} {mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm_scaling.json").write_text(json.dumps({"flags": FLAGS, "runs": results}, indent=1))
    baseline = {part: statistics.median(r[part] for r in results["1 process, 1 thread"])
                for part in (*STAGES, "command")}
    lines = ["| mode | " + " | ".join(f"{part} s (speed-up)" for part in (*STAGES, "command")) + " |",
             "|---" * (len(STAGES) + 2) + "|"]
    for mode, runs in results.items():
        cells = []
        for part in (*STAGES, "command"):
            values = [r[part] for r in runs]
            median = statistics.median(values)
            cells.append(f"{median:.1f} ({min(values):.1f}-{max(values):.1f}; {baseline[part] / median:.2f}x)")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    (args.out / "lm_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

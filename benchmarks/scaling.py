"""Throughput of `proximal train` on one machine: 1 process on 1 thread, 1 process whose update
runs on 2 threads (`--update-threads 2`), and 2 processes (`torchrun --nproc-per-node 2`, gloo),
plus what one collective costs here. Writes scaling.json and scaling.md into --out.

    python3 benchmarks/scaling.py --out docs/scaling

Each (env, mode) trains a fixed number of steps with no early stop, in a fresh process, the modes
interleaved and repeated (`--repeats`): this VM's timings drift by 10-30% between identical runs,
so the table gives the median. CartPole-v1 is also timed to a solved policy (its preset's
--stop-return 475) on seeds 0-2.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "1 process, 1 thread": ([], 1),
    "1 process, update on 2 threads": (["--update-threads", "2"], 1),
    "2 processes (torchrun), 1 thread each": ([], 2),
}
STEPS = {"CartPole-v1": 51_200, "HalfCheetah-v5": 25_600, "Hopper-v5": 25_600}
TRAINED = re.compile(r"([\d,]+) env steps in ([\d.]+) s of training")

COLLECTIVES = r"""
import time, torch, torch.distributed as dist
dist.init_process_group("gloo")
def timed(call, repeats):
    for _ in range(20): call()
    start = time.perf_counter()
    for _ in range(repeats): call()
    return (time.perf_counter() - start) / repeats * 1e6
rows = torch.zeros(4, 17, dtype=torch.float64); out = [torch.empty_like(rows) for _ in range(2)]
grads = torch.zeros(142_000)  # HalfCheetah's actor and critic (17 -> 256 -> 256 -> 6 and 1)
small = torch.zeros(3, dtype=torch.float64)
result = {"all_gather of one step's observations (4 x 17)": timed(lambda: dist.all_gather(out, rows), 2000),
          "all_reduce of 3 numbers": timed(lambda: dist.all_reduce(small), 2000),
          "all_reduce of HalfCheetah's gradients (142k floats)": timed(lambda: dist.all_reduce(grads), 300)}
if dist.get_rank() == 0:
    print("COLLECTIVES " + __import__("json").dumps(result))
dist.destroy_process_group()
"""


def train_seconds(env_id: str, flags: list[str], processes: int, runs_dir: str) -> tuple[int, float]:
    command = [sys.executable, "-m", "proximal", "train", env_id, *flags, "--eval-episodes", "1",
               "--runs-dir", runs_dir]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "-m",
                   *command[2:]]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    steps, seconds = TRAINED.search(finished.stdout).groups()
    return int(steps.replace(",", "")), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="docs/scaling")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for env_id, steps in STEPS.items():
            results[env_id] = {mode: {"seconds": []} for mode in MODES}
            for _ in range(args.repeats):
                for mode, (flags, processes) in MODES.items():
                    done, seconds = train_seconds(env_id, [*flags, "--ppo.total-timesteps", str(steps),
                                                           "--stop-return", "none"], processes, runs_dir)
                    results[env_id][mode]["seconds"].append(seconds)
                    results[env_id][mode]["steps"] = done
                    print(f"{env_id:15s} {mode:40s} {done:,} steps in {seconds:.2f} s", flush=True)
        solve = {mode: [] for mode in MODES}
        for seed in range(3):
            for mode, (flags, processes) in MODES.items():
                solve[mode].append(train_seconds("CartPole-v1", [*flags, "--seed", str(seed)], processes, runs_dir))
                print(f"CartPole-v1 to 475, seed {seed}, {mode}: {solve[mode][-1]}", flush=True)
    collectives = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--no-python", sys.executable, "-c",
                                  COLLECTIVES], capture_output=True, text=True, check=True).stdout
    costs = json.loads(collectives.split("COLLECTIVES ", 1)[1].splitlines()[0])
    summary = {"throughput": results, "cartpole_to_475": solve, "collective_microseconds": costs}
    (out / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| env (steps timed) | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for env_id, modes in results.items():
        base = statistics.median(modes["1 process, 1 thread"]["seconds"])
        cells = []
        for mode, data in modes.items():
            median = statistics.median(data["seconds"])
            cells.append(f"{data['steps'] / median:,.0f} steps/s ({base / median:.2f}x)")
        steps = next(iter(modes.values()))["steps"]
        lines.append(f"| {env_id} ({steps:,} steps) | " + " | ".join(cells) + " |")
    lines.append("| CartPole-v1 to a solved policy, seeds 0-2 (median s) | " + " | ".join(
        f"{statistics.median(seconds for _, seconds in solve[mode]):.2f} s" for mode in MODES) + " |")
    lines += ["", "| collective, 2 processes, gloo on loopback | microseconds |", "|---|---|"]
    lines += [f"| {name} | {value:,.0f} |" for name, value in costs.items()]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

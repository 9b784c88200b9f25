"""A reward written as a plain Python function instead of learned from preferences (what
GRPO-style "verifiable rewards" use): `--reward.function module:callable` or
`--reward.function path/to/file.py:callable`.

The callable takes (prompts, completions), two lists of strings, and returns one float per
completion. PPO/RLOO then optimise it in place of a reward model's score (the score sits at the
response's last token, the KL penalty on every token, exactly as with a reward model), or the
synthetic labeller answers by it (`--reward.function-role labeller`). Whatever it returns is
checked: a wrong count, a non-number (a string too, "1.0" included), a number beyond a float or a
NaN stops the run with one line naming the prompt, and so does anything it raises, sys.exit()
(SystemExit) and KeyboardInterrupt included. A call that runs past SLOW_CALL_SECONDS is announced
on stderr (which function, on how many completions), and `--reward.function-timeout` stops one
that runs past its limit (SIGALRM: Python code is interrupted where it is; a call into C code
when it returns).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from proximal.errors import ConfigError, ProximalError, Terminated
from proximal.lm.model import Completions


def with_missing_eos(scores: torch.Tensor, ended: torch.Tensor, missing_eos_score: float | None) -> torch.Tensor:
    """`scores` [B], with `missing_eos_score` for a response cut at the length limit (None: as scored)."""
    if missing_eos_score is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, missing_eos_score))


SLOW_CALL_SECONDS = 30.0  # a call running this long is announced on stderr (once)


class RewardFunctionError(ProximalError):
    """The user's reward function could not be imported, raised, or returned something unusable."""


class _TimedOut(BaseException):
    """Raised inside the user's function when its time is up: a BaseException, so that an
    `except Exception` in the function cannot swallow it."""


@contextlib.contextmanager
def _watched(spec: str, completions: int, timeout: float):
    """Announce a call that runs past SLOW_CALL_SECONDS; raise _TimedOut inside it after `timeout`
    seconds (0: never; only where signals can be set, the main thread)."""
    announce = threading.Timer(SLOW_CALL_SECONDS, lambda: print(
        f"--reward.function {spec}: one call on {completions} completions has run {SLOW_CALL_SECONDS:g} s so far"
        + (f" (it is stopped at {timeout:g} s)" if timeout else " (--reward.function-timeout S stops such a call)"),
        file=sys.stderr, flush=True))
    announce.daemon = True
    limited = timeout > 0 and threading.current_thread() is threading.main_thread()
    if limited:
        def time_up(signum, frame):
            raise _TimedOut()

        previous = signal.signal(signal.SIGALRM, time_up)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    announce.start()
    try:
        yield
    finally:
        announce.cancel()
        if limited:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def import_callable(spec: str):
    """The callable that `module:name` or `path/to/file.py:name` names."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ConfigError(f"--reward.function {spec!r}: expected module:callable or path/to/file.py:callable")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise RewardFunctionError(f"--reward.function {spec!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"proximal_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # a module beside the user's working directory, as `python -m` finds it
            module = importlib.import_module(module_name)
    except (RewardFunctionError, Terminated):  # SIGTERM while it imports: rc 143 as everywhere
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as error:  # noqa: BLE001  (sys.exit() at import is no success)
        raise RewardFunctionError(f"--reward.function {spec!r}: importing {module_name} failed "
                                  f"({type(error).__name__}: {error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardFunctionError(f"--reward.function {spec!r}: {module_name} has no callable {name!r}")
    return function


class RewardFunction:
    """The user's function, called on text and checked; also a scorer for PPO (`scores`)."""

    def __init__(self, spec: str, missing_eos_score: float | None, timeout: float = 0.0):
        self.spec, self.function, self.missing_eos_score = spec, import_callable(spec), missing_eos_score
        self.timeout = timeout

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """One checked float per completion [B]."""
        try:
            with _watched(self.spec, len(completions), self.timeout):
                values = self.function(list(prompts), list(completions))
        except _TimedOut:
            raise RewardFunctionError(f"--reward.function {self.spec} took more than {self.timeout:g} s on "
                                      f"{len(completions)} completions (--reward.function-timeout)") from None
        except Terminated:  # SIGTERM while it runs: the run stops as everywhere else (rc 143)
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as error:  # noqa: BLE001  (sys.exit() in it is no success)
            raise RewardFunctionError(f"--reward.function {self.spec} raised {type(error).__name__}: {error} "
                                      f"(on prompt {prompts[0]!r} and {len(prompts) - 1} more)") from None
        try:
            values = list(values)
            if any(isinstance(value, (str, bytes)) for value in values):  # float("1.0") would pass a string
                raise TypeError
            values = [float(value) for value in values]
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond a float, 10**400
            shown = " ".join(str(values).split())  # one line, whatever the array's shape
            raise RewardFunctionError(f"--reward.function {self.spec} must return one number per completion "
                                      f"(int or float), got {shown[:80]}") from None
        if len(values) != len(completions):
            raise RewardFunctionError(f"--reward.function {self.spec} returned {len(values)} values for "
                                      f"{len(completions)} completions")
        bad = next((index for index, value in enumerate(values) if not math.isfinite(value)), None)
        if bad is not None:
            raise RewardFunctionError(f"--reward.function {self.spec} returned {values[bad]} for the completion "
                                      f"{completions[bad]!r} of the prompt {prompts[bad]!r}")
        return np.array(values, dtype=float)

    def gold(self, prompts: list[str], responses: list[str], ended) -> np.ndarray:
        """The function as a task's gold score: it sees the text, cut or not."""
        return self(prompts, responses)

    def scores(self, prompts: list[str], completions: Completions, tokenizer) -> torch.Tensor:
        """PPO's score [B]: the function's value, or the missing-EOS score for a response cut at
        the length limit (as for a reward model)."""
        values = torch.tensor(self(prompts, completions.texts(tokenizer)), dtype=torch.float32,
                              device=completions.ended.device)
        return with_missing_eos(values, completions.ended, self.missing_eos_score)

"""The one exception family users see.

Library code raises these; the CLI catches `ProximalError` once and prints its message as a
single line. Anything else escaping is a bug in proximal, not bad input.
"""

import contextlib


class ProximalError(Exception):
    """Base class: a problem with the user's input or run, explained in one line."""


class ConfigError(ProximalError):
    """A hyperparameter or option outside its allowed range. `field` names the config field the
    message begins with ("kl_coef must be >= 0, ..."; "ppo.kl_coef" once its section is known),
    so the command line can say it as the flag the user typed (`--ppo.kl-coef`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class EnvError(ProximalError):
    """An environment id that does not exist, or spaces proximal cannot handle."""


class CheckpointError(ProximalError):
    """A checkpoint or run directory that is missing, corrupt or of another kind."""


class TrainingDiverged(ProximalError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, a container stop, a CI timeout, torchrun stopping the other ranks),
    raised wherever the command is (`proximal.cli` installs the handler): it stops as on Ctrl-C,
    files whole and the run resumable."""


@contextlib.contextmanager
def naming(flag: str):
    """Errors raised inside are about the value of `flag`: their line begins with it, so the user
    reads which flag to correct ("--data.sft sft.jsonl line 2: ...")."""
    try:
        yield
    except ProximalError as error:
        raise type(error)(f"{flag} {error}") from None

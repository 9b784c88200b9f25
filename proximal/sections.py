"""What every config section shares: a field declared with its help line and the checks its value
must pass (`setting`), the `Section` base that runs those checks when a section is made, reading a
section back from a file (`section_settings`) and replacing sections (`replace_sections`).

A section is a frozen dataclass (`PPOConfig`, `RewardConfig`); its fields are declared as data:

    clip_coef: float = setting(0.2, "clip range epsilon of Eq. 7", above(0))

and a rule between two fields goes in the section's `check()`. An error names the field and what
it must be ("clip_coef must be > 0, got 0"); the command line says the field as the flag typed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from proximal.errors import ConfigError


def require(ok: bool, name: str, allowed: str, value: Any) -> None:
    """A ConfigError "NAME must be ALLOWED, got VALUE" unless `ok`."""
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}", field=name)


@dataclass(frozen=True)
class Check:
    """One thing a field's value must be, said as the error says it (`allowed`: "> 0")."""

    allowed: str
    ok: Callable[[Any], bool]

    def __call__(self, name: str, value: Any) -> None:
        require(self.ok(value), name, self.allowed, value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


FINITE = Check("a finite number", _is_finite)
POSITIVE_INT = Check("a positive integer", lambda value: _is_int(value) and value > 0)
POSITIVE_INTS = Check("one or more positive integers",
                      lambda value: isinstance(value, tuple) and len(value) > 0
                      and all(_is_int(v) and v > 0 for v in value))
NON_NEGATIVE_NUMBERS = Check("finite values >= 0",
                             lambda value: isinstance(value, tuple) and len(value) > 0
                             and all(_is_finite(v) and v >= 0 for v in value))
PATH = Check("a path", lambda value: isinstance(value, str))


def non_empty(what: str) -> Check:
    """A string with something in it besides spaces ("a non-empty path")."""
    return Check(f"a non-empty {what}", lambda value: isinstance(value, str) and value.strip() != "")


NON_EMPTY_PATH = non_empty("path")
HOST = Check("a host name or IP address (127.0.0.1, 0.0.0.0, ::1, myhost.local)",
             lambda value: isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9.:\-]+", value) is not None)
PORT = Check("in [0, 65535]", lambda value: _is_int(value) and 0 <= value <= 65535)


def int_at_least(bound: int) -> Check:
    return Check(f"an integer >= {bound}", lambda value: _is_int(value) and value >= bound)


def above(bound: float) -> tuple[Check, ...]:
    return FINITE, Check(f"> {bound:g}", lambda value: value > bound)


def at_least(bound: float, note: str = "") -> tuple[Check, ...]:
    return FINITE, Check(f">= {bound:g}" + (f" ({note})" if note else ""), lambda value: value >= bound)


def within(low: float, high: float, high_open: bool = False) -> tuple[Check, ...]:
    """In [low, high], or [low, high) with `high_open`."""
    return FINITE, Check(f"in [{low:g}, {high:g}{')' if high_open else ']'}",
                         lambda value: low <= value < high if high_open else low <= value <= high)


def one_of(choices: tuple[str, ...]) -> Check:
    return Check(" or ".join(choices), lambda value: value in choices)


def or_none(*checks: Check | tuple[Check, ...]) -> tuple[Check, ...]:
    """The checks, with None also allowed (`--flag none`)."""
    flat = _flatten(checks)
    return tuple(Check(check.allowed + (" (or none)" if check is flat[-1] else ""),
                       lambda value, ok=check.ok: value is None or ok(value)) for check in flat)


def _flatten(checks: tuple[Check | tuple[Check, ...], ...]) -> tuple[Check, ...]:
    return tuple(c for check in checks for c in (check if isinstance(check, tuple) else (check,)))


def setting(default: Any, help: str, *checks: Check | tuple[Check, ...]) -> Any:
    """A section's field: its default, its `--help` line and what its value must be (in order:
    the first check failed is the error)."""
    return field(default=default, metadata={"help": help, "checks": _flatten(checks)})


class Section:
    """The base of every config section: making one runs each field's checks, then `check()`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            for check in f.metadata.get("checks", ()):
                check(f.name, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Rules between this section's fields (each field's own checks have passed)."""


# Fields renamed since a run directory may have been written: {section: {old name: new name}}.
# Files written before are read with them (a run resumes, a checkpoint evaluates); flags are not
# (the command line refuses an old flag and names the new one).
RENAMED: dict[str, dict[str, str]] = {
    "ppo": {"update_epochs": "epochs", "target_kl": "early_stop_kl"},
    "reward": {"reward_hidden_sizes": "hidden_sizes", "reward_learning_rate": "learning_rate",
               "reward_minibatch_size": "batch_size", "reward_steps": "steps",
               "initial_reward_steps": "initial_steps", "learned_reward_std": "learned_std",
               "reward_input_clip": "input_clip"},
}


def section_from_dict(name: str, section_cls: type, values: dict[str, Any]) -> Any:
    """One section of a config file, built (`section_settings`)."""
    return section_cls(**section_settings(name, section_cls, values))


def section_settings(name: str, section_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """{field: value} of one section as a file writes it (config.json, a --config file,
    presets.toml), read as today's: the names older versions wrote (`RENAMED`) renamed, lists as
    tuples, and "none" as None where the field may be none (TOML has no null); an unknown field
    is a ConfigError."""
    values = {RENAMED.get(name, {}).get(key, key): value for key, value in dict(values).items()}
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    _refuse_unknown(name, section_cls, values)

    def read(key: str, value: Any) -> Any:
        if known[key].type.startswith("tuple") and isinstance(value, list):
            return tuple(value)
        return None if value == "none" and known[key].type.endswith("| None") else value

    return {key: read(key, value) for key, value in values.items()}


def replace_sections(config: Any, overrides: dict[str, dict[str, Any]]) -> Any:
    """A copy of a sectioned config (TrainConfig, RLHFConfig) with `{section: {field: value}}`
    applied; a refused value's error knows its section (`ConfigError.field` "ppo.clip_coef"), so
    the command line says it as the flag that was typed."""
    replaced = {}
    for section, values in overrides.items():
        if not hasattr(config, section):
            raise ConfigError(f"unknown section {section!r}")
        _refuse_unknown(section, type(getattr(config, section)), values)
        with in_section(section):
            replaced[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **replaced)


def _refuse_unknown(section: str, section_cls: type, names) -> None:
    unknown = sorted(set(names) - {f.name for f in dataclasses.fields(section_cls)})
    if unknown:
        raise ConfigError(f"unknown {section} settings: {', '.join(unknown)}")


@contextlib.contextmanager
def in_section(section: str):
    """A ConfigError raised inside about a field of `section` says so (`field` "clip_coef" ->
    "ppo.clip_coef")."""
    try:
        yield
    except ConfigError as error:
        if error.field is not None and "." not in error.field:
            error.field = f"{section}.{error.field}"
        raise

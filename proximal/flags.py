"""The configuration language every trainer speaks on the command line, in one place.

A setting is a field of a config dataclass and its flag is `--SECTION.FIELD` (`--ppo.clip-coef`
sets `PPOConfig.clip_coef` in `train` and `prefs`, `PPOStageConfig.clip_coef` in `rlhf`); the run
section's fields are bare (`--seed`, `--threads`). `add_section_flags` makes them, grouped by
section in --help; `given_settings` reads back {section: {field: value}} of the flags typed, under
a `--config FILE` (`read_config_file`: .toml, .yaml or .json, the same sections, a run's
config.json included); `retired_flags` are the flat spellings of an earlier version, refused with their new
name; `as_typed` says a refused value's field as the flag the user typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from proximal.config import PREFS_SECTIONS, TRAIN_SECTIONS
from proximal.sections import RENAMED, section_settings
from proximal.errors import ConfigError, ProximalError


def bare_flag(name: str) -> str:
    """The command-line spelling of a name: input_clip -> --input-clip."""
    return "--" + name.replace("_", "-")


def section_flag(section: str, name: str) -> str:
    """The flag of a config field: --SECTION.FIELD (ppo, clip_coef -> --ppo.clip-coef); the run
    section's without a prefix (--seed, --threads), the same in every command."""
    return bare_flag(name) if section == "run" else f"--{section}.{bare_flag(name)[2:]}"


def optional_float(text: str) -> float | None:
    """A flag value that may be switched off: "none" or "off" -> None, else a float."""
    return None if text.lower() in ("none", "off") else float(text)


def optional_int(text: str) -> int | None:
    """A flag value that may be switched off: "none" or "off" -> None, else an int."""
    return None if text.lower() in ("none", "off") else int(text)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """An output file's folder must exist and be writable: checked before any work is done."""
    if not str(path):
        raise ConfigError(f"{flag} needs a file name")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag} {path}: directory {folder} is not writable")
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A directory that will be created (or reused) for output: non-empty, and its nearest
    existing ancestor a writable directory. Checked before any work is done."""
    if str(path).strip() == "":
        raise ConfigError(f"{flag} must be a non-empty path")
    path = Path(path)
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise ConfigError(f"{flag} {path}: {ancestor} is not writable")
    return path


def check_seed(seed: int | None) -> None:
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed}")


def add_field_flag(parser: argparse.ArgumentParser, config_field: dataclasses.Field, flag: str, dest: str,
                   help_text: str) -> None:
    """The flag of one config field, defaulting to 'not given': a --x/--no-x switch for a bool, a
    typed value otherwise (parsed by the field's type; validation is the dataclass's)."""
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if config_field.type == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif config_field.type in ("tuple[int, ...]", "tuple[float, ...]"):
        is_int = "int" in config_field.type
        metavar = "WIDTH" if config_field.name == "hidden_sizes" else "N" if is_int else "X"
        parser.add_argument(flag, type=int if is_int else float, nargs="+", metavar=metavar, **kwargs)
    elif config_field.type == "float | None":
        parser.add_argument(flag, type=optional_float, metavar="FLOAT|none", **kwargs)
    elif config_field.type == "int | None":
        parser.add_argument(flag, type=optional_int, metavar="N|none", **kwargs)
    else:
        parser.add_argument(flag, type={"int": int, "float": float, "str": str}[config_field.type],
                            metavar={"int": "N", "float": "X", "str": "TEXT"}[config_field.type], **kwargs)


POSITIONALS = (("env", "env_id"), ("task", "name"))  # fields set by a command's positional argument


def add_section_flags(parser: argparse.ArgumentParser, sections: dict[str, type], default: str = "default") -> None:
    """One flag per config field (`section_flag`), grouped by section in --help with its default
    (said as `default`), each defaulting to 'not given' (a preset's value stays unless typed)."""
    for section, section_cls in sections.items():
        group = parser.add_argument_group(f"--{section}.*" if section != "run" else "run",
                                          " ".join((section_cls.__doc__ or "").split("\n\n")[0].split()))
        for config_field in dataclasses.fields(section_cls):
            if (section, config_field.name) not in POSITIONALS:
                add_field_flag(group, config_field, section_flag(section, config_field.name),
                               f"{section}.{config_field.name}",
                               f"{config_field.metadata['help']} ({default}: {config_field.default})")


def add_config_file_flag(parser: argparse.ArgumentParser, reproduces: str) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"settings by section, as the flags name them, in a .toml, .yaml or .json file "
                             f"({reproduces}); "
                             "the flags given override it")


def given_settings(args: argparse.Namespace, sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of --config FILE's settings under the flags typed (lists as tuples)."""
    typed: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, _, name = dest.partition(".")
        if section in sections and name:
            typed.setdefault(section, {})[name] = value
    from_file = read_config_file(args.config, sections) if getattr(args, "config", None) is not None else {}
    given: dict[str, dict[str, Any]] = {section: {} for section in sections}
    for source in (from_file, typed):  # the flags over the file
        for section, values in source.items():
            given[section].update({name: tuple(value) if isinstance(value, list) else value
                                   for name, value in values.items()})
    return given


def read_config_file(path: str, sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of a .toml, .yaml (.yml) or .json config file, each section and
    field checked against `sections` (the values are checked by the config itself, as a flag's are)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = _parse_config(file.read_text(encoding="utf-8-sig"), file.suffix.lower())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # each format's parse error is a ValueError
        raise ConfigError(f"--config {path}: not a readable {file.suffix.lstrip('.') or 'JSON'} file "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the sections {', '.join(sections)} are expected, got a {type(data).__name__}")
    for section, values in data.items():
        if section not in sections or not isinstance(values, dict):
            raise ConfigError(f"--config {path}: {section!r} is not a section ({', '.join(sections)})")
        known = {f.name for f in dataclasses.fields(sections[section])}
        unknown = sorted({RENAMED.get(section, {}).get(name, name) for name in values} - known)
        if unknown:
            raise ConfigError(f"--config {path}: no setting {section}.{unknown[0]} (--{section}.* flags name them)")
        data[section] = section_settings(section, sections[section], values)
    return data


def _parse_config(text: str, suffix: str) -> Any:
    """A config file's text by its suffix: TOML, YAML or JSON (anything else is read as JSON, as a
    run's config.json is). A parse error is a ValueError."""
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        import yaml

        class Loader(yaml.SafeLoader):
            """YAML 1.1 reads 1e-3 as a string (it wants 1.0e-3); a config means the number."""

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                     list("-+0123456789."))
        try:
            return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data, no Python objects
        except yaml.YAMLError as error:
            raise ValueError(str(error)) from None
    return json.loads(text)


def retired_flags(sections: dict[str, type]) -> dict[str, str]:
    """{flat flag of an earlier version: its flag now} for a control command's settings
    (--clip-coef -> --ppo.clip-coef, --reward-learning-rate -> --reward.learning-rate), and
    --resume -> --run-dir: refused with the new name, never taken silently."""
    retired = {"--resume": "--run-dir"}
    for section, section_cls in sections.items():
        old_name = {new: old for old, new in RENAMED.get(section, {}).items()}
        for config_field in dataclasses.fields(section_cls):
            if (section, config_field.name) in POSITIONALS:
                continue
            old = bare_flag(old_name.get(config_field.name, config_field.name))
            new = section_flag(section, config_field.name)
            if old != new:
                retired[old] = new
                if config_field.type == "bool":
                    retired["--no-" + old[2:]] = "--no-" + new[2:]
    return retired


def refuse_retired(argv: Sequence[str]) -> str | None:
    """The one-line error for a flag of the flat dialect given to train or prefs, else None."""
    if not argv or argv[0] not in ("train", "prefs"):
        return None
    retired = retired_flags(TRAIN_SECTIONS if argv[0] == "train" else PREFS_SECTIONS)
    for token in argv[1:]:
        if token == "--":
            break
        flag = token.partition("=")[0]
        if flag in retired:
            return f"proximal {argv[0]}: error: {flag} is now {retired[flag]} (see proximal {argv[0]} --help)"
    return None


def as_typed(error: ProximalError, command: str, parser: argparse.ArgumentParser) -> str:
    """The error's message with the config field it begins with said as the flag that sets it
    ("kl_coef must be >= 0" -> "--ppo.kl-coef must be >= 0"): the field's own flag, else the one
    flag of the command (in `parser`, the whole command line's) whose field it is in whatever
    section."""
    field = getattr(error, "field", None)
    message = str(error)
    if field is None:
        return message
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    dests = {action.dest: action.option_strings[0] for action in commands.choices[command]._actions
             if action.option_strings}
    name = field.rpartition(".")[2]
    in_some_section = [flag for dest, flag in dests.items() if "." not in field and dest.endswith("." + name)]
    flag = dests.get(field) or (in_some_section[0] if len(in_some_section) == 1 else None)
    return message.replace(name, flag, 1) if flag is not None and message.startswith(name) else message

"""Every preset in one place: the settings a command starts from before its flags, each with
what it measured. The values live in presets.toml beside this file, written as a `--config
FILE.toml` is (sections and names of the flags), each with the comment that says why; this
module reads them once.

- `PRESETS`: `proximal train ENV_ID` and `proximal prefs ENV_ID`, one `Preset` per environment,
  versioned (the version goes up when a value changes) with what that version measured.
- `SENTIMENT_PRESET`: `proximal rlhf sentiment` on a real pretrained model ({section: {field:
  value}}, as the flags are); the addition task runs on the config's own defaults, which were
  tuned on it.

`proximal presets` lists them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proximal.config import PREFS_SECTIONS, EnvConfig, PrefsConfig, TrainConfig
from proximal.sections import section_settings

PRESETS_FILE = Path(__file__).with_name("presets.toml")


@dataclass(frozen=True)
class Preset:
    """Hyperparameters for one environment. `version` goes up whenever a value changes, so a
    result can name the preset it came from; `measured` says what it reached and how;
    `target_return` is what counts as solved where Gymnasium defines no reward_threshold;
    `prefs` is what `proximal prefs ENV_ID` starts from."""

    config: TrainConfig
    version: int
    measured: str
    target_return: float | None = None
    prefs: PrefsConfig = field(default_factory=PrefsConfig)


def _preset(env_id: str, table: dict[str, Any]) -> Preset:
    """One [train."ENV_ID"] table of presets.toml: its version, what it measured, and the settings
    of its sections over the generic defaults."""
    about = {key: table[key] for key in ("version", "measured", "target_return") if key in table}
    settings = {section: section_settings(section, section_cls, table.get(section, {}))
                for section, section_cls in PREFS_SECTIONS.items()}
    prefs = PrefsConfig(**settings.pop("reward"))
    config = TrainConfig(env=EnvConfig(env_id=env_id)).with_overrides(settings)
    return Preset(config, prefs=prefs, **about)


_TABLES = tomllib.loads(PRESETS_FILE.read_text(encoding="utf-8"))
# Chosen by `proximal train ENV_ID`; flags override them.
PRESETS: dict[str, Preset] = {env_id: _preset(env_id, table) for env_id, table in _TABLES["train"].items()}
# `proximal rlhf sentiment`, tuned for SmolLM2-135M-Instruct on a 2-core CPU (docs/lm_real_model.md).
SENTIMENT_PRESET: dict[str, dict[str, Any]] = _TABLES["rlhf"]["sentiment"]


def preset_for(env_id: str) -> TrainConfig:
    """The preset's config for `env_id`, or the generic defaults with that env id."""
    if env_id in PRESETS:
        return PRESETS[env_id].config
    return TrainConfig(env=EnvConfig(env_id=env_id))


def prefs_preset_for(env_id: str) -> PrefsConfig:
    """The preference-learning settings `proximal prefs ENV_ID` starts from."""
    return PRESETS[env_id].prefs if env_id in PRESETS else PrefsConfig()


def describe_preset(config: TrainConfig) -> str:
    """One line with the hyperparameters that differ most between presets."""
    ppo, env = config.ppo, config.env
    switches = [name for name, on in (("obs-norm", ppo.normalize_observations),
                                      ("reward-scaling", ppo.normalize_rewards)) if on]
    stop = f", stop at {config.run.stop_return:g}" if config.run.stop_return is not None else ""
    return (f"{env.num_envs} env{'s' if env.num_envs > 1 else ''} x {ppo.num_steps} steps, {ppo.epochs} epochs of minibatch "
            f"{ppo.minibatch_size}, lr {ppo.learning_rate:g}, gamma {ppo.gamma:g}, lambda {ppo.gae_lambda:g}, "
            f"{ppo.total_timesteps:,} steps{stop}, {'x'.join(map(str, ppo.hidden_sizes))} {ppo.activation}"
            + (f", {', '.join(switches)}" if switches else ""))

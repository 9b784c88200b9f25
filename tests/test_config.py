"""Config validation: every bad value is named, with its allowed range, before any work starts."""

import dataclasses

import pytest

from proximal.config import EnvConfig, PPOConfig, RunConfig, TrainConfig
from proximal.presets import PRESETS, preset_for
from proximal.errors import ConfigError


@pytest.mark.parametrize("section,field,value,message", [
    (PPOConfig, "clip_coef", 0.0, "clip_coef must be > 0"),
    (PPOConfig, "clip_coef", -0.1, "clip_coef must be > 0"),
    (PPOConfig, "gamma", 1.5, r"gamma must be in \[0, 1\]"),
    (PPOConfig, "gamma", -0.01, r"gamma must be in \[0, 1\]"),
    (PPOConfig, "gae_lambda", 1.01, r"gae_lambda must be in \[0, 1\]"),
    (PPOConfig, "learning_rate", 0.0, "learning_rate must be > 0"),
    (PPOConfig, "learning_rate", float("nan"), "learning_rate must be a finite number"),
    (PPOConfig, "total_timesteps", 0, "total_timesteps must be a positive integer"),
    (PPOConfig, "num_steps", -5, "num_steps must be a positive integer"),
    (PPOConfig, "update_epochs", 0, "update_epochs must be a positive integer"),
    (PPOConfig, "minibatch_size", 0, "minibatch_size must be a positive integer"),
    (PPOConfig, "ent_coef", -1.0, "ent_coef must be >= 0"),
    (PPOConfig, "vf_coef", -1.0, "vf_coef must be >= 0"),
    (PPOConfig, "max_grad_norm", 0.0, "max_grad_norm must be > 0"),
    (PPOConfig, "target_kl", 0.0, "target_kl must be > 0"),
    (PPOConfig, "hidden_sizes", (), "hidden_sizes must be one or more positive integers"),
    (PPOConfig, "hidden_sizes", (64, 0), "hidden_sizes must be one or more positive integers"),
    (EnvConfig, "num_envs", 0, "num_envs must be a positive integer"),
    (EnvConfig, "env_id", "", "env_id must be a non-empty Gymnasium id"),
    (RunConfig, "seed", -1, "seed must be an integer >= 0"),
    (RunConfig, "threads", 0, "threads must be a positive integer"),
    (RunConfig, "eval_episodes", 0, "eval_episodes must be a positive integer"),
])
def test_invalid_values_are_named_with_their_range(section, field, value, message):
    with pytest.raises(ConfigError, match=message):
        section(**{field: value})


def test_minibatch_larger_than_the_batch_is_rejected():
    with pytest.raises(ConfigError, match=r"minibatch_size must be <= the batch num_steps \* num_envs = 512"):
        TrainConfig(env=EnvConfig(num_envs=4), ppo=PPOConfig(num_steps=128, minibatch_size=513))


def test_budget_smaller_than_one_batch_is_rejected():
    with pytest.raises(ConfigError, match="total_timesteps must be >= one batch"):
        TrainConfig(env=EnvConfig(num_envs=4), ppo=PPOConfig(num_steps=128, total_timesteps=100))


def test_dict_round_trip_and_unknown_keys():
    config = preset_for("CartPole-v1")
    assert TrainConfig.from_dict(config.to_dict()) == config
    data = config.to_dict()
    data["ppo"]["learning_rat"] = 0.1
    with pytest.raises(ConfigError, match="unknown ppo settings: learning_rat"):
        TrainConfig.from_dict(data)


def test_overrides_go_to_the_section_that_owns_each_field():
    config = TrainConfig().with_overrides({"num_envs": 2, "clip_coef": 0.1, "seed": 5, "minibatch_size": 64})
    assert (config.env.num_envs, config.ppo.clip_coef, config.run.seed) == (2, 0.1, 5)
    with pytest.raises(ConfigError, match="unknown setting 'bogus'"):
        TrainConfig().with_overrides({"bogus": 1})


def test_presets_are_valid_and_unknown_envs_get_generic_defaults():
    for env_id, preset in PRESETS.items():
        assert preset.config.env.env_id == env_id and preset.version >= 1 and preset.measured
    generic = preset_for("MountainCarContinuous-v0")
    assert generic.env.env_id == "MountainCarContinuous-v0"
    assert dataclasses.replace(generic, env=EnvConfig()) == TrainConfig()


def test_a_runs_config_json_given_back_as_config_reproduces_it_and_flags_override_a_toml_file(tmp_path):
    """`proximal rlhf --config RUN_DIR/config.json` is that run's config exactly; a TOML file's
    sections are the flags' (`[ppo] kl_coef` is --ppo.kl-coef), under the flags given."""
    pytest.importorskip("transformers")
    import json

    from proximal.cli import build_parser, rlhf_config
    from proximal.lm.config import RLHFConfig

    def config_of(*argv):
        return rlhf_config(build_parser().parse_args(["rlhf", *argv]))

    ran = config_of("sentiment", "--model.path", "m.gguf", "--seed", "100", "--ppo.iterations", "9",
                    "--no-reward.keep-best")
    (tmp_path / "config.json").write_text(ran.to_json())
    assert config_of("--config", str(tmp_path / "config.json")) == ran
    assert config_of("--config", str(tmp_path / "config.json"), "--ppo.iterations", "4") == \
        ran.with_overrides({"ppo": {"iterations": 4}})
    (tmp_path / "settings.toml").write_text('[ppo]\nkl_coef = 0.5\niterations = 3\n[run]\nseed = 7\n')
    from_file = config_of("--config", str(tmp_path / "settings.toml"), "--ppo.iterations", "5")
    assert from_file == config_of("--ppo.kl-coef", "0.5", "--ppo.iterations", "5", "--seed", "7")
    assert json.loads(from_file.to_json())["task"]["name"] == "addition"
    assert RLHFConfig.from_dict(json.loads(ran.to_json())) == ran


@pytest.mark.parametrize("content, message", [
    ("[ppo]\nkl_coef = -1\n", "--ppo.kl-coef must be >= 0"),
    ("[ppo]\nkl_cof = 1\n", "no setting ppo.kl_cof"),
    ("[optimiser]\nlr = 1\n", "'optimiser' is not a section"),
    ("[ppo\n", "not a readable toml file"),
])
def test_a_bad_config_file_is_one_line(content, message, tmp_path, capsys):
    pytest.importorskip("transformers")
    from proximal.cli import main

    (tmp_path / "settings.toml").write_text(content)
    assert main(["rlhf", "--config", str(tmp_path / "settings.toml")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err

"""Config validation: every bad value is named, with its allowed range, before any work starts."""

import dataclasses

import pytest
import torch

from proximal.config import EnvConfig, PPOConfig, PrefsConfig, RunConfig, TrainConfig
from proximal.sections import section_from_dict
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
    (PPOConfig, "epochs", 0, "epochs must be a positive integer"),
    (PPOConfig, "minibatch_size", 0, "minibatch_size must be a positive integer"),
    (PPOConfig, "ent_coef", -1.0, "ent_coef must be >= 0"),
    (PPOConfig, "vf_coef", -1.0, "vf_coef must be >= 0"),
    (PPOConfig, "max_grad_norm", 0.0, "max_grad_norm must be > 0"),
    (PPOConfig, "early_stop_kl", 0.0, "early_stop_kl must be > 0"),
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


def test_overrides_go_to_their_section_and_an_error_names_it():
    config = TrainConfig().with_overrides({"env": {"num_envs": 2}, "ppo": {"clip_coef": 0.1, "minibatch_size": 64},
                                           "run": {"seed": 5}})
    assert (config.env.num_envs, config.ppo.clip_coef, config.ppo.minibatch_size, config.run.seed) == (2, 0.1, 64, 5)
    with pytest.raises(ConfigError, match="unknown section 'bogus'"):
        TrainConfig().with_overrides({"bogus": {"x": 1}})
    with pytest.raises(ConfigError, match="unknown ppo setting"):
        TrainConfig().with_overrides({"ppo": {"seed": 1}})
    with pytest.raises(ConfigError) as refused:
        TrainConfig().with_overrides({"ppo": {"clip_coef": -1.0}})
    assert refused.value.field == "ppo.clip_coef"


def test_a_config_written_before_the_renames_reads_back_under_the_new_names():
    data = TrainConfig().to_dict()
    data["ppo"]["update_epochs"] = data["ppo"].pop("epochs") + 3
    data["ppo"]["target_kl"] = data["ppo"].pop("early_stop_kl")
    old = TrainConfig.from_dict(data)
    assert old.ppo.epochs == TrainConfig().ppo.epochs + 3 and old.ppo.early_stop_kl is None
    prefs = section_from_dict("reward", PrefsConfig, {"reward_learning_rate": 0.5, "reward_hidden_sizes": [8, 8]})
    assert (prefs.learning_rate, prefs.hidden_sizes) == (0.5, (8, 8))


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

    from proximal.cli import build_parser
    from proximal.lm.commands import rlhf_config
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


def test_none_in_a_toml_file_is_what_the_flag_none_is(tmp_path):
    """TOML has no null: "none" is None where the field may be none, as `--ppo.early-stop-kl none`
    is, and stays a string elsewhere (where the config then refuses it)."""
    from proximal.cli import build_parser
    from proximal.commands import prefs_config, train_config

    (tmp_path / "settings.toml").write_text('[ppo]\nearly_stop_kl = "none"\n[reward]\ninput_clip = "none"\n')
    config, prefs = prefs_config(build_parser().parse_args(["prefs", "--config", str(tmp_path / "settings.toml")]))[:2]
    assert config.ppo.early_stop_kl is None and prefs.input_clip is None and PrefsConfig().input_clip == 10.0
    (tmp_path / "settings.toml").write_text('[ppo]\nearly_stop_kl = "none"\n')
    assert train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "settings.toml")]))[0] \
        .ppo.early_stop_kl is None
    (tmp_path / "settings.toml").write_text('[ppo]\nactivation = "none"\n')
    with pytest.raises(ConfigError, match="activation must be tanh or relu, got 'none'"):
        train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "settings.toml")]))


def test_a_yaml_config_file_is_the_same_settings_as_its_toml_twin(tmp_path):
    """--config FILE.yaml (or .yml): the sections and names of the TOML file; YAML's null is none,
    and 1e-3 is the number (YAML 1.1 alone would read it as a string)."""
    from proximal.cli import build_parser
    from proximal.commands import prefs_config

    def config_of(path):
        return prefs_config(build_parser().parse_args(["prefs", "--config", str(path)]))[:2]

    (tmp_path / "settings.toml").write_text('[ppo]\nlearning_rate = 1e-3\nhidden_sizes = [32, 32]\n'
                                            'early_stop_kl = "none"\n[reward]\nlabels = 200\ninput_clip = "none"\n')
    (tmp_path / "settings.yaml").write_text("ppo:\n  learning_rate: 1e-3\n  hidden_sizes: [32, 32]\n"
                                            "  early_stop_kl: null\nreward:\n  labels: 200\n  input_clip: null\n")
    (tmp_path / "settings.yml").write_text((tmp_path / "settings.yaml").read_text())
    config, prefs = config_of(tmp_path / "settings.yaml")
    assert (config.ppo.learning_rate, config.ppo.hidden_sizes, config.ppo.early_stop_kl) == (1e-3, (32, 32), None)
    assert (prefs.labels, prefs.input_clip) == (200, None)
    assert config_of(tmp_path / "settings.yml") == config_of(tmp_path / "settings.toml") == (config, prefs)


@pytest.mark.parametrize("name, content, message", [
    ("settings.toml", "[ppo]\nkl_coef = -1\n", "--ppo.kl-coef must be >= 0"),
    ("settings.toml", "[ppo]\nkl_cof = 1\n", "no setting ppo.kl_cof"),
    ("settings.toml", "[optimiser]\nlr = 1\n", "'optimiser' is not a section"),
    ("settings.toml", "[ppo\n", "not a readable toml file"),
    ("settings.yaml", "ppo:\n  kl_coef: [1\n", "not a readable yaml file"),
    ("settings.yaml", "ppo:\n  kl_coef: -1\n", "--ppo.kl-coef must be >= 0"),
])
def test_a_bad_config_file_is_one_line(name, content, message, tmp_path, capsys):
    pytest.importorskip("transformers")
    from proximal.cli import main

    (tmp_path / name).write_text(content)
    assert main(["rlhf", "--config", str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_train_and_prefs_take_the_same_config_file_a_train_run_reproduced_row_for_row(tmp_path, monkeypatch):
    """`proximal train --config RUN_DIR/config.json` is that run again: its metrics.csv row for
    row (the timing columns aside) and the same weights; a TOML file's [ppo] is --ppo.*, a prefs
    file's [reward] is --reward.*, the flags win, ENV_ID comes from the file's [env]."""
    import csv
    import json

    from proximal.agent import PPOAgent
    from proximal.cli import build_parser, main
    from proximal.commands import prefs_config, train_config

    def config_of(command, *argv):
        args = build_parser().parse_args([command, *argv])
        return (train_config if command == "train" else prefs_config)(args)[:2]

    monkeypatch.chdir(tmp_path)
    short = ["--ppo.total-timesteps", "1024", "--env.num-envs", "2", "--ppo.num-steps", "64", "--ppo.minibatch-size",
             "64", "--eval-episodes", "2", "--seed", "4"]
    assert main(["train", "Acrobot-v1", *short, "--run-dir", "first"]) == 0
    assert main(["train", "--config", "first/config.json", "--run-dir", "again"]) == 0
    timing = {"wall_seconds", "steps_per_second"}

    def rows(run):
        with open(tmp_path / run / "metrics.csv") as file:
            return [{k: v for k, v in row.items() if k not in timing} for row in csv.DictReader(file)]

    assert rows("first") == rows("again") and len(rows("first")) == 8
    first, again = PPOAgent.load(tmp_path / "first"), PPOAgent.load(tmp_path / "again")
    assert first.config == again.config and first.config.env.env_id == "Acrobot-v1"
    assert all(torch.equal(a, b) for a, b in zip(first.network.parameters(), again.network.parameters()))

    (tmp_path / "settings.toml").write_text('[env]\nenv_id = "Pendulum-v1"\n[ppo]\nclip_coef = 0.3\nepochs = 2\n'
                                            '[reward]\nlabels = 77\nlearning_rate = 0.002\n')
    config, prefs = config_of("prefs", "--config", "settings.toml", "--ppo.epochs", "3")
    assert (config.env.env_id, config.ppo.clip_coef, config.ppo.epochs) == ("Pendulum-v1", 0.3, 3)
    assert (prefs.labels, prefs.learning_rate) == (77, 0.002)
    old_names = {"ppo": {"update_epochs": 6, "target_kl": 0.02}}  # a file written before the renames
    (tmp_path / "old.json").write_text(json.dumps(old_names))
    config, _ = config_of("train", "CartPole-v1", "--config", "old.json")
    assert (config.env.env_id, config.ppo.epochs, config.ppo.early_stop_kl) == ("CartPole-v1", 6, 0.02)

"""The checks a config field declares (proximal/sections.py), against hand-worked cases: the
boundary of each range on both sides, NaN and booleans refused where a number is asked, None only
where or_none allows it, the first failing check is the error, and rules between fields run after
every field's own."""

from dataclasses import dataclass

import pytest

from proximal.config import PPOConfig, PrefsConfig
from proximal.errors import ConfigError
from proximal.lm.config import RewardConfig
from proximal.sections import (POSITIVE_INT, Section, above, at_least, int_at_least, one_of, or_none, require,
                               setting, within)


def _verdicts(checks, values):
    """[None if value passes every check, else the error's text] for each value."""
    checks = checks if isinstance(checks, tuple) else (checks,)
    verdicts = []
    for value in values:
        try:
            for check in checks:
                check("x", value)
            verdicts.append(None)
        except ConfigError as error:
            verdicts.append(str(error))
    return verdicts


def test_each_check_at_its_boundaries():
    assert _verdicts(within(0, 1), [0, 1, 0.5, -1e-9, 1.0000001, float("nan")]) == [
        None, None, None, "x must be in [0, 1], got -1e-09", "x must be in [0, 1], got 1.0000001",
        "x must be a finite number, got nan"]
    assert _verdicts(within(0, 1, high_open=True), [0.0, 0.999, 1.0]) == [None, None, "x must be in [0, 1), got 1.0"]
    assert _verdicts(above(0), [1e-12, 0, float("inf")]) == [None, "x must be > 0, got 0",
                                                             "x must be a finite number, got inf"]
    assert _verdicts(at_least(0, "0: no limit"), [0, -1]) == [None, "x must be >= 0 (0: no limit), got -1"]
    assert _verdicts(POSITIVE_INT, [1, 0, 2.0, True]) == [
        None, "x must be a positive integer, got 0", "x must be a positive integer, got 2.0",
        "x must be a positive integer, got True"]
    assert _verdicts(int_at_least(2), [2, 1]) == [None, "x must be an integer >= 2, got 1"]
    assert _verdicts(one_of(("a", "b")), ["b", "c"]) == [None, "x must be a or b, got 'c'"]
    assert _verdicts(or_none(above(0)), [None, 0.1, 0, "1"]) == [
        None, None, "x must be > 0 (or none), got 0", "x must be a finite number, got '1'"]
    assert _verdicts(above(0), [True]) == ["x must be a finite number, got True"]  # a bool is not a number here


@dataclass(frozen=True)
class _Window(Section):
    low: float = setting(0.0, "the low end", at_least(0))
    high: float = setting(1.0, "the high end", above(0))

    def check(self) -> None:
        require(self.low < self.high, "high", f"> low ({self.low})", self.high)


def test_a_section_runs_its_fields_checks_in_order_then_its_rules_between_fields():
    assert _Window(0.5, 2.0).high == 2.0
    with pytest.raises(ConfigError, match=r"^low must be >= 0, got -1$"):
        _Window(-1, -1)  # the first field's check fails first; the rule between them is not reached
    with pytest.raises(ConfigError, match=r"^high must be > low \(3\), got 2$"):
        _Window(3, 2)
    with pytest.raises(ConfigError) as caught:
        _Window(high=0)
    assert caught.value.field == "high"


def test_numbers_and_booleans_in_real_sections():
    with pytest.raises(ConfigError, match="learning_rate must be a finite number, got True"):
        PPOConfig(learning_rate=True)  # a TOML `learning_rate = true` used to be taken as 1
    with pytest.raises(ConfigError, match="model_error_rate must be in \\[0, 1\\), got 1"):
        PrefsConfig(model_error_rate=1)


def test_the_labeller_settings_are_one_declaration_with_each_commands_defaults():
    """prefs and rlhf share the labeller's fields (LabellerSettings); rlhf has no replay labeller
    (a run's own labels replay by --run-dir) and a colder Boltzmann labeller by default."""
    shared = ("labeller", "labeller_noise", "labeller_error_rate", "labeller_temperature", "host", "port")
    assert all(name in PrefsConfig.__dataclass_fields__ and name in RewardConfig.__dataclass_fields__
               for name in shared)
    assert (PrefsConfig().labeller_temperature, RewardConfig().labeller_temperature) == (1.0, 0.25)
    assert PrefsConfig(labeller="replay", replay_from="c.jsonl").labeller == "replay"
    with pytest.raises(ConfigError, match="labeller must be synthetic or human, got 'replay'"):
        RewardConfig(labeller="replay")
    for config in (PrefsConfig, RewardConfig):
        with pytest.raises(ConfigError, match="labeller_noise must be none or uniform or boltzmann"):
            config(labeller_noise="gaussian")
        with pytest.raises(ConfigError, match="port must be in \\[0, 65535\\], got 70000"):
            config(port=70000)

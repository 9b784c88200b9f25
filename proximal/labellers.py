"""The labellers that are programs: they answer "which of two is better?" from a score the
learner never sees (the true return of a clip, the gold score of a completion), so that a run
learns from preferences as it would from a person, exactly and repeatably.

The answer vocabulary is shared with the person on the labelling page (proximal.human):
mu(1) = 1.0 (first better), 0.0 (second better), 0.5 (equally good), None (can't tell).
Used by `proximal prefs` (clips of a control task) and `proximal rlhf` (completions of a
language model) alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from proximal.errors import ProximalError
from proximal.jsonl import read_json_lines


class ReplayError(ProximalError):
    """The replayed labels do not match the queries of this run."""


class SyntheticLabeller:
    """Prefers the clip with the higher true return; "equally good" (0.5) on a tie.

    noise "uniform": with probability `error_rate` the answer is a coin flip instead;
    noise "boltzmann": prefers clip 1 with probability sigmoid((R1 - R2) / temperature).
    """

    def __init__(self, noise: str, error_rate: float, temperature: float, rng: np.random.Generator):
        self.noise, self.error_rate, self.temperature, self.rng = noise, error_rate, temperature, rng

    def answer(self, true_return_1: float, true_return_2: float) -> float | None:
        """mu(1): 1.0 (clip 1 better), 0.0 (clip 2 better), 0.5 (equally good); None would be
        "can't tell" (the synthetic labeller always can)."""
        if self.noise == "boltzmann":
            preference = 1.0 / (1.0 + math.exp(-(true_return_1 - true_return_2) / self.temperature))
            return 1.0 if self.rng.random() < preference else 0.0
        if self.noise == "uniform" and self.rng.random() < self.error_rate:
            return float(self.rng.integers(2))
        if math.isclose(true_return_1, true_return_2, rel_tol=1e-9, abs_tol=1e-9):
            return 0.5
        return 1.0 if true_return_1 > true_return_2 else 0.0


class ReplayLabeller:
    """Gives the answers recorded in a comparisons.jsonl, in order, checking that each query
    is the recorded one (same true returns): a seeded run's labels can be reproduced exactly,
    or answers recorded elsewhere (by a person) reused."""

    def __init__(self, path: str | Path):
        self.records = []
        for number, record in read_json_lines(path, ReplayError):
            if not (isinstance(record, dict) and "label" in record and "true_returns" in record):
                raise ReplayError(f"{path} line {number}: a recorded comparison is a JSON object with 'label' and "
                                  "'true_returns'")
            self.records.append(record)
        if not self.records:
            raise ReplayError(f"{path}: holds no recorded comparisons to replay")
        self.position = 0

    def answer(self, true_return_1: float, true_return_2: float) -> float | None:
        if self.position >= len(self.records):
            raise ReplayError(f"the replayed file has only {len(self.records)} answers; this run asks for more")
        record = self.records[self.position]
        if not np.allclose(record["true_returns"], [true_return_1, true_return_2], rtol=1e-4, atol=1e-4):
            raise ReplayError(f"query {self.position} differs from the recorded one (true returns "
                              f"{record['true_returns']} recorded, {[true_return_1, true_return_2]} now)")
        self.position += 1
        return record["label"]


def make_labeller(settings, rng: np.random.Generator) -> SyntheticLabeller | ReplayLabeller:
    """The labeller a config section describes (`proximal prefs`' PrefsConfig or `proximal rlhf`'s
    RewardConfig, which name these fields alike): synthetic with `labeller_noise`, or "replay"
    of the answers in `replay_from`."""
    if settings.labeller == "replay":
        return ReplayLabeller(settings.replay_from)
    return SyntheticLabeller(settings.labeller_noise, settings.labeller_error_rate, settings.labeller_temperature, rng)

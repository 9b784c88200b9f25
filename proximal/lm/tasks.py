"""Tasks with a programmatic gold reward: prompts, noisy demonstrations, and the gold score.

A task is plain text in, plain text out. It generates, deterministically from a seed, the
demonstrations SFT imitates and the prompts the later stages use; `gold` scores a response and
is the truth every stage is measured against. The gold reward never reaches the policy or the
reward model: it drives the synthetic labeller and the evaluation, nothing else.

`addition` (the default): two-digit addition, prompt "47+38=", answer "85" then EOS. The noise is
systematic, as a careless annotator's would be: in `carry_noise` of the demonstrations whose sum
carries from the units, the carry is dropped ("47+38=75"). Random wrong answers would be too
easy: the mode of the demonstrations stays right and greedy SFT is already correct (see
docs/lm_rlhf.md). Here the mode itself is wrong on carry prompts, so SFT can only imitate it,
and only preferences can say what is right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from proximal.errors import ConfigError

ALPHABET = "0123456789+="  # every character a prompt or an answer of these tasks uses


@dataclass(frozen=True)
class PromptSplits:
    """Disjoint sets of prompts, one per use: SFT never sees an evaluation prompt."""

    sft: list[str]  # prompts of the demonstrations (with repeats: one per demonstration)
    preference: list[str]  # prompts whose SFT samples are compared by the labeller
    rl: list[str]  # prompts PPO samples from
    evaluation: list[str]  # held-out prompts for the gold evaluation of every stage


class AdditionTask:
    """a + b for a, b in [0, 99]; gold = 1 for exactly the sum followed by EOS, else 0."""

    name = "addition"
    instructions = "the sum of the two numbers, and nothing after it, is the right answer."

    def __init__(self, carry_noise: float = 0.6):
        if not 0.0 <= carry_noise <= 1.0:
            raise ConfigError(f"carry_noise must be in [0, 1], got {carry_noise!r}")
        self.carry_noise = carry_noise

    @staticmethod
    def operands(prompt: str) -> tuple[int, int]:
        left, right = prompt.rstrip("=").split("+")
        return int(left), int(right)

    @staticmethod
    def is_hard(prompt: str) -> bool:
        """The slice the noise hits: the units digits carry."""
        a, b = AdditionTask.operands(prompt)
        return a % 10 + b % 10 >= 10

    def gold(self, prompt: str, response: str, ended: bool) -> float:
        """1.0 for the exact sum followed by EOS (`ended`), else 0.0."""
        a, b = self.operands(prompt)
        return float(ended and response == str(a + b))

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        """What the noisy annotator writes: the sum, or on a carry prompt with probability
        `carry_noise`, the sum with the carry dropped (10 too small)."""
        a, b = self.operands(prompt)
        if self.is_hard(prompt) and rng.random() < self.carry_noise:
            return str(a + b - 10)
        return str(a + b)

    def splits(self, seed: int, num_demonstrations: int, num_preference: int, num_rl: int,
               num_evaluation: int) -> PromptSplits:
        """All 10,000 prompts shuffled by `seed`; the first `num_evaluation` are held out for
        evaluation, the rest feed SFT (drawn with replacement), preferences and RL."""
        rng = np.random.default_rng(seed)
        every_prompt = [f"{a}+{b}=" for a in range(100) for b in range(100)]
        order = rng.permutation(len(every_prompt))
        evaluation = [every_prompt[i] for i in order[:num_evaluation]]
        pool = [every_prompt[i] for i in order[num_evaluation:]]
        if not pool:
            raise ConfigError(f"num_evaluation must leave prompts to train on (< {len(every_prompt)})")
        pick = lambda count: [pool[i] for i in rng.integers(len(pool), size=count)]  # noqa: E731
        return PromptSplits(sft=pick(num_demonstrations), preference=pick(num_preference), rl=pick(num_rl),
                            evaluation=evaluation)


TASKS = {"addition": AdditionTask}


def make_task(name: str, carry_noise: float) -> AdditionTask:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](carry_noise)

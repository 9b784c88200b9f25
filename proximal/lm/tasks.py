"""What the model learns: the `Task` protocol, and the built-in task (two-digit addition).

A task is plain text in, plain text out. It gives every stage its data (`TaskData`: the
demonstrations SFT imitates, the prompts whose samples a labeller compares or the labelled pairs
themselves, the prompts PPO samples from, the held-out prompts every stage is evaluated on), and
optionally a gold score: the truth a stage is measured against. The gold never reaches the
policy or the reward model: it drives the synthetic labeller and the evaluation, nothing else.
Named evaluation slices (a bool per held-out prompt) get their own gold columns.

To add a task: a class with the members of `Task`, and an entry in `TASKS` (docs/your_data.md
shows one); the command line, the config and every stage take it from there. A user's own data
in files is the task `proximal.lm.data.FileTask` (`--data.prompts`, `--data.sft`, ...).

`addition` (the default): two-digit addition, prompt "47+38=", answer "85" then EOS. The noise is
systematic, as a careless annotator's would be: in `carry_noise` of the demonstrations whose sum
carries from the units, the carry is dropped ("47+38=75"). Random wrong answers would be too
easy: the mode of the demonstrations stays right and greedy SFT is already correct (see
docs/lm_rlhf.md). Here the mode itself is wrong on carry prompts, so SFT can only imitate it,
and only preferences can say what is right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from proximal.errors import ConfigError
from proximal.presets import SENTIMENT_PRESET


@dataclass(frozen=True)
class DataSizes:
    """How much of each kind a generated task draws (a task read from files has what it has)."""

    demonstrations: int
    preference_prompts: int
    rl_prompts: int
    eval_prompts: int
    validation_fraction: float  # share of labelled pairs held out to measure a reward model


@dataclass(frozen=True)
class TaskData:
    """Disjoint sets of prompts, one per use: SFT never sees an evaluation prompt."""

    sft_prompts: list[str]  # the prompt of each demonstration (with repeats); empty: nothing to imitate
    sft_completions: list[str]  # the demonstrations, aligned with sft_prompts
    preference_prompts: list[str]  # prompts whose samples the labeller compares
    rl: list[str]  # prompts PPO samples from
    evaluation: list[str]  # held-out prompts for the evaluation of every stage
    preferences: list[dict] | None = None  # labelled pairs given as data (comparisons.jsonl records), or None
    origins: dict[str, list[str]] = field(default_factory=dict)  # where each record of a kind came from, if a file

    def origin(self, kind: str, index: int, text: str) -> str:
        """How an error names record `index` of `kind`: its file and line, or its text."""
        where = self.origins.get(kind)
        return where[index] if where else f"the {kind} prompt {text!r}"


class Task(Protocol):
    name: str
    instructions: str  # what "better" means, one sentence: shown to a person labelling
    alphabet: str  # the characters the tiny model's character tokenizer must cover
    has_gold: bool  # whether `gold` scores responses (else it returns None)
    preset: dict  # {section: {field: value}}: the settings a run of the task starts from (flags override them)

    @classmethod
    def from_config(cls, task_config) -> Task:
        """The task from the run's `TaskConfig` (its own settings, such as addition's carry_noise)."""

    def data(self, seed: int, sizes: DataSizes, tokenizer) -> TaskData: ...

    def gold(self, prompts: list[str], responses: list[str], ended: list[bool]) -> np.ndarray | None:
        """The gold score [B] of each response (`ended`: it emitted EOS), or None: no gold."""

    def slices(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Named subsets of the held-out prompts [B] bool, each evaluated on its own."""


class AdditionTask:
    """a + b for a, b in [0, 99]; gold = 1 for exactly the sum followed by EOS, else 0."""

    name = "addition"
    instructions = "the sum of the two numbers, and nothing after it, is the right answer."
    alphabet = "0123456789+="
    has_gold = True
    preset: dict = {}  # the defaults were tuned on this task

    def __init__(self, carry_noise: float = 0.6):
        if not 0.0 <= carry_noise <= 1.0:
            raise ConfigError(f"carry_noise must be in [0, 1], got {carry_noise!r}")
        self.carry_noise = carry_noise

    @classmethod
    def from_config(cls, task_config) -> AdditionTask:
        return cls(task_config.carry_noise)

    @staticmethod
    def operands(prompt: str) -> tuple[int, int]:
        left, right = prompt.rstrip("=").split("+")
        return int(left), int(right)

    @staticmethod
    def carries(prompt: str) -> bool:
        """The slice the noise hits: the units digits carry."""
        a, b = AdditionTask.operands(prompt)
        return a % 10 + b % 10 >= 10

    def slices(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {"carry": np.array([self.carries(prompt) for prompt in prompts], dtype=bool)}

    def score(self, prompt: str, response: str, ended: bool) -> float:
        """1.0 for the exact sum followed by EOS (`ended`), else 0.0."""
        a, b = self.operands(prompt)
        return float(ended and response == str(a + b))

    def gold(self, prompts: list[str], responses: list[str], ended: list[bool]) -> np.ndarray:
        return np.array([self.score(p, r, bool(e)) for p, r, e in zip(prompts, responses, ended)])

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        """What the noisy annotator writes: the sum, or on a carry prompt with probability
        `carry_noise`, the sum with the carry dropped (10 too small)."""
        a, b = self.operands(prompt)
        if self.carries(prompt) and rng.random() < self.carry_noise:
            return str(a + b - 10)
        return str(a + b)

    def data(self, seed: int, sizes: DataSizes, tokenizer=None) -> TaskData:
        """All 10,000 prompts shuffled by `seed`; the first `eval_prompts` are held out for
        evaluation, the rest feed SFT (drawn with replacement), preferences and RL."""
        rng = np.random.default_rng(seed)
        every_prompt = [f"{a}+{b}=" for a in range(100) for b in range(100)]
        order = rng.permutation(len(every_prompt))
        evaluation = [every_prompt[i] for i in order[:sizes.eval_prompts]]
        pool = [every_prompt[i] for i in order[sizes.eval_prompts:]]
        if not pool:
            raise ConfigError(f"eval_prompts must leave prompts to train on (< {len(every_prompt)})")
        pick = lambda count: [pool[i] for i in rng.integers(len(pool), size=count)]  # noqa: E731
        sft_prompts, preference_prompts, rl = pick(sizes.demonstrations), pick(sizes.preference_prompts), \
            pick(sizes.rl_prompts)
        annotator = np.random.default_rng(seed)  # the noisy annotator's own stream
        return TaskData(sft_prompts, [self.demonstration(prompt, annotator) for prompt in sft_prompts],
                        preference_prompts, rl, evaluation)




# -- sentiment: a real chat model asked about everyday things, judged by VADER ------------------------

THINGS = (
    "a pizza place", "a used car", "a train station", "a dentist", "a rainy Monday", "a public library",
    "a budget airline", "a hotel room", "a city park", "a coffee shop", "a laptop", "a pair of running shoes",
    "a museum", "a bus ride", "a gym", "a bakery", "a supermarket", "a camping trip", "a concert", "a movie",
    "a novel", "a video game", "a smartphone", "a vacuum cleaner", "a hair salon", "a bank", "a post office",
    "a beach", "a ski resort", "a zoo", "a farmers market", "a taxi ride", "a hospital", "a school cafeteria",
    "a theme park", "a board game", "a podcast", "a restaurant", "a bicycle", "a washing machine",
    "a shopping mall", "a swimming pool", "a winter coat", "a kitchen knife", "a hiking trail",
    "an online course", "a cooking class", "a job interview", "a birthday party", "a wedding",
    "a road trip", "a ferry crossing", "a music festival", "a bookshop", "a car wash", "a sushi bar",
    "an art gallery", "a yoga class", "a garden centre", "a science fair", "a cinema", "a pet shop",
    "a thunderstorm", "a family dinner", "a night train", "a hardware store", "a tennis court",
    "a spa", "a pharmacy", "a mountain cabin", "a street market", "a flight delay", "a bowling alley",
    "a new apartment", "a phone call with support", "a chess club", "a jazz bar", "an ice cream shop",
    "a football match", "a long queue",
)
TEMPLATES = (
    "Describe {thing} in one sentence.", "Give a short review of {thing}.", "What do you think of {thing}?",
    "Write one sentence about {thing}.", "Tell me about {thing} in a few words.",
    "How was your visit to {thing}?", "Share your opinion of {thing}.", "Sum up {thing} in one sentence.",
)
HELD_OUT_THINGS = 16  # the last things of a seeded shuffle: their prompts are held out for evaluation
BASE_MODEL_FRAME = "Question: {question}\nAnswer:"  # a base model (no chat template) continues this
SYSTEM_PROMPT = "You are a helpful assistant. Answer in one short sentence."  # 13 tokens, not the default 38


def vader_scores(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER's compound sentiment of each completion, in [-1, 1] (Hutto & Gilbert 2014; a rule-based
    scorer nobody here wrote). Usable as `--reward.function proximal.lm.tasks:vader_scores`."""
    return [_vader().polarity_scores(text)["compound"] for text in completions]


def _vader():
    global _ANALYZER
    if _ANALYZER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ConfigError('the sentiment task needs VADER: pip install -e ".[real]" (or vadersentiment)') from None
        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


_ANALYZER = None


class SentimentTask:
    """A pretrained chat model asked about everyday things ("Give a short review of a bakery.");
    gold = VADER compound of the response, cut or not. No demonstrations: the model already
    speaks, so SFT is skipped; preferences teach what to say. The things of held-out prompts
    never appear in training prompts."""

    name = "sentiment"
    instructions = "the more positive response is the better one."
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-\n"
    has_gold = True
    preset = SENTIMENT_PRESET  # proximal/presets.toml, [rlhf.sentiment]

    @classmethod
    def from_config(cls, task_config) -> SentimentTask:
        return cls()

    def slices(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {}

    def gold(self, prompts: list[str], responses: list[str], ended: list[bool]) -> np.ndarray:
        return np.array(vader_scores(prompts, responses), dtype=float)

    @staticmethod
    def render(tokenizer, question: str) -> str:
        """The question as the model expects it: its chat template with a short system prompt, or
        for a base model without one (Gemma 3 270M) the question-and-answer frame its pretraining text
        is full of, so that what follows reads as an answer rather than the next question of a list."""
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return BASE_MODEL_FRAME.format(question=question)

    @staticmethod
    def questions(seed: int) -> tuple[list[str], list[str]]:
        """(training questions, held-out questions): every template for each thing, the things
        split by a seeded shuffle."""
        order = np.random.default_rng(seed).permutation(len(THINGS))
        split = len(THINGS) - HELD_OUT_THINGS
        ask = lambda things: [t.format(thing=THINGS[i]) for i in things for t in TEMPLATES]  # noqa: E731
        return ask(order[:split]), ask(order[split:])

    def data(self, seed: int, sizes: DataSizes, tokenizer) -> TaskData:
        rng = np.random.default_rng(seed)
        train, held_out = self.questions(seed)
        if sizes.eval_prompts > len(held_out):
            raise ConfigError(f"eval_prompts must be <= {len(held_out)} for the sentiment task, got {sizes.eval_prompts}")
        render = lambda questions: [self.render(tokenizer, q) for q in questions]  # noqa: E731
        pick = lambda count: [train[i] for i in rng.integers(len(train), size=count)]  # noqa: E731
        evaluation = [held_out[i] for i in rng.permutation(len(held_out))[:sizes.eval_prompts]]
        return TaskData([], [], render(pick(sizes.preference_prompts)), render(pick(sizes.rl_prompts)),
                        render(evaluation))


TASKS = {"addition": AdditionTask, "sentiment": SentimentTask}

"""A user's own data as a task: JSON-lines files in the formats of TRL's dataset documentation.

One record per line, "standard" (plain text) or "conversational" (a list of {"role", "content"}
messages, rendered through the model's own chat template):

  prompts       {"prompt": "Describe the sea."}
                {"prompt": [{"role": "user", "content": "Describe the sea."}]}
  sft           {"prompt": "Describe the sea.", "completion": "It is wide and calm."}
                {"messages": [{"role": "user", ...}, {"role": "assistant", "content": "It is wide and calm."}]}
  preferences   {"prompt": "Describe the sea.", "chosen": "It is lovely.", "rejected": "It is grim."}
                {"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...]}  (implicit prompt)

A conversational prompt becomes `apply_chat_template(messages, add_generation_prompt=True)` as
text, and its completion the assistant message's content; the EOS token is appended to every
completion as to a sampled one, so a model whose end-of-turn token is its EOS (SmolLM2, Qwen,
Llama 3) sees exactly the rendering of the whole conversation. A record is checked when it is
read: a bad one stops the run before anything is written, with one line naming the file, the
line and the field. A record longer than the model's context is refused the same way (with a
count of how many are), never truncated: a cut demonstration would teach the model to stop early.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from proximal.errors import ConfigError, naming
from proximal.jsonl import read_json_lines
from proximal.lm.tasks import DataSizes, TaskData

if TYPE_CHECKING:
    from proximal.lm.config import RLHFConfig

Text = str | list  # a string, or a list of messages
ROLES = ("system", "user", "assistant", "tool")


class DataError(ConfigError):
    """A record in a user's file that cannot be used; the message names the file, line and field."""


@dataclass
class Record:
    """One line of a file, checked: where it came from and its fields (text or messages)."""

    origin: str  # "path line N"
    fields: dict[str, Text]


def _is_messages(value) -> bool:
    return isinstance(value, list)


def _check_messages(origin: str, name: str, value: list) -> None:
    if not value:
        raise DataError(f"{origin}: field {name!r} is an empty list of messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise DataError(f"{origin}: field {name!r}, message {index}: expected "
                            f'{{"role": one of {", ".join(ROLES)}, "content": a string}}')


def _field(origin: str, record: dict, name: str) -> Text:
    if name not in record:
        raise DataError(f"{origin}: no {name!r} field (the record has {', '.join(map(repr, record)) or 'none'})")
    value = record[name]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{origin}: field {name!r} is empty")
        return value
    if _is_messages(value):
        _check_messages(origin, name, value)
        return value
    raise DataError(f"{origin}: field {name!r} must be a string or a list of messages, got {type(value).__name__}")


def read_records(path: str, kinds: tuple[tuple[str, ...], ...]) -> list[Record]:
    """The records of a JSON-lines file, each with the fields of one of `kinds` (tried in order:
    the first whose fields the record has)."""
    records = []
    for number, record in read_json_lines(path, DataError):
        origin = f"{path} line {number}"
        if not isinstance(record, dict):
            raise DataError(f"{origin}: a record must be a JSON object, got {type(record).__name__}")
        kind = next((kind for kind in kinds if all(name in record for name in kind)), kinds[0])
        records.append(Record(origin, {name: _field(origin, record, name) for name in kind}))
    if not records:
        raise DataError(f"{path}: holds no records")
    return records


@dataclass
class Example:
    """A record reduced to text: the prompt (messages kept for the chat template) and completions."""

    origin: str
    prompt: Text
    completions: list[str] = field(default_factory=list)


def _last_assistant(origin: str, name: str, messages: list) -> str:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{origin}: field {name!r} must end with an assistant message")
    if not messages[-1]["content"].strip():
        raise DataError(f"{origin}: field {name!r}: the assistant's message is empty")
    return messages[-1]["content"]


def _completion(origin: str, name: str, prompt: Text, value: Text) -> str:
    """A completion as text: a string, or the one assistant message of a conversational record."""
    if _is_messages(prompt) != _is_messages(value):
        raise DataError(f"{origin}: field {name!r} and the prompt must both be text or both be messages")
    return _last_assistant(origin, name, value) if _is_messages(value) else value


def prompt_examples(path: str) -> list[Example]:
    return [Example(r.origin, r.fields["prompt"]) for r in read_records(path, (("prompt",),))]


def sft_examples(path: str) -> list[Example]:
    examples = []
    for record in read_records(path, (("prompt", "completion"), ("messages",))):
        if "messages" in record.fields:
            messages = record.fields["messages"]
            if not _is_messages(messages) or len(messages) < 2:
                raise DataError(f"{record.origin}: field 'messages' must hold a conversation of at least two "
                                "messages, the last the assistant's")
            examples.append(Example(record.origin, messages[:-1], [_last_assistant(record.origin, "messages",
                                                                                     messages)]))
        else:
            prompt = record.fields["prompt"]
            examples.append(Example(record.origin, prompt,
                                    [_completion(record.origin, "completion", prompt, record.fields["completion"])]))
    return examples


def preference_examples(path: str) -> list[Example]:
    """(prompt, [chosen, rejected]) per record; an implicit prompt is the messages before the last,
    which chosen and rejected must share."""
    examples = []
    for record in read_records(path, (("prompt", "chosen", "rejected"), ("chosen", "rejected"))):
        chosen, rejected = record.fields["chosen"], record.fields["rejected"]
        if "prompt" in record.fields:
            prompt = record.fields["prompt"]
        else:
            if not (_is_messages(chosen) and _is_messages(rejected)):
                raise DataError(f"{record.origin}: no 'prompt' field (only conversational chosen/rejected "
                                "carry their prompt inside)")
            if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
                raise DataError(f"{record.origin}: fields 'chosen' and 'rejected' must share every message but "
                                "the last (the implicit prompt)")
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        pair = [_completion(record.origin, name, prompt, value)
                for name, value in (("chosen", chosen), ("rejected", rejected))]
        if pair[0] == pair[1]:
            raise DataError(f"{record.origin}: fields 'chosen' and 'rejected' are the same text, which teaches "
                            "nothing")
        examples.append(Example(record.origin, prompt, pair))
    return examples


def render_prompt(tokenizer, example: Example) -> str:
    """A prompt as the text the model reads: as is, or a conversation through the chat template."""
    if not _is_messages(example.prompt):
        return example.prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{example.origin}: a conversational record needs a model with a chat template, and "
                        "this model's tokenizer has none (pass --model.path of a chat model, or write the "
                        'record as {"prompt": "...", ...})')
    return tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)


def _read(flag: str, examples, path: str | None) -> list[Example]:
    """`examples(path)` ([] when the flag is not given), a bad file's error saying the flag too."""
    if not path:
        return []
    with naming(flag):
        return examples(path)


class FileTask:
    """The task made of a user's files (`DataConfig`): no gold score of its own and no slices;
    `--reward.function` can give one."""

    name = "files"
    instructions = "which completion answers the prompt better?"
    has_gold = False

    def __init__(self, data_config):
        self.config = data_config
        self.prompts = _read("--data.prompts", prompt_examples, data_config.prompts)
        self.eval_prompts = _read("--data.eval-prompts", prompt_examples, data_config.eval_prompts)
        self.demonstrations = _read("--data.sft", sft_examples, data_config.sft)
        self.preferences = _read("--data.preferences", preference_examples, data_config.preferences)
        self.eval_preferences = _read("--data.eval-preferences", preference_examples, data_config.eval_preferences)
        every = [*self.prompts, *self.eval_prompts, *self.demonstrations, *self.preferences, *self.eval_preferences]
        texts = [text for e in every for text in (e.prompt if isinstance(e.prompt, str) else "", *e.completions)]
        self.alphabet = "".join(sorted(set("".join(texts))))

    def gold(self, prompts, responses, ended) -> None:
        return None

    def slices(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {}

    def rl_prompts(self, key) -> list[Example]:
        """The PPO prompts before the held-out split: --data.prompts, else the prompts of the
        demonstrations and pairs, each once (distinct by `key(example)`)."""
        return self.prompts or list({key(e): e for e in [*self.demonstrations, *self.preferences]}.values())

    def held_out_count(self, prompts: int) -> int:
        """How many of `prompts` PPO prompts are held out: none with --data.eval-prompts, else a
        --data.eval-fraction of them (at least one)."""
        return 0 if self.eval_prompts else max(1, round(self.config.eval_fraction * prompts))

    def data(self, seed: int, sizes: DataSizes, tokenizer) -> TaskData:
        """Prompts for PPO: --data.prompts, else the prompts of the demonstrations and pairs (each
        once); held out: --data.eval-prompts, else a seeded --data.eval-fraction of them. The
        labeller's pairs (a --reward.function labeller, a person) are asked of --reward.labels of
        the training prompts, a seeded choice in their order (each of them at most once)."""
        render = lambda example: render_prompt(tokenizer, example)  # noqa: E731
        prompts = self.rl_prompts(render)
        rng = np.random.default_rng(seed)
        if self.eval_prompts:
            train, held_out = prompts, self.eval_prompts
        else:
            order = rng.permutation(len(prompts))
            cut = self.held_out_count(len(prompts))
            held_out, train = [prompts[i] for i in order[:cut]], [prompts[i] for i in order[cut:]]
            if prompts and not train:
                raise DataError(f"{self.config.prompts or self.config.sft or self.config.preferences}: "
                                f"{len(prompts)} distinct prompt(s), too few to hold {cut} out for evaluation "
                                f"(--data.eval-fraction {self.config.eval_fraction}) and train on the rest; "
                                "add records or pass --data.eval-prompts")
        pairs = [(e, False) for e in self.preferences] + [(e, True) for e in self.eval_preferences]
        validation = np.random.default_rng(seed + 1).random(len(self.preferences)) < sizes.validation_fraction
        records = [{"query": index, "prompt": render(example), "responses": list(example.completions),
                    "ended": [True, True], "label": 1.0, "labeller": "file", "true_returns": None,
                    "validation": bool(is_eval or (index < len(validation) and validation[index])),
                    "origin": example.origin}
                   for index, (example, is_eval) in enumerate(pairs)]
        train_prompts = [render(e) for e in train]
        labelled = np.sort(np.random.default_rng(seed + 2).permutation(len(train_prompts))[:sizes.preference_prompts])
        return TaskData(
            sft_prompts=[render(e) for e in self.demonstrations],
            sft_completions=[e.completions[0] for e in self.demonstrations],
            preference_prompts=[train_prompts[i] for i in labelled], rl=train_prompts,
            evaluation=[render(e) for e in held_out],
            preferences=records or None,
            origins={"sft": [e.origin for e in self.demonstrations], "rl": [e.origin for e in train],
                     "evaluation": [e.origin for e in held_out], "preferences": [e.origin for e, _ in pairs]})


PASSES = 3  # passes over a user's files when a pretrained model starts: TRL's trainers' default of 3 epochs


def sized_to_files(config: RLHFConfig, typed: dict[str, dict]) -> tuple[RLHFConfig, list[str]]:
    """`config` (an RLHFConfig on --data.* files) with what was not `typed` sized by passes over
    the files when a pretrained --model.path starts: SFT's steps and PPO's iterations PASSES
    passes over the demonstrations and the prompts, the reward model PASSES passes over the pairs
    (the tiny model trained from scratch keeps its defaults: it needs hundreds of passes). Also
    one line a stage saying what it will take, for the run's first lines."""
    task = FileTask(config.data)  # a bad file fails here, in one line, as it would in the run
    prompts = len(task.rl_prompts(lambda example: str(example.prompt)))  # raw text: no tokenizer yet
    rl_prompts = prompts - task.held_out_count(prompts)
    sizes: dict[str, dict] = {"sft": {}, "reward": {}, "ppo": {}}
    if config.model.path:
        if task.demonstrations and "steps" not in typed.get("sft", {}):
            sizes["sft"]["steps"] = -(-PASSES * len(task.demonstrations) // config.sft.batch_size)
        if task.preferences and "epochs" not in typed.get("reward", {}):
            sizes["reward"]["epochs"] = PASSES
        if rl_prompts > 0 and "iterations" not in typed.get("ppo", {}):
            sizes["ppo"]["iterations"] = -(-PASSES * rl_prompts // config.ppo.prompts_per_iteration)
    config = config.with_overrides({section: values for section, values in sizes.items() if values})

    def why(section: str, name: str) -> str:
        chosen = ("as given" if name in typed.get(section, {}) else
                  f"{PASSES} passes, the default from a pretrained model" if name in sizes[section] else
                  "the default for a model trained from scratch")
        return f"({chosen}; --{section}.{name} sets it)"

    lines = []
    if task.demonstrations:
        lines.append(f"sft: {config.sft.steps:,} steps of {config.sft.batch_size} = "
                     f"{config.sft.steps * config.sft.batch_size / len(task.demonstrations):.1f} passes over "
                     f"{len(task.demonstrations):,} demonstrations {why('sft', 'steps')}")
    if task.preferences:
        lines.append(f"reward: {config.reward.epochs} passes over {len(task.preferences):,} pairs "
                     f"{why('reward', 'epochs')}")
    if rl_prompts > 0:
        lines.append(f"ppo: {config.ppo.iterations:,} iterations of {config.ppo.prompts_per_iteration} = "
                     f"{config.ppo.iterations * config.ppo.prompts_per_iteration / rl_prompts:.1f} passes over "
                     f"{rl_prompts:,} training prompts {why('ppo', 'iterations')}")
    return config, lines

"""Pairs of completions and the labeller's answers, kept as plain JSON lines.

For each prompt two responses are sampled from a model; the labeller compares them. The
synthetic labeller is the control side's `SyntheticLabeller` fed the two responses' gold scores:
exact (the higher gold wins, a tie is "equally good") or Boltzmann-noisy. The answer vocabulary
is `proximal prefs`'s: label = mu(1) = 1.0 (first better), 0.0 (second better), 0.5 (equally
good), null (can't tell: recorded, never trained on). One query per line of comparisons.jsonl:

  {"query": 0, "prompt": "47+38=", "responses": ["85", "75"], "ended": [true, true],
   "label": 1.0, "labeller": "synthetic", "true_returns": [1.0, 0.0], "validation": false}

`true_returns` holds the gold scores (the name `ReplayLabeller` checks a replayed query against);
a person labelling through the page (`--reward.labeller human`, `ask_person`) writes the same
lines with "labeller": "human", plus which response was shown on the left and the answer given.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from proximal.errors import CheckpointError
from proximal.jsonl import read_json_lines
from proximal.lm.model import Completions, encode_completions
from proximal.labellers import SyntheticLabeller
from proximal.run import write_text_atomic

COMPARISONS_NAME = "comparisons.jsonl"


def label_records(prompts: list[str], first: list[str], second: list[str], ended_first: list[bool],
                  ended_second: list[bool], gold_first: np.ndarray | None, gold_second: np.ndarray | None,
                  labeller: SyntheticLabeller | None, validation_fraction: float, rng: np.random.Generator
                  ) -> list[dict]:
    """One query per prompt, as the dicts written to comparisons.jsonl, answered by the synthetic
    `labeller` from the gold scores (None: unanswered, "labeller": "human", for `ask_person`;
    a task without gold has gold None, and only a person can answer)."""
    records = []
    for query, prompt in enumerate(prompts):
        gold = None if gold_first is None else [float(gold_first[query]), float(gold_second[query])]
        records.append({
            "query": query, "prompt": prompt, "responses": [first[query], second[query]],
            "ended": [bool(ended_first[query]), bool(ended_second[query])],
            "label": None if labeller is None else labeller.answer(*gold),
            "labeller": "synthetic" if labeller is not None else "human",
            "true_returns": gold,
            "validation": bool(rng.random() < validation_fraction),
        })
    return records


PERSON_ANSWERS_NAME = "answers.jsonl"


def ask_person(records: list[dict], stage_dir: Path, host: str, port: int, task: str, seed: int,
               announce=print) -> list[dict]:
    """The unanswered `records` answered by a person on the labelling page (proximal.human),
    every answer fsynced to STAGE_DIR/answers.jsonl as it comes; returns them answered, in query
    order. A killed stage asks again only what was not answered (queries.jsonl, answers.jsonl)."""
    from proximal.human.labeller import HumanLabeller, Query, question_of
    from proximal.human.server import TOKEN_NAME, FeedbackServer

    def query_of(record: dict) -> Query:
        left = int(record["left"]) if "left" in record else int(1 + sides.integers(2))
        return Query(record["query"], question_of(record), (), bool(record["validation"]), left)

    sides = np.random.default_rng(seed)  # which response is shown on the left
    server = FeedbackServer(None, host, port, task=task, token_path=stage_dir / TOKEN_NAME)
    labeller = HumanLabeller(stage_dir, PERSON_ANSWERS_NAME, "wait", len(records), len(records), query_of)
    server.start(labeller, stage_dir / TOKEN_NAME)
    announce(f"label the pairs at {server.url}")
    try:
        labeller.submit([query_of(record) for record in records[labeller.asked:]])
        labeller.wait_until_answered()
    finally:
        labeller.finish()
        server.stop()
        labeller.close()
    answered = {record["query"]: record for record in read_records(stage_dir / PERSON_ANSWERS_NAME)}
    return [answered[record["query"]] for record in records]


def teaches_something(record: dict) -> bool:
    """False for an answered pair of two identical responses: equal scores and the label 0.5
    give a Bradley-Terry loss of log 2 whatever the weights, so its gradient is exactly zero.
    Such pairs are recorded (the labeller did answer) but not spent compute on."""
    return record["label"] is not None and (record["responses"][0] != record["responses"][1]
                                            or record["ended"][0] != record["ended"][1])


def write_records(path: Path, records: list[dict]) -> None:
    """The whole file at once (temp file + rename), so a kill leaves none or all of it."""
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def append_records(path: Path, records: list[dict]) -> None:
    """Add answered queries at the end of a comparisons file, flushed to disk before returning."""
    with open(path, "a") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
        file.flush()
        os.fsync(file.fileno())


def _record_problem(record) -> str | None:
    """What is wrong with one comparisons.jsonl record (None: nothing), in a few words."""
    if not isinstance(record, dict):
        return f"a JSON object is expected, got {type(record).__name__}"
    for key in ("prompt", "responses", "ended", "label", "validation"):
        if key not in record:
            return f"the field {key!r} is missing"
    if not isinstance(record["prompt"], str):
        return "'prompt' must be a string"
    for key, kind in (("responses", str), ("ended", bool)):
        value = record[key]
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, kind) for v in value)):
            return f"{key!r} must be a list of two {kind.__name__}s"
    label = record["label"]
    if label is not None and not (isinstance(label, (int, float)) and not isinstance(label, bool)
                                  and 0.0 <= label <= 1.0):  # NaN fails the range check too
        return f"'label' must be 1.0, 0.0, 0.5, null or a number in [0, 1], got {json.dumps(label)}"
    if not isinstance(record["validation"], bool):
        return "'validation' must be true or false"
    gold = record.get("true_returns")
    if gold is not None and not (isinstance(gold, list) and len(gold) == 2
                                 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in gold)):
        return "'true_returns' must be null or a list of two numbers"
    return None


def read_records(path: Path) -> list[dict]:
    """The records of a comparisons.jsonl file, each checked: a bad one is a one-line error that
    names the file, the line and the field, before anything trains on it."""
    records = []
    for number, record in read_json_lines(path, CheckpointError):
        problem = _record_problem(record)
        if problem is not None:
            raise CheckpointError(f"{path} line {number}: {problem}")
        records.append(record)
    return records


@dataclass
class PairBatch:
    """Labelled pairs as tensors: side 1 of pair i is row i of `first`, side 2 row i of `second`."""

    first: Completions
    second: Completions
    labels: torch.Tensor  # [M] mu(1)
    gold: torch.Tensor  # [M, 2], NaN where the task has no gold
    is_validation: torch.Tensor  # [M] bool

    def select(self, index: torch.Tensor) -> PairBatch:
        return PairBatch(self.first.select(index), self.second.select(index), self.labels[index], self.gold[index],
                         self.is_validation[index])

    @property
    def size(self) -> int:
        return len(self.labels)

    def sides(self) -> Completions:
        """Both sides as one batch [2M]: pair i's first response in row 2i, its second in row
        2i + 1, the narrower side's responses padded. The two rows of a pair share their prompt,
        which a forward pass then reads once (`completions_forward`)."""
        width = max(self.first.response_ids.shape[1], self.second.response_ids.shape[1])

        def side_by_side(first: torch.Tensor, second: torch.Tensor, padded: bool = False) -> torch.Tensor:
            if padded:  # [M, R] -> [M, width]: the new columns are padding (0, masked out)
                first, second = (F.pad(side, (0, width - side.shape[1])) for side in (first, second))
            return torch.stack([first, second], dim=1).flatten(0, 1)  # [2M, ...]

        first, second = self.first, self.second
        return Completions(side_by_side(first.prompt_ids, second.prompt_ids),
                           side_by_side(first.prompt_mask, second.prompt_mask),
                           side_by_side(first.response_ids, second.response_ids, padded=True),
                           side_by_side(first.response_mask, second.response_mask, padded=True),
                           side_by_side(first.ended, second.ended))


def pairs_from_records(records: list[dict], tokenizer, device: str) -> PairBatch:
    """The answered queries ("can't tell" dropped) as one padded batch per side."""
    answered = [record for record in records if record["label"] is not None]
    prompts = [record["prompt"] for record in answered]

    def side(index: int) -> Completions:
        return encode_completions(tokenizer, prompts, [record["responses"][index] for record in answered],
                                  [record["ended"][index] for record in answered], device)

    return PairBatch(side(0), side(1), torch.tensor([float(r["label"]) for r in answered], device=device),
                     torch.tensor([r["true_returns"] or [math.nan, math.nan] for r in answered], device=device),
                     torch.tensor([bool(r["validation"]) for r in answered], device=device))

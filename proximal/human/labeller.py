"""The person as a labeller: a bounded queue of queries between the training loop and the page.

Two threads share a `HumanLabeller`:
  training loop (PreferenceLearner)              web server (proximal.human.server)
  submit(queries) -> queries.jsonl, queue   ->   current() shows the oldest pending query
  take_answers() <- answers in arrival order <-  answer(query, choice): comparisons.jsonl + fsync
Every query is written to `queries.jsonl` (and fsynced) before it is shown; every answer is
appended to `comparisons.jsonl` and fsynced before `answer` returns, so the page says "saved"
only for an answer on disk. A query is answered at most once: a second answer to it (a second
tab, a reload, a double press) is refused. On `--run-dir` the answered queries are read back from
`comparisons.jsonl` and the unanswered ones from `queries.jsonl` go back into the queue.

Pace (`--reward.human-pace`): "wait" pauses training at each label round until every query shown so
far is answered (a full queue also blocks the round that fills it); "continue" never waits: the
oldest pending query is dropped when the queue is full, and PPO trains on the reward model
fitted to the answers in so far (reward 0 until the first fit).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from proximal.errors import ProximalError
from proximal.run import read_jsonl

QUERIES_NAME = "queries.jsonl"
ANSWERS = ("left", "right", "equal", "cant_tell")
PACES = ("wait", "continue")


class AnswerRefused(ProximalError):
    """An answer that is not recorded; `status` is the HTTP status the page gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Query:
    """One pair of clips to compare. `record` is its comparisons.jsonl line without the answer:
    where the clips came from, their observations and actions, their true returns (never shown)."""

    index: int  # the query's number in the run, from 0
    record: dict[str, Any]
    clips: tuple[torch.Tensor, torch.Tensor]  # [k, D] each: what the reward model sees
    is_validation: bool
    left: int  # 1 or 2: the clip shown on the left (random per query)

    def true_returns(self) -> tuple[float, float]:
        return tuple(self.record["true_returns"])


ANSWER_FIELDS = ("label", "left", "answer", "answered_at")  # what answering adds to a query's record


def question_of(record: dict[str, Any]) -> dict[str, Any]:
    """A recorded line without its answer: the query as it was asked."""
    return {key: value for key, value in record.items() if key not in ANSWER_FIELDS}


def label_of(answer: str, left: int) -> float | None:
    """mu(1), the label from clip 1's side: 1.0 clip 1 better, 0.0 clip 2 better, 0.5 equally
    good, None for "can't tell" (recorded, never trained on)."""
    if answer == "equal":
        return 0.5
    if answer == "cant_tell":
        return None
    left_better = answer == "left"
    return 1.0 if left_better == (left == 1) else 0.0


def fsync_append(file, line: str) -> None:
    """Append one line and put it on the disk before returning."""
    file.write(line + "\n")
    file.flush()
    os.fsync(file.fileno())


class HumanLabeller:
    """The queue of queries a person answers. `query_from_record` rebuilds a Query from its
    queries.jsonl line (for resume)."""

    def __init__(self, run_dir: Path, comparisons_name: str, pace: str, queue_size: int, total_labels: int,
                 query_from_record):
        self.run_dir = Path(run_dir)
        self.pace, self.queue_size, self.total_labels = pace, queue_size, total_labels
        self.condition = threading.Condition()
        self.pending: OrderedDict[int, Query] = OrderedDict()  # oldest first
        self.answered: set[int] = set()
        self.arrived: list[tuple[Query, float | None]] = []  # answered since the last take_answers
        self.dropped = 0
        self.asked = 0
        self.progress: dict[str, Any] = {"env_steps": 0, "finished": False}
        comparisons_path, queries_path = self.run_dir / comparisons_name, self.run_dir / QUERIES_NAME
        answered_records = read_jsonl(comparisons_path, repair=True)
        asked_records = read_jsonl(queries_path, repair=True)
        self.answered = {record["query"] for record in answered_records}
        self.asked = len(asked_records)
        unanswered = [record for record in asked_records if record["query"] not in self.answered]
        for record in unanswered[-queue_size:]:  # back in the queue after a resume
            query = query_from_record(record)
            self.pending[query.index] = query
        self.answers_recorded = len(answered_records)
        self.comparisons_file = open(comparisons_path, "a")
        self.queries_file = open(queries_path, "a")

    # -- the training side -------------------------------------------------------------------

    def submit(self, queries: list[Query]) -> None:
        """Queue new queries (each on disk first). With pace "wait" a full queue blocks until the
        person answers; with "continue" the oldest pending query is dropped instead."""
        for query in queries:
            fsync_append(self.queries_file, json.dumps({**query.record, "left": query.left}))
            with self.condition:
                while self.pace == "wait" and len(self.pending) >= self.queue_size:
                    self.condition.wait()
                if len(self.pending) >= self.queue_size:
                    self.pending.popitem(last=False)
                    self.dropped += 1
                self.pending[query.index] = query
                self.asked += 1
                self.condition.notify_all()

    def wait_until_answered(self) -> None:
        """Block until no query is pending (pace "wait", at a label round)."""
        with self.condition:
            while self.pending:
                self.condition.wait()

    def take_answers(self) -> list[tuple[Query, float | None]]:
        """The answers that arrived since the last call, in arrival order."""
        with self.condition:
            arrived, self.arrived = self.arrived, []
        return arrived

    def set_progress(self, **progress: Any) -> None:
        with self.condition:
            self.progress.update(progress)
            self.condition.notify_all()

    # -- the page's side ---------------------------------------------------------------------

    def current(self) -> Query | None:
        """The oldest pending query: what the page shows next."""
        with self.condition:
            return next(iter(self.pending.values()), None)

    def query(self, index: int) -> Query:
        with self.condition:
            if index not in self.pending:
                raise AnswerRefused(404, f"query {index} is not waiting for an answer")
            return self.pending[index]

    def answer(self, index: int, answer: str) -> dict[str, Any]:
        """Record one answer (on disk before returning) and return the new status. Refused:
        an unknown answer (400), a query answered already (409) or never asked (404)."""
        if answer not in ANSWERS:
            raise AnswerRefused(400, f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
        with self.condition:
            if index in self.answered:
                raise AnswerRefused(409, f"query {index} was answered already; your answer was not recorded")
            if index not in self.pending:
                raise AnswerRefused(404, f"query {index} is not waiting for an answer")
            query = self.pending.pop(index)
            label = label_of(answer, query.left)
            record = {**query.record, "label": label, "left": query.left, "answer": answer,
                      "answered_at": round(time.time(), 3)}
            fsync_append(self.comparisons_file, json.dumps(record))
            self.answered.add(index)
            self.answers_recorded += 1
            self.arrived.append((query, label))
            self.condition.notify_all()
        return self.status()

    def status(self) -> dict[str, Any]:
        """What the page shows besides the clips: never a true return."""
        with self.condition:
            return {"answers": self.answers_recorded, "asked": self.asked, "labels": self.total_labels,
                    "queue": len(self.pending), "queue_size": self.queue_size, "dropped": self.dropped,
                    "pace": self.pace, **self.progress}

    def finish(self) -> None:
        """Training is over: the page says so, and nothing more is accepted."""
        with self.condition:
            self.pending.clear()
            self.progress["finished"] = True
            self.condition.notify_all()

    def close(self) -> None:
        self.comparisons_file.close()
        self.queries_file.close()


"""The run layer every trainer shares: run directories, resuming from a checkpoint, and files
written so that a kill at any moment leaves each one absent or whole.

- `unique_run_dir`: RUNS_DIR/<name>__<time>/, unique even when two runs start in the same second.
- `locked_run_dir`: one process at a time writes into a run directory (an flock on RUN_DIR/run.lock,
  which holds the holder's pid; a second is refused in one line; a dead holder's lock is free).
- `restore_states`: put each object back as a checkpoint holds it (resume).
- `write_text_atomic`, `write_json_atomic`, `save_figure_atomic`: a result, summary or plot,
  written to a temp file and renamed into place.
- `read_jsonl`: the records of an append-only JSON-lines file; a line cut short by a kill (the
  last one, never fsynced) is dropped, and with `repair` rewritten away before appending again.
- `CsvLog`: one metrics row per step, appended and flushed at once. Resuming from a checkpoint
  first drops the rows logged after it (work about to be redone) by rewriting the file to a temp
  file and renaming it, never by truncating it in place.
Checkpoints themselves go through `proximal.checkpoint.save_checkpoint` (atomic, weights-only).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from proximal.checkpoint import load_checkpoint
from proximal.errors import ProximalError
from proximal.jsonl import LineError, file_text, parse_line


def unique_run_dir(runs_dir: str | Path, name: str) -> Path:
    """A new directory RUNS_DIR/<name>__<time>, suffixed -2, -3 ... if that one exists; readable by
    the user alone (0700): it holds the labelling page's token and the true returns of queries."""
    base = Path(runs_dir) / f"{name}__{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    run_dir.mkdir(parents=True, mode=0o700)
    return run_dir


LOCK_NAME = "run.lock"
_HELD: set[Path] = set()  # run directories this process holds (a nested lock on one is a no-op)


@contextlib.contextmanager
def locked_run_dir(run_dir: Path):
    """Hold RUN_DIR/run.lock for the duration of a `with` block: a second process writing into the
    same run (two identical `rlhf` runs, a `--run-dir` beside a live run) would interleave its
    records with this one's. The lock is the kernel's (`flock` on the file, which holds the
    holder's pid for the error message): it is released when its process ends, however it ends,
    and taking it is one atomic step, so no two processes can both hold it and no live one loses it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new one: the user's alone, as unique_run_dir's
    lock = run_dir / LOCK_NAME
    descriptor = _take_lock(lock, run_dir)
    os.fchmod(descriptor, 0o600)  # a file left by a killed holder keeps whatever mode it had
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    _HELD.add(run_dir)
    try:
        yield
    finally:
        _HELD.discard(run_dir)
        lock.unlink(missing_ok=True)  # before the lock goes: a waiting process then finds the path gone
        os.close(descriptor)


def _take_lock(lock: Path, run_dir: Path) -> int:
    """An open descriptor of `lock` holding its exclusive flock, or the one-line error naming the
    holder. A lock file its holder unlinked while this process waited is not the lock any more:
    opened again."""
    while True:
        descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "that holds it"
            os.close(descriptor)
            raise ProximalError(f"{run_dir} is in use by process {holder} (its {LOCK_NAME}); wait for it "
                                "to finish") from None
        try:
            if os.fstat(descriptor).st_ino == os.stat(lock).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def restore_states(checkpoint_path: Path, **stateful: Any) -> dict[str, Any] | None:
    """If `checkpoint_path` exists, load each named object's state from the checkpoint entry of
    the same name (`set_state` for a torch.Generator, `load_state_dict` for the rest) and return
    the checkpoint for its other entries; else None (a fresh start)."""
    if not Path(checkpoint_path).exists():
        return None
    state = load_checkpoint(checkpoint_path)
    for name, target in stateful.items():
        if isinstance(target, torch.Generator):
            target.set_state(state[name])
        else:
            target.load_state_dict(state[name])
    return state


def write_text_atomic(path: Path, text: str) -> None:
    """The whole file or none of it: a temp file beside it, fsynced, renamed into place."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w", newline="") as file:  # the text verbatim: no newline translation
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_figure_atomic(figure, path: Path, dpi: int = 110) -> Path:
    """A matplotlib figure saved whole or not at all (the temp name keeps the extension, from
    which matplotlib takes the format)."""
    path = Path(path)
    temp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(temp, dpi=dpi)
    os.replace(temp, path)
    return path


def read_jsonl(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] if it does not exist). Only the last line may be
    unreadable (cut short by a kill while it was written): it is dropped, and with `repair` the
    file is rewritten without it, atomically. An unreadable line before the last is an error."""
    path = Path(path)
    if not path.exists():
        return []
    text = file_text(path)
    lines = text.split("\n")
    records, cut = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_line(line))
        except LineError as problem:
            if number < len(lines) - 1 or (number == len(lines) - 1 and lines[-1] != ""):
                raise ProximalError(f"{path} line {number}: {problem}") from None
            cut = True
    complete = text.endswith("\n") or text == ""
    if repair and (cut or not complete):
        write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))
    return records


def read_csv_rows(path: Path) -> list[dict[str, float | None]]:
    """Rows of a metrics CSV as numbers (None where a cell is empty)."""
    with open(path, newline="") as file:
        return [{key: (float(value) if value not in ("", None) else None) for key, value in row.items()}
                for row in csv.DictReader(file)]


class CsvLog:
    """Append-only metrics CSV. `keep_until`: on resume, keep only the rows whose `step_column`
    is <= it (the rest are rewritten away atomically); None starts a new file."""

    def __init__(self, path: Path, columns: tuple[str, ...], step_column: str, keep_until: float | None):
        self.path, self.columns = Path(path), columns
        kept = ([row for row in read_csv_rows(self.path) if row[step_column] is not None
                 and row[step_column] <= keep_until] if keep_until is not None and self.path.exists() else [])
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: _format(row.get(key)) for key in columns} for row in kept)
        write_text_atomic(self.path, text.getvalue())
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="ignore")

    def log(self, row: dict[str, Any]) -> None:
        self._writer.writerow({key: _format(row.get(key)) for key in self.columns})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)

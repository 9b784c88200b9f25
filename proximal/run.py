"""The run layer the LM stages share: files written so that a kill at any moment leaves each one
absent or whole.

- `write_json_atomic`: a summary or result, written to a temp file, fsynced, renamed into place.
- `CsvLog`: one metrics row per step, appended and flushed at once. Resuming from a checkpoint
  first drops the rows logged after it (work about to be redone) by rewriting the file to a temp
  file and renaming it, never by truncating it in place.
Checkpoints themselves go through `proximal.checkpoint.save_checkpoint` (atomic, weights-only).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as file:
        file.write(json.dumps(data, indent=2) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


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
        temp = self.path.with_name(f".{self.path.name}.tmp")
        with open(temp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({key: _format(row.get(key)) for key in columns} for row in kept)
        os.replace(temp, self.path)
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

"""Reading JSON-lines files, the one way every reader in the package does it.

A file may come from a user (prompts, demonstrations, pairs, recorded answers) or from a run a
kill cut short; whatever its bytes, a reader gets values or a one-line reason naming the file
and line, never a traceback:

- `file_text`: a text file's content: missing, a directory, unreadable and non-UTF-8 files
  refused; a UTF-8 byte-order mark (as Windows editors write it) skipped, as `utf-8-sig` does.
- `parse_line`: one line's JSON value: invalid JSON, nesting deeper than Python's decoder can
  follow (RecursionError) and strings holding a lone UTF-16 surrogate (`"\\ud800"`, valid JSON
  but not text: no tokenizer or UTF-8 file can hold it) refused.
- `read_json_lines`: both, for a file whose every line must be whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proximal.errors import ProximalError


class LineError(ValueError):
    """Why one line is not a JSON value a reader can use (the caller adds the file and line)."""


def file_text(path: str | Path, error: type[ProximalError] = ProximalError) -> str:
    """The text of the file at `path`, or `error` in one line saying why it cannot be read."""
    file = Path(path)
    if file.is_dir():
        raise error(f"{path}: is a directory, not a JSON-lines file")
    if not file.exists():
        raise error(f"{path}: no such file")
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not UTF-8 text (byte {problem.start} cannot be decoded: save it as UTF-8)") from None
    except OSError as problem:
        raise error(f"{path}: cannot be read ({problem.strerror or problem})") from None


def parse_line(line: str) -> Any:
    """The JSON value of one line, or LineError saying why there is none to use."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as problem:
        raise LineError(f"not valid JSON ({problem.msg} at column {problem.colno})") from None
    except RecursionError:
        raise LineError("JSON nested too deeply to read") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as problem:
        surrogate = problem.object[problem.start:problem.end].encode("unicode_escape").decode()
        raise LineError(f"a string holds a lone UTF-16 surrogate ({surrogate}), which is not text") from None
    except RecursionError:
        raise LineError("JSON nested too deeply to read") from None
    return value


def read_json_lines(path: str | Path, error: type[ProximalError] = ProximalError) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of `path`; the first bad line is `error`
    naming the file and line."""
    values = []
    for number, line in enumerate(file_text(path, error).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, parse_line(line)))
        except LineError as problem:
            raise error(f"{path} line {number}: {problem}") from None
    return values

"""`proximal inspect RUN_DIR`: one self-contained HTML page of a run's PPO snapshots
(lm/snapshots.py), to see a sequence reward become per-token advantages.

The page (inspector.html, the data written into it as JSON) needs no network and no other file;
`--serve` shows it on 127.0.0.1 behind a random token, as the labelling page is.
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from proximal.errors import ProximalError
from proximal.lm.snapshots import SNAPSHOTS_NAME
from proximal.run import read_jsonl, write_text_atomic

PAGE_NAME = "inspect.html"
PAGE_HEADERS = {  # --serve: the page's own policy (no network, inline script and style) sent as a header too
    "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
}
TOKEN_FIELDS = ("logprobs", "ref_logprobs", "kl_penalty", "rewards", "values", "returns", "advantages", "whitened",
                "first_ratio", "ratio")  # one finite number per token each, as snapshots.py writes them


class InspectError(ProximalError):
    """A run directory with nothing to inspect."""


def snapshots_path(run_dir: Path) -> Path:
    """RUN_DIR/ppo/snapshots.jsonl (RUN_DIR may be the ppo folder itself)."""
    run_dir = Path(run_dir)
    return run_dir / SNAPSHOTS_NAME if (run_dir / SNAPSHOTS_NAME).exists() else run_dir / "ppo" / SNAPSHOTS_NAME


def read_snapshots(run_dir: Path) -> list[dict]:
    path = snapshots_path(run_dir)
    if not Path(run_dir).is_dir():
        raise InspectError(f"{run_dir} is not a directory")
    snapshots = read_jsonl(path) if path.exists() else []
    if not snapshots:
        raise InspectError(f"{run_dir} holds no PPO snapshots ({path} is missing or empty): run `proximal rlhf` "
                           "with --ppo.snapshot-every > 0 (the default, 10)")
    rows = None  # the first snapshot's count: every one answers the same fixed prompts
    for number, snapshot in enumerate(snapshots, start=1):
        problem = _snapshot_problem(snapshot, rows)
        if problem is not None:
            raise InspectError(f"{path} line {number}: {problem}; it is not a snapshot proximal wrote")
        rows = len(snapshot["rows"])
    return snapshots


def _is_number(value, finite: bool = True) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (not finite or math.isfinite(value))


def _snapshot_problem(snapshot, rows: int | None) -> str | None:
    """What in one snapshot line the page could not draw (a JavaScript TypeError in the browser),
    or None: the fields snapshots.py writes, with their types and one value per token."""
    if not isinstance(snapshot, dict):
        return f"a snapshot is a JSON object, got {type(snapshot).__name__}"
    kinds = {"iteration": lambda v: isinstance(v, int) and not isinstance(v, bool), "kl_coef": _is_number,
             "clip_coef": _is_number, "method": lambda v: isinstance(v, str),
             "summary": lambda v: isinstance(v, dict) and all(x is None or _is_number(x, False) for x in v.values()),
             "rows": lambda v: isinstance(v, list) and len(v) > 0 and rows in (None, len(v))}
    for name, is_kind in kinds.items():
        if name not in snapshot or not is_kind(snapshot[name]):
            return f"field {name!r} is missing or of the wrong type" + (
                " (a non-empty list, as many rows as the first snapshot's)" if name == "rows" else "")
    for index, row in enumerate(snapshot["rows"]):
        where = f"row {index}"
        if not isinstance(row, dict):
            return f"{where} is not a JSON object"
        tokens = row.get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(token, str) for token in tokens)):
            return f"{where}: 'tokens' must be a list of strings"
        row_kinds = {"prompt": lambda v: isinstance(v, str), "text": lambda v: isinstance(v, str),
                     "ended": lambda v: isinstance(v, bool), "score": _is_number,
                     "gold": lambda v: v is None or _is_number(v),
                     "clipped": lambda v: isinstance(v, list) and len(v) == len(tokens)
                     and all(isinstance(x, bool) for x in v),
                     **{name: lambda v: isinstance(v, list) and len(v) == len(tokens) and all(map(_is_number, v))
                        for name in TOKEN_FIELDS}}
        for name, is_kind in row_kinds.items():
            if name not in row or not is_kind(row[name]):
                return f"{where}: field {name!r} is missing or of the wrong type (one per token where there is one)"
    return None


def render_page(snapshots: list[dict], source: str) -> str:
    """The page with the snapshots in it; '<' escaped so no completion can close the script."""
    snapshots = [{**snapshot, "summary": {name: value if value is None or math.isfinite(value) else None
                                          for name, value in snapshot["summary"].items()}}
                 for snapshot in snapshots]  # NaN (the explained variance of constant returns) is no JSON: "-"
    data = json.dumps({"snapshots": snapshots, "source": source}, allow_nan=False).replace("<", "\\u003c")
    data = data.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    template = resources.files("proximal.lm").joinpath("inspector.html").read_text(encoding="utf-8")
    return template.replace("/*DATA*/", data)


def write_page(run_dir: Path, out: Path | None = None) -> Path:
    """Write the page (default RUN_DIR/ppo/inspect.html) and return its path; nothing is written
    when the run has no snapshots."""
    snapshots = read_snapshots(run_dir)
    path = snapshots_path(run_dir)
    out = Path(out) if out is not None else path.parent / PAGE_NAME
    iterations = [snapshot["iteration"] for snapshot in snapshots]
    source = (f"{path}: {len(snapshots)} snapshots, iterations {iterations[0]} to {iterations[-1]}, "
              f"{len(snapshots[0]['rows'])} completions each ({snapshots[0]['method']})")
    write_text_atomic(out, render_page(snapshots, source))
    return out


class PageServer:
    """The page on HOST:PORT; every request must carry the token (`?token=` or X-Token)."""

    def __init__(self, html: str, host: str = "127.0.0.1", port: int = 0):
        self.token = secrets.token_urlsafe(24)
        body, token = html.encode("utf-8"), self.token

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:  # the terminal is the training's, not a web log
                pass

            def _send(self, status: HTTPStatus, payload: bytes, kind: str) -> None:
                self.send_response(status)
                for header, value in {"Content-Type": kind, "Content-Length": str(len(payload)),
                                      **PAGE_HEADERS}.items():
                    self.send_header(header, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                given = self.headers.get("X-Token") or (parse_qs(url.query).get("token") or [""])[0]
                if not hmac.compare_digest(given.encode(), token.encode()):
                    self._send(HTTPStatus.FORBIDDEN, b"missing or wrong token: open the URL proximal printed\n",
                               "text/plain; charset=utf-8")
                elif url.path != "/":
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
                else:
                    self._send(HTTPStatus.OK, body, "text/html; charset=utf-8")

            do_HEAD = do_GET

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as error:
            raise InspectError(f"cannot listen on {host}:{port} ({error.strerror})") from None
        self.httpd.daemon_threads = True
        bound_host, bound_port = self.httpd.server_address[:2]
        self.url = f"http://{bound_host}:{bound_port}/?token={self.token}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> str:
        self.thread.start()
        return self.url

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

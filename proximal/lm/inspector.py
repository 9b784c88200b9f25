"""`proximal inspect RUN_DIR`: one self-contained HTML page of a run's PPO snapshots
(lm/snapshots.py), to see a sequence reward become per-token advantages.

The page (inspector.html, the data written into it as JSON) needs no network and no other file;
`--serve` shows it on 127.0.0.1 behind a random token, as the labelling page is.
"""

from __future__ import annotations

import hmac
import json
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
    return snapshots


def render_page(snapshots: list[dict], source: str) -> str:
    """The page with the snapshots in it; '<' escaped so no completion can close the script."""
    data = json.dumps({"snapshots": snapshots, "source": source}).replace("<", "\\u003c")
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
                for header, value in (("Content-Type", kind), ("Content-Length", str(len(payload))),
                                      ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                                      ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")):
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

"""The local web server a person labels through: the page, the current query, its clips, answers.

Python's standard library (`http.server.ThreadingHTTPServer`): one person and a handful of
requests a second need no framework, and the core install gains no dependency. Routes (every
request carries the token from the printed URL, `?token=` or the `X-Token` header; without it,
403 and nothing is read or written):
  GET  /                         the page (proximal/human/page.html, from the package)
  GET  /api/state                counts, training progress and the current query (no true returns)
  GET  /api/clip?query=N&side=S  the film strip PNG of query N's left or right clip (control tasks;
                                 an LM pair's prompt and two responses come as text in the state)
  POST /api/answer               {"query": N, "answer": "left|right|equal|cant_tell"} -> saved
Anything else is 404 (no path reaches the file system: the page is the one file served), a bad
body 400, a second answer to a query 409. The server binds 127.0.0.1 unless `--host` says
otherwise; the token stays required there too.
"""

from __future__ import annotations

import hmac
import json
import secrets
import sys
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from proximal.errors import ConfigError
from proximal.human.clips import ClipRenderer
from proximal.human.labeller import AnswerRefused, HumanLabeller

MAX_BODY_BYTES = 4096
SIDES = ("left", "right")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A browser that drops a connection (a closed tab, an image no longer wanted) is normal."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FeedbackServer:
    """Serves one run's queries to a person, on a background thread (`start`, `stop`)."""

    def __init__(self, renderer: ClipRenderer | None, host: str = "127.0.0.1", port: int = 0,
                 task: str | None = None):
        """Binds the port at once (a port in use fails here, before a run writes anything); `start`
        serves a labeller's queries. `renderer` draws clips (control tasks); None serves text pairs
        (records with "prompt" and "responses"). `task`: the sentence telling the person what is
        better (default: the renderer's)."""
        self.labeller: HumanLabeller | None = None
        self.renderer = renderer
        self.task = task if task is not None else renderer.task
        self.token = secrets.token_urlsafe(24)
        self.page = resources.files("proximal.human").joinpath("page.html").read_bytes()
        self.frame_width, self.frame_height = renderer.frame_size() if renderer is not None else (0, 0)
        self.strips: OrderedDict[tuple[int, str], bytes] = OrderedDict()  # a few recent film strips
        self.strips_lock = threading.Lock()
        try:
            self.httpd = _QuietServer((host, port), _handler_for(self))
        except OSError as error:
            raise ConfigError(f"cannot serve the labelling page on {host}:{port} ({error.strerror or error}); "
                              "pick another --port (0: any free one)") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="feedback-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/?token={self.token}"

    def start(self, labeller: HumanLabeller) -> None:
        self.labeller = labeller
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def state(self) -> dict[str, Any]:
        return {**self.labeller.status(), "task": self.task, "query": self._shown(self.labeller.current())}

    def _shown(self, query) -> dict[str, Any] | None:
        """What the page needs of a query: never its true returns."""
        if query is None:
            return None
        if "responses" in query.record:  # an LM pair: the prompt and the two responses, left first
            order = (0, 1) if query.left == 1 else (1, 0)
            record = query.record
            return {"index": query.index, "kind": "text", "prompt": record["prompt"],
                    "responses": [record["responses"][side] for side in order],
                    "ended": [bool(record["ended"][side]) for side in order]}
        return {"index": query.index, "kind": "clips", "frames": len(query.record["clips"][0]["observations"]),
                "fps": self.renderer.fps, "width": self.frame_width, "height": self.frame_height}

    def film_strip(self, index: int, side: str) -> bytes:
        key = (index, side)
        with self.strips_lock:
            if key in self.strips:
                return self.strips[key]
        query = self.labeller.query(index)
        if self.renderer is None or "clips" not in query.record:
            raise AnswerRefused(404, f"query {index} has no clips")
        clip = query.record["clips"][(query.left - 1) if side == "left" else (2 - query.left)]
        strip = self.renderer.film_strip(clip["observations"], clip["actions"])
        with self.strips_lock:
            self.strips[key] = strip
            while len(self.strips) > 8:
                self.strips.popitem(last=False)
        return strip


def _handler_for(server: FeedbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection for a person's whole session
        disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal shows training
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        def _authorised(self, query: dict[str, list[str]]) -> bool:
            given = self.headers.get("X-Token") or (query.get("token") or [""])[0]
            if hmac.compare_digest(given.encode(), server.token.encode()):
                return True
            self._error(HTTPStatus.FORBIDDEN, "missing or wrong token: open the URL proximal printed")
            return False

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if not self._authorised(query):
                return
            if url.path == "/":
                self._send(HTTPStatus.OK, server.page, "text/html; charset=utf-8")
            elif url.path == "/api/state":
                self._json(HTTPStatus.OK, server.state())
            elif url.path == "/api/clip":
                side = (query.get("side") or [""])[0]
                try:
                    index = int((query.get("query") or [""])[0])
                except ValueError:
                    return self._error(HTTPStatus.BAD_REQUEST, "query must be an integer")
                if side not in SIDES:
                    return self._error(HTTPStatus.BAD_REQUEST, "side must be left or right")
                try:
                    self._send(HTTPStatus.OK, server.film_strip(index, side), "image/png")
                except AnswerRefused as refused:
                    self._error(refused.status, str(refused))
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            if not self._authorised(parse_qs(url.query)):
                return
            if url.path != "/api/answer":
                return self._error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            if not 0 < length <= MAX_BODY_BYTES:
                self.close_connection = True
                return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else HTTPStatus.BAD_REQUEST,
                                   f"the body must be 1 to {MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(self.rfile.read(length))
                index, answer = body["query"], body["answer"]
                if not (isinstance(index, int) and not isinstance(index, bool) and isinstance(answer, str)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return self._error(HTTPStatus.BAD_REQUEST,
                                   'the body must be JSON {"query": <int>, "answer": "left|right|equal|cant_tell"}')
            try:
                status = server.labeller.answer(index, answer)
            except AnswerRefused as refused:
                return self._error(refused.status, str(refused))
            self._json(HTTPStatus.OK, {"saved": True, "query": index, **status})

        def _not_allowed(self) -> None:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not used here")

        do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    return Handler

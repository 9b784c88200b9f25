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
body 400, a second answer to a query 409. The server binds 127.0.0.1 unless `--reward.host` says
otherwise; the token stays required there too.

Beyond the token: an answer must come as `application/json` (an HTML form on another site cannot
send that), with a Host naming this server and, when the browser sends one, its own Origin; a
body is always read (or the connection closed) so it is never taken for the next request; a
connection idle for `IDLE_SECONDS` is closed; every reply, the standard library's error pages
included, is `no-store`, `nosniff`, framed by nobody and sends no Referer (the URL holds the
token). With a `token_path`, the token is kept there (0600) and a resumed run serves the same URL,
so an open tab keeps working.
"""

from __future__ import annotations

import hmac
import io
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from proximal.errors import ConfigError
from proximal.human.clips import ClipRenderer
from proximal.human.labeller import AnswerRefused, HumanLabeller

MAX_BODY_BYTES = 4096
IDLE_SECONDS = 60.0  # each request (the wait for it, its headers and body) must arrive within this
MAX_CONNECTIONS = 32  # open at once (a thread each); a browser opens ~6 to one host; more are closed at once
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'none'; "
                               "base-uri 'none'",
}


TOKEN_NAME = "page_token"  # in the run directory: the URL a resumed run serves again


def read_token(token_path: Path | None) -> str | None:
    """The token a run kept at `token_path`, or None."""
    if token_path is None or not Path(token_path).is_file():
        return None
    return Path(token_path).read_text().strip() or None


def keep_token(token: str, token_path: Path) -> None:
    """Write the page's token where a resumed run finds it (0600: only the user reads it)."""
    descriptor = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
SIDES = ("left", "right")


def _listening(host: str, port: int, handler) -> _QuietServer:
    try:
        return _QuietServer((host, port), handler)
    except OSError as error:
        raise ConfigError(f"cannot serve the labelling page on {host}:{port} ({error.strerror or error}); "
                          "pick another --reward.port (0: any free one)") from None


def check_can_serve(host: str, port: int) -> None:
    """Refuse, before a run writes anything, a host and port the page could not be served on
    (another process holds the port): the same one line the server would give later."""
    _listening(host, port, BaseHTTPRequestHandler).server_close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        """A thread for the connection, unless MAX_CONNECTIONS are open: then it is closed unread
        (sockets held open by anyone on the machine cannot take a thread each without end)."""
        with self.connections_lock:
            full = len(self.open_connections) >= MAX_CONNECTIONS
            if not full:
                self.open_connections.add(request)
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every kept-alive connection: a stopped server answers nothing more on them."""
        with self.connections_lock:
            for connection in list(self.open_connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request, client_address) -> None:
        """A browser that drops a connection (a closed tab, an image no longer wanted) is normal."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _DeadlineReader(io.RawIOBase):
    """A connection's bytes, every read bounded by the deadline of the request being read: a
    client that sends one byte every 20 s (never idle long enough for a per-read timeout) is cut
    off all the same."""

    def __init__(self, connection: socket.socket):
        self.connection, self.deadline = connection, math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self.connection.settimeout(left)
        return self.connection.recv_into(buffer)


class FeedbackServer:
    """Serves one run's queries to a person, on a background thread (`start`, `stop`)."""

    def __init__(self, renderer: ClipRenderer | None, host: str = "127.0.0.1", port: int = 0,
                 task: str | None = None, token_path: Path | None = None, idle_seconds: float = IDLE_SECONDS):
        """Binds the port at once (a port in use fails here, before a run writes anything); `start`
        serves a labeller's queries. `renderer` draws clips (control tasks); None serves text pairs
        (records with "prompt" and "responses"). `task`: the sentence telling the person what is
        better (default: the renderer's). `token_path`: where the token is kept across a resume."""
        self.labeller: HumanLabeller | None = None
        self.renderer = renderer
        self.task = task if task is not None else renderer.task
        self.token = read_token(token_path) or secrets.token_urlsafe(24)
        self.idle_seconds = idle_seconds
        self.page = resources.files("proximal.human").joinpath("page.html").read_bytes()
        self.frame_width, self.frame_height = renderer.frame_size() if renderer is not None else (0, 0)
        self.strips: OrderedDict[tuple[int, str], bytes] = OrderedDict()  # a few recent film strips
        self.strips_lock = threading.Lock()
        self.httpd = _listening(host, port, _handler_for(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="feedback-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/?token={self.token}"

    def start(self, labeller: HumanLabeller, token_path: Path | None = None) -> None:
        """Serve `labeller`'s queries; with `token_path`, the token is kept there for a resume."""
        if token_path is not None:
            keep_token(self.token, token_path)
        self.labeller = labeller
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.close_connections()
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
        timeout = server.idle_seconds  # an idle connection is closed, its thread freed

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the standard library's reader, replaced by one that keeps a deadline
            self.reader = _DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self.reader)

        def handle_one_request(self) -> None:
            """One request, which must arrive whole (request line, headers, body) within
            `idle_seconds` of the last reply: else the connection is closed."""
            self.reader.deadline = time.monotonic() + server.idle_seconds
            super().handle_one_request()

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal shows training
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.connection.settimeout(server.idle_seconds)  # the reply's own time, whatever the request left
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # a reply to HEAD has headers only
                self.wfile.write(body)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The standard library's own errors (a line too long, a bad request line, 501) as the
            same JSON with the same headers; the connection is closed (its state is unknown)."""
            self.close_connection = True
            self._error(code, message or HTTPStatus(code).phrase)

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

        def _same_site(self) -> bool:
            """The Host names this server (not a rebound DNS name) and the Origin, when sent, is its own."""
            port = self.server.server_address[1]
            bound = self.server.server_address[0]
            host = self.headers.get("Host", "")
            name, _, given_port = host.rpartition(":")
            local = bound in ("127.0.0.1", "localhost", "::1")
            if given_port != str(port) or (local and name not in ("127.0.0.1", "localhost", "[::1]")):
                self._error(HTTPStatus.FORBIDDEN, f"the Host header {host!r} does not name this server")
                return False
            origin = self.headers.get("Origin")
            if origin is not None and origin != f"http://{host}":
                self._error(HTTPStatus.FORBIDDEN, f"answers come from this page only, not from {origin!r}")
                return False
            return True

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True  # the body's end is unknown: it cannot be skipped
                return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            if not 0 < length <= MAX_BODY_BYTES:
                self.close_connection = True
                return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else HTTPStatus.BAD_REQUEST,
                                   f"the body must be 1 to {MAX_BODY_BYTES} bytes")
            url = urlsplit(self.path)
            keep_alive, self.close_connection = self.close_connection, True  # refused unread: close after
            if not self._authorised(parse_qs(url.query)):  # no token: not one more byte is read
                return
            self.close_connection = keep_alive
            raw = self.rfile.read(length)  # read before any other refusal, so the connection stays usable
            if not self._same_site():
                return
            if url.path != "/api/answer":
                return self._error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")
            if self.headers.get_content_type() != "application/json":
                return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "answers are sent as application/json")
            try:
                body = json.loads(raw)
                index, answer = body["query"], body["answer"]
                if not (isinstance(index, int) and not isinstance(index, bool) and isinstance(answer, str)):
                    raise TypeError
            except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: "[[[[..." nested deep
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

"""A real HTTP server for the REST connector tests (no mocks of the client).

Routes map (method, path) to a handler that gets the recorded request and returns
(status, headers, body). Every request is recorded, in arrival order, with the time
it arrived.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Recorded:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


Handler = Callable[[Recorded], Reply]


def json_reply(payload: Any, status: int = 200, **headers: str) -> Reply:
    """A JSON response."""
    return (
        status,
        {"Content-Type": "application/json", **headers},
        orjson.dumps(payload),
    )


class ApiServer:
    """A threading HTTP server on 127.0.0.1 with per-test routes."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded = Recorded(
                    self.command,
                    parts.path,
                    parse_qs(parts.query, keep_blank_values=True),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with server.lock:
                    server.requests.append(recorded)
                    handler = server.routes.get((self.command, parts.path))
                if handler is None:
                    status, headers, payload = json_reply({"error": "no route"}, 404)
                else:
                    status, headers, payload = handler(recorded)
                # `X-No-Length`: stream the body without Content-Length, then close.
                headers = dict(headers)
                unsized = headers.pop("X-No-Length", None) is not None
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    if unsized:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    else:
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    for start in range(0, len(payload), 16384):
                        self.wfile.write(payload[start : start + 16384])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            do_GET = do_POST = do_PUT = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def route(self, method: str, path: str, handler: Handler) -> None:
        """Answer `method path` with `handler(request)`."""
        with self.lock:
            self.routes[(method, path)] = handler

    def hits(self, path: str) -> list[Recorded]:
        """The requests made to `path`, in order."""
        with self.lock:
            return [r for r in self.requests if r.path == path]

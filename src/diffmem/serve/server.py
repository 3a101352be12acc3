"""The HTTP side of the explanation page: the page itself and a small JSON API over a PromptExplainer.

``GET /`` the page, ``GET /api/info`` model and settings, ``POST /api/explain`` and ``POST /api/thumbnail``
with ``{"prompt": ...}``. A POST must come from the page's own origin (no ``Origin`` of another host:
403), say ``Content-Type: application/json`` (415) and declare its exact length (411); bodies over
``MAX_BODY_BYTES`` are refused unread (413), and a body that does not arrive within
``READ_TIMEOUT_S`` ends the request (408). Every bad request is answered 4xx; 5xx means the model failed.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any

from diffmem.errors import DiffmemError
from diffmem.serve.explainer import PromptExplainer, QueueFull

MAX_BODY_BYTES = 16 * 1024
READ_TIMEOUT_S = 10.0  # for each read of a request: its lines and its body
LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger("diffmem.serve")


class ExplanationServer(ThreadingHTTPServer):
    """Serves the explanation page for one explainer; ``port=0`` picks a free port; a client gets
    ``read_timeout_s`` seconds for each read of its request."""

    daemon_threads = True

    def __init__(
        self,
        explainer: PromptExplainer,
        host: str = "127.0.0.1",
        port: int = 8765,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.explainer = explainer
        self.page = files("diffmem.serve").joinpath("page.html").read_bytes()
        handler = type("_TimedHandler", (_Handler,), {"timeout": read_timeout_s})
        try:
            super().__init__((host, port), handler)
        except OSError as error:
            raise DiffmemError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def start(self) -> threading.Thread:
        """Serve on a background thread (for tests and notebooks); stop with :meth:`stop`."""
        thread = threading.Thread(target=self.serve_forever, name="diffmem-serve", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop serving, close the socket and the explainer's worker."""
        self.shutdown()
        self.server_close()
        self.explainer.close()


class _Handler(BaseHTTPRequestHandler):
    server: ExplanationServer
    server_version = "diffmem"
    timeout = READ_TIMEOUT_S  # set on the socket: a client that stops sending cannot hold a thread

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif self.path == "/api/info":
            self._json(HTTPStatus.OK, self.server.explainer.info())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {self.path}"})

    def do_POST(self) -> None:
        actions = {
            "/api/explain": self.server.explainer.explain,
            "/api/thumbnail": self.server.explainer.thumbnail,
        }
        try:
            action = actions.get(self.path)
            if action is None:
                raise _Refused(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
            self._check_origin()
            request = self._body()
            self._json(HTTPStatus.OK, action(request.get("prompt")))
        except _Refused as refused:
            self.close_connection = True  # an unread or partly read body must not be taken for a request
            self._json(refused.status, {"error": str(refused)})
        except QueueFull as busy:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(busy)})
        except DiffmemError as error:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except Exception as error:  # a model failure answers 500; the server goes on
            log.exception("request %s failed", self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})

    def _check_origin(self) -> None:
        """Refuse a request a page of another site sends (the server may listen beyond localhost)."""
        origin = self.headers.get("Origin")
        if self.headers.get("Sec-Fetch-Site") == "cross-site" or (
            origin is not None and origin != f"http://{self.headers.get('Host', '')}"
        ):
            raise _Refused(HTTPStatus.FORBIDDEN, "requests from another origin are refused")
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise _Refused(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request as Content-Type: application/json"
            )

    def _body(self) -> dict[str, Any]:
        """The request's JSON object: exactly Content-Length bytes, at most MAX_BODY_BYTES, in time."""
        declared = self.headers.get("Content-Length", "")
        if not declared.isascii() or not declared.isdigit():
            raise _Refused(
                HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header: the body's size in bytes"
            )
        length = int(declared)
        if length > MAX_BODY_BYTES:
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request larger than {MAX_BODY_BYTES} bytes")
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            data = b""
        if len(data) != length:
            raise _Refused(HTTPStatus.REQUEST_TIMEOUT, f"the body ended after {len(data)} of {length} bytes")
        try:
            request = json.loads(data)
        except (ValueError, RecursionError) as error:  # bad JSON, bad UTF-8, or nested beyond Python's stack
            raise _Refused(
                HTTPStatus.BAD_REQUEST, f"the request is not JSON: {type(error).__name__}"
            ) from None
        if not isinstance(request, dict):
            raise _Refused(HTTPStatus.BAD_REQUEST, 'send a JSON object: {"prompt": "..."}')
        return request

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client left before the answer
            log.info("%s left before the answer to %s", self.address_string(), self.path)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status

"""A fault-injecting HTTP proxy in front of an S3 endpoint, for tests (127.0.0.1 only).

Every request (method, path, query, headers, body) is forwarded to the upstream endpoint and its
response relayed, except requests that match a rule, which get a fault instead:

- ``"503"``: an S3 XML error, ``ServiceUnavailable`` unless another ``code`` is given
  (e.g. ``"SlowDown"``), status 503;
- ``"403"``: an S3 XML error, ``AccessDenied`` unless another ``code`` is given
  (e.g. ``"InvalidAccessKeyId"``), status 403;
- ``"stall"``: the request is read and never answered, until the proxy stops (or
  ``stall_limit`` seconds pass);
- ``"reset"``: the connection is closed with a TCP reset;
- ``"truncate"``: the request is forwarded and the response relayed with its full
  Content-Length but only the first half of its body, then the connection is closed (a
  transfer that breaks after the response began).

Rules match on method and on the decoded object key, so a GetObject of one image can fail while
listings of its bucket (requests without a key) pass. Rules can be added and cleared at any time
from the test thread.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

MODES = {"503": (503, "ServiceUnavailable"), "403": (403, "AccessDenied"),
         "stall": (0, ""), "reset": (0, ""), "truncate": (0, "")}
# hop-by-hop headers are the proxy's own business; the body is re-framed with Content-Length
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
                "transfer-encoding", "upgrade", "expect", "content-length"}


@dataclass
class Rule:
    """Requests to fault: ``method`` (None: any) and ``key_contains`` (None: any, even no key)."""

    mode: str
    method: str | None = None
    key_contains: str | None = None
    times: int | None = None
    code: str = ""
    hits: int = 0

    def matches(self, method: str, key: str) -> bool:
        """Whether a request is one this rule still faults."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.key_contains is None or (bool(key) and self.key_contains in key)


def object_key(path: str) -> str:
    """The decoded object key of a path-style S3 request path ("" for bucket-level requests)."""
    parts = urlsplit(path).path.lstrip("/").split("/", 1)
    return unquote(parts[1]) if len(parts) == 2 else ""


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still in a keep-alive read never holds up stop()
    request_queue_size = 64  # many workers may connect at once


class S3FaultProxy:
    """The proxy server; ``endpoint`` is its ``http://127.0.0.1:PORT``."""

    def __init__(self, upstream: str, stall_limit: float = 60.0):
        target = urlsplit(upstream)
        if target.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the fault proxy forwards to loopback only, not {upstream}")
        self.upstream = (target.hostname, target.port or 80)
        self.stall_limit = stall_limit
        self.log: list[tuple[str, str, str | None]] = []  # (method, key, fault mode or None)
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._open: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.05}, name="s3-fault-proxy", daemon=True)

    def start(self) -> S3FaultProxy:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release stalled requests and close every open connection."""
        self._stopped.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._open)
        for conn in conns:  # handler threads blocked on a keep-alive read see EOF and end
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def fail(self, method: str | None = None, key_contains: str | None = None,
             mode: str = "503", times: int | None = None, code: str | None = None) -> Rule:
        """Fault matching requests (``times``: the first n of them; None: all) with ``mode``."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; known: {sorted(MODES)}")
        rule = Rule(mode, method, key_contains, times, code or MODES[mode][1])
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule: all requests pass again."""
        with self._lock:
            self._rules.clear()

    @property
    def faulted(self) -> int:
        """How many requests got a fault so far."""
        return self.count(faulted=True)

    def count(self, method: str | None = None, key_contains: str | None = None,
              faulted: bool | None = None) -> int:
        """How many requests seen so far match (None: any)."""
        with self._lock:
            return sum(1 for m, key, mode in self.log
                       if (method is None or m == method.upper())
                       and (key_contains is None or key_contains in key)
                       and (faulted is None or (mode is not None) == faulted))

    def _decide(self, method: str, key: str) -> Rule | None:
        with self._lock:
            rule = next((r for r in self._rules if r.matches(method, key)), None)
            if rule is not None:
                rule.hits += 1
            self.log.append((method, key, rule.mode if rule else None))
            return rule

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(conn)


def _error_body(code: str, key: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code>'
            f"<Message>injected fault</Message><Key>{escape(key)}</Key>"
            "<RequestId>fault-proxy</RequestId></Error>").encode()


def _handler_for(proxy: S3FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
        timeout = 30  # an idle keep-alive connection ends its thread by itself

        def setup(self) -> None:
            super().setup()
            proxy._track(self.connection, add=True)

        def finish(self) -> None:
            proxy._track(self.connection, add=False)
            super().finish()

        def log_message(self, format: str, *args) -> None:  # quiet: tests read proxy.log
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailers
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._body()  # always consumed, so a kept-alive connection stays in step
            key = object_key(self.path)
            rule = proxy._decide(self.command, key)
            if rule is None:
                self._forward(body)
            elif rule.mode == "truncate":
                self._forward(body, truncate=True)
                self.close_connection = True
            elif rule.mode == "stall":
                proxy._stopped.wait(proxy.stall_limit)
                self.close_connection = True
            elif rule.mode == "reset":
                # linger 0: close() sends RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
            else:
                self._reply(MODES[rule.mode][0], _error_body(rule.code, key))

        def _reply(self, status: int, payload: bytes) -> None:
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("x-amz-request-id", "fault-proxy")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _forward(self, body: bytes, truncate: bool = False) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                upstream_headers = response.getheaders()
            finally:
                conn.close()
            no_body = self.command == "HEAD" or response.status in (204, 304)
            self.send_response_only(response.status, response.reason)
            for name, value in upstream_headers:
                lower = name.lower()
                if lower in _HOP_HEADERS and not (no_body and lower == "content-length"):
                    continue
                self.send_header(name, value)
            if not no_body:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if not no_body:
                self.wfile.write(payload[: len(payload) // 2] if truncate else payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler

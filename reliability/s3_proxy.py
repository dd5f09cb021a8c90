"""A throttling proxy in front of an S3 endpoint: answers 503 SlowDown at a seeded rate, and can
be made to refuse connections (a store that is down) while the real server restarts, or to
answer a refused conditional write (412) with 200 (what a client sees of a store that ignores
If-None-Match and If-Match; the headers themselves are signed, so they cannot be dropped).

Requests are forwarded byte for byte with their Host header, so SigV4 signatures still verify.
"""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}


class S3FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        throttle: float = 0.0,
        seed: int = 0,
        ignore_conditions: bool = False,
    ) -> None:
        parts = urlsplit(upstream)
        self.ignore_conditions = ignore_conditions
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.throttle = throttle
        self.down = False
        self.throttled = 0
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.down:
                    self.close_connection = True
                    self.connection.close()
                    return
                with proxy._lock:
                    throttle = proxy._rng.random() < proxy.throttle
                    if throttle:
                        proxy.throttled += 1
                    else:
                        proxy.forwarded += 1
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(
                        self.command,
                        self.path,
                        body=body,
                        headers={k: v for k, v in self.headers.items() if k.lower() not in _HOP},
                    )
                    answer = conn.getresponse()
                    data = answer.read()
                except OSError:
                    self.close_connection = True
                    self.connection.close()
                    return
                finally:
                    conn.close()
                if proxy.ignore_conditions and self.command == "PUT" and answer.status == 412:
                    self.send_response(200)
                    self.send_header("ETag", '"00000000000000000000000000000000"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hanging up mid-request are expected in a fault soak

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

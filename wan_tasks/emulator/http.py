"""The emulator's HTTP surface: routes, auth, validation, fault injection.

Built on the standard library's threading HTTP server rather than an ASGI stack because faults
need the raw socket: "create the task, then drop the connection" and "truncate the download"
are things a framework will not let an app do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import socket
import time
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from wan_tasks.api.models import MODEL_ID, PRICE_USD, I2VRequest
from wan_tasks.emulator.config import Endpoint

if TYPE_CHECKING:
    from wan_tasks.emulator.server import EmulatorServer

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024
UPLOAD_TYPES = {
    "image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff",
}
_PREDICTION = re.compile(r"^/api/v3/predictions/([0-9a-f]{32})(/result)?$")


class Dropped(Exception):
    """Close the connection without answering."""


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "body"
    return loc, err["msg"]


class Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    protocol_version = "HTTP/1.1"
    server_version = "wavespeed-emulator/1"
    sys_version = ""

    # -- plumbing ------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        # The request line only: never headers, so the Authorization header is never logged.
        logger.debug("%s %s", self.address_string(), format % args)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes, content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, message: str = "success",
              headers: dict[str, str] | None = None) -> None:
        envelope = {"code": status, "message": message, "data": data}
        self._send(status, json.dumps(envelope).encode(), headers=headers)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, None, message, headers)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        raise Dropped

    def _authorised(self) -> bool:
        expected = f"Bearer {self.server.config.api_key}"
        given = self.headers.get("Authorization", "")
        if secrets.compare_digest(given.encode(), expected.encode()):
            return True
        self._error(401, "Unauthorized: invalid or missing API key")
        return False

    def _fault(self, endpoint: Endpoint) -> str | None:
        """Apply a request-level fault. Returns a fault the route must apply itself."""
        fault = self.server.faults.pick(endpoint)
        if fault is None:
            return None
        self.server.engine.stats.faults_injected += 1
        plan = self.server.faults.plan
        if fault == "429":
            retry_after = max(0.0, self.server.engine.scaled(plan.retry_after_s))
            self._error(429, "Too many requests", {"Retry-After": f"{retry_after:g}"})
            raise Dropped
        if fault in ("500", "502", "503"):
            self._error(int(fault), HTTPStatus(int(fault)).phrase)
            raise Dropped
        if fault == "slow":
            time.sleep(plan.slow_s)  # real seconds: meant to exceed a client's timeout
            return None
        if fault == "drop" and endpoint != "submit":
            self._drop()
        return fault

    def _dispatch(self) -> None:
        try:
            self._route()
        except Dropped:
            pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            logger.exception("emulator: unhandled error on %s %s", self.command, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._error(500, "internal error")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch

    # -- routing -------------------------------------------------------------------------------

    def _route(self) -> None:
        url = urlsplit(self.path)
        path, method = url.path.rstrip("/") or "/", self.command
        query = parse_qs(url.query)
        srv = self.server

        # Public (no auth): what the CDN and the presigned upload URL serve.
        if path.startswith("/media/outputs/") and method in ("GET", "HEAD"):
            return self._download(path.removeprefix("/media/outputs/").removesuffix(".mp4"))
        if path.startswith("/media/uploads/") and method in ("GET", "HEAD"):
            return self._serve_upload(path.removeprefix("/media/uploads/"))
        if path.startswith("/upload/") and method == "PUT":
            return self._presigned_put(path.removeprefix("/upload/"))
        if path == "/_emulator/stats" and method == "GET":
            return self._send(200, json.dumps(srv.engine.stats.as_dict()).encode())
        if path == "/_emulator/faults" and method == "POST":
            return self._set_faults()
        if path == "/_emulator/health":
            return self._send(200, b'{"ok": true}')

        if not path.startswith("/api/v3/"):
            return self._error(404, f"no route {path}")
        self._body_cache = self._body()
        if not self._authorised():
            return None

        if path == f"/api/v3/{MODEL_ID}" and method == "POST":
            return self._submit(query.get("webhook", [None])[0])
        match = _PREDICTION.match(path)
        if match and method == "GET":
            return self._result(match.group(1))
        if match and method == "DELETE" and not match.group(2):
            return self._cancel(match.group(1))
        if path == "/api/v3/predictions" and method == "POST":
            return self._history()
        if path == "/api/v3/media/upload/binary" and method == "POST":
            return self._upload_binary()
        if path == "/api/v3/media/uploads" and method == "POST":
            return self._upload_ticket()
        if path in ("/api/v3/balance", "/api/v3/account/balance") and method == "GET":
            self._fault("balance")
            return self._json(200, {"balance": float(srv.engine.balance)})
        if path == "/api/v3/webhook/secret" and method == "GET":
            return self._json(200, {"secret": srv.config.webhook_secret})
        if path.startswith("/api/v3/predictions/"):
            return self._error(404, "prediction not found")
        return self._error(404, f"model or route not found: {path}")

    # -- API routes ----------------------------------------------------------------------------

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body_cache or b"null")
        except ValueError:
            self._error(400, "request body is not valid JSON")
            raise Dropped from None

    def _submit(self, webhook: str | None) -> None:
        fault = self._fault("submit")
        body = self._json_body()
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object")
        # The service only takes URLs; check before the model, which also accepts local paths.
        for name in ("image", "last_image"):
            value = body.get(name)
            if isinstance(value, str) and not value.startswith(("http://", "https://")):
                return self._error(400, f"invalid parameter {name}: must be an http(s) URL")
        try:
            request = I2VRequest.model_validate(body)
        except ValidationError as exc:
            field, rule = _first_error(exc)
            return self._error(400, f"invalid parameter {field}: {rule}")
        if webhook and not webhook.startswith(("http://", "https://")):
            return self._error(400, "invalid parameter webhook: must be an http(s) URL")
        task = self.server.engine.submit(
            MODEL_ID, request.model_dump(exclude_none=True), PRICE_USD[request.duration], webhook
        )
        if task is None:
            return self._error(402, "Insufficient balance: top up your account")
        if fault and fault.startswith("fail:"):
            self.server.engine.force_failure(task.id, int(fault.split(":", 1)[1]))
        if fault == "drop":
            self._drop()  # the task exists and is billed; the caller never hears of it
        return self._json(200, task.view(self.server.base_url))

    def _result(self, task_id: str) -> None:
        engine = self.server.engine
        with engine.lock:
            engine.stats.result_polls += 1
            polls = engine.stats.polls_by_prediction
            polls[task_id] = polls.get(task_id, 0) + 1
        self._fault("result")
        task = engine.get(task_id)
        if task is None:
            return self._error(404, "prediction not found")
        return self._json(200, task.view(self.server.base_url))

    def _cancel(self, task_id: str) -> None:
        self._fault("cancel")
        task = self.server.engine.cancel(task_id)
        if task is None:
            return self._error(404, "prediction not found")
        return self._json(200, task.view(self.server.base_url))

    def _history(self) -> None:
        self.server.engine.stats.history_queries += 1
        self._fault("history")
        query = self._json_body()
        if not isinstance(query, dict):
            return self._error(400, "request body must be a JSON object")
        try:
            rows, total = self.server.engine.history(query)
        except (TypeError, ValueError) as exc:
            return self._error(400, f"invalid history query: {exc}")
        base = self.server.base_url
        return self._json(200, {
            "items": [t.view(base, with_input=True) for t in rows],
            "page": int(query.get("page") or 1),
            "page_size": int(query.get("page_size") or 20),
            "total": total,
        })

    def _upload_binary(self) -> None:
        self._fault("upload")
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            return self._error(400, "expected multipart/form-data with a 'file' field")
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + self._body_cache
        )
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "file":
                data = part.get_payload(decode=True)
                filename = part.get_filename() or "upload"
                content_type = part.get_content_type()
                if not isinstance(data, bytes):
                    break
                return self._store_upload(filename, content_type, data)
        return self._error(400, "missing form field 'file'")

    def _store_upload(self, filename: str, content_type: str, data: bytes) -> None:
        if content_type not in UPLOAD_TYPES:
            return self._error(400, f"unsupported file type {content_type}")
        upload = self.server.media.add(filename, content_type, data)
        self.server.engine.stats.uploads += 1
        return self._json(200, {
            "type": content_type, "filename": filename, "size": len(data),
            "download_url": self.server.media.url(upload),
        })

    def _upload_ticket(self) -> None:
        """The presigned flow of SDK 2.x: a ticket, then a PUT without Authorization."""
        self._fault("upload")
        body = self._json_body()
        if not isinstance(body, dict) or not body.get("filename"):
            return self._error(400, "invalid parameter filename: required")
        content_type = str(body.get("content_type") or "application/octet-stream")
        if content_type not in UPLOAD_TYPES:
            return self._error(400, f"unsupported file type {content_type}")
        ticket = self.server.media.ticket(str(body["filename"]), content_type)
        return self._json(200, {
            "download_url": self.server.media.url(ticket),
            "upload": {
                "method": "PUT",
                "url": f"{self.server.base_url}/upload/{ticket}",
                "headers": {"Content-Type": content_type},
            },
        })

    # -- public routes -------------------------------------------------------------------------

    def _presigned_put(self, ticket: str) -> None:
        data = self._body()
        if not self.server.media.fill(ticket, data):
            return self._error(404, "unknown or used upload ticket")
        self.server.engine.stats.uploads += 1
        return self._send(200, b"")

    def _serve_upload(self, key: str) -> None:
        item = self.server.media.get(key)
        if item is None:
            return self._error(404, "no such media")
        return self._send(200, item[1], item[0])

    def _download(self, task_id: str) -> None:
        self.server.engine.stats.downloads += 1
        fault = self._fault("download")
        data = self.server.engine.output(task_id)
        if data is None or fault == "expire":
            return self._error(404, "output expired or not found")
        if fault == "truncate":
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._drop()
        return self._send(200, data, "video/mp4")

    def _set_faults(self) -> None:
        from wan_tasks.emulator.config import FaultPlan

        try:
            plan = FaultPlan.model_validate_json(self._body() or b"{}")
        except ValidationError as exc:
            field, rule = _first_error(exc)
            return self._error(400, f"invalid fault plan {field}: {rule}")
        self.server.faults.replace(plan)
        return self._json(200, plan.model_dump())

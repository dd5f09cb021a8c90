"""The emulator's HTTP surface: routes, auth, validation, fault injection, odd shapes.

Built on the standard library's threading HTTP server rather than an ASGI stack because faults
need the raw socket: "create the task, then drop the connection" and "truncate the download"
are things a framework will not let an app do.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
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
from wan_tasks.emulator import media
from wan_tasks.emulator.catalogue import catalogue, price
from wan_tasks.emulator.config import Endpoint
from wan_tasks.emulator.engine import Task

if TYPE_CHECKING:
    from wan_tasks.emulator.server import EmulatorServer

logger = logging.getLogger(__name__)
_SIGNATURE_IN_QUERY = re.compile(r"(?i)(signature|expires)=[^&\s]+")

# Request fields the service accepts on every model, on top of the model's own.
COMMON_FLAGS = ("enable_sync_mode", "enable_base64_output")
_PREDICTION = re.compile(r"^/api/v3/predictions/([0-9a-f]{32})(/result)?$")


class Dropped(Exception):
    """Close the connection without answering."""


class BadBody(Exception):
    """The request's framing is unusable: answer `status` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "body"
    return loc, err["msg"]


class Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    # A one-shot `status=` or `shape:` fault picked for the request being answered.
    _one_shot: str | None = None
    protocol_version = "HTTP/1.1"
    server_version = "wavespeed-emulator/1"
    sys_version = ""

    # -- plumbing ------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        # The request line only: never headers, so the Authorization header is never logged;
        # and a signed output URL's signature is a credential too.
        line = _SIGNATURE_IN_QUERY.sub(r"\1=REDACTED", format % args)
        logger.debug("%s %s", self.address_string(), line)

    def _body(self) -> bytes:
        """The request body. Bad framing answers at once (400/413) instead of waiting for
        bytes that never come (`Content-Length: -1`) or failing with a 500."""
        cap = self.server.config.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._chunked(cap)
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not raw.isdigit():
            raise BadBody(400, f"invalid Content-Length {raw[:40]!r}: must be a whole number")
        length = int(raw)
        if length > cap:
            raise BadBody(413, f"request body too large: {length} bytes, the limit is {cap}")
        return self.rfile.read(length) if length else b""

    def _chunked(self, cap: int) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise BadBody(400, "invalid chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body)
            if len(body) + size > cap:
                raise BadBody(413, f"request body too large: over the limit of {cap} bytes")
            body += self.rfile.read(size)
            self.rfile.readline(1024)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
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

    def _json(
        self,
        status: int,
        data: Any,
        message: str = "success",
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        envelope = {"code": status, "message": message, "data": data, **extra}
        self._send(status, json.dumps(envelope).encode(), headers=headers)

    def _prediction(
        self, task: Task, *, with_input: bool = False, history: bool = False
    ) -> dict[str, Any]:
        """A task as sent, with the persistent shapes and this request's one-shot shape."""
        data = self.server.engine.signed(task.view(self.server.base_url, with_input=with_input))
        if history:
            data["executionTime"] = task.execution_ms
        plan = self.server.faults.plan
        shapes: list[str] = list(plan.shapes)
        one_shot = self._one_shot
        if one_shot and one_shot.startswith("shape:"):
            shapes.append(one_shot.removeprefix("shape:"))
        if data["status"] in plan.status_alias:
            data["status"] = plan.status_alias[data["status"]]
        if one_shot and one_shot.startswith("status="):
            data["status"] = one_shot.removeprefix("status=")
        if "nanos" in shapes:
            data["created_at"] = data["created_at"][:-1] + "456789Z"  # .123 -> .123456789
        if "code0" in shapes:
            data.setdefault("code", 0)
        if "execution_time" in shapes:
            data["executionTime"] = task.execution_ms
        if "extra_fields" in shapes:
            data["future_field"] = {"nested": [1, "two"], "flag": True}
            data["queue_position"] = None
        return data

    def _prediction_answer(self, data: dict[str, Any]) -> None:
        plan = self.server.faults.plan
        one_shot = self._one_shot
        extra: dict[str, Any] = {}
        if "extra_fields" in plan.shapes or one_shot == "shape:extra_fields":
            extra = {"trace_id": "emu-trace-0001", "meta": {"region": "emulated"}}
        self._json(200, data, **extra)

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
        if fault.startswith(("status=", "shape:")):
            self._one_shot = fault
            return None
        if fault.startswith("error_code:"):
            status = int(fault.split(":", 1)[1])
            message = (
                HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
            )
            self._json(status, None, f"{message} (injected)", error_code=f"E{status}")
            raise Dropped
        if fault.startswith("envelope_error:"):
            code = int(fault.split(":", 1)[1])
            self._send(
                200,
                json.dumps(
                    {
                        "code": code,
                        "message": f"request failed with code {code} (injected)",
                        "data": None,
                    }
                ).encode(),
            )
            raise Dropped
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
        except BadBody as exc:
            self.close_connection = True  # the unread body makes the connection unusable
            with contextlib.suppress(OSError):
                self._error(exc.status, exc.message)
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
        self._one_shot = None
        url = urlsplit(self.path)
        path, method = url.path.rstrip("/") or "/", self.command
        query = parse_qs(url.query)
        srv = self.server

        # Public (no auth): what the CDN and the presigned upload URL serve.
        if path.startswith("/media/outputs/") and method in ("GET", "HEAD"):
            return self._download(path.removeprefix("/media/outputs/").removesuffix(".mp4"), query)
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
        if path == "/api/v3/predictions/delete" and method == "POST":
            return self._delete_many()
        if path == "/api/v3/models" and method == "GET":
            self._fault("models")
            return self._json(200, catalogue(srv.base_url))
        if path in ("/api/v3/model/pricing", "/api/v3/model/price") and method == "POST":
            return self._price()
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
        flags: dict[str, Any] = {}
        for name in COMMON_FLAGS:
            if name in body:
                flags[name] = body.pop(name)
                if not isinstance(flags[name], bool):
                    return self._error(400, f"invalid parameter {name}: must be a boolean")
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
        engine = self.server.engine
        wait = engine.rate_check()
        if wait is not None:
            cap, tier = self.server.config.submits_per_minute, self.server.config.tier
            return self._error(
                429,
                f"Too many requests: at most {cap} video submissions per minute on the {tier} tier",
                {"Retry-After": _seconds(wait)},
            )
        task = engine.submit(
            MODEL_ID,
            request.model_dump(exclude_none=True),
            PRICE_USD[request.duration],
            webhook,
            base64_output=bool(flags.get("enable_base64_output")),
        )
        if task is None:
            return self._error(402, "Insufficient balance: top up your account")
        if fault and fault.startswith("fail:"):
            engine.force_failure(task.id, int(fault.split(":", 1)[1]))
        if fault and fault.startswith("end:"):
            engine.force_end(task.id, fault.removeprefix("end:"))
        if fault == "drop":
            self._drop()  # the task exists and is billed; the caller never hears of it
        if not flags.get("enable_sync_mode"):
            return self._prediction_answer(self._prediction(task))
        return self._sync_answer(task)

    def _sync_answer(self, task: Task) -> None:
        """enable_sync_mode: hold the answer until the task ends; past the sync timeout,
        answer HTTP 200 with status `processing` and code 5004 (the task goes on)."""
        engine, config = self.server.engine, self.server.config
        with engine.lock:
            engine.stats.sync_submits += 1
        if engine.wait_ended(task.id, engine.scaled(config.sync_timeout_s)):
            return self._prediction_answer(self._prediction(task))
        with engine.lock:
            engine.stats.sync_timeouts += 1
            data = copy.deepcopy(self._prediction(task))
        data.update(
            status="processing",
            code=5004,
            error=f"Sync mode timed out after {config.sync_timeout_s:g} seconds, please "
            f"query the result later with the prediction id {task.id}",
        )
        return self._prediction_answer(data)

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
        with engine.lock:
            data = self._prediction(task)
        return self._prediction_answer(data)

    def _cancel(self, task_id: str) -> None:
        self._fault("cancel")
        task = self.server.engine.cancel(task_id)
        if task is None:
            return self._error(404, "prediction not found")
        return self._prediction_answer(self._prediction(task))

    def _delete_many(self) -> None:
        self._fault("delete")
        body = self._json_body()
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return self._error(400, "invalid parameter ids: must be a list of prediction ids")
        return self._json(200, {"deleted_count": self.server.engine.delete_many(ids)})

    def _price(self) -> None:
        self._fault("pricing")
        body = self._json_body()
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object")
        amount, problem = price(body.get("model_id"), body.get("inputs"))
        if amount is None:
            status = 404 if problem and problem.startswith("model not found") else 400
            return self._error(status, problem or "invalid request")
        value = float(amount)
        # Both routes answer the union: `unit_price` (/model/pricing, CLI 0.2.2) and
        # `price`/`discounted_price` (/model/price, the MCP server and newer CLI).
        return self._json(
            200,
            {
                "model_id": MODEL_ID,
                "unit_price": value,
                "price": value,
                "discounted_price": value,
                "discount_rate": 0,
                "currency": "USD",
            },
        )

    def _history(self) -> None:
        self.server.engine.stats.history_queries += 1
        self._fault("history")
        query = self._json_body()
        if not isinstance(query, dict):
            return self._error(400, "request body must be a JSON object")
        try:
            rows, total, page, size = self.server.engine.history(query)
        except (TypeError, ValueError) as exc:
            return self._error(400, f"invalid history query: {exc}")
        with self.server.engine.lock:
            items = [self._prediction(t, with_input=True, history=True) for t in rows]
        # `page_size` and `total` beyond the documented {page, items}: this project's client
        # (HistoryPage) reads them.
        return self._json(200, {"page": page, "items": items, "page_size": size, "total": total})

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
                # A part without a Content-Type header is text/plain to the parser; treat it
                # as untyped, as the service does with a Blob that has no type.
                declared = part.get("Content-Type") and part.get_content_type()
                if not isinstance(data, bytes):
                    break
                return self._store_upload(filename, declared or None, data)
        return self._error(400, "missing form field 'file'")

    def _check_upload(self, content_type: str | None, size: int | None) -> bool:
        """Refuse (400 unsupported type, 413 too large) and say True, or say False if fine.
        An unknown type (a ticket whose bytes come later) is held to the largest limit."""
        limits = self.server.config.upload_limits
        kind = media.kind_of(content_type) if content_type else None
        if content_type and kind is None:
            self._error(
                400, f"unsupported file type {content_type}: images, videos and audio are accepted"
            )
            return True
        if size is not None:
            limit = getattr(limits, kind) if kind else max(limits.image, limits.video, limits.audio)
            if size > limit:
                self._error(
                    413,
                    f"file too large: {size} bytes, the {kind or 'upload'} limit is {limit} bytes",
                )
                return True
        return False

    def _store_upload(self, filename: str, declared: str | None, data: bytes) -> None:
        content_type = media.resolve(declared, filename, data)
        if content_type is None:
            return self._error(
                400,
                "unsupported file type: neither the content type, the "
                "bytes nor the filename show an image, video or audio",
            )
        if self._check_upload(content_type, len(data)):
            return None
        upload = self.server.media.add(filename, content_type, data)
        self.server.engine.stats.uploads += 1
        return self._json(
            200,
            {
                "type": media.kind_of(content_type),
                "content_type": content_type,
                "filename": filename,
                "size": len(data),
                "download_url": self.server.media.url(upload),
            },
        )

    def _upload_ticket(self) -> None:
        """The presigned flow of SDK 2.x: a ticket, then a PUT without Authorization. Without
        a content type (or name that shows one), the type is read from the PUT's bytes."""
        self._fault("upload")
        body = self._json_body()
        if not isinstance(body, dict) or not body.get("filename"):
            return self._error(400, "invalid parameter filename: required")
        filename = str(body["filename"])
        size = body.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            return self._error(400, "invalid parameter size: must be a whole number of bytes")
        content_type = media.resolve(body.get("content_type"), filename, None)
        if self._check_upload(content_type, size):
            return None
        ticket = self.server.media.ticket(filename, content_type)
        return self._json(
            200,
            {
                "download_url": self.server.media.url(ticket),
                "type": media.kind_of(content_type) if content_type else None,
                "filename": filename,
                "size": size,
                "upload": {
                    "method": "PUT",
                    "url": f"{self.server.base_url}/upload/{ticket}",
                    "headers": {"Content-Type": content_type} if content_type else {},
                },
            },
        )

    # -- public routes -------------------------------------------------------------------------

    def _presigned_put(self, ticket: str) -> None:
        data = self._body()
        pending = self.server.media.pending(ticket)
        if pending is None:
            return self._error(404, "unknown or used upload ticket")
        filename, declared = pending
        content_type = media.resolve(declared, filename, data)
        if content_type is None:
            return self._error(
                400,
                "unsupported file type: neither the content type, the "
                "bytes nor the filename show an image, video or audio",
            )
        if self._check_upload(content_type, len(data)):
            return None
        if not self.server.media.fill(ticket, content_type, data):
            return self._error(404, "unknown or used upload ticket")
        self.server.engine.stats.uploads += 1
        return self._send(200, b"")

    def _serve_upload(self, key: str) -> None:
        item = self.server.media.get(key)
        if item is None:
            return self._error(404, "no such media")
        return self._send(200, item[1], item[0])

    def _download(self, task_id: str, query: dict[str, list[str]]) -> None:
        self.server.engine.stats.downloads += 1
        if not self.server.engine.signature_ok(task_id, query):
            return self._error(403, "signature missing, invalid or expired")
        fault = self._fault("download")
        if fault == "redirect":  # as a CDN may: to the same object, its query kept
            self.send_response(302)
            self.send_header("Location", self.path + ("&" if "?" in self.path else "?") + "via=1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        data = self.server.engine.output(task_id)
        if fault == "expire" or data == "expired":
            return self._error(404, "output expired")
        if isinstance(data, str):
            return self._error(404, "not found")
        if fault == "truncate":
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._drop()
        if fault == "truncate_unsized":
            # No Content-Length: the body ends where the connection does, so the client sees
            # a complete answer of half the bytes.
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
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


def _seconds(value: float) -> str:
    """Retry-After in seconds, rounded up so a client waiting that long is let in: whole
    seconds from 10 s on (as HTTP has it), to the ms below (scaled clocks give short windows,
    which whole seconds would overstate several times over)."""
    if value >= 10:
        return str(math.ceil(value))
    return f"{math.ceil(value * 1000) / 1000:g}"

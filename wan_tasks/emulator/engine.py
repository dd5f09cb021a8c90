"""The emulator's task store and lifecycle: created -> processing -> completed/failed.

Tasks beyond the concurrency cap wait in `created`, as the real service queues them; video
submissions past the tier's per-minute cap are refused until the window resets. One scheduler
thread moves tasks along; rendering and webhook delivery run in a small pool. Sync-mode
submits wait here for their task to end.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import io
import json
import logging
import random
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

import httpx
from PIL import Image

from wan_tasks.api.webhooks import sign
from wan_tasks.emulator.config import EmulatorConfig, FaultDecider
from wan_tasks.emulator.render import render_i2v

logger = logging.getLogger(__name__)

MESSAGES = {
    1200: "content moderation: the input was flagged",
    1400: "missing required parameter",
    1401: "invalid parameter",
    1402: "media access failed: could not download the input image",
    1403: "task execution failed",
    1405: "task failed",
    5000: "internal error",
    5003: "service unavailable",
    5004: "timeout",
}
TERMINAL = ("completed", "failed", "cancelled", "timeout", "deleted")
# What an `end:STATUS` fault ends a task with: (task code, error text).
FORCED_ENDS: dict[str, tuple[int | None, str]] = {
    "cancelled": (None, "task cancelled"),
    "timeout": (5004, "task timed out"),
}
RenderKey = tuple[str, str | None, int, int, str]


def iso_ms(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _decodes(data: bytes) -> bool:
    """Whether the bytes are an image Pillow can decode (what the renderer will need)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    return True


@dataclass
class Task:
    id: str
    model: str
    input: dict[str, Any]
    created: float
    webhook: str | None = None
    status: str = "created"
    started: float | None = None
    finished: float | None = None
    code: int | None = None
    error: str = ""
    forced_code: int | None = None
    forced_status: str | None = None
    base64_output: bool = False
    output: bytes | None = None
    rendering: Future[tuple[int | None, bytes | None]] | None = None
    # The MP4 being made; a download waits for it (the emulated inference time is the timer's,
    # not the renderer's: on a loaded machine a render can take longer than the latency).
    render_job: Future[bytes] | None = None

    @property
    def execution_ms(self) -> int:
        if self.finished and self.started:
            return int((self.finished - self.started) * 1000)
        return 0

    def view(self, base_url: str, *, with_input: bool = False) -> dict[str, Any]:
        outputs: list[str] = []
        if self.status == "completed":
            if self.base64_output and self.output is not None:
                outputs = ["data:video/mp4;base64," + base64.b64encode(self.output).decode()]
            else:
                outputs = [f"{base_url}/media/outputs/{self.id}.mp4"]
        data: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "outputs": outputs,
            "urls": {"get": f"{base_url}/api/v3/predictions/{self.id}/result"},
            "has_nsfw_contents": [False] if self.status == "completed" else [],
            "status": self.status,
            "created_at": iso_ms(self.created),
            "error": self.error,
            "timings": {"inference": self.execution_ms},
        }
        if self.code is not None:
            data["code"] = self.code
        if with_input:
            data["input"] = self.input
        return data


@dataclass
class Stats:
    submissions: int = 0
    result_polls: int = 0
    uploads: int = 0
    downloads: int = 0
    cancels: int = 0
    history_queries: int = 0
    deletes: int = 0
    rate_limited: int = 0
    sync_submits: int = 0
    sync_timeouts: int = 0
    renders: int = 0
    render_cache_hits: int = 0
    webhooks_sent: int = 0
    faults_injected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    processing: int = 0
    max_processing: int = 0
    completed: int = 0
    failed: int = 0
    polls_by_prediction: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["polls_by_prediction"] = dict(self.polls_by_prediction)
        return out


class Engine:
    def __init__(
        self,
        config: EmulatorConfig,
        faults: FaultDecider,
        base_url: Callable[[], str],
        fetch_media: Callable[[str], bytes | None],
    ) -> None:
        self.config = config
        self.faults = faults
        self._base_url = base_url
        self._fetch_media = fetch_media
        self.lock = threading.RLock()
        self.tasks: dict[str, Task] = {}
        self.stats = Stats()
        self.balance = Decimal(config.balance)
        self._queue: deque[str] = deque()
        self._timers: list[tuple[float, str]] = []
        self._wake = threading.Condition(self.lock)
        # Separate from _wake (which the scheduler waits on): sync submits wait for task ends.
        self._ended = threading.Condition(self.lock)
        self._window_start: float | None = None
        self._window_count = 0
        self._render_lock = threading.Lock()
        self._cdn_secret = secrets.token_bytes(32)
        self._render_cache: dict[RenderKey, Future[bytes]] = {}
        # Rendering is CPU-bound (2 workers for 2 cores); webhooks wait on the network. The
        # input checks that decide a task's end have their own pool: behind a backlog of
        # renders (1,000 distinct inputs) tasks would end minutes past their latency.
        self._render_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emulator-render")
        self._check_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="emulator-check")
        # Draws of each task's inference time (under self.lock: tasks start there).
        self._latency_rng = random.Random(config.latency_seed)
        self._hook_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="emulator-hook")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="emulator-engine", daemon=True)
        self._thread.start()

    # -- clock helpers: every emulated delay goes through time_scale ----------------------------

    def scaled(self, seconds: float) -> float:
        return seconds * self.config.time_scale

    # -- public operations (called from HTTP handler threads) ---------------------------------

    def rate_check(self) -> float | None:
        """Count one video submission against the per-minute cap: None if it may go on,
        else the seconds (real, so already scaled) until the window resets."""
        cap = self.config.submits_per_minute
        if cap is None:
            return None
        window = self.scaled(self.config.rate_window_s)
        with self.lock:
            now = time.monotonic()
            if self._window_start is None or now - self._window_start >= window:
                self._window_start, self._window_count = now, 0
            if self._window_count >= cap:
                self.stats.rate_limited += 1
                return max(0.001, self._window_start + window - now)
            self._window_count += 1
            return None

    def submit(
        self,
        model: str,
        payload: dict[str, Any],
        cost: Decimal,
        webhook: str | None,
        *,
        base64_output: bool = False,
    ) -> Task | None:
        """Create a task and charge for it; None if the balance does not cover it."""
        with self.lock:
            if self.balance < cost:
                return None
            self.balance -= cost
            task = Task(
                id=uuid.uuid4().hex,
                model=model,
                input=payload,
                created=time.time(),
                webhook=webhook,
                forced_code=self.faults.task_failure(),
                base64_output=base64_output,
            )
            self.tasks[task.id] = task
            self.stats.submissions += 1
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
            self._queue.append(task.id)
            self._wake.notify()
            return task

    def force_failure(self, task_id: str, code: int) -> None:
        with self.lock:
            self.tasks[task_id].forced_code = code

    def force_end(self, task_id: str, status: str) -> None:
        with self.lock:
            self.tasks[task_id].forced_status = status

    def wait_ended(self, task_id: str, timeout: float) -> bool:
        """Block until the task is terminal (True) or `timeout` real seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            task = self.tasks[task_id]
            while task.status not in TERMINAL:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return False
                self._ended.wait(timeout=left)
            return True

    def get(self, task_id: str) -> Task | None:
        with self.lock:
            return self.tasks.get(task_id)

    def cancel(self, task_id: str) -> Task | None:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                return None
            self.stats.cancels += 1
            self._delete(task)
            return task

    def delete_many(self, ids: list[str]) -> int:
        """`POST /predictions/delete`: unknown and already deleted ids are ignored."""
        count = 0
        with self.lock:
            self.stats.deletes += 1
            for task_id in dict.fromkeys(ids):
                task = self.tasks.get(task_id)
                if task is not None and task.status != "deleted":
                    self._delete(task)
                    count += 1
        return count

    def _delete(self, task: Task) -> None:
        if task.status in ("created", "processing"):
            if task.status == "created" and task.id in self._queue:
                self._queue.remove(task.id)
            self._finish(task, "deleted", None, "deleted by user")
        else:
            task.status = "deleted"

    def history(self, query: dict[str, Any]) -> tuple[list[Task], int, int, int]:
        """Rows of one page, the total, the page and the page size (1 to 100, default 100;
        larger sizes are capped). Only tasks of the last `history_window_s` (scaled)."""
        after = _parse_time(query.get("created_after"))
        before = _parse_time(query.get("created_before"))
        page = int(query["page"]) if query.get("page") is not None else 1
        size = int(query["page_size"]) if query.get("page_size") is not None else 100
        if page < 1:
            raise ValueError("page: must be at least 1")
        if size < 1:
            raise ValueError("page_size: must be 1 to 100")
        size = min(100, self.config.history_page_cap, size)
        oldest = time.time() - self.scaled(self.config.history_window_s)
        with self.lock:
            rows = [
                t
                for t in self.tasks.values()
                if t.created >= oldest
                and (after is None or t.created >= after)
                and (before is None or t.created <= before)
                and (not query.get("model") or t.model == query["model"])
                and (not query.get("status") or t.status == query["status"])
            ]
        rows.sort(key=lambda t: t.created, reverse=True)
        return rows[(page - 1) * size : page * size], len(rows), page, size

    def signed(self, view: dict[str, Any]) -> dict[str, Any]:
        """A prediction's view with CDN-style signed output URLs (when configured)."""
        if not self.config.signed_outputs:
            return view
        expires = int(time.time() + self.scaled(self.config.output_ttl_s))
        outputs = []
        for url in view.get("outputs") or []:
            if url.startswith("data:"):
                outputs.append(url)
                continue
            task_id = url.rsplit("/", 1)[-1].removesuffix(".mp4")
            outputs.append(f"{url}?Expires={expires}&Signature={self._sign(task_id, expires)}")
        return {**view, "outputs": outputs}

    def _sign(self, task_id: str, expires: int) -> str:
        message = f"{task_id}:{expires}".encode()
        return hmac.new(self._cdn_secret, message, hashlib.sha256).hexdigest()

    def signature_ok(self, task_id: str, query: dict[str, list[str]]) -> bool:
        """Whether a download carries a valid, unexpired signature (always, when unsigned)."""
        if not self.config.signed_outputs:
            return True
        try:
            expires = int(query.get("Expires", [""])[0])
        except ValueError:
            return False
        given = query.get("Signature", [""])[0]
        return expires >= time.time() and hmac.compare_digest(given, self._sign(task_id, expires))

    def output(self, task_id: str) -> bytes | str:
        """The MP4, or why not: "not found" (no such task or no output) or "expired".
        A completed task's output stays downloadable after DELETE until it expires."""
        with self.lock:
            task = self.tasks.get(task_id)
            if (
                task is None
                or task.finished is None
                or (task.output is None and task.render_job is None)
            ):
                return "not found"
            if time.time() - task.finished > self.scaled(self.config.output_ttl_s):
                return "expired"
            if task.output is not None:
                return task.output
            job = task.render_job
        if job is None:
            return "not found"
        try:
            data = job.result(timeout=600)
        except Exception:  # a render that failed has no output
            logger.exception("rendering the output of %s failed", task_id)
            return "not found"
        with self.lock:
            task.output = data
        return data

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=5)
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        self._check_pool.shutdown(wait=False, cancel_futures=True)
        self._hook_pool.shutdown(wait=False, cancel_futures=True)

    # -- the lifecycle -----------------------------------------------------------------------

    def _loop(self) -> None:
        with self.lock:
            while not self._stopping:
                now = time.monotonic()
                while self._queue and self.stats.processing < self.config.concurrency:
                    self._start(self.tasks[self._queue.popleft()], now)
                while self._timers and self._timers[0][0] <= now:
                    _, task_id = heapq.heappop(self._timers)
                    task = self.tasks[task_id]
                    if task.rendering is not None:
                        # Finishes when both the emulated latency and the render are done.
                        task.rendering.add_done_callback(partial(self._on_rendered, task))
                # Woken by submits and finishes; also once a second, so that a wake-up that
                # went astray can delay the queue, never wedge it (a queued task waiting on a
                # slot forever was seen once on a loaded machine).
                wait = self._timers[0][0] - now if self._timers else 1.0
                self._wake.wait(timeout=min(wait, 1.0))

    def _start(self, task: Task, now: float) -> None:
        task.status = "processing"
        task.started = time.time()
        self.stats.processing += 1
        self.stats.max_processing = max(self.stats.max_processing, self.stats.processing)
        if task.forced_code is None and task.forced_status is None:
            task.rendering = self._check_pool.submit(self._render, task)
        else:
            done: Future[tuple[int | None, bytes | None]] = Future()
            done.set_result((task.forced_code, None))
            task.rendering = done
        heapq.heappush(self._timers, (now + self.scaled(self._inference_s()), task.id))

    def _inference_s(self) -> float:
        """This task's emulated inference time: latency_s, or a seeded draw around it."""
        jitter = self.config.latency_jitter_s
        if not jitter:
            return self.config.latency_s
        return self.config.latency_s + self._latency_rng.uniform(-jitter, jitter)

    def _on_rendered(self, task: Task, done: Future[tuple[int | None, bytes | None]]) -> None:
        try:
            code, _ = done.result()
        except BaseException:  # a render that raised fails its task: it never keeps its slot
            logger.exception("checking the inputs of %s failed", task.id)
            code = 5000
        with self.lock:
            if task.status != "processing":  # cancelled meanwhile
                return
            if task.forced_status is not None:
                forced_code, error = FORCED_ENDS[task.forced_status]
                self._finish(task, task.forced_status, forced_code, error)
            elif code is not None:
                self._finish(task, "failed", code, MESSAGES.get(code, "task failed"))
            elif task.base64_output:
                # The answer itself carries the bytes: it needs them when the task ends.
                assert task.render_job is not None
                task.render_job.add_done_callback(partial(self._on_base64_rendered, task))
            else:
                self._finish(task, "completed", None, "")

    def _on_base64_rendered(self, task: Task, job: Future[bytes]) -> None:
        with self.lock:
            if task.status != "processing":
                return
            try:
                task.output = job.result()
            except ValueError:
                self._finish(task, "failed", 1402, MESSAGES.get(1402, "task failed"))
                return
            self._finish(task, "completed", None, "")

    def _render(self, task: Task) -> tuple[int | None, bytes | None]:
        """Fetch and check the inputs (the task's outcome), then start the render beside it:
        the task ends on the emulated latency, and a download waits for the bytes."""
        first = self._fetch_media(task.input["image"])
        last_url = task.input.get("last_image")
        last = self._fetch_media(last_url) if last_url else None
        if first is None or (last_url and last is None):
            return 1402, None
        if not all(_decodes(b) for b in (first, last) if b is not None):
            return 1402, None  # the URL answered, but not with an image we can decode
        requested_seed = int(task.input.get("seed", -1))
        duration = int(task.input.get("duration", 5))
        prompt = str(task.input.get("prompt", ""))

        def render() -> bytes:
            seed = secrets.randbelow(2**31) if requested_seed == -1 else requested_seed
            with self.lock:
                self.stats.renders += 1
            return render_i2v(first, last, duration=duration, seed=seed, prompt=prompt)

        if not self.config.render_once:
            task.render_job = self._render_pool.submit(render)
            return None, None
        # Keyed by the request as sent (seed -1 included), so equal requests share one MP4.
        key: RenderKey = (
            hashlib.sha256(first).hexdigest(),
            hashlib.sha256(last).hexdigest() if last is not None else None,
            duration,
            requested_seed,
            prompt,
        )
        task.render_job = self._render_pool.submit(self._render_cached, key, render)
        return None, None

    def _render_cached(self, key: RenderKey, render: Callable[[], bytes]) -> bytes:
        with self._render_lock:
            future = self._render_cache.get(key)
            owner = future is None
            if future is None:
                future = self._render_cache[key] = Future()
        if not owner:
            with self.lock:
                self.stats.render_cache_hits += 1
            return future.result()
        try:
            future.set_result(render())
        except BaseException as exc:
            with self._render_lock:  # a failed render is not cached: the next task retries
                del self._render_cache[key]
            future.set_exception(exc)
            raise
        return future.result()

    def _finish(self, task: Task, status: str, code: int | None, error: str) -> None:
        was_processing = task.status == "processing"
        task.status, task.code, task.error = status, code, error
        task.finished = time.time()
        if was_processing:
            self.stats.processing -= 1
        self.stats.in_flight -= 1
        if status == "completed":
            self.stats.completed += 1
        elif status == "failed":
            self.stats.failed += 1
        self._wake.notify()
        self._ended.notify_all()
        if task.webhook and status in ("completed", "failed"):
            body = {
                **self.signed(task.view(self._base_url())),
                "input": task.input,
                "executionTime": task.execution_ms,
            }
            self._hook_pool.submit(self._deliver_webhook, task.webhook, body)

    def _deliver_webhook(self, url: str, body: dict[str, Any]) -> None:
        raw = json.dumps(body, separators=(",", ":")).encode()
        webhook_id = f"msg_{uuid.uuid4().hex}"
        for attempt in range(self.config.webhook_retries + 1):
            ts = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(ts),
                "webhook-signature": sign(self.config.webhook_secret, webhook_id, ts, raw),
            }
            try:
                response = httpx.post(url, content=raw, headers=headers, timeout=10.0)
                if response.status_code < 300:
                    with self.lock:
                        self.stats.webhooks_sent += 1
                    return
            except httpx.HTTPError as exc:
                logger.info("webhook to %s failed: %s", url, type(exc).__name__)
            time.sleep(self.scaled(2**attempt))


def _parse_time(value: Any) -> float | None:
    if value in (None, ""):
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).replace("Z", "+00:00")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()

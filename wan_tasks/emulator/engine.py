"""The emulator's task store and lifecycle: created -> processing -> completed/failed.

Tasks beyond the concurrency cap wait in `created`, as the real service queues them. One
scheduler thread moves tasks along; rendering and webhook delivery run in a small pool.
"""

from __future__ import annotations

import heapq
import json
import logging
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

from wan_tasks.api.webhooks import sign
from wan_tasks.emulator.config import EmulatorConfig, FaultDecider
from wan_tasks.emulator.render import render_i2v

logger = logging.getLogger(__name__)

MESSAGES = {
    1200: "content moderation: the input was flagged",
    1402: "media access failed: could not download the input image",
    1403: "task execution failed",
    5000: "internal error",
    5003: "service unavailable",
    5004: "timeout",
}


def iso_ms(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


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
    output: bytes | None = None
    rendering: Future[tuple[int | None, bytes | None]] | None = None

    def view(self, base_url: str, *, with_input: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "outputs": [f"{base_url}/media/outputs/{self.id}.mp4"]
            if self.status == "completed"
            else [],
            "urls": {"get": f"{base_url}/api/v3/predictions/{self.id}/result"},
            "has_nsfw_contents": [False] if self.status == "completed" else [],
            "status": self.status,
            "created_at": iso_ms(self.created),
            "error": self.error,
            "timings": {
                "inference": int((self.finished - self.started) * 1000)
                if self.finished and self.started
                else 0
            },
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
        # Rendering is CPU-bound (2 workers for 2 cores); webhooks wait on the network.
        self._render_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emulator-render")
        self._hook_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="emulator-hook")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="emulator-engine", daemon=True)
        self._thread.start()

    # -- clock helpers: every emulated delay goes through time_scale ----------------------------

    def scaled(self, seconds: float) -> float:
        return seconds * self.config.time_scale

    # -- public operations (called from HTTP handler threads) ---------------------------------

    def submit(
        self, model: str, payload: dict[str, Any], cost: Decimal, webhook: str | None
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

    def get(self, task_id: str) -> Task | None:
        with self.lock:
            return self.tasks.get(task_id)

    def cancel(self, task_id: str) -> Task | None:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                return None
            self.stats.cancels += 1
            if task.status in ("created", "processing"):
                if task.status == "created" and task_id in self._queue:
                    self._queue.remove(task_id)
                self._finish(task, "deleted", None, "deleted by user")
            else:
                task.status = "deleted"
            return task

    def history(self, query: dict[str, Any]) -> tuple[list[Task], int]:
        after = _parse_time(query.get("created_after"))
        before = _parse_time(query.get("created_before"))
        with self.lock:
            rows = [
                t
                for t in self.tasks.values()
                if (after is None or t.created >= after)
                and (before is None or t.created <= before)
                and (not query.get("model") or t.model == query["model"])
                and (not query.get("status") or t.status == query["status"])
            ]
        rows.sort(key=lambda t: t.created, reverse=True)
        page = max(1, int(query.get("page") or 1))
        size = min(100, max(1, int(query.get("page_size") or 20)))
        return rows[(page - 1) * size : page * size], len(rows)

    def output(self, task_id: str) -> bytes | None:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or task.status != "completed" or task.output is None:
                return None
            assert task.finished is not None
            if time.time() - task.finished > self.scaled(self.config.output_ttl_s):
                return None
            return task.output

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=5)
        self._render_pool.shutdown(wait=False, cancel_futures=True)
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
                wait = self._timers[0][0] - now if self._timers else None
                self._wake.wait(timeout=wait)

    def _start(self, task: Task, now: float) -> None:
        task.status = "processing"
        task.started = time.time()
        self.stats.processing += 1
        self.stats.max_processing = max(self.stats.max_processing, self.stats.processing)
        if task.forced_code is None:
            task.rendering = self._render_pool.submit(self._render, task)
        else:
            done: Future[tuple[int | None, bytes | None]] = Future()
            done.set_result((task.forced_code, None))
            task.rendering = done
        heapq.heappush(self._timers, (now + self.scaled(self.config.latency_s), task.id))

    def _on_rendered(self, task: Task, done: Future[tuple[int | None, bytes | None]]) -> None:
        code, output = done.result()
        with self.lock:
            if task.status != "processing":  # cancelled meanwhile
                return
            if code is None:
                task.output = output
                self._finish(task, "completed", None, "")
            else:
                self._finish(task, "failed", code, MESSAGES.get(code, "task failed"))

    def _render(self, task: Task) -> tuple[int | None, bytes | None]:
        first = self._fetch_media(task.input["image"])
        last_url = task.input.get("last_image")
        last = self._fetch_media(last_url) if last_url else None
        if first is None or (last_url and last is None):
            return 1402, None
        seed = task.input.get("seed", -1)
        if seed == -1:
            seed = secrets.randbelow(2**31)
        try:
            video = render_i2v(
                first,
                last,
                duration=int(task.input.get("duration", 5)),
                seed=seed,
                prompt=str(task.input.get("prompt", "")),
            )
        except ValueError:
            return 1402, None  # the URL answered, but not with an image we can decode
        return None, video

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
        if task.webhook and status in ("completed", "failed"):
            body = {
                **task.view(self._base_url()),
                "input": task.input,
                "executionTime": task.view("")["timings"]["inference"],
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

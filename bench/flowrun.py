"""Running the flows from a benchmark, and reading back where their time went.

Imports Prefect: use only after `bench.stack.prefect_api()` has set the environment.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from bench.common import SAMPLE

PHASES = ("submit-i2v", "wait-for-prediction", "archive-to-s3")
_RETRY = re.compile(r"retryable status code (\d+)\. Another attempt will be made in ([\d.]+)s")


_ID = re.compile(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class PrefectRetries(logging.Handler):
    """Counts the Prefect client's retried API calls (a 503 is SQLite's "database is locked"
    on the server) and the seconds it slept before retrying. Prefect logs these at DEBUG only.
    Installed on `prefect.client`, which then no longer propagates its DEBUG records; its
    warnings and errors still reach stderr.

    Also counts every request this process sends to the Prefect API, and the 503 answers, by
    endpoint (httpx's send is wrapped, in this process only)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._lock_counts = threading.Lock()
        self.by_status: dict[str, int] = {}
        self.sleep_s = 0.0
        self.calls: dict[str, int] = {}
        self.locked: dict[str, int] = {}

    def record(self, method: str, url: str, status: int) -> None:
        api = os.environ.get("PREFECT_API_URL", "")
        if not api or not url.startswith(api):
            return
        endpoint = f"{method} {_ID.sub('/{id}', url[len(api) :].split('?')[0])}"
        with self._lock_counts:
            self.calls[endpoint] = self.calls.get(endpoint, 0) + 1
            if status == 503:
                self.locked[endpoint] = self.locked.get(endpoint, 0) + 1

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock_counts:
            return dict(self.calls), dict(self.locked)

    def emit(self, record: logging.LogRecord) -> None:
        match = _RETRY.search(record.getMessage())
        if match:
            with self._lock_counts:
                self.by_status[match.group(1)] = self.by_status.get(match.group(1), 0) + 1
                self.sleep_s += float(match.group(2))
        elif record.levelno >= logging.WARNING:
            sys.stderr.write(self.format(record) + "\n")

    def snapshot(self) -> tuple[int, float]:
        with self._lock_counts:
            return sum(self.by_status.values()), self.sleep_s

    @classmethod
    def install(cls) -> PrefectRetries:
        client_logger = logging.getLogger("prefect.client")
        for existing in client_logger.handlers:
            if isinstance(existing, cls):
                return existing
        handler = cls()
        client_logger.setLevel(logging.DEBUG)
        client_logger.propagate = False
        client_logger.addHandler(handler)
        _wrap_httpx(handler)
        return handler


def _wrap_httpx(counter: PrefectRetries) -> None:
    import httpx

    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = sync_send(self, request, **kwargs)
        counter.record(request.method, str(request.url), response.status_code)
        return response

    async def asend(
        self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any
    ) -> httpx.Response:
        response = await async_send(self, request, **kwargs)
        counter.record(request.method, str(request.url), response.status_code)
        return response

    httpx.Client.send = send  # type: ignore[method-assign]
    httpx.AsyncClient.send = asend  # type: ignore[method-assign]


def diff_counts(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def top_endpoints(counts: dict[str, int], per: int, limit: int = 6) -> str:
    """'endpoint n/per, ...' for the most frequent endpoints."""
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{k} {v / per:.1f}" for k, v in ordered) or "-"


def request(prompt: str, seed: int) -> Any:
    from wan_tasks.api.models import I2VRequest

    return I2VRequest(image=str(SAMPLE), prompt=prompt, seed=seed)


def write_manifest(path: Path, prompts: list[str]) -> str:
    rows = [
        {"id": f"v{i:04d}", "image": str(SAMPLE), "prompt": p, "seed": i}
        for i, p in enumerate(prompts)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@dataclass(frozen=True)
class FlowCall:
    seconds: float
    flow_run_id: UUID
    result: Any
    started: float  # time.time() at the call


def call_flow(flow: Any, *args: Any, **kwargs: Any) -> FlowCall:
    """Call a flow, timing it; raise if it did not complete."""
    started = time.time()
    began = time.perf_counter()
    call = flow(*args, return_state=True, **kwargs)
    state = asyncio.run(call) if inspect.iscoroutine(call) else call  # async flows
    seconds = time.perf_counter() - began
    result = state.result()  # raises the flow's error, if any
    return FlowCall(seconds, state.state_details.flow_run_id, result, started)


@dataclass(frozen=True)
class TaskSpan:
    name: str
    start: float
    end: float
    id: str = ""
    upstream: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSpans:
    """A flow run's own start/end and its task runs', as Unix times (from the Prefect API)."""

    start: float
    end: float
    tasks: list[TaskSpan]

    def first(self, name: str) -> TaskSpan | None:
        spans = [t for t in self.tasks if t.name == name]
        return min(spans, key=lambda t: t.start) if spans else None

    def named(self, name: str) -> list[TaskSpan]:
        return [t for t in self.tasks if t.name == name]

    def waits_after_submit(self) -> list[tuple[TaskSpan, TaskSpan]]:
        """(submit, wait) pairs of each video, linked by the wait's upstream input."""
        submits = {t.id: t for t in self.named("submit-i2v")}
        pairs = []
        for wait in self.named("wait-for-prediction"):
            submit = next((submits[u] for u in wait.upstream if u in submits), None)
            if submit is not None:
                pairs.append((submit, wait))
        return pairs


def _ts(value: datetime | None) -> float:
    return value.timestamp() if value else float("nan")


def read_spans(flow_run_id: UUID, *, settle_s: float = 2.0) -> RunSpans:
    """Task runs' states reach the server as events: give them `settle_s` to land."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    time.sleep(settle_s)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        tasks = []
        offset = 0
        while True:
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                limit=200,
                offset=offset,
            )
            tasks += page
            offset += len(page)
            if len(page) < 200:
                break
    spans = [
        TaskSpan(
            _task_name(t.name),
            _ts(t.start_time),
            _ts(t.end_time),
            str(t.id),
            _upstream(t.task_inputs),
        )
        for t in tasks
    ]
    return RunSpans(_ts(run.start_time), _ts(run.end_time), spans)


def _upstream(inputs: dict[str, list[Any]]) -> tuple[str, ...]:
    return tuple(
        str(ref.id)
        for refs in inputs.values()
        for ref in refs
        if getattr(ref, "input_type", "") == "task_run"
    )


# Task run names say what they work on (`wait[prediction-id]`, wan_tasks.integration.tasks).
_RUN_PREFIXES = {
    "submit-i2v": "submit-i2v",
    "wait[": "wait-for-prediction",
    "archive[": "archive-to-s3",
}


def _task_name(run_name: str) -> str:
    for prefix, name in (*_RUN_PREFIXES.items(), *((n, n) for n in PHASES)):
        if run_name.startswith(prefix):
            return name
    return run_name

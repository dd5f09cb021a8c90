"""The sans-I/O core driven in memory: a fake clock, a fake rng, httpx.Response objects, no
sockets. What is asserted is what the operations decide: which requests, which sleeps, which
error class."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.conftest import SAMPLE
from wan_tasks.api import protocol
from wan_tasks.api.media import inspect_image
from wan_tasks.api.models import I2VRequest, PredictionStatus
from wan_tasks.api.operations import LocalImage, Operation, Operations, ReadImage, Sleep
from wan_tasks.api.policies import PollPolicy, RetryPolicy
from wan_tasks.errors import (
    AuthenticationError,
    ContentModerationError,
    InsufficientBalanceError,
    InvalidRequestError,
    MediaAccessError,
    OutputExpiredError,
    RateLimitedError,
    SubmissionUncertainError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimedOutError,
    TransientServerError,
    WaitTimeoutError,
    WaveSpeedError,
)

NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
BASE = "https://api.test"
PID = "p" * 32

Answer = httpx.Response | Exception
Script = Callable[[httpx.Request], Answer]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class EdgeRng(random.Random):
    """`uniform` returns the low or the high end of its range, and records every range."""

    def __init__(self, end: str) -> None:
        super().__init__(0)
        self.end = end
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return a if self.end == "low" else b


class Run:
    """Drives one operation in memory and records its steps."""

    def __init__(self, ops: Operations, clock: FakeClock) -> None:
        self.ops, self.clock = ops, clock
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []
        self.timeline: list[tuple[str, float]] = []  # ("request" | "sleep", clock time)
        self.wakes: list[float] = []  # clock times at which a sleep's `wake` fires

    def __call__(self, op: Operation[Any], script: Script | list[Answer]) -> Any:
        answers = list(script) if isinstance(script, list) else None
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    assert step.seconds >= 0
                    end = self.clock.t + step.seconds
                    due = [w for w in self.wakes if self.clock.t <= w < end]
                    if step.wake is not None and due:
                        self.wakes.remove(due[0])
                        self.sleeps.append(due[0] - self.clock.t)
                        self.clock.t = due[0]
                        step = op.send(True)
                        continue
                    self.sleeps.append(step.seconds)
                    self.clock.t = end
                    step = op.send(None)
                    continue
                assert isinstance(step, httpx.Request), f"unexpected step {step!r}"
                self.requests.append(step)
                self.timeline.append(("request", self.clock.t))
                if answers is not None:
                    answer = answers.pop(0) if len(answers) > 1 else answers[0]
                else:
                    assert not isinstance(script, list)
                    answer = script(step)
                if isinstance(answer, Exception):
                    step = op.throw(answer)
                else:
                    answer.request = step
                    step = op.send(answer)
        except StopIteration as done:
            return done.value
        finally:
            op.close()

    @property
    def poll_times(self) -> list[float]:
        return [t for kind, t in self.timeline if kind == "request"]


def make(end: str = "high", **kwargs: Any) -> tuple[Operations, Run, EdgeRng]:
    clock, rng = FakeClock(), EdgeRng(end)
    ops = Operations(
        api_key=SecretStr("sk-secret-key"),
        base_url=BASE,
        clock=clock,
        rng=rng,
        now=lambda: NOW,
        **kwargs,
    )
    return ops, Run(ops, clock), rng


def env(
    data: Any = None,
    *,
    code: int = 200,
    status: int = 200,
    message: str = "success",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.Response(
        status, json={"code": code, "message": message, "data": data}, headers=headers
    )


def pred(status: str = "processing", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": PID,
        "model": "m",
        "status": status,
        "outputs": [],
        "created_at": "2026-11-25T09:59:00.000Z",
        "error": "",
    }
    body.update(fields)
    return body


DONE = pred("completed", outputs=["https://cdn.test/v.mp4"], timings={"inference": 4200})


# -- retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["low", "high"])
def test_retry_backoff_doubles_to_its_cap_with_full_jitter(end: str) -> None:
    ops, run, rng = make(end, retry=RetryPolicy(max_attempts=6, backoff=0.5, max_backoff=3))
    answers: list[Answer] = [httpx.Response(503)] * 5 + [env({"balance": 4.5})]
    assert str(run(ops.balance(), answers)) == "4.5"
    assert len(run.requests) == 6
    # Full jitter: each delay is drawn from [0, min(cap, backoff * 2^(n-1))].
    assert rng.ranges == [(0, 0.5), (0, 1.0), (0, 2.0), (0, 3.0), (0, 3.0)]
    assert run.sleeps == ([0.0] * 5 if end == "low" else [0.5, 1.0, 2.0, 3.0, 3.0])


def test_retries_exhausted_raise_the_last_error_without_a_last_sleep() -> None:
    ops, run, _ = make(retry=RetryPolicy(max_attempts=3, backoff=1))
    with pytest.raises(TransientServerError, match="HTTP 502"):
        run(ops.balance(), [httpx.Response(502)])
    assert len(run.requests) == 3 and len(run.sleeps) == 2


def test_transport_errors_on_a_read_are_retried() -> None:
    ops, run, _ = make(retry=RetryPolicy(max_attempts=3))
    answers: list[Answer] = [
        httpx.ReadTimeout("slow"),
        httpx.ConnectError("refused"),
        env({"balance": 1}),
    ]
    assert str(run(ops.balance(), answers)) == "1"
    assert len(run.requests) == 3


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("0.25", 0.25),
        (format_datetime(NOW + timedelta(seconds=12), usegmt=True), 12.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
        ("600", 60.0),
    ],  # capped by max_retry_after
    ids=["seconds", "fraction", "http-date", "http-date-in-the-past", "capped"],
)
def test_retry_after_is_honoured(header: str, expected: float) -> None:
    ops, run, rng = make(retry=RetryPolicy(max_retry_after=60))
    answers: list[Answer] = [
        httpx.Response(429, headers={"Retry-After": header}),
        env({"balance": 2}),
    ]
    run(ops.balance(), answers)
    assert run.sleeps == [pytest.approx(expected)]
    assert rng.ranges == []  # the server's delay, not a jittered backoff


def test_rate_limit_without_retry_after_backs_off() -> None:
    ops, run, rng = make(retry=RetryPolicy(backoff=2))
    run(ops.balance(), [httpx.Response(429), env({"balance": 2})])
    assert run.sleeps == [2.0] and rng.ranges == [(0, 2.0)]


# -- the poll schedule --------------------------------------------------------------------

POLICY = PollPolicy(
    first_poll_after=10,
    min_interval=5,
    max_interval=30,
    multiplier=1.5,
    jitter=0.1,
    learn_first_poll=False,
)


@pytest.mark.parametrize("end", ["low", "high"])
def test_poll_schedule_first_poll_floor_and_growth(end: str) -> None:
    ops, run, _ = make(end, poll=POLICY)
    answers: list[Answer] = [env(pred())] * 8 + [env(DONE)]
    done = run(ops.wait(PID, timeout=10_000, poll_first=False), answers)
    assert done.status is PredictionStatus.COMPLETED and len(run.requests) == 9
    first, *rest = run.sleeps
    # The first poll aims at the expected inference time and is jittered later, never earlier.
    assert first == (10.0 if end == "low" else 11.0)
    assert all(s >= 5.0 for s in rest)  # the service's floor between video polls
    assert rest[0] == (5.0 if end == "low" else 5.5)
    bases = [5.0, 7.5, 11.25, 16.875, 25.3125, 30.0, 30.0, 30.0]
    factor = 0.9 if end == "low" else 1.1
    assert rest == pytest.approx([max(5.0, b * factor) for b in bases])
    assert all(r.url.path == f"/api/v3/predictions/{PID}/result" for r in run.requests)


def test_poll_first_polls_at_once_then_after_min_interval() -> None:
    ops, run, _ = make(poll=POLICY)
    run(ops.wait(PID, timeout=100), [env(pred()), env(DONE)])
    assert run.poll_times[0] == 1000.0  # no sleep before the first poll
    assert run.sleeps == [5.5]


def test_poll_deadline_keeps_the_floor_then_times_out() -> None:
    ops, run, _ = make("high", poll=POLICY)
    with pytest.raises(WaitTimeoutError, match="not finished after 60s") as info:
        run(ops.wait(PID, timeout=60, poll_first=False), [env(pred())])
    assert info.value.prediction_id == PID and info.value.retryable
    # 11, 5.5, 8.25, 12.375, 18.5625 -> t=55.69; 4.31 s remain, less than the floor: the last
    # poll comes min_interval later (overshooting by < 5 s) instead of too soon.
    assert run.sleeps == pytest.approx([11, 5.5, 8.25, 12.375, 18.5625, 5.0])
    gaps = [b - a for a, b in zip(run.poll_times, run.poll_times[1:], strict=False)]
    assert min(gaps) >= 5.0
    assert run.poll_times[-1] - 1000.0 < 60 + 5.0


def test_poll_deadline_shorter_than_the_first_poll() -> None:
    ops, run, _ = make(poll=POLICY)
    with pytest.raises(WaitTimeoutError):
        run(ops.wait(PID, timeout=3, poll_first=False), [env(pred())])
    assert run.sleeps == [3.0] and len(run.requests) == 1


class ScriptedSteer:
    """A PollSteer that knows nothing (its polls far off) until its news, at `news_at`, then
    aims at `aim_at`; it listens only until it knows."""

    class _Wake:
        def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
            return lambda: None  # the in-memory driver fires it from Run.wakes

    def __init__(self, clock: FakeClock, news_at: float, aim_at: float) -> None:
        self.clock, self.news_at, self.aim_at = clock, news_at, aim_at
        self.asked: list[tuple[int, float]] = []

    def next_poll(self, polls: int, scheduled: float) -> float:
        self.asked.append((polls, scheduled))
        if self.clock.t < self.news_at:
            return 100.0
        return max(0.0, self.aim_at - self.clock.t)

    def wake(self) -> Any:
        return self._Wake() if self.clock.t < self.news_at else None


def test_a_steered_wait_moves_its_next_poll_when_woken_and_keeps_the_floor() -> None:
    """A wait with nothing to aim at sleeps on its steer's plan and is woken by news (the
    first time learned for its model): it then polls at the new aim, never sooner than
    min_interval after its last poll, and not past the deadline by more than that."""
    ops, run, _ = make(poll=POLICY)
    clock = run.clock
    steer = ScriptedSteer(clock, news_at=1003.0, aim_at=1005.0)
    run.wakes = [1003.0]
    answers: list[Answer] = [env(pred()), env(DONE)]
    done = run(ops.wait(PID, timeout=600, steer=steer), answers)
    assert done.status is PredictionStatus.COMPLETED
    # Woken at 3 s (planned 100), polled at the aim (5 s); running: the steer says "now",
    # the floor makes it 5 s later.
    assert run.poll_times == [1005.0, 1010.0]
    assert run.sleeps == [3.0, 2.0, 5.0]
    assert steer.asked[0] == (0, 0.0)  # the steer plans the first poll too

    # Nothing ever learned: the plan holds until the deadline, where the last poll comes.
    ops, run, _ = make(poll=POLICY)
    never = ScriptedSteer(run.clock, news_at=float("inf"), aim_at=0.0)
    with pytest.raises(WaitTimeoutError):
        run(ops.wait(PID, timeout=60, steer=never), [env(pred())])
    assert run.poll_times == [1060.0]  # one poll at the deadline, then out


def test_transient_poll_failures_are_absorbed_within_the_deadline() -> None:
    ops, run, _ = make(poll=POLICY, retry=RetryPolicy(max_attempts=2, backoff=1))
    answers: list[Answer] = [httpx.Response(503)] * 4 + [env(DONE)]
    done = run(ops.wait(PID, timeout=600), answers)
    assert done.outputs and len(run.requests) == 5


def test_unknown_status_is_not_terminal_and_logged_once_per_value(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "_UNKNOWN_SEEN", set())  # "once per process": start afresh
    caplog.set_level(logging.WARNING, logger="wan_tasks.api.protocol")
    ops, run, _ = make(poll=POLICY)
    answers: list[Answer] = [
        env(pred(s)) for s in ("pending", "queued", "pending", "queued", "processing")
    ]
    done = run(ops.wait(PID, timeout=600), [*answers, env(DONE)])
    assert done.status is PredictionStatus.COMPLETED and len(run.requests) == 6
    unknown = [
        r.getMessage() for r in caplog.records if "unknown prediction status" in r.getMessage()
    ]
    assert len(unknown) == 2
    assert "'pending'" in unknown[0] and "'queued'" in unknown[1]


def test_unknown_status_until_the_deadline_is_a_wait_timeout() -> None:
    ops, run, _ = make(poll=POLICY)
    with pytest.raises(WaitTimeoutError):
        run(ops.wait(PID, timeout=30), [env(pred("pending"))])
    assert len(run.requests) >= 3


# -- error mapping ------------------------------------------------------------------------


def http_error(status: int, message: str = "nope", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"code": status, "message": message}, headers=headers)


@pytest.mark.parametrize(
    ("answer", "error", "retryable"),
    [
        (http_error(401), AuthenticationError, False),
        (http_error(403), AuthenticationError, False),
        (http_error(402), InsufficientBalanceError, False),
        (http_error(400, "Insufficient balance"), InsufficientBalanceError, False),
        (http_error(400), InvalidRequestError, False),
        (http_error(422), InvalidRequestError, False),
        (http_error(404), OutputExpiredError, False),
        (http_error(429), RateLimitedError, True),
        (http_error(408), TransientServerError, True),
        (http_error(500), TransientServerError, True),
        (http_error(502), TransientServerError, True),
        (http_error(503), TransientServerError, True),
        (http_error(504), TransientServerError, True),
        (httpx.Response(502, text="<html>bad gateway</html>"), TransientServerError, True),
        (httpx.Response(200, text="not json"), TransientServerError, True),
        (httpx.Response(200, json={"no": "envelope"}), TransientServerError, True),
        # An HTTP 200 whose envelope carries an error code.
        (env(code=400, message="bad"), InvalidRequestError, False),
        (env(code=401, message="bad key"), AuthenticationError, False),
        (env(code=404, message="no such task"), OutputExpiredError, False),
        (env(code=429, message="slow down"), RateLimitedError, True),
        (env(code=500, message="oops"), TransientServerError, True),
        (env(code="500", message="oops"), TransientServerError, True),
    ],
    ids=lambda v: None,
)
def test_http_status_and_envelope_code_map_to_error_classes(
    answer: httpx.Response, error: type[WaveSpeedError], retryable: bool
) -> None:
    ops, run, _ = make(retry=RetryPolicy(max_attempts=1))
    with pytest.raises(WaveSpeedError) as info:
        run(ops.get_prediction(PID), [answer])
    assert type(info.value) is error, info.value
    assert info.value.retryable is retryable
    assert info.value.prediction_id == PID
    assert "sk-secret-key" not in str(info.value)


def test_error_body_message_and_error_code_are_quoted() -> None:
    ops, run, _ = make(retry=RetryPolicy(max_attempts=1))
    body = {"code": 400, "message": "image is required", "error_code": "MISSING_PARAM"}
    with pytest.raises(InvalidRequestError, match=r"image is required \(error_code MISSING_PARAM"):
        run(ops.balance(), [httpx.Response(400, json=body)])


def test_envelope_code_zero_is_success() -> None:
    ops, run, _ = make()
    assert str(run(ops.balance(), [env({"balance": 3}, code=0)])) == "3"


@pytest.mark.parametrize(
    ("status", "code", "error", "retryable"),
    [
        ("failed", 1200, ContentModerationError, False),
        ("failed", 1400, InvalidRequestError, False),
        ("failed", 1401, InvalidRequestError, False),
        ("failed", 1402, MediaAccessError, False),
        ("failed", 1403, TaskFailedError, False),
        ("failed", 1405, TaskFailedError, False),
        ("failed", 5000, TaskFailedError, True),
        ("failed", 5003, TaskFailedError, True),
        ("failed", 5004, TaskTimedOutError, True),
        ("failed", None, TaskFailedError, False),
        ("cancelled", None, TaskCancelledError, False),
        ("deleted", None, TaskCancelledError, False),
        ("timeout", None, TaskTimedOutError, True),
        ("completed", None, TaskFailedError, False),  # completed without outputs
    ],
)
def test_terminal_statuses_and_task_codes_map_to_error_classes(
    status: str, code: int | None, error: type[WaveSpeedError], retryable: bool
) -> None:
    ops, run, _ = make(poll=POLICY)
    with pytest.raises(WaveSpeedError) as info:
        run(ops.wait(PID, timeout=600), [env(pred(status, code=code, error="went wrong"))])
    assert type(info.value) is error, info.value
    assert info.value.retryable is retryable
    assert info.value.prediction_id == PID and info.value.task_code == code
    assert status in str(info.value)
    assert len(run.requests) == 1  # a terminal answer ends the wait at once


def test_cancel_and_timeout_are_task_failures() -> None:
    assert issubclass(TaskCancelledError, TaskFailedError)
    assert issubclass(TaskTimedOutError, TaskFailedError)


# -- submit -------------------------------------------------------------------------------

PAYLOAD = {"image": "https://example.com/a.png", "prompt": "p", "duration": 5, "seed": 1}


def submit(answers: list[Answer], **kwargs: Any) -> tuple[Any, Run]:
    ops, run, _ = make(**kwargs)
    return run(ops.submit_payload(PAYLOAD), answers), run


def posts(run: Run) -> int:
    return sum(1 for r in run.requests if r.method == "POST")


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>"),
        httpx.Response(200, content=b""),
        httpx.Response(200, json=["not", "an", "envelope"]),
        env(None),
        env({"status": "created"}),  # no data / no id
        env(code=500, message="internal"),
        env(code=503),
        env(code=5000, message="internal"),
    ],
    ids=["html", "empty", "list", "data-null", "no-id", "code-500", "code-503", "code-5000"],
)
def test_unreadable_or_5xx_coded_200_to_submit_is_uncertain(answer: httpx.Response) -> None:
    with pytest.raises(SubmissionUncertainError, match="reconcile") as info:
        submit([answer, env(pred("created"))])
    assert not info.value.retryable and not isinstance(info.value, TransientServerError)


def test_submit_is_posted_once_when_uncertain() -> None:
    ops, run, _ = make()
    with pytest.raises(SubmissionUncertainError):
        run(ops.submit_payload(PAYLOAD), [httpx.Response(200, text="garbage"), env(pred())])
    assert posts(run) == 1


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (env(code=400, message="duration must be 5 or 8"), InvalidRequestError),
        (env(code=401, message="bad key"), AuthenticationError),
        (env(code=402, message="insufficient balance"), InsufficientBalanceError),
        (env(code=1401, message="invalid parameter"), InvalidRequestError),
        (http_error(400), InvalidRequestError),
        (http_error(404), InvalidRequestError),  # an unknown model path, not an expired output
        (http_error(401), AuthenticationError),
    ],
)
def test_refused_submit_raises_the_mapped_error_once(
    answer: httpx.Response, error: type[WaveSpeedError]
) -> None:
    ops, run, _ = make()
    with pytest.raises(WaveSpeedError) as info:
        run(ops.submit_payload(PAYLOAD), [answer])
    assert type(info.value) is error and not info.value.retryable
    assert posts(run) == 1


def test_any_2xx_submit_answer_is_read_like_200() -> None:
    prediction, run = submit([env(pred("created"), status=202)])
    assert prediction.id == PID and posts(run) == 1
    with pytest.raises(SubmissionUncertainError, match="HTTP 201"):
        submit([httpx.Response(201, text="")])


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_submit_5xx_is_uncertain(status: int) -> None:
    with pytest.raises(SubmissionUncertainError):
        submit([http_error(status)])


def test_submit_rate_limit_is_retried_as_status_or_envelope_code() -> None:
    answers: list[Answer] = [
        http_error(429, **{"Retry-After": "3"}),
        env(code=429, message="slow down"),
        env(pred("created")),
    ]
    prediction, run = submit(answers, retry=RetryPolicy(backoff=1))
    assert prediction.id == PID and posts(run) == 3
    assert run.sleeps == [3.0, 2.0]  # Retry-After, then the second backoff step


def test_submit_transport_errors() -> None:
    prediction, run = submit([httpx.ConnectError("refused"), env(pred("created"))])
    assert prediction.id == PID and posts(run) == 2  # never reached the service: safe again
    with pytest.raises(SubmissionUncertainError, match="may exist"):
        submit([httpx.ReadTimeout("lost"), env(pred("created"))])


# -- file reads are steps, not I/O inside the operation -----------------------------------


def test_prepare_yields_the_file_read_as_a_step() -> None:
    ops, _, _ = make()
    op = ops.prepare(I2VRequest(image=str(SAMPLE), prompt="x", seed=3))
    step = next(op)
    assert isinstance(step, ReadImage) and step.path == SAMPLE.resolve()
    # Whatever the driver read is what gets uploaded: the operation reads nothing itself.
    step = op.send(LocalImage(inspect_image(SAMPLE), b"bytes the driver read"))
    assert isinstance(step, httpx.Request) and step.url.path == "/api/v3/media/upload/binary"
    assert b"bytes the driver read" in step.read() and b'filename="sample.png"' in step.read()
    upload = env({"download_url": "https://cdn.test/u.png", "size": 21})
    upload.request = step
    with pytest.raises(StopIteration) as done:
        op.send(upload)
    assert done.value.value["image"] == "https://cdn.test/u.png"


def test_one_image_is_uploaded_once_for_many_requests() -> None:
    """A batch of many prompts on one image: the second request reuses the first upload of
    the same bytes; other bytes, or an upload older than UPLOAD_REUSE_S, upload again."""
    from wan_tasks.api.operations import UPLOAD_REUSE_S

    ops, run, _ = make()
    info = inspect_image(SAMPLE)

    def prepare(data: bytes) -> tuple[dict[str, Any], int]:
        op = ops.prepare(I2VRequest(image=str(SAMPLE), prompt="x", seed=3))
        assert isinstance(next(op), ReadImage)
        try:
            step = op.send(LocalImage(info, data))
        except StopIteration as done:
            return done.value, 0  # answered without a call
        assert isinstance(step, httpx.Request) and step.url.path.endswith("/upload/binary")
        upload = env({"download_url": f"https://cdn.test/{len(data)}-{run.clock.t}.png"})
        upload.request = step
        with pytest.raises(StopIteration) as done:
            op.send(upload)
        return done.value.value, 1

    first, calls = prepare(b"the image")
    assert calls == 1
    again, calls = prepare(b"the image")
    assert (again["image"], calls) == (first["image"], 0)
    other, calls = prepare(b"another image")
    assert calls == 1 and other["image"] != first["image"]
    run.clock.t += UPLOAD_REUSE_S + 1
    late, calls = prepare(b"the image")
    assert calls == 1 and late["image"] != first["image"]


def test_a_bad_file_is_thrown_into_the_operation() -> None:
    ops, _, _ = make()
    op = ops.upload_file(SAMPLE)
    assert isinstance(next(op), ReadImage)
    with pytest.raises(ValueError, match="does not exist"):
        op.throw(ValueError("local file '/x.png' does not exist"))
    assert op.gi_frame is None


def test_the_key_is_only_in_the_authorization_header() -> None:
    ops, run, _ = make()
    run(ops.balance(), [env({"balance": 1})])
    (sent,) = run.requests
    assert sent.headers["Authorization"] == "Bearer sk-secret-key"
    assert "sk-secret-key" not in repr(ops) and "sk-secret-key" not in str(sent.url)

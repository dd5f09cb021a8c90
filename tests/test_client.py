"""The real client against the emulator over HTTP: lifecycle, uploads and every fault."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import FAST_POLL, FAST_RETRY, SAMPLE
from wan_tasks import (
    MODEL_ID,
    AsyncWaveSpeedClient,
    AuthenticationError,
    ContentModerationError,
    I2VRequest,
    InsufficientBalanceError,
    InvalidRequestError,
    MediaAccessError,
    OutputExpiredError,
    PredictionStatus,
    RateLimitedError,
    SubmissionUncertainError,
    TaskFailedError,
    Timeouts,
    TransientServerError,
    WaitTimeoutError,
    WaveSpeedClient,
    WaveSpeedError,
)
from wan_tasks.api.operations import LocalImage, Operation, ReadImage
from wan_tasks.emulator import Emulator
from wan_tasks.emulator.render import probe_mp4
from wan_tasks.errors import TaskCancelledError, TaskTimedOutError

Make = Callable[..., Any]


def request(**kw: Any) -> I2VRequest:
    kw.setdefault("image", str(SAMPLE))
    kw.setdefault("prompt", "a quiet lake")
    kw.setdefault("seed", 11)
    return I2VRequest(**kw)


def download(client: WaveSpeedClient, url: str) -> bytes:
    with client.stream_output(url) as response:
        return response.read()


def test_lifecycle_upload_submit_wait_download(emulator: Emulator, client: WaveSpeedClient) -> None:
    submission = client.submit(request(duration=8))
    first = submission.prediction
    assert first.status is PredictionStatus.CREATED and first.outputs == []
    assert submission.payload["image"].startswith(emulator.base_url + "/media/uploads/")
    seen = {client.get_prediction(first.id).status}
    done = client.wait(first.id)
    seen.add(done.status)
    assert done.status is PredictionStatus.COMPLETED and len(done.outputs) == 1
    assert done.inference_ms is not None and done.inference_ms >= 300
    assert done.created_at is not None and done.urls.get and done.has_nsfw_contents == [False]
    assert seen <= {"created", "processing", "completed"} and "completed" in seen

    info = probe_mp4(download(client, done.outputs[0]))
    assert (info.width, info.height, info.frames, info.codec) == (832, 480, 129, "h264")
    assert info.fps == pytest.approx(16.0) and info.duration_s == pytest.approx(129 / 16, abs=0.1)
    stats = emulator.stats()
    assert stats["submissions"] == 1 and stats["uploads"] == 1 and stats["downloads"] == 1


def test_portrait_input_gives_portrait_video(tmp_path: Any, client: WaveSpeedClient) -> None:
    from PIL import Image

    portrait = tmp_path / "p.jpg"
    Image.new("RGB", (360, 640), (120, 30, 90)).save(portrait)
    done = client.run(request(image=str(portrait)))
    info = probe_mp4(download(client, done.outputs[0]))
    assert (info.width, info.height, info.frames) == (480, 832, 81)


def test_first_and_last_image(tmp_path: Any, client: WaveSpeedClient, emulator: Emulator) -> None:
    from PIL import Image

    last = tmp_path / "last.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(last)
    done = client.run(request(last_image=str(last)))
    assert done.status is PredictionStatus.COMPLETED
    assert emulator.stats()["uploads"] == 2
    # The same bytes again (as either image): this client's upload of them is reused.
    again = client.run(request(image=str(last), last_image=str(SAMPLE), seed=99))
    assert again.status is PredictionStatus.COMPLETED
    assert emulator.stats()["uploads"] == 2


def test_same_seed_same_video_different_seed_different_video(client: WaveSpeedClient) -> None:
    a = download(client, client.run(request(seed=5)).outputs[0])
    b = download(client, client.run(request(seed=5)).outputs[0])
    c = download(client, client.run(request(seed=6)).outputs[0])
    assert a == b and a != c


def test_presigned_upload_flow(emulator: Emulator) -> None:
    """The SDK 2.x flow: a ticket with the key, then a PUT without it."""
    auth = {"Authorization": f"Bearer {emulator.api_key}"}
    data = SAMPLE.read_bytes()
    with httpx.Client(base_url=emulator.base_url, timeout=10) as http:
        ticket = http.post(
            "/api/v3/media/uploads",
            headers=auth,
            json={"filename": "s.png", "size": len(data), "content_type": "image/png"},
        ).json()["data"]
        assert ticket["upload"]["method"] == "PUT"
        put = httpx.put(
            ticket["upload"]["url"], content=data, headers=ticket["upload"]["headers"], timeout=10
        )
        assert put.status_code == 200
        assert httpx.get(ticket["download_url"], timeout=10).content == data
        # A ticket is single use.
        again = httpx.put(ticket["upload"]["url"], content=data, timeout=10)
        assert again.status_code == 404


def test_wrong_key_is_401(emulator: Emulator, make_client: Make) -> None:
    bad = make_client(emulator, api_key="wrong-key")
    with pytest.raises(AuthenticationError, match="HTTP 401") as info:
        bad.balance()
    assert not info.value.retryable
    raw = httpx.get(f"{emulator.base_url}/api/v3/balance", timeout=5)
    assert raw.status_code == 401


def test_service_side_validation_is_400(emulator: Emulator) -> None:
    auth = {"Authorization": f"Bearer {emulator.api_key}"}
    url = f"{emulator.base_url}/api/v3/wavespeed-ai/wan-2.2/i2v-480p-lora-ultra-fast"
    bad = httpx.post(
        url,
        headers=auth,
        json={"image": "https://x/a.png", "prompt": "p", "duration": 6},
        timeout=5,
    )
    assert bad.status_code == 400 and "duration" in bad.json()["message"]
    local = httpx.post(url, headers=auth, json={"image": "/tmp/a.png", "prompt": "p"}, timeout=5)
    assert local.status_code == 400 and "image" in local.json()["message"]
    assert httpx.post(url, headers=auth, content=b"{", timeout=5).status_code == 400


def test_unreachable_image_url_fails_task_with_1402(client: WaveSpeedClient) -> None:
    # The emulator never leaves this machine: a non-loopback URL is unreachable, as for the
    # real service a private URL would be.
    with pytest.raises(MediaAccessError, match="1402") as info:
        client.run(request(image="https://unreachable.invalid/cat.png"))
    assert info.value.prediction_id and not info.value.retryable


@pytest.mark.parametrize(
    ("code", "error", "retryable"),
    [
        (5003, TaskFailedError, True),
        (5000, TaskFailedError, True),
        (1200, ContentModerationError, False),
        (1403, TaskFailedError, False),
    ],
)
def test_failed_tasks_map_to_typed_errors(
    make_emulator: Make, make_client: Make, code: int, error: type[Exception], retryable: bool
) -> None:
    emu = make_emulator(faults={"script": {"submit": [f"fail:{code}"]}})
    client = make_client(emu)
    with pytest.raises(error, match=str(code)) as info:
        client.run(request())
    assert info.value.task_code == code  # type: ignore[attr-defined]
    assert info.value.retryable is retryable  # type: ignore[attr-defined]
    assert info.value.prediction_id  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", ["429", "500", "502", "503"])
def test_poll_faults_are_retried(make_emulator: Make, make_client: Make, fault: str) -> None:
    emu = make_emulator(faults={"script": {"result": [fault, fault]}, "retry_after_s": 0.2})
    client = make_client(emu)
    done = client.run(request())
    assert done.status is PredictionStatus.COMPLETED
    stats = emu.stats()
    assert stats["faults_injected"] == 2 and stats["submissions"] == 1


def test_retry_after_is_honoured(make_emulator: Make, make_client: Make) -> None:
    emu = make_emulator(faults={"script": {"balance": ["429"]}, "retry_after_s": 0.6})
    client = make_client(emu)
    start = time.monotonic()
    client.balance()
    assert time.monotonic() - start >= 0.55


def test_rate_limit_error_carries_retry_after(make_emulator: Make, make_client: Make) -> None:
    from wan_tasks import RetryPolicy

    emu = make_emulator(faults={"script": {"balance": ["429"]}, "retry_after_s": 7})
    client = make_client(emu, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(RateLimitedError) as info:
        client.balance()
    assert info.value.retry_after == 7 and info.value.retryable


def test_slow_answer_past_timeout_is_retried(make_emulator: Make, make_client: Make) -> None:
    emu = make_emulator(faults={"script": {"result": ["slow"]}, "slow_s": 1.5})
    client = make_client(emu, timeouts=Timeouts(read=0.5, submit_read=5))
    done = client.run(request())
    assert done.status is PredictionStatus.COMPLETED
    assert emu.stats()["result_polls"] >= 2


def test_submit_429_is_retried_without_double_submission(
    make_emulator: Make, make_client: Make
) -> None:
    emu = make_emulator(faults={"script": {"submit": ["429"]}, "retry_after_s": 0.1})
    client = make_client(emu)
    client.run(request())
    assert emu.stats()["submissions"] == 1


@pytest.mark.parametrize("fault", ["500", "503"])
def test_submit_5xx_is_uncertain_not_retried(
    make_emulator: Make, make_client: Make, fault: str
) -> None:
    emu = make_emulator(faults={"script": {"submit": [fault]}})
    client = make_client(emu)
    with pytest.raises(SubmissionUncertainError, match="reconcile") as info:
        client.submit(request())
    assert not info.value.retryable


def test_dropped_submit_is_uncertain_and_the_task_exists(
    make_emulator: Make, make_client: Make
) -> None:
    emu = make_emulator(faults={"script": {"submit": ["drop"]}})
    client = make_client(emu)
    with pytest.raises(SubmissionUncertainError, match="may exist") as info:
        client.submit(request())
    assert not info.value.retryable
    stats = emu.stats()
    assert stats["submissions"] == 1  # created and billed, never answered, never re-sent
    found = client.history(page_size=10).items
    assert len(found) == 1 and found[0].input is not None
    assert found[0].input["prompt"] == "a quiet lake" and found[0].input["seed"] == 11


def test_submit_connect_error_is_retried_safely(make_client: Make, emulator: Emulator) -> None:
    calls = {"n": 0}
    real = httpx.HTTPTransport()

    class FlakyConnect(httpx.BaseTransport):
        def handle_request(self, req: httpx.Request) -> httpx.Response:
            if req.method == "POST" and "ultra-fast" in req.url.path and calls["n"] == 0:
                calls["n"] += 1
                raise httpx.ConnectError("refused", request=req)
            return real.handle_request(req)

    client = make_client(emulator, transport=FlakyConnect())
    client.run(request())
    assert calls["n"] == 1 and emulator.stats()["submissions"] == 1


def test_transient_poll_failures_until_deadline_then_timeout(
    make_emulator: Make, make_client: Make
) -> None:
    emu = make_emulator(latency_s=30)
    client = make_client(emu)
    sub = client.submit(request())
    start = time.monotonic()
    with pytest.raises(WaitTimeoutError) as info:
        client.wait(sub.prediction.id, timeout=1.0)
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 3.0
    assert info.value.prediction_id == sub.prediction.id and info.value.retryable
    assert sub.prediction.id in str(info.value)


def test_expired_and_truncated_downloads(make_emulator: Make, make_client: Make) -> None:
    emu = make_emulator(faults={"script": {"download": ["expire", "truncate"]}})
    client = make_client(emu)
    done = client.run(request())
    with pytest.raises(OutputExpiredError, match="404"), client.stream_output(done.outputs[0]):
        pass
    with pytest.raises(httpx.RemoteProtocolError), client.stream_output(done.outputs[0]) as r:
        r.read()
    assert len(download(client, done.outputs[0])) > 10_000


def test_outputs_expire_after_their_lifetime(make_emulator: Make, make_client: Make) -> None:
    emu = make_emulator(output_ttl_s=0.5)
    client = make_client(emu)
    done = client.run(request())
    assert download(client, done.outputs[0])
    time.sleep(0.6)
    with pytest.raises(OutputExpiredError), client.stream_output(done.outputs[0]):
        pass


def test_concurrency_cap_queues_tasks(make_emulator: Make, make_client: Make) -> None:
    emu = make_emulator(concurrency=2, latency_s=1.0)
    client = make_client(emu)
    ids = [
        client.submit(request(image="http://127.0.0.1:1/never.png")).prediction.id for _ in range(5)
    ]
    time.sleep(0.2)
    # One GET after another is no atomic snapshot (a slot can change hands between two), so
    # the cap itself is asserted on the emulator's counters below.
    statuses = [client.get_prediction(i).status for i in ids]
    assert PredictionStatus.CREATED in statuses  # some wait for a slot
    for i in ids:
        with pytest.raises(MediaAccessError):
            client.wait(i)
    stats = emu.stats()
    # The cap held, and tasks queued past it. (All five at once only if the five submits beat
    # the first task's end: on a loaded machine one had ended before the fifth came.)
    assert stats["max_processing"] == 2 and stats["max_in_flight"] >= 3


def test_cancel(make_emulator: Make, make_client: Make) -> None:
    emu = make_emulator(latency_s=10)
    client = make_client(emu)
    sub = client.submit(request())
    assert client.cancel(sub.prediction.id).status is PredictionStatus.DELETED
    with pytest.raises(TaskFailedError, match="deleted"):
        client.wait(sub.prediction.id)
    assert emu.stats()["cancels"] == 1


def test_insufficient_balance(make_emulator: Make, make_client: Make) -> None:
    emu = make_emulator(balance="0.15")
    client = make_client(emu)
    client.submit(request())
    with pytest.raises(InsufficientBalanceError, match="Top up"):
        client.submit(request())
    assert str(client.balance()) == "0.05"


def test_unknown_prediction_is_404(client: WaveSpeedClient) -> None:
    with pytest.raises(OutputExpiredError):
        client.get_prediction("0" * 32)


def test_history_filters(client: WaveSpeedClient) -> None:
    from datetime import UTC, datetime, timedelta

    before = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    client.submit(request(seed=1))
    client.submit(request(seed=2))
    page = client.history(created_after=before, page_size=1)
    assert page.total == 2 and len(page.items) == 1
    later = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    assert client.history(created_after=later).total == 0


def test_emulator_rejects_bad_fault_plan(emulator: Emulator) -> None:
    r = httpx.post(f"{emulator.base_url}/_emulator/faults", json={"rates": {"slow": 2}}, timeout=5)
    assert r.status_code == 400 and "slow" in r.json()["message"]


def test_async_client_runs_many_concurrently(make_emulator: Make) -> None:
    emu = make_emulator(concurrency=4, latency_s=0.3)

    async def main() -> list[str]:
        async with AsyncWaveSpeedClient(emu.api_key, emu.base_url, poll=FAST_POLL) as client:
            url = await client.upload(SAMPLE)
            done = await asyncio.gather(*(client.run(request(image=url, seed=s)) for s in range(6)))
            async with client.stream_output(done[0].outputs[0]) as r:
                body = await r.aread()
            assert probe_mp4(body).frames == 81
            return [d.id for d in done]

    ids = asyncio.run(main())
    assert len(set(ids)) == 6
    stats = emu.stats()
    assert stats["submissions"] == 6 and stats["uploads"] == 1 and stats["max_processing"] == 4


def test_retries_exhausted_raise_transient_error(make_emulator: Make, make_client: Make) -> None:
    emu = make_emulator(faults={"script": {"balance": ["503"] * 10}})
    client = make_client(emu)
    with pytest.raises(TransientServerError, match="503") as info:
        client.balance()
    assert info.value.retryable


def test_invalid_request_from_service_is_not_retried(emulator: Emulator, make_client: Make) -> None:
    client = make_client(emulator)
    with pytest.raises(InvalidRequestError, match="duration"):
        client.submit_payload({"image": "https://x/a.png", "prompt": "p", "duration": 7})
    assert emulator.stats()["submissions"] == 0


def test_errors_survive_pickling() -> None:
    import pickle

    err = RateLimitedError("slow down", retry_after=3.0, prediction_id="abc")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, RateLimitedError) and back.retry_after == 3.0
    assert back.prediction_id == "abc" and str(back) == str(err)
    failed = pickle.loads(pickle.dumps(TaskFailedError("x", prediction_id="p", task_code=5003)))
    assert failed.retryable and failed.task_code == 5003


def test_stream_is_not_buffered(client: WaveSpeedClient) -> None:
    done = client.run(request())
    with client.stream_output(done.outputs[0]) as response:
        buf = io.BytesIO()
        for chunk in response.iter_bytes(4096):
            buf.write(chunk)
    assert probe_mp4(buf.getvalue()).frames == 81


def test_both_result_paths_and_both_balance_paths(
    emulator: Emulator, client: WaveSpeedClient
) -> None:
    sub = client.submit(request())
    auth = {"Authorization": f"Bearer {emulator.api_key}"}
    base = f"{emulator.base_url}/api/v3"
    for path in (f"/predictions/{sub.prediction.id}", f"/predictions/{sub.prediction.id}/result"):
        answer = httpx.get(base + path, headers=auth, timeout=5).json()
        assert answer["code"] == 200 and answer["data"]["id"] == sub.prediction.id
    for path in ("/balance", "/account/balance"):
        assert httpx.get(base + path, headers=auth, timeout=5).json()["data"]["balance"] > 0


# -- the drivers ---------------------------------------------------------------------------


def test_sync_and_async_clients_have_identical_signatures() -> None:
    """Every public method exists on both clients with the same parameters (no **kwargs);
    the async one is a coroutine (or an async context manager). close/aclose as in httpx."""

    def public(cls: type) -> dict[str, Any]:
        return {
            n: getattr(cls, n)
            for n in dir(cls)
            if not n.startswith("_") and inspect.isfunction(getattr(cls, n))
        }

    sync, aio = public(WaveSpeedClient), public(AsyncWaveSpeedClient)
    renames = {"close": "aclose"}
    assert {renames.get(n, n) for n in sync} == set(aio)
    assert {"wait", "history", "run", "submit", "upload", "stream_output"} <= set(sync)
    for name, fn in sync.items():
        afn = aio[renames.get(name, name)]
        s, a = inspect.signature(fn), inspect.signature(afn)
        assert list(s.parameters.values()) == list(a.parameters.values()), name
        assert str(s.return_annotation) == str(a.return_annotation).replace(
            "AsyncIterator", "Iterator"
        ), name
        assert all(p.kind is not p.VAR_KEYWORD for p in s.parameters.values()), name
        inner = getattr(afn, "__wrapped__", afn)
        assert inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner), name
    init_s = inspect.signature(WaveSpeedClient.__init__).parameters
    init_a = inspect.signature(AsyncWaveSpeedClient.__init__).parameters
    assert list(init_s) == list(init_a)
    assert all(init_s[n] == init_a[n] for n in init_s if n != "transport")
    assert all(p.kind is not p.VAR_KEYWORD for p in init_s.values())


class _FailOnPoll(httpx.BaseTransport):
    """The real transport, except that the driver itself breaks on the second poll."""

    def __init__(self) -> None:
        self.real = httpx.HTTPTransport()
        self.polls = 0

    def handle_request(self, req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/result"):
            self.polls += 1
            if self.polls == 2:
                raise RuntimeError("the driver broke")
        return self.real.handle_request(req)


def test_sync_driver_closes_the_operation_on_an_exception(
    make_emulator: Make, make_client: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wan_tasks.api.operations")
    emu = make_emulator(latency_s=30)
    client = make_client(emu, transport=_FailOnPoll())
    sub = client.submit(request())
    op = client.ops.wait(sub.prediction.id, timeout=60)
    with pytest.raises(RuntimeError, match="the driver broke"):
        client._run(op)
    # The generator ran its cleanup at once, though the test still holds it.
    assert op.gi_frame is None
    assert any(
        f"stopped waiting on prediction {sub.prediction.id} after 2 polls" in r.getMessage()
        for r in caplog.records
    )


def test_async_driver_closes_the_operation_on_cancellation(
    make_emulator: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wan_tasks.api.operations")
    emu = make_emulator(latency_s=30)

    async def main() -> tuple[Any, str]:
        async with AsyncWaveSpeedClient(emu.api_key, emu.base_url, poll=FAST_POLL) as client:
            pid = (await client.submit(request())).prediction.id
            op = client.ops.wait(pid, timeout=60)
            task = asyncio.create_task(client._run(op))
            for _ in range(500):
                if (await asyncio.to_thread(emu.stats))["result_polls"] >= 2:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return op, pid

    op, pid = asyncio.run(main())
    assert op.gi_frame is None
    assert any(f"stopped waiting on prediction {pid}" in r.getMessage() for r in caplog.records)


def test_async_driver_reads_files_off_the_event_loop(emulator: Emulator) -> None:
    """A file read that only finishes once the loop has ticked: on the loop thread it would
    wait its 10 s out with zero ticks, and fail."""
    gate = threading.Event()
    readers: list[int] = []
    ticks_when_read: list[int] = []

    class GatedRead(ReadImage):
        def run(self) -> LocalImage:
            readers.append(threading.get_ident())
            if not gate.wait(10):
                raise AssertionError("the event loop did not run while the file was read")
            return super().run()

    async def main() -> tuple[int, str]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 5:
                    gate.set()
                await asyncio.sleep(0)

        async with AsyncWaveSpeedClient(emulator.api_key, emulator.base_url) as client:

            def upload_op() -> Operation[str]:
                local: LocalImage = yield GatedRead(SAMPLE)
                ticks_when_read.append(ticks)
                result = yield from client.ops.upload(
                    local.data, local.info.path.name, local.info.content_type
                )
                return result.download_url

            tick_task = asyncio.create_task(ticker())
            try:
                url = await client._run(upload_op())
            finally:
                tick_task.cancel()
        return threading.get_ident(), url

    loop_thread, url = asyncio.run(main())
    assert readers and readers[0] != loop_thread
    assert ticks_when_read[0] >= 5
    assert httpx.get(url, timeout=5).content == SAMPLE.read_bytes()


def test_async_prepare_uploads_a_local_image_through_the_thread_step(emulator: Emulator) -> None:
    async def main() -> dict[str, Any]:
        async with AsyncWaveSpeedClient(emulator.api_key, emulator.base_url) as client:
            return await client.prepare(request())

    payload = asyncio.run(main())
    assert httpx.get(payload["image"], timeout=5).content == SAMPLE.read_bytes()
    assert emulator.stats()["uploads"] == 1


# -- what the service may send (a scripted server on loopback) -----------------------------


class Scripted:
    """A tiny HTTP server on 127.0.0.1 answering each (method, path) from a script: answers
    are used in order, the last one repeats. Counts the requests per route."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[tuple[int, bytes, dict[str, str]]]] = {}
        self.hits: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                key = (self.command, self.path.split("?")[0])
                with scripted.lock:
                    scripted.hits[key] = scripted.hits.get(key, 0) + 1
                    answers = scripted.routes.get(key)
                    if not answers:
                        status, body, headers = 599, b"no script for this route", {}
                    else:
                        status, body, headers = answers.pop(0) if len(answers) > 1 else answers[0]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, method: str, path: str, *answers: Any) -> None:
        """Each answer: a dict (sent as JSON with HTTP 200), bytes (HTTP 200, raw), or a tuple
        (status, dict | bytes, headers)."""
        script = []
        for answer in answers:
            status, body, headers = answer if isinstance(answer, tuple) else (200, answer, {})
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            script.append((status, raw, {"Content-Type": "application/json", **headers}))
        self.routes[(method, "/api/v3" + path)] = script

    def count(self, method: str, path: str) -> int:
        return self.hits.get((method, "/api/v3" + path), 0)


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
        server.thread.join(5)


@pytest.fixture
def scripted_client(scripted: Scripted) -> Iterator[WaveSpeedClient]:
    with WaveSpeedClient(
        "test-key-0123456789",
        scripted.base_url,
        poll=FAST_POLL,
        retry=FAST_RETRY,
        timeouts=Timeouts(read=5.0, submit_read=5.0),
    ) as client:
        yield client


PID = "f" * 32
SUBMIT = f"/{MODEL_ID}"
RESULT = f"/predictions/{PID}/result"


def envelope(data: Any, code: int = 200, message: str = "success") -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}


def prediction(status: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": PID,
        "model": MODEL_ID,
        "status": status,
        "outputs": [],
        "urls": {"get": f"https://api.test{RESULT}"},
        "has_nsfw_contents": [],
        "created_at": "2026-11-25T10:00:00.000Z",
        "error": "",
    }
    body.update(fields)
    return body


COMPLETED = prediction(
    "completed",
    outputs=["https://cdn.test/v.mp4"],
    has_nsfw_contents=[False],
    created_at="2026-11-25T10:00:00.123456789Z",
    executionTime=3456,
    code=0,
    queue_position=None,
    new_field={"nested": [1, 2]},
)


def test_unknown_status_mid_wait_keeps_waiting(
    scripted: Scripted, scripted_client: WaveSpeedClient
) -> None:
    scripted.on(
        "GET",
        RESULT,
        envelope(prediction("pending")),
        envelope(prediction("queued")),
        envelope(prediction("pending")),
        envelope(COMPLETED),
    )
    done = scripted_client.wait(PID, timeout=30)
    assert done.status is PredictionStatus.COMPLETED and scripted.count("GET", RESULT) == 4
    # Nanoseconds, executionTime instead of timings, code 0 and unknown fields: all read.
    assert done.created_at is not None and done.created_at.microsecond == 123456
    assert done.inference_ms == 3456 and done.code is None
    assert done.model_extra is not None and done.model_extra["new_field"] == {"nested": [1, 2]}


def test_unknown_status_through_the_deadline_is_a_wait_timeout(
    scripted: Scripted, scripted_client: WaveSpeedClient
) -> None:
    scripted.on("GET", RESULT, envelope(prediction("queued")))
    with pytest.raises(WaitTimeoutError) as info:
        scripted_client.wait(PID, timeout=0.5)
    assert info.value.prediction_id == PID and scripted.count("GET", RESULT) >= 2


@pytest.mark.parametrize(
    ("status", "code", "error", "retryable"),
    [
        ("cancelled", None, TaskCancelledError, False),
        ("timeout", None, TaskTimedOutError, True),
        ("failed", 5004, TaskTimedOutError, True),
        ("failed", 1400, InvalidRequestError, False),
        ("failed", 1401, InvalidRequestError, False),
        ("failed", 1405, TaskFailedError, False),
    ],
)
def test_terminal_failures_over_http(
    scripted: Scripted,
    scripted_client: WaveSpeedClient,
    status: str,
    code: int | None,
    error: type[Exception],
    retryable: bool,
) -> None:
    scripted.on(
        "GET",
        RESULT,
        envelope(prediction("processing")),
        envelope(prediction(status, code=code, error="stopped")),
    )
    with pytest.raises(WaveSpeedError) as info:
        scripted_client.wait(PID)
    assert type(info.value) is error
    assert info.value.retryable is retryable and info.value.prediction_id == PID
    assert scripted.count("GET", RESULT) == 2


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (envelope(None, 401, "invalid api key"), AuthenticationError),
        (envelope(None, 400, "bad request"), InvalidRequestError),
        (envelope(None, 404, "prediction not found"), OutputExpiredError),
    ],
)
def test_http_200_carrying_an_error_code(
    scripted: Scripted,
    scripted_client: WaveSpeedClient,
    body: dict[str, Any],
    error: type[Exception],
) -> None:
    scripted.on("GET", RESULT, body)
    with pytest.raises(error, match=str(body["message"])):
        scripted_client.get_prediction(PID)
    assert scripted.count("GET", RESULT) == 1  # not retried


def test_http_200_with_a_5xx_code_on_a_read_is_retried(
    scripted: Scripted, scripted_client: WaveSpeedClient
) -> None:
    scripted.on("GET", "/balance", envelope(None, 500, "internal"), envelope({"balance": 7.5}))
    assert str(scripted_client.balance()) == "7.5"
    assert scripted.count("GET", "/balance") == 2


def test_error_body_with_message_and_error_code(
    scripted: Scripted, scripted_client: WaveSpeedClient
) -> None:
    scripted.on(
        "POST",
        SUBMIT,
        (400, {"code": 400, "message": "prompt is required", "error_code": 1400}, {}),
    )
    with pytest.raises(InvalidRequestError, match=r"prompt is required \(error_code 1400\)"):
        scripted_client.submit_payload({"image": "https://x.test/a.png", "prompt": "p"})
    assert scripted.count("POST", SUBMIT) == 1


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (envelope(None, 400, "duration must be 5 or 8"), InvalidRequestError),
        (envelope(None, 401, "invalid api key"), AuthenticationError),
        (envelope(None, 500, "internal error"), SubmissionUncertainError),
        (envelope(None, 503, "unavailable"), SubmissionUncertainError),
    ],
)
def test_submit_200_carrying_an_error_code(
    scripted: Scripted,
    scripted_client: WaveSpeedClient,
    body: dict[str, Any],
    error: type[Exception],
) -> None:
    scripted.on("POST", SUBMIT, body, envelope(prediction("created")))
    with pytest.raises(error) as info:
        scripted_client.submit_payload({"image": "https://x.test/a.png", "prompt": "p"})
    assert type(info.value) is error and not info.value.retryable  # type: ignore[attr-defined]
    assert scripted.count("POST", SUBMIT) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"<html><body>OK</body></html>",
        b'{"code": 200, "data": {"id": "ff',
        b"",
        json.dumps(envelope({"status": "created"})).encode(),
    ],
    ids=["html", "truncated-json", "empty", "no-id"],
)
def test_submit_200_that_cannot_be_read_is_uncertain(
    scripted: Scripted, scripted_client: WaveSpeedClient, raw: bytes
) -> None:
    """Issue 13 point 4: the service said 200, so the task may exist: never a retryable
    TransientServerError (a caller's retry would pay twice)."""
    scripted.on("POST", SUBMIT, raw, envelope(prediction("created")))
    with pytest.raises(SubmissionUncertainError, match="reconcile") as info:
        scripted_client.submit_payload({"image": "https://x.test/a.png", "prompt": "p"})
    assert not info.value.retryable and not isinstance(info.value, TransientServerError)
    assert scripted.count("POST", SUBMIT) == 1


def test_history_items_in_the_documented_shape(
    scripted: Scripted, scripted_client: WaveSpeedClient
) -> None:
    scripted.on(
        "POST",
        "/predictions",
        envelope(
            {
                "page": 1,
                "items": [
                    {**COMPLETED, "input": {"prompt": "p", "duration": 5}},
                    prediction(
                        "pending",
                        created_at="2026-11-25T10:00:01.987654321Z",
                        outputs=None,
                        executionTime=None,
                    ),
                ],
            }
        ),
    )
    page = scripted_client.history(page_size=10, status="completed")
    assert [p.status for p in page.items] == ["completed", "pending"]
    assert page.items[0].inference_ms == 3456 and page.items[0].input == {
        "prompt": "p",
        "duration": 5,
    }
    assert not page.items[1].is_terminal and page.items[1].outputs == []
    assert page.total is None


def test_clients_share_one_tls_context(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Loading the CA bundle costs 25-50 ms of CPU; a flow run makes a client per event loop,
    so the clients load it once per process, and again only when SSL_CERT_FILE changes."""
    import ssl

    import certifi

    from wan_tasks.api._tls import shared_ssl_context

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    shared_ssl_context()  # whatever an earlier test left cached for this setting
    loads: list[object] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        loads.append(kwargs.get("cafile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    sync = WaveSpeedClient("k" * 32, "https://api.example.invalid")

    async def make_async() -> None:
        for _ in range(3):
            async with AsyncWaveSpeedClient.sharing(sync):
                pass

    asyncio.run(make_async())
    sync.close()
    assert loads == []

    # A CA setting of the user's own is honoured, as httpx honours it.
    pem = certifi.contents()
    one_ca = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    (tmp_path / "ca.pem").write_text(one_ca[one_ca.index("-----BEGIN") :] + "\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    assert len(shared_ssl_context().get_ca_certs()) == 1
    assert loads == [str(tmp_path / "ca.pem")]
    assert shared_ssl_context() is shared_ssl_context()


class _Bell:
    """A `Wake` rung from another thread; records who listens."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[], None]] = []
        self.unsubscribed = 0

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self.listeners.append(callback)

        def unsubscribe() -> None:
            self.unsubscribed += 1

        return unsubscribe

    def ring_from_a_thread(self) -> None:
        def ring() -> None:
            while not self.listeners:
                time.sleep(0.01)
            for listener in self.listeners:
                listener()

        threading.Thread(target=ring, daemon=True).start()


def test_a_sleep_with_a_wake_ends_when_it_rings_in_both_drivers() -> None:
    """A steered wait's sleep (`Sleep.wake`) ends when its news comes from another thread
    (the sync driver, in a worker thread; the async one, on the event loop), says so, and
    stops listening; one that is not rung sleeps it out and says it was not woken."""
    from wan_tasks.api.client import _async_sleep, _sleep
    from wan_tasks.api.operations import Sleep

    bell = _Bell()
    bell.ring_from_a_thread()
    assert _sleep(Sleep(60.0, wake=bell)) is True and bell.unsubscribed == 1
    quiet = _Bell()
    assert _sleep(Sleep(0.01, wake=quiet)) is False and quiet.unsubscribed == 1

    async def both() -> tuple[bool, bool]:
        bell = _Bell()
        bell.ring_from_a_thread()
        rung = await _async_sleep(Sleep(60.0, wake=bell))
        return rung, await _async_sleep(Sleep(0.01, wake=_Bell()))

    assert asyncio.run(both()) == (True, False)
    assert _sleep(Sleep(0.0)) is False  # no wake: a plain sleep


def test_a_woken_sleep_cancelled_in_the_same_loop_iteration_stays_cancelled() -> None:
    """The news wakes thousands of waits in one loop iteration; one cancelled in that same
    iteration (a flow run cancelled) must end cancelled. `asyncio.wait_for` on Python 3.11
    returned the wake's result instead and the wait polled on (a reviewer's reproduction)."""
    from wan_tasks.api.client import _async_sleep
    from wan_tasks.api.operations import Sleep

    async def scenario() -> str:
        bell = _Bell()
        sleeper = asyncio.ensure_future(_async_sleep(Sleep(60.0, wake=bell)))
        await asyncio.sleep(0)  # it sleeps, subscribed
        for listener in bell.listeners:
            listener()  # the news, from this thread: the wake is scheduled on the loop
        await asyncio.sleep(0)  # the wake runs: the sleeper's future is done
        sleeper.cancel()  # a cancellation in the same iteration
        try:
            await sleeper
        except asyncio.CancelledError:
            return f"cancelled, unsubscribed {bell.unsubscribed}"
        return "returned: the cancellation was lost"

    assert asyncio.run(scenario()) == "cancelled, unsubscribed 1"

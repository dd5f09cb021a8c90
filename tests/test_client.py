"""The real client against the emulator over HTTP: lifecycle, uploads and every fault."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import FAST_POLL, SAMPLE
from wan_tasks import (
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
)
from wan_tasks.emulator import Emulator
from wan_tasks.emulator.render import probe_mp4

Make = Callable[..., Any]


def request(**kw: Any) -> I2VRequest:
    kw.setdefault("image", str(SAMPLE))
    kw.setdefault("prompt", "a quiet lake")
    kw.setdefault("seed", 11)
    return I2VRequest(**kw)


def download(client: WaveSpeedClient, url: str) -> bytes:
    with client.stream_output(url) as response:
        return response.read()


def test_lifecycle_upload_submit_wait_download(emulator: Emulator, client: WaveSpeedClient
                                              ) -> None:
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


def test_first_and_last_image(client: WaveSpeedClient, emulator: Emulator) -> None:
    done = client.run(request(last_image=str(SAMPLE)))
    assert done.status is PredictionStatus.COMPLETED
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
        ticket = http.post("/api/v3/media/uploads", headers=auth, json={
            "filename": "s.png", "size": len(data), "content_type": "image/png"}).json()["data"]
        assert ticket["upload"]["method"] == "PUT"
        put = httpx.put(ticket["upload"]["url"], content=data,
                        headers=ticket["upload"]["headers"], timeout=10)
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
    bad = httpx.post(url, headers=auth, json={"image": "https://x/a.png", "prompt": "p",
                                               "duration": 6}, timeout=5)
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
    [(5003, TaskFailedError, True), (5000, TaskFailedError, True),
     (1200, ContentModerationError, False), (1403, TaskFailedError, False)],
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


def test_submit_429_is_retried_without_double_submission(make_emulator: Make, make_client: Make
                                                         ) -> None:
    emu = make_emulator(faults={"script": {"submit": ["429"]}, "retry_after_s": 0.1})
    client = make_client(emu)
    client.run(request())
    assert emu.stats()["submissions"] == 1


@pytest.mark.parametrize("fault", ["500", "503"])
def test_submit_5xx_is_uncertain_not_retried(make_emulator: Make, make_client: Make, fault: str
                                             ) -> None:
    emu = make_emulator(faults={"script": {"submit": [fault]}})
    client = make_client(emu)
    with pytest.raises(SubmissionUncertainError, match="reconcile") as info:
        client.submit(request())
    assert not info.value.retryable


def test_dropped_submit_is_uncertain_and_the_task_exists(make_emulator: Make, make_client: Make
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


def test_transient_poll_failures_until_deadline_then_timeout(make_emulator: Make,
                                                             make_client: Make) -> None:
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
    emu = make_emulator(concurrency=2, latency_s=0.5)
    client = make_client(emu)
    ids = [client.submit(request(image="http://127.0.0.1:1/never.png")).prediction.id
           for _ in range(5)]
    time.sleep(0.2)
    statuses = [client.get_prediction(i).status for i in ids]
    assert statuses.count(PredictionStatus.PROCESSING) == 2
    assert statuses.count(PredictionStatus.CREATED) == 3
    for i in ids:
        with pytest.raises(MediaAccessError):
            client.wait(i)
    stats = emu.stats()
    assert stats["max_processing"] == 2 and stats["max_in_flight"] == 5


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
            done = await asyncio.gather(
                *(client.run(request(image=url, seed=s)) for s in range(6))
            )
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


def test_invalid_request_from_service_is_not_retried(emulator: Emulator, make_client: Make
                                                     ) -> None:
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


def test_both_result_paths_and_both_balance_paths(emulator: Emulator, client: WaveSpeedClient
                                                  ) -> None:
    sub = client.submit(request())
    auth = {"Authorization": f"Bearer {emulator.api_key}"}
    base = f"{emulator.base_url}/api/v3"
    for path in (f"/predictions/{sub.prediction.id}", f"/predictions/{sub.prediction.id}/result"):
        answer = httpx.get(base + path, headers=auth, timeout=5).json()
        assert answer["code"] == 200 and answer["data"]["id"] == sub.prediction.id
    for path in ("/balance", "/account/balance"):
        assert httpx.get(base + path, headers=auth, timeout=5).json()["data"]["balance"] > 0

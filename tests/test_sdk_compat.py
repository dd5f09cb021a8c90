"""The official `wavespeed` SDK (2.0.5), pointed at the emulator, works as against the service."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import SAMPLE
from wan_tasks.api.models import MODEL_ID
from wan_tasks.emulator import Emulator
from wan_tasks.emulator.render import probe_mp4

wavespeed = pytest.importorskip("wavespeed")


def test_official_sdk_uploads_and_runs_to_completion(emulator: Emulator) -> None:
    from wavespeed import Client

    client = Client(api_key=emulator.api_key, base_url=emulator.base_url, max_retries=0)
    image_url = client.upload(str(SAMPLE))  # the presigned /media/uploads + PUT flow
    assert image_url.startswith(emulator.base_url)
    result = client.run(
        MODEL_ID,
        {"image": image_url, "prompt": "a lake", "duration": 5, "seed": 3},
        timeout=60,
        poll_interval=0.2,
    )
    (url,) = result["outputs"]
    info = probe_mp4(httpx.get(url, timeout=10).content)
    assert (info.width, info.height, info.frames) == (832, 480, 81)
    stats = emulator.stats()
    assert stats["uploads"] == 1 and stats["submissions"] == 1


def test_official_sdk_sees_a_failed_task(make_emulator: type[Emulator]) -> None:
    from wavespeed import Client

    emu = make_emulator(faults={"script": {"submit": ["fail:1200"]}})  # type: ignore[call-arg]
    client = Client(api_key=emu.api_key, base_url=emu.base_url, max_retries=0)
    with pytest.raises(RuntimeError, match="failed"):
        client.run(
            MODEL_ID,
            {"image": f"{emu.base_url}/media/uploads/none", "prompt": "x"},
            timeout=30,
            poll_interval=0.2,
        )

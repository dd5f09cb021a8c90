"""Account tiers: a Bronze account (2 at once, 2 video submissions a minute) still completes a
batch, waiting out the service's 429s without paying twice, and says how long it waited.

A scaled clock makes "a minute" 2.4 s (time_scale 0.04 x the 60 s window).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.conftest import SAMPLE, Stack
from wan_tasks import I2VRequest, PollPolicy
from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.emulator.server import Emulator
from wan_tasks.flows.generate import generate_batch
from wan_tasks.flows.options import RunOptions

SCALE = 0.04
WINDOW_S = 60 * SCALE
FAST = RunOptions(
    poll=PollPolicy(first_poll_after=0.1, min_interval=0.1, max_interval=0.3, jitter=0.0)
)


def test_client_waits_out_a_submit_429_and_counts_it(
    make_emulator: Callable[..., Emulator], make_client: Callable[..., WaveSpeedClient]
) -> None:
    emu = make_emulator(tier="bronze", rate_window_s=3.0, latency_s=0.05)
    client = make_client(emu)
    payload = client.prepare(I2VRequest(image=str(SAMPLE), prompt="tiers: three submits"))
    assert client.rate_limited_wait_s == 0.0
    ids = [client.submit_payload(payload).id for _ in range(3)]
    stats = emu.stats()
    # The third was refused (429, nothing created), waited out and sent again: one task each.
    assert stats["rate_limited"] >= 1 and stats["submissions"] == 3 and len(set(ids)) == 3
    assert 0 < client.rate_limited_wait_s <= 3.0 * stats["rate_limited"]


def test_bronze_batch_of_ten_completes_without_duplicates(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    stack = make_stack(in_flight=2, tier="bronze", concurrency=2, time_scale=SCALE)
    manifest = tmp_path / "bronze.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"bronze-{i}", "image": str(SAMPLE), "prompt": f"bronze tier {i}"})
            + "\n"
            for i in range(10)
        )
    )
    report = generate_batch(str(manifest), options=FAST)
    assert report.archived == 10 and report.failed == 0, [o.error for o in report.outcomes]
    stats = stack.stats()
    assert stats["submissions"] == 10 and stats["completed"] == 10
    assert len({o.prediction_id for o in report.outcomes}) == 10
    assert stats["max_processing"] <= 2
    # 10 submissions at 2 a window: whenever the service refused some (how many depends on
    # how fast this machine runs the lanes: under load a lane can take a window per video),
    # the run says how long it slept on them (each sleep is at most one window: Retry-After
    # is the window's rest); when it refused none, no sleep is reported.
    if stats["rate_limited"]:
        assert 0 < report.rate_limit_wait_s <= WINDOW_S * stats["rate_limited"] + 0.01
    else:
        assert report.rate_limit_wait_s == 0

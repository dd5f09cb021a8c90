"""The offline demo: one video from the bundled image, through the real client and emulator."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from wan_tasks.client import WaveSpeedClient
from wan_tasks.emulator.render import VideoInfo, probe_mp4
from wan_tasks.emulator.server import run_emulator
from wan_tasks.models import I2VRequest
from wan_tasks.policies import PollPolicy

logger = logging.getLogger("wan_tasks.demo")


@dataclass(frozen=True)
class DemoResult:
    prediction_id: str
    seed: int
    cost_usd: str
    video: Path
    info: VideoInfo


def run_demo(out_dir: Path, *, image: Path, prompt: str) -> DemoResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    request = I2VRequest(image=str(image), prompt=prompt).with_concrete_seed()
    with run_emulator(latency_s=2.0) as emu, WaveSpeedClient(
        emu.api_key, emu.base_url, poll=PollPolicy(first_poll_after=2.0, min_interval=1.0)
    ) as client:
        submission = client.submit(request)
        prediction = client.wait(submission.prediction.id, poll_first=False, timeout=120)
        target = out_dir / f"{prediction.id}.mp4"
        with client.stream_output(prediction.outputs[0]) as response, target.open("wb") as fh:
            for chunk in response.iter_bytes():
                fh.write(chunk)
    info = probe_mp4(target.read_bytes())
    return DemoResult(prediction.id, request.seed, str(request.cost_usd), target.resolve(), info)

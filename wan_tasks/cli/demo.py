"""The main job, offline: one video from the bundled image, through Prefect, the emulator and
the embedded SeaweedFS, archived and verified; local copies of the MP4 and its contact sheet."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

from wan_tasks.api.models import I2VRequest
from wan_tasks.api.policies import PollPolicy
from wan_tasks.devstack.embedded import embedded_defaults
from wan_tasks.emulator.render import probe_mp4
from wan_tasks.flows.generate import generate_video
from wan_tasks.flows.options import RunOptions
from wan_tasks.integration.runtime import s3_client

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "sample.png"
DEMO_PROMPT = "slow aerial drift over a mountain lake at sunset, gentle ripples"


@dataclass(frozen=True)
class DemoResult:
    prediction_id: str
    seed: int
    cost_usd: str
    s3_uri: str
    sidecar_uri: str
    video: Path
    contact_sheet: Path | None
    info: str


def _download(uri: str, target: Path) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    data: bytes = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    target.write_bytes(data)
    return data


def run_demo(out_dir: Path) -> DemoResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    request = I2VRequest(image=str(SAMPLE_IMAGE), prompt=DEMO_PROMPT)
    # The emulator renders in ~4 s; poll soon after, then every 2 s.
    options = RunOptions(poll=PollPolicy(first_poll_after=4.0, min_interval=2.0))
    with embedded_defaults():
        outcome = asyncio.run(generate_video(request, options=options))
        assert outcome.s3_uri and outcome.sidecar_uri and outcome.prediction_id
        video = out_dir / f"{outcome.prediction_id}.mp4"
        data = _download(outcome.s3_uri, video)
        if hashlib.sha256(data).hexdigest() != outcome.sha256:
            raise RuntimeError(f"{outcome.s3_uri} does not match its recorded sha256")
        sheet = None
        if outcome.contact_sheet_uri:
            sheet = out_dir / f"{outcome.prediction_id}.sheet.jpg"
            _download(outcome.contact_sheet_uri, sheet)
    info = probe_mp4(data)
    return DemoResult(
        prediction_id=outcome.prediction_id,
        seed=outcome.seed or 0,
        cost_usd=str(outcome.cost_usd),
        s3_uri=outcome.s3_uri,
        sidecar_uri=outcome.sidecar_uri,
        video=video.resolve(),
        contact_sheet=sheet.resolve() if sheet else None,
        info=f"{info.width}x{info.height}, {info.frames} frames, {info.fps:g} fps, "
        f"{info.duration_s:.2f} s, {info.codec}, sha256 verified",
    )

"""Embedded defaults: what runs when nothing is configured, so that nothing costs money.

- No `WAVESPEED_API_KEY`: the local emulator serves the WaveSpeed API (in this process).
- No `WAN_TASKS_BUCKET`: an embedded SeaweedFS on 127.0.0.1 (credentials enforced, data under
  `$WAN_TASKS_HOME/seaweedfs`) is the object store, with bucket `wan-videos`.

Real services are used only when configured. The services started here live as long as the
`with` block and are stopped through their handles, also on errors and Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_tasks.api.config import ENV_API_KEY, ENV_BASE_URL
from wan_tasks.errors import ConfigurationError
from wan_tasks.integration.runtime import ENV_BUCKET

logger = logging.getLogger(__name__)

ENV_HOME = "WAN_TASKS_HOME"
ENV_NO_EMBEDDED = "WAN_TASKS_NO_EMBEDDED"
EMBEDDED_BUCKET = "wan-videos"
# The emulator's concurrent-task cap when it stands in for the service (the lowest real tiers
# allow 2-3 concurrent tasks).
EMULATOR_CONCURRENCY = 3
_lock = threading.RLock()
_depth = 0
_current: EmbeddedServices | None = None


@dataclass(frozen=True)
class EmbeddedServices:
    emulator_url: str | None
    s3_endpoint: str | None
    bucket: str

    @property
    def any(self) -> bool:
        return bool(self.emulator_url or self.s3_endpoint)


def wan_home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".wan-tasks").expanduser().resolve()


@contextmanager
def env_overrides(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) variables for the block; restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def embedded_defaults(
    *, emulator_settings: dict[str, Any] | None = None, home: Path | None = None,
    s3: bool = True, emulator: bool = True,
) -> Iterator[EmbeddedServices]:
    """Start the emulator and/or SeaweedFS where the environment configures nothing.
    `s3=False` / `emulator=False`: the caller names its own store (a bucket or an S3 block) or
    credentials (a block); start none.

    With WAN_TASKS_NO_EMBEDDED=1 (set it on production workers), a missing configuration is
    an error instead: a worker without its key or bucket must not quietly produce emulated
    videos in a throwaway store.

    Re-entrant within a process: a nested call (a flow inside a flow, the CLI around a flow)
    reuses what the outer call started.
    """
    global _depth, _current
    with _lock:
        _depth += 1
        outer = _depth == 1
    try:
        if not outer:
            yield _current or EmbeddedServices(None, None, os.environ.get(ENV_BUCKET, ""))
            return
        need_emulator = emulator and not os.environ.get(ENV_API_KEY)
        need_s3 = s3 and not os.environ.get(ENV_BUCKET)
        if (need_emulator or need_s3) and os.environ.get(ENV_NO_EMBEDDED, "") not in ("", "0"):
            missing = [n for n, need in ((ENV_API_KEY, need_emulator), (ENV_BUCKET, need_s3))
                       if need]
            raise ConfigurationError(
                f"{' and '.join(missing)} not set, and {ENV_NO_EMBEDDED} forbids the local "
                "emulator and embedded store: configure this worker's environment"
            )
        with ExitStack() as stack:
            env: dict[str, str | None] = {}
            emulator_url = s3_url = None
            if need_emulator:
                from wan_tasks.emulator.server import run_emulator

                settings = {"concurrency": EMULATOR_CONCURRENCY, **(emulator_settings or {})}
                emu = stack.enter_context(run_emulator(**settings))
                env.update({ENV_API_KEY: emu.api_key, ENV_BASE_URL: emu.base_url})
                emulator_url = emu.base_url
                logger.info("no WAVESPEED_API_KEY: using the local emulator at %s (free)",
                            emu.base_url)
            if need_s3:
                from wan_tasks.storage.seaweed import SeaweedFS

                data = (home or wan_home()) / "seaweedfs"
                weed = stack.enter_context(SeaweedFS(data, buckets=[EMBEDDED_BUCKET]))
                env.update(weed.endpoint.env())
                env[ENV_BUCKET] = EMBEDDED_BUCKET
                # Settings that would point boto3 elsewhere must not leak in.
                env.update(dict.fromkeys(("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")))
                s3_url = weed.endpoint.endpoint_url
                logger.info("no WAN_TASKS_BUCKET: archiving to embedded SeaweedFS at %s (%s)",
                            s3_url, data)
            stack.enter_context(env_overrides(env))
            _current = EmbeddedServices(emulator_url, s3_url, os.environ.get(ENV_BUCKET, ""))
            yield _current
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _current = None

"""Embedded defaults: what runs when nothing is configured, so that nothing costs money.

- No `WAVESPEED_API_KEY`: the local emulator serves the WaveSpeed API (in this process).
- No `WAN_TASKS_BUCKET`: an embedded SeaweedFS on 127.0.0.1 (credentials enforced, data under
  `$WAN_TASKS_HOME/seaweedfs`) is the object store, with bucket `wan-videos`.

Real services are used only when configured. What is started is passed to the rest of the
package as a settings override (`wan_tasks.settings.override`), not through `os.environ`, so
other libraries and child processes never see the emulator's key or the store's credentials.
The services live as long as the `with` block and are stopped through their handles, also on
errors and Ctrl-C.
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

from wan_tasks import settings
from wan_tasks.errors import ConfigurationError
from wan_tasks.settings import ENV_API_KEY, ENV_BUCKET, ENV_NO_EMBEDDED, S3Connection

logger = logging.getLogger(__name__)

EMBEDDED_BUCKET = "wan-videos"
EMBEDDED_EMULATOR_KEY = "wan-tasks-embedded-emulator"
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
    return settings.current().home_dir


@contextmanager
def env_overrides(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block; restore them after.
    For scripts that configure child processes (benchmarks); the package itself passes
    settings with `wan_tasks.settings.override`."""
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
    *,
    emulator_settings: dict[str, Any] | None = None,
    home: Path | None = None,
    s3: bool = True,
    emulator: bool = True,
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
            yield _current or EmbeddedServices(None, None, settings.current().bucket or "")
            return
        config = settings.current()
        need_emulator = emulator and config.api_key is None
        need_s3 = s3 and not config.bucket
        if (need_emulator or need_s3) and config.no_embedded:
            missing = [
                n for n, need in ((ENV_API_KEY, need_emulator), (ENV_BUCKET, need_s3)) if need
            ]
            raise ConfigurationError(
                f"{' and '.join(missing)} not set, and {ENV_NO_EMBEDDED} forbids the local "
                "emulator and embedded store: configure this worker's environment"
            )
        with ExitStack() as stack:
            values: dict[str, Any] = {}
            emulator_url = s3_url = None
            if need_emulator:
                from wan_tasks.emulator.server import run_emulator

                options = {"concurrency": EMULATOR_CONCURRENCY, **(emulator_settings or {})}
                # A fixed key: the embedded emulator is one (free) account across runs, so a
                # re-run finds what an earlier one made (its store persists under the home).
                emu = stack.enter_context(run_emulator(EMBEDDED_EMULATOR_KEY, **options))
                values.update(api_key=emu.api_key, base_url=emu.base_url)
                emulator_url = emu.base_url
                logger.info(
                    "no WAVESPEED_API_KEY: using the local emulator at %s (free)", emu.base_url
                )
            if need_s3:
                from wan_tasks.storage.seaweed import SeaweedFS

                data = (home or config.home_dir) / "seaweedfs"
                weed = stack.enter_context(SeaweedFS(data, buckets=[EMBEDDED_BUCKET]))
                end = weed.endpoint
                values.update(
                    bucket=EMBEDDED_BUCKET,
                    s3_endpoint_url=end.endpoint_url,
                    s3=S3Connection(
                        endpoint_url=end.endpoint_url,
                        access_key_id=end.access_key_id,
                        secret_access_key=end.secret_access_key,
                        region=end.region,
                    ),
                )
                s3_url = end.endpoint_url
                logger.info(
                    "no WAN_TASKS_BUCKET: archiving to embedded SeaweedFS at %s (%s)", s3_url, data
                )
            now = stack.enter_context(settings.override(**values))
            _current = EmbeddedServices(emulator_url, s3_url, now.bucket or "")
            yield _current
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _current = None


def embedded_service_id() -> str:
    """The service identity runs on the embedded emulator get (see `service_fingerprint`)."""
    from pydantic import SecretStr

    from wan_tasks.api.config import service_fingerprint

    return service_fingerprint("http://127.0.0.1", SecretStr(EMBEDDED_EMULATOR_KEY))

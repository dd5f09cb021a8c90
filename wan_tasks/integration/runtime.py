"""Per-process clients for tasks: one WaveSpeed connection pool and one S3 client per config.

Tasks receive a credentials block *name* (never a key), so nothing secret lands in Prefect's
parameters or results; the client is built here, in the process that runs the task.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wan_tasks import settings
from wan_tasks.api.client import AsyncWaveSpeedClient, WaveSpeedClient
from wan_tasks.api.policies import PollPolicy
from wan_tasks.core.ledger import S3Ledger
from wan_tasks.errors import ConfigurationError
from wan_tasks.storage.place import S3Place

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_lock = threading.Lock()
_wavespeed: dict[tuple[str, ...], WaveSpeedClient] = {}
_s3: dict[tuple[str, ...], Any] = {}
# Async clients per event loop (an httpx async pool belongs to its loop), per sync client.
_async: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[int, tuple[WaveSpeedClient, AsyncWaveSpeedClient]]
] = weakref.WeakKeyDictionary()


def _fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


# Saved blocks are read again after this long: a batch asks for its blocks several times per
# video (submit, wait, archive), each a Prefect API read; a block re-saved with new
# credentials is honoured within this time.
BLOCK_REFRESH_S = 30.0
_blocks: dict[str, tuple[float, Any]] = {}


def _load_block(slug: str, load: Callable[[], Any]) -> Any:
    """`load()`, or what it returned for `slug` in the last BLOCK_REFRESH_S."""
    now = time.monotonic()
    with _lock:
        known = _blocks.get(slug)
    if known is not None and now - known[0] < BLOCK_REFRESH_S:
        return known[1]
    block = load()
    with _lock:
        _blocks[slug] = (now, block)
    return block


def wavespeed_client(credentials_block: str | None = None) -> WaveSpeedClient:
    """The shared client for a saved `WaveSpeedCredentials` block, or for the environment
    (WAVESPEED_API_KEY / WAVESPEED_BASE_URL)."""
    if credentials_block:
        from wan_tasks.integration.blocks import WaveSpeedCredentials

        # _sync: also called from async flows' worker threads (see s3_bucket_block).
        creds: WaveSpeedCredentials = _load_block(
            f"wavespeed-credentials/{credentials_block}",
            lambda: WaveSpeedCredentials.load(credentials_block, _sync=True),  # type: ignore[call-arg]
        )
        api_key, base_url = creds.api_key.get_secret_value(), creds.base_url
    else:
        config = settings.current()
        api_key = config.api_key.get_secret_value() if config.api_key else ""
        base_url = config.base_url or ""
    ident = (credentials_block or "", base_url, _fingerprint(api_key))
    with _lock:
        client = _wavespeed.get(ident)
        if client is None:
            client = WaveSpeedClient(api_key or None, base_url or None, poll=PollPolicy())
            _wavespeed[ident] = client
        return client


async def async_wavespeed_client(credentials_block: str | None = None) -> AsyncWaveSpeedClient:
    """The running loop's async twin of `wavespeed_client` (same account, settings and
    operations); a saved block is loaded off the loop. `close_async_clients` ends them."""
    if credentials_block:
        client = await asyncio.to_thread(wavespeed_client, credentials_block)
    else:
        client = wavespeed_client()
    loop = asyncio.get_running_loop()
    with _lock:
        clients = _async.setdefault(loop, {})
        entry = clients.get(id(client))
        if entry is None or entry[0] is not client:
            entry = (client, AsyncWaveSpeedClient.sharing(client))
            clients[id(client)] = entry
        return entry[1]


async def close_async_clients() -> None:
    """Close the running loop's async clients (their pools die with the loop anyway)."""
    with _lock:
        clients = _async.pop(asyncio.get_running_loop(), {})
    for _, client in clients.values():
        await client.aclose()


def s3_bucket_block(name: str) -> tuple[str, S3Client]:
    """(bucket name, S3 client) of a saved prefect-aws `S3Bucket` block (a bare name) or of
    any block by slug ("type-slug/name") that has `bucket_name` and `credentials` with
    `get_s3_client()`, as prefect-aws's S3Bucket with AwsCredentials or MinIOCredentials has.

    The client is shared per block and per credentials, so a block re-saved with new
    credentials is honoured by the next task."""
    from prefect.blocks.core import Block

    slug = name if "/" in name else f"s3-bucket/{name}"
    try:
        # _sync: also called from async flows' worker threads, where Prefect would otherwise
        # return a coroutine.
        block: Any = _load_block(slug, lambda: Block.load(slug, _sync=True))  # type: ignore[call-arg]
    except (KeyError, ValueError) as exc:
        raise ConfigurationError(
            f"s3_block {name!r}: cannot load {slug!r} ({exc}). Is prefect-aws installed "
            "where this runs, and the block saved?"
        ) from exc
    credentials: Any = getattr(block, "credentials", None)
    bucket = getattr(block, "bucket_name", None)
    if not bucket or not callable(getattr(credentials, "get_s3_client", None)):
        raise ConfigurationError(
            f"s3_block {name!r}: {type(block).__name__} is not an S3 bucket block (it needs "
            "bucket_name and credentials.get_s3_client(), as prefect-aws's S3Bucket has)"
        )
    ident = ("block", slug, _fingerprint(_credentials_json(credentials)))
    with _lock:
        client = _s3.get(ident)
        if client is None:
            client = credentials.get_s3_client()
            _s3[ident] = client
    return str(bucket), client


def _credentials_json(credentials: Any) -> str:
    # Secrets included: only a fingerprint of this is kept, to tell credentials apart.
    dumped = credentials.model_dump(mode="json", context={"include_secrets": True})
    return json.dumps(dumped, sort_keys=True, default=str)


def s3_client(block: str | None = None) -> S3Client:
    """The shared boto3 S3 client: from a prefect-aws S3Bucket block when one is named,
    else from the standard AWS configuration."""
    from wan_tasks.storage.archive import make_s3_client

    if block:
        return s3_bucket_block(block)[1]

    # boto3 resolves its own chain from the environment: the client is per distinct setting.
    config = settings.current()
    names = (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
    )
    ident = (
        *(os.environ.get(n, "") for n in names),
        _fingerprint(os.environ.get("AWS_SECRET_ACCESS_KEY", "")),
        config.s3.model_dump_json() if config.s3 else "",
        _fingerprint(config.s3.secret_access_key.get_secret_value()) if config.s3 else "",
    )
    with _lock:
        client = _s3.get(ident)
        if client is None:
            client = make_s3_client(config)
            _s3[ident] = client
        result: S3Client = client
        return result


def default_bucket() -> str | None:
    return settings.current().bucket


def open_ledger(place: S3Place) -> S3Ledger:
    """The submission ledger at `place`, through the place's block or the standard chain."""
    return S3Ledger(s3_client(place.s3_block), place)

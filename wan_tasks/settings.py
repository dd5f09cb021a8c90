"""Every environment variable wan-tasks reads, in one settings model.

`current()` is what the package uses: the environment, read when asked (so a worker picks up
its configuration without re-importing anything), with the overrides of any active
`override()` block on top. The embedded defaults (`wan_tasks.devstack.embedded`) pass the
emulator's URL and key and the embedded store's endpoint this way, instead of writing them into
`os.environ` where every other library in the process (and every child process) would see them.
Overrides are process-wide, not per thread: the flows run their videos in worker threads.

S3 access is boto3's own standard chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_REGION, ...),
read by boto3 itself; only the endpoint is read here too (path-style addressing for local
stores), and `s3` carries an explicit connection only when one was set by an override.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_API_KEY = "WAVESPEED_API_KEY"
ENV_BASE_URL = "WAVESPEED_BASE_URL"
ENV_BUCKET = "WAN_TASKS_BUCKET"
ENV_HOME = "WAN_TASKS_HOME"
ENV_NO_EMBEDDED = "WAN_TASKS_NO_EMBEDDED"
ENV_EMULATOR_KEY = "WAVESPEED_EMULATOR_KEY"
ENV_LOCK_MANAGER = "WAN_TASKS_LOCK_MANAGER"
ENV_REDIS_URL = "WAN_TASKS_REDIS_URL"
DEFAULT_BASE_URL = "https://api.wavespeed.ai"
DEFAULT_RECONCILE_SETTLE_S = (1.0, 3.0, 10.0)


class S3Connection(BaseModel):
    """An explicit S3 connection (the embedded store); None in `Settings.s3` means boto3's
    standard configuration."""

    model_config = ConfigDict(frozen=True)

    endpoint_url: str
    access_key_id: str
    secret_access_key: SecretStr
    region: str = "us-east-1"


class Settings(BaseSettings):
    """What the environment configures. Field names are the package's; aliases are the
    variables."""

    model_config = SettingsConfigDict(
        extra="ignore", frozen=True, populate_by_name=True, env_ignore_empty=True
    )

    api_key: SecretStr | None = Field(
        None, validation_alias=ENV_API_KEY, description="WaveSpeed API key; none: the emulator"
    )
    base_url: str | None = Field(
        None, validation_alias=ENV_BASE_URL, description=f"API base URL ({DEFAULT_BASE_URL})"
    )
    bucket: str | None = Field(
        None, validation_alias=ENV_BUCKET, description="archive bucket; none: the embedded store"
    )
    home: Path = Field(
        Path("~/.wan-tasks"),
        validation_alias=ENV_HOME,
        description="where embedded services keep their data",
    )
    no_embedded: bool = Field(
        False,
        validation_alias=ENV_NO_EMBEDDED,
        description="refuse the emulator and embedded store (set it on production workers)",
    )
    emulator_key: SecretStr | None = Field(
        None, validation_alias=ENV_EMULATOR_KEY, description="the key a local emulator accepts"
    )
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        description="S3 endpoint (boto3's own setting, read here for path-style addressing)",
    )
    s3: S3Connection | None = Field(None, description="an explicit connection (overrides only)")
    lock_manager: Literal["file", "redis"] = Field(
        "file",
        validation_alias=ENV_LOCK_MANAGER,
        description="what serialises identical submits: file (one host) or redis (many hosts)",
    )
    # The whole URL is secret: it may carry a password (redis://:PASSWORD@host:6379/0) and
    # pydantic would quote a plain str field, value included, in reprs and validation errors.
    # It is checked where it is used (wan_tasks.integration.locking), never echoed.
    redis_url: SecretStr | None = Field(
        None,
        validation_alias=ENV_REDIS_URL,
        description="the Redis for WAN_TASKS_LOCK_MANAGER=redis (redis://, rediss://, "
        "redis+sentinel://)",
    )

    # Longer than a submit takes from its claim to the recorded id (the POST with its own
    # retries, then the history's settle time): a live owner is never overtaken. It is how
    # long another machine waits on the claim of a machine that died mid-submit (a dead
    # process on the same machine is seen at once).
    claim_lease_s: float = Field(
        300.0,
        ge=5.0,
        le=86_400.0,
        validation_alias="WAN_TASKS_CLAIM_LEASE_S",
        description="seconds a ledger claim is its owner's before another machine may take "
        "it over (after searching the history)",
    )

    # How long a lost submit answer waits, round by round, for the service's history to show
    # the task before it is declared never created (the history may lag behind submits).
    reconcile_settle_s: tuple[float, ...] = Field(
        DEFAULT_RECONCILE_SETTLE_S,
        min_length=1,
        validation_alias="WAN_TASKS_RECONCILE_SETTLE_S",
        description="seconds to wait before each history search for a lost submit answer "
        "(a JSON list)",
    )

    @field_validator("reconcile_settle_s")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 or v > 600 for v in value):
            raise ValueError("each settle time is between 0 and 600 seconds")
        return value

    @field_validator("lock_manager", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()


def _env_names() -> frozenset[str]:
    names: set[str] = set()
    for info in Settings.model_fields.values():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        names.update(c.upper() for c in choices if isinstance(c, str))
    return frozenset(names)


_ENV_NAMES = _env_names()
_lock = threading.Lock()
_overrides: list[dict[str, Any]] = []
_generation = 0  # bumped whenever the overrides change
_cached: tuple[object, Settings] | None = None


def current() -> Settings:
    """The settings in force now: the environment, then active overrides, innermost last.

    Read again whenever a variable it reads (or an override) changed, and otherwise answered
    from the last read: building the model from the environment cost ~4% of a batch's CPU
    (it is asked for several times per video)."""
    global _cached
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.upper() in _ENV_NAMES))
    with _lock:
        key = (_generation, env)
        if _cached is not None and _cached[0] == key:
            return _cached[1]
        layers = [dict(layer) for layer in _overrides]
    settings = Settings()
    for layer in layers:
        settings = settings.model_copy(update=layer)
    with _lock:
        _cached = (key, settings)
    return settings


@contextmanager
def override(**values: Any) -> Iterator[Settings]:
    """Settings for the duration of the block (by field name), for the whole process."""
    unknown = set(values) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    layer = {
        k: SecretStr(v) if isinstance(v, str) and k in _SECRET_FIELDS else v
        for k, v in values.items()
    }
    global _generation
    with _lock:
        _overrides.append(layer)
        _generation += 1
    try:
        yield current()
    finally:
        with _lock:
            _overrides.remove(layer)
            _generation += 1


_SECRET_FIELDS = frozenset({"api_key", "emulator_key", "redis_url"})

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_BUCKET",
    "ENV_EMULATOR_KEY",
    "ENV_HOME",
    "ENV_LOCK_MANAGER",
    "ENV_NO_EMBEDDED",
    "ENV_REDIS_URL",
    "S3Connection",
    "Settings",
    "current",
    "override",
]

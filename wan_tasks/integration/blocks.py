"""WaveSpeed credentials as a Prefect Block, the way prefect-aws and prefect-dbt keep theirs."""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from wan_tasks.api.client import AsyncWaveSpeedClient, WaveSpeedClient
from wan_tasks.api.config import DEFAULT_BASE_URL


class WaveSpeedCredentials(Block):
    """An API key (stored encrypted by Prefect, shown as ********) and the API's base URL.

    Point `base_url` at a local emulator for free dry runs.
    """

    _block_type_name: ClassVar[str] = "WaveSpeed Credentials"
    _block_type_slug: ClassVar[str] = "wavespeed-credentials"
    _description: ClassVar[str] = "API key and base URL for the WaveSpeedAI API."

    api_key: SecretStr = Field(description="WaveSpeed API key.")
    base_url: str = Field(default=DEFAULT_BASE_URL, description="API base URL.")

    def get_client(self, **kwargs: Any) -> WaveSpeedClient:
        return WaveSpeedClient(self.api_key, self.base_url, **kwargs)

    def get_async_client(self, **kwargs: Any) -> AsyncWaveSpeedClient:
        return AsyncWaveSpeedClient(self.api_key, self.base_url, **kwargs)

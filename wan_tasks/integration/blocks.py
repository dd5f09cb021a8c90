"""The package's Prefect blocks: WaveSpeed credentials, kept the way prefect-aws keeps AWS's.

This module is the `prefect.collections` entry point (pyproject.toml): importing it registers
every block of the package with Prefect, so a self-hosted server started beside wan-tasks lists
them and `Block.load("wavespeed-credentials/...")` finds the class. `prefect block register -m
wan_tasks.integration.blocks` (or `-m wan_tasks`) registers them with any server.
"""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, HttpUrl, SecretStr

from wan_tasks.api.client import AsyncWaveSpeedClient, WaveSpeedClient
from wan_tasks.api.config import DEFAULT_BASE_URL

# WaveSpeedAI's own logo and docs; Prefect's UI shows them on the block's card.
LOGO_URL = "https://wavespeed.ai/logo.webp"
DOCUMENTATION_URL = "https://wavespeed.ai/docs"


class WaveSpeedCredentials(CredentialsBlock):
    """An API key (stored encrypted by Prefect, shown as ********) and the API's base URL.

    Point `base_url` at a local emulator for free dry runs.
    """

    _block_type_name: ClassVar[str] = "WaveSpeed Credentials"
    _block_type_slug: ClassVar[str] = "wavespeed-credentials"
    _description: ClassVar[str] = "API key and base URL for the WaveSpeedAI API."
    _logo_url: ClassVar[HttpUrl | None] = HttpUrl(LOGO_URL)
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCUMENTATION_URL)
    _code_example: ClassVar[str] = """```python
from wan_tasks import WaveSpeedCredentials

creds = WaveSpeedCredentials.load("BLOCK_NAME")
with creds.get_client() as client:
    print(client.balance())
```
Flows take the block's name, never the key: `RunOptions(credentials_block="BLOCK_NAME")`."""

    api_key: SecretStr = Field(description="WaveSpeed API key.")
    base_url: str = Field(default=DEFAULT_BASE_URL, description="API base URL.")

    def get_client(self, *args: Any, **kwargs: Any) -> WaveSpeedClient:
        """A synchronous client; keyword arguments go to `WaveSpeedClient` (poll, retry,
        timeouts)."""
        return WaveSpeedClient(self.api_key, self.base_url, *args, **kwargs)

    def get_async_client(self, *args: Any, **kwargs: Any) -> AsyncWaveSpeedClient:
        """An asyncio client, with the same arguments as `get_client`."""
        return AsyncWaveSpeedClient(self.api_key, self.base_url, *args, **kwargs)


# Every block of the package: the entry point, `prefect block register` and the tests use this.
BLOCKS: tuple[type[CredentialsBlock], ...] = (WaveSpeedCredentials,)

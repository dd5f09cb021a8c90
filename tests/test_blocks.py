"""The package's Prefect blocks: Prefect's own block test suite, both ways of registering them
with a real server (the `prefect.collections` entry point and `prefect block register -m`), and
the README's block snippet."""

from __future__ import annotations

import importlib
import re
import subprocess
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from wan_tasks.integration.blocks import BLOCKS, WaveSpeedCredentials

README = Path(__file__).resolve().parents[1] / "README.md"


def package_blocks() -> list[type[Block]]:
    """Every concrete Block class the package defines (its modules that import Prefect)."""
    import pkgutil

    import wan_tasks

    found: set[type[Block]] = set()
    for info in pkgutil.walk_packages(wan_tasks.__path__, "wan_tasks."):
        if not info.name.startswith(("wan_tasks.integration", "wan_tasks.flows")):
            continue
        module = importlib.import_module(info.name)
        found |= {
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, Block)
            and obj.__module__ == info.name
            and not getattr(obj, "__abstractmethods__", None)
        }
    return sorted(found, key=lambda b: b.__name__)


def test_blocks_lists_every_block_of_the_package() -> None:
    assert set(package_blocks()) == set(BLOCKS)
    assert WaveSpeedCredentials in BLOCKS


class TestStandardSuite(BlockStandardTestSuite):
    """Prefect's own checks (description, docs URL, field descriptions, code example) on
    every block."""

    @pytest.fixture(params=BLOCKS, ids=lambda b: b.__name__)
    def block(self, request: pytest.FixtureRequest) -> type[Block]:
        cls: type[Block] = request.param
        return cls

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        # Prefect's version downloads the logo; tests have no network. The UI needs an https
        # URL of an image.
        logo = str(block._logo_url or "")
        assert re.fullmatch(r"https://[^/\s]+/\S+\.(png|svg|webp|jpg)", logo), logo


def test_credentials_block_gives_clients_without_exposing_the_key() -> None:
    from prefect.blocks.abstract import CredentialsBlock

    creds = WaveSpeedCredentials(api_key="secret-abcdef-123456", base_url="http://127.0.0.1:9")
    assert isinstance(creds, CredentialsBlock)
    with creds.get_client() as client:
        assert "secret-abcdef" not in repr(client)
    assert "secret-abcdef" not in repr(creds)
    assert type(creds.get_async_client()).__name__ == "AsyncWaveSpeedClient"


def test_entry_point_module_loads_every_block() -> None:
    (ep,) = [e for e in entry_points(group="prefect.collections") if e.name == "wan_tasks"]
    module = ep.load()
    assert set(getattr(module, "BLOCKS", ())) == set(BLOCKS)
    # What Prefect does with it: Block.load of a slug it has not imported finds the class.
    from prefect._internal.plugins.collections import load_prefect_collections

    assert "wan_tasks" in load_prefect_collections()
    assert Block.get_block_class_from_key("wavespeed-credentials") is WaveSpeedCredentials


# -- registration against a real server ---------------------------------------------------


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fresh `prefect server start` in this environment (its startup auto-registers the
    collections installed beside it), so nothing a test saved can have created the types."""
    from wan_tasks.devstack.prefect_server import PrefectServer

    with PrefectServer(tmp_path_factory.mktemp("blocks-server")) as server:
        yield server


def _call(method: str, url: str, **kw: Any) -> httpx.Response:
    """A raw call to the Prefect server, retried on 503 as Prefect's own client does (SQLite
    answers "database busy" under load)."""
    for attempt in range(8):
        answer = httpx.request(method, url, timeout=30, **kw)
        if answer.status_code != 503:
            break
        time.sleep(0.5 * (attempt + 1))
    return answer


def block_type(api: str, slug: str) -> dict[str, Any] | None:
    answer = _call("GET", f"{api}/block_types/slug/{slug}")
    if answer.status_code == 404:
        return None
    answer.raise_for_status()
    found: dict[str, Any] = answer.json()
    return found


def delete_block_type(api: str, slug: str) -> None:
    found = block_type(api, slug)
    assert found is not None
    _call("DELETE", f"{api}/block_types/{found['id']}").raise_for_status()
    assert block_type(api, slug) is None


def test_server_started_beside_wan_tasks_lists_the_blocks(own_server: Any) -> None:
    for cls in BLOCKS:
        found = block_type(own_server.api_url, cls.get_block_type_slug())
        assert found is not None, f"{cls.__name__} not auto-registered"
        assert found["name"] == cls.get_block_type_name()
        assert found["logo_url"] == str(cls._logo_url)
        assert found["documentation_url"] == str(cls._documentation_url)


@pytest.mark.parametrize("module", ["wan_tasks", "wan_tasks.integration.blocks"])
def test_prefect_block_register_cli(own_server: Any, tmp_path: Path, module: str) -> None:
    from wan_tasks.devstack.prefect_server import clean_env, executable

    api = own_server.api_url
    for cls in BLOCKS:
        delete_block_type(api, cls.get_block_type_slug())
    env = {**clean_env(), **own_server.client_env(home=tmp_path)}
    done = subprocess.run(
        [executable("prefect"), "block", "register", "-m", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for cls in BLOCKS:
        found = block_type(api, cls.get_block_type_slug())
        assert found is not None, f"{cls.__name__} not registered by -m {module}"
        schemas = _call(
            "POST",
            f"{api}/block_schemas/filter",
            json={"block_schemas": {"block_type_id": {"any_": [found["id"]]}}},
        ).json()
        assert schemas and "api_key" in schemas[0]["fields"]["properties"]


# -- the README's snippet -----------------------------------------------------------------


def readme_block_snippet() -> str:
    text = README.read_text()
    section = text[text.index("save the key once as a block") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python snippet after 'save the key once as a block'"
    return match.group(1)


def test_readme_block_snippet_runs_twice(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = readme_block_snippet()
    assert "overwrite=True" in code
    for key in ("first-key-0123456789", "second-key-0123456789"):
        monkeypatch.setenv("WAVESPEED_API_KEY", key)
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102
        loaded: Any = WaveSpeedCredentials.load("wavespeed")
        assert loaded.api_key.get_secret_value() == key

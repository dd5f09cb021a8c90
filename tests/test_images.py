"""Real-world images of every supported type pass and render; corrupt and hostile ones are
refused locally, before an upload, because the service would bill and then fail them."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from reliability.bad_input import VALID_IMAGES, png_claiming, write_valid_image
from tests.conftest import SAMPLE
from wan_tasks import I2VRequest, WaveSpeedClient
from wan_tasks.api.media import MAX_PIXELS, inspect_image
from wan_tasks.core.manifest import parse_manifest
from wan_tasks.emulator import Emulator
from wan_tasks.errors import MediaAccessError


def test_every_real_world_image_type_is_accepted_and_rendered(
    client: WaveSpeedClient, emulator: Emulator, tmp_path: Path
) -> None:
    submitted = {}
    for name in VALID_IMAGES:
        request = I2VRequest(image=str(write_valid_image(name, tmp_path)), prompt="p", seed=7)
        submitted[name] = client.submit(request).prediction.id
    results = {name: client.wait(pid) for name, pid in submitted.items()}
    failed = {name: (p.status, p.code) for name, p in results.items() if not p.status.is_success}
    assert not failed, f"the service refused images we accepted: {failed}"
    assert emulator.stats()["completed"] == len(VALID_IMAGES)


def test_phone_mpo_uploads_as_jpeg(tmp_path: Path) -> None:
    info = inspect_image(write_valid_image("phone JPEG with MPF segment (MPO)", tmp_path))
    assert (info.format, info.content_type) == ("MPO", "image/jpeg")


def _corrupt(tmp_path: Path) -> dict[str, bytes]:
    png = SAMPLE.read_bytes()
    jpeg = write_valid_image("phone JPEG, EXIF orientation 6", tmp_path).read_bytes()
    return {"truncated.png": png[: len(png) * 2 // 3], "truncated.jpg": jpeg[: len(jpeg) * 4 // 5]}


def test_corrupt_images_that_the_service_fails_are_refused_before_upload(
    client: WaveSpeedClient, emulator: Emulator, tmp_path: Path
) -> None:
    for name, data in _corrupt(tmp_path).items():
        # Sent as they are, the service takes the money and fails the task with 1402 ...
        upload = client._run(client.ops.upload(data, name, "image/png"))
        prediction = client.submit_payload({"image": upload.download_url, "prompt": "p"})
        with pytest.raises(MediaAccessError) as failed:
            client.wait(prediction.id)
        assert failed.value.task_code == 1402, name
        # ... so the request model refuses them locally, naming the field and the rule.
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValidationError) as caught:
            I2VRequest(image=str(path), prompt="p")
        assert caught.value.errors()[0]["loc"] == ("image",)
        assert "cannot be decoded" in str(caught.value), name
    uploads = emulator.stats()["uploads"]
    assert uploads == 2  # only the deliberate raw uploads above


@pytest.mark.parametrize(("width", "height"), [(30000, 30000), (8000, 8000), (8192, 6500)])
def test_header_claiming_too_many_pixels_is_refused_unread(
    width: int, height: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(width, height))
    assert width * height > MAX_PIXELS
    with pytest.raises(ValueError, match=r"pixels|each side"):
        inspect_image(path)
    # Our own bound holds even when the process turned Pillow's off.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path.write_bytes(png_claiming(width, height) + b"\0")  # a new file version (uncached)
    with pytest.raises(ValueError, match=r"pixels|each side"):
        inspect_image(path)


def test_bomb_and_corrupt_images_cost_only_their_rows(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_claiming(30000, 30000))
    for name, data in _corrupt(tmp_path).items():
        (tmp_path / name).write_bytes(data)
    rows = [
        '{"image": "bomb.png", "prompt": "p"}',
        '{"image": "truncated.png", "prompt": "p"}',
        '{"image": "truncated.jpg", "prompt": "p"}',
        f'{{"image": "{SAMPLE}", "prompt": "fine"}}',
    ]
    items = parse_manifest("\n".join(rows).encode(), name="m.jsonl", base_dir=tmp_path)
    assert [i.ok for i in items] == [False, False, False, True]
    assert items[0].error and items[0].error.startswith("row 1: image:")
    assert "pixels" in items[0].error
    assert all("cannot be decoded" in (i.error or "") for i in items[1:3])


def test_same_image_on_many_rows_is_decoded_once(tmp_path: Path) -> None:
    from wan_tasks.api import media

    path = write_valid_image("TIFF (LZW)", tmp_path)
    media._decode_check.cache_clear()
    rows = "\n".join(f'{{"image": "{path}", "prompt": "p{i}"}}' for i in range(50))
    items = parse_manifest(rows.encode(), name="m.jsonl")
    assert all(i.ok for i in items)
    assert media._decode_check.cache_info().misses == 1

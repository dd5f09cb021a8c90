"""Every rule of the request model fails with an error that names the field and the rule."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.conftest import SAMPLE
from wan_tasks.api.models import MAX_SEED, I2VRequest, Prediction, PredictionStatus

URL = "https://example.com/a.png"
LORA = {"path": "https://example.com/l.safetensors", "scale": 1.0}


def base(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"image": URL, "prompt": "a cat"}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not ...}


# (case, fields, the field the error must name, words the message must contain)
BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("image missing", base(image=...), "image", "Field required"),
    ("prompt missing", base(prompt=...), "prompt", "Field required"),
    ("prompt blank", base(prompt="   "), "prompt", "blank"),
    ("prompt not a string", base(prompt=5), "prompt", "valid string"),
    ("image not a string", base(image=["x"]), "image", "valid string"),
    ("image ftp scheme", base(image="ftp://h/a.png"), "image", "http(s) URL or a local file"),
    ("image URL without host", base(image="https:///a.png"), "image", "no host"),
    ("image local file missing", base(image="/nonexistent/a.png"), "image", "does not exist"),
    (
        "last_image bad scheme",
        base(last_image="data:image/png;base64,AAAA"),
        "last_image",
        "http(s) URL",
    ),
    ("negative_prompt not a string", base(negative_prompt=3), "negative_prompt", "valid string"),
    ("duration 6", base(duration=6), "duration", "5 or 8"),
    ("duration as string", base(duration="5"), "duration", "5 or 8"),
    ("seed below -1", base(seed=-2), "seed", "greater than or equal to -1"),
    ("seed above max", base(seed=MAX_SEED + 1), "seed", "less than or equal to 2147483647"),
    ("seed float", base(seed=1.5), "seed", "valid integer"),
    ("seed bool", base(seed=True), "seed", "valid integer"),
    ("four loras", base(loras=[LORA] * 4), "loras", "at most 3"),
    ("four high-noise loras", base(high_noise_loras=[LORA] * 4), "high_noise_loras", "at most 3"),
    ("four low-noise loras", base(low_noise_loras=[LORA] * 4), "low_noise_loras", "at most 3"),
    (
        "lora scale above 4",
        base(loras=[{"path": "p", "scale": 4.01}]),
        "loras.0.scale",
        "less than or equal to 4",
    ),
    (
        "lora scale below 0",
        base(loras=[{"path": "p", "scale": -0.1}]),
        "loras.0.scale",
        "greater than or equal to 0",
    ),
    (
        "lora scale NaN",
        base(loras=[{"path": "p", "scale": float("nan")}]),
        "loras.0.scale",
        "finite",
    ),
    ("lora path missing", base(loras=[{"scale": 1.0}]), "loras.0.path", "Field required"),
    ("lora path blank", base(loras=[{"path": " ", "scale": 1.0}]), "loras.0.path", "blank"),
    (
        "lora unknown field",
        base(loras=[{"path": "p", "scale": 1, "weight": 2}]),
        "loras.0.weight",
        "Extra inputs",
    ),
    ("unknown field (typo)", base(negative_promt="blurry"), "negative_promt", "Extra inputs"),
]


@pytest.mark.parametrize(("case", "fields", "loc", "words"), BAD, ids=[b[0] for b in BAD])
def test_each_rule_rejects_with_field_and_rule(
    case: str, fields: dict[str, Any], loc: str, words: str
) -> None:
    with pytest.raises(ValidationError) as info:
        I2VRequest.model_validate(fields)
    errors = info.value.errors()
    locs = [".".join(str(p) for p in e["loc"]) for e in errors]
    assert loc in locs, f"{case}: error names {locs}, not {loc}"
    msg = next(e["msg"] for e in errors if ".".join(str(p) for p in e["loc"]) == loc)
    assert words.lower() in msg.lower(), f"{case}: {msg!r} does not say {words!r}"


def test_local_file_that_is_not_an_image(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ValidationError, match=r"image\n.*not an image of a supported type"):
        I2VRequest(image=str(fake), prompt="x")


def test_local_file_of_unsupported_type(tmp_path: Path) -> None:
    from PIL import Image

    ico = tmp_path / "a.ico"
    Image.new("RGB", (64, 64)).save(ico)
    with pytest.raises(ValidationError, match="ICO; supported"):
        I2VRequest(image=str(ico), prompt="x")


def test_image_too_small(tmp_path: Path) -> None:
    from PIL import Image

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8)).save(tiny)
    with pytest.raises(ValidationError, match="each side must be"):
        I2VRequest(image=str(tiny), prompt="x")


def test_valid_request_defaults_and_payload() -> None:
    req = I2VRequest(image=URL, prompt="a cat")
    assert req.duration == 5 and req.seed == -1
    assert req.to_payload() == {"image": URL, "prompt": "a cat", "duration": 5, "seed": -1}
    full = I2VRequest.model_validate(
        base(
            last_image=URL,
            negative_prompt="blur",
            duration=8,
            seed=0,
            loras=[LORA],
            high_noise_loras=[LORA] * 3,
            low_noise_loras=[{"path": "p", "scale": 0}],
        )
    )
    payload = full.to_payload()
    assert payload["loras"] == [LORA] and len(payload["high_noise_loras"]) == 3
    assert payload["low_noise_loras"] == [{"path": "p", "scale": 0.0}]


def test_local_image_is_normalised_and_must_be_uploaded() -> None:
    req = I2VRequest(image=str(SAMPLE), prompt="x")
    assert req.local_images() == {"image": SAMPLE.resolve()}
    with pytest.raises(ValueError, match="must be uploaded"):
        req.to_payload()
    assert req.to_payload(image=URL)["image"] == URL


def test_price_per_duration() -> None:
    assert I2VRequest(image=URL, prompt="x").cost_usd == Decimal("0.10")
    assert I2VRequest(image=URL, prompt="x", duration=8).cost_usd == Decimal("0.16")
    assert I2VRequest(image=URL, prompt="x", duration=8).frame_count == 129


def test_status_terminality() -> None:
    terminal = {s for s in PredictionStatus if s.is_terminal}
    assert terminal == {"completed", "failed", "cancelled", "timeout", "deleted"}
    p = Prediction.model_validate(
        {
            "id": "x",
            "status": "failed",
            "error": "boom",
            "code": 5003,
            "created_at": "2026-11-25T09:00:00.123Z",
            "timings": {"inference": 12},
            "new_field_from_service": 1,
        }
    )
    assert p.is_terminal and p.code == 5003 and p.inference_ms == 12
    assert p.model_extra == {"new_field_from_service": 1}


# Request-side hostile input: invisible prompts, malformed URLs, odd LoRA paths.
HOSTILE: list[tuple[str, dict[str, Any], str, str]] = [
    ("prompt of NULs", base(prompt="\x00\x00"), "prompt", "blank"),
    ("prompt of zero-width spaces", base(prompt="\u200b\ufeff"), "prompt", "blank"),
    ("prompt of an ANSI escape", base(prompt="\x1b[2J"), "prompt", "blank"),
    ("image URL with a space", base(image="https://h.example/a b.png"), "image", "space"),
    ("image URL with CR", base(image="https://h.example/a\r.png"), "image", "line break"),
    ("upper-case ftp URL", base(image="FTP://h.example/a.png"), "image", "http(s) URL"),
    ("lora path with a tab", base(loras=[{"path": "a\tb"}]), "loras.0.path", "tab"),
    ("lora s3 URL", base(loras=[{"path": "s3://b/l"}]), "loras.0.path", "http(s) URL"),
]


@pytest.mark.parametrize(("case", "fields", "field", "words"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_fields(case: str, fields: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        I2VRequest.model_validate(fields)
    errors = caught.value.errors()
    assert [".".join(map(str, e["loc"])) for e in errors] == [field], case
    assert words in errors[0]["msg"], case


def test_relative_file_name_with_a_colon_is_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shots").mkdir()
    (tmp_path / "shots" / "take:1.png").write_bytes(SAMPLE.read_bytes())
    (tmp_path / "take:2.png").write_bytes(SAMPLE.read_bytes())
    monkeypatch.chdir(tmp_path)
    for name in ("shots/take:1.png", "take:2.png"):
        request = I2VRequest(image=name, prompt="p")
        assert request.local_images() == {"image": tmp_path / name}


# -- response models: what the service may send ------------------------------------------


def test_unknown_status_parses_and_is_not_terminal() -> None:
    import pickle

    p = Prediction.model_validate({"id": "x", "status": "pending"})
    assert p.status == "pending" and not p.status.is_known
    assert not p.is_terminal and not p.status.is_success
    assert PredictionStatus("queued") is PredictionStatus("queued")  # one pseudo-member each
    assert "pending" not in {s.value for s in PredictionStatus}  # the enum itself is unchanged
    assert PredictionStatus("COMPLETED") is PredictionStatus.COMPLETED
    back = pickle.loads(pickle.dumps(p))  # Prefect pickles results
    assert back.status is p.status and back == p
    assert Prediction.model_validate_json(p.model_dump_json()).status == "pending"


def test_response_shapes_the_service_may_send() -> None:
    p = Prediction.model_validate(
        {
            "id": "x",
            "status": "completed",
            "outputs": None,
            "has_nsfw_contents": None,
            "urls": None,
            "created_at": "2026-11-25T10:00:00.123456789Z",
            "code": 0,
            "executionTime": 2345,
            "queue": {"position": 3},
        }
    )
    assert p.outputs == [] and p.has_nsfw_contents == [] and p.urls.get is None
    assert p.created_at is not None and p.created_at.microsecond == 123456
    assert p.code is None  # task code 0 is success, not an error code
    assert p.inference_ms == 2345  # executionTime stands in for timings.inference
    assert p.model_extra == {"queue": {"position": 3}}
    both = Prediction.model_validate(
        {"id": "x", "status": "completed", "timings": {"inference": 10.6}, "executionTime": 99}
    )
    assert both.inference_ms == 11  # timings win when present
    blank = Prediction.model_validate({"id": "x", "status": "created", "created_at": ""})
    assert blank.created_at is None

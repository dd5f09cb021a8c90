"""Request and prediction models for `wavespeed-ai/wan-2.2/i2v-480p-lora-ultra-fast`.

The request model enforces every rule of the API reference, so bad input fails here, before any
HTTP call, with pydantic's error naming the field and the rule. Unknown fields are rejected, not
dropped: a typo such as `negative_promt` must not silently produce a different video.
"""

from __future__ import annotations

import re
import threading
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from wan_tasks.api.media import check_image_reference, check_url, is_url
from wan_tasks.api.text import clean_text, find_char, has_visible_text, quote_value

MODEL_ID = "wavespeed-ai/wan-2.2/i2v-480p-lora-ultra-fast"
MAX_SEED = 2_147_483_647
MAX_LORAS = 3
PRICE_USD: dict[int, Decimal] = {5: Decimal("0.10"), 8: Decimal("0.16")}
FPS = 16
# A LoRA path is a URL or a hub id: no whitespace, controls or invisible characters inside.
_LORA_PATH_FORBIDDEN = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
_SCHEME_SLASHES = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _prompt_text(value: str) -> str:
    """A prompt as it is sent: without control characters and terminal escapes."""
    bad = find_char(value, frozenset({"Cs"}))
    if bad:
        raise ValueError(f"has {bad[1]} at position {bad[0]}")
    return clean_text(value)


class LoraWeight(BaseModel):
    """One LoRA: a path (URL or hub id the service resolves) and a blending scale."""

    # Errors never echo the input: a credential pasted into a field must not reach logs.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    path: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    scale: Annotated[StrictFloat, Field(ge=0.0, le=4.0, allow_inf_nan=False)] = 1.0

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        v = v.strip()
        if not has_visible_text(v):
            raise ValueError("must not be blank")
        bad = find_char(v, _LORA_PATH_FORBIDDEN)
        if bad:
            raise ValueError(f"has {bad[1]} at position {bad[0]}")
        if is_url(v):
            return check_url(v)
        if _SCHEME_SLASHES.match(v):
            raise ValueError("must be an http(s) URL or a model id, not another kind of URL")
        return v


LoraList = Annotated[list[LoraWeight], Field(max_length=MAX_LORAS)]


class I2VRequest(BaseModel):
    """A Wan 2.2 image-to-video request, exactly as the service accepts it.

    `image` and `last_image` are http(s) URLs or local file paths; a local file is checked here
    (exists, supported image type, sane size) and uploaded by the client before submit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    image: Annotated[StrictStr, Field(min_length=1, description="First frame: URL or local path")]
    prompt: Annotated[StrictStr, Field(min_length=1, max_length=10_000)]
    negative_prompt: Annotated[StrictStr, Field(max_length=10_000)] = ""
    last_image: StrictStr | None = Field(default=None, description="Last frame: URL or path")
    duration: Literal[5, 8] = 5
    loras: LoraList = Field(default_factory=list)
    high_noise_loras: LoraList = Field(default_factory=list)
    low_noise_loras: LoraList = Field(default_factory=list)
    seed: Annotated[StrictInt, Field(ge=-1, le=MAX_SEED)] = -1

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        # Blank means nothing visible: NULs, zero-width spaces or a bare ANSI escape are
        # blank too, and the service would bill for a video from an empty prompt.
        v = _prompt_text(v)
        if not has_visible_text(v):
            raise ValueError("must not be blank (it has no visible characters)")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt(cls, v: str) -> str:
        v = _prompt_text(v)
        return v if has_visible_text(v) else ""

    @field_validator("image", "last_image")
    @classmethod
    def _image_reference(cls, v: str | None) -> str | None:
        return None if v is None else check_image_reference(v)

    @property
    def cost_usd(self) -> Decimal:
        """What the service charges for this request."""
        return PRICE_USD[self.duration]

    @property
    def frame_count(self) -> int:
        return FPS * self.duration + 1

    def local_images(self) -> dict[str, Path]:
        """The fields that name local files (and so need an upload before submit)."""
        found: dict[str, Path] = {}
        for name in ("image", "last_image"):
            value: str | None = getattr(self, name)
            if value is not None and not is_url(value):
                found[name] = Path(value)
        return found

    def to_payload(self, **urls: str) -> dict[str, Any]:
        """The JSON body for submit. `urls` replaces local paths with their uploaded URLs."""
        body = self.model_dump(exclude_none=True, exclude_defaults=False)
        body.update(urls)
        leftover = [k for k in ("image", "last_image") if k in body and k not in urls]
        for name in leftover:
            if not is_url(str(body[name])):
                raise ValueError(
                    f"{name}: local file {quote_value(body[name])} must be uploaded first"
                )
        for lora_field in ("loras", "high_noise_loras", "low_noise_loras"):
            if not body[lora_field]:
                del body[lora_field]
        if not body["negative_prompt"]:
            del body["negative_prompt"]
        return body


class PredictionStatus(StrEnum):
    """A prediction's status. A value this enum does not know (the service has sent, or may
    send, `pending` or `queued`) still parses, as a pseudo-member that is not terminal: a wait
    must keep going rather than fail after the task is paid for. `is_known` tells them apart."""

    CREATED = "created"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    # Not in the model page, but the official SDK treats these as terminal too.
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    DELETED = "deleted"

    @classmethod
    def _missing_(cls, value: object) -> PredictionStatus | None:
        if not isinstance(value, str) or not value:
            return None
        known = cls._value2member_map_.get(value.lower())
        if known is not None:  # "COMPLETED" is still completed
            return known  # type: ignore[return-value]
        with _UNKNOWN_LOCK:
            member = _UNKNOWN.get(value)
            if member is None:
                # One pseudo-member per value, so `is` works for unknown values too.
                member = str.__new__(cls, value)
                member._name_ = value.upper()
                member._value_ = value
                _UNKNOWN[value] = member
            return member

    @property
    def is_known(self) -> bool:
        return self._value_ in type(self)._value2member_map_

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def is_success(self) -> bool:
        return self is PredictionStatus.COMPLETED


_UNKNOWN: dict[str, PredictionStatus] = {}
_UNKNOWN_LOCK = threading.Lock()
_TERMINAL = frozenset(
    {
        PredictionStatus.COMPLETED,
        PredictionStatus.FAILED,
        PredictionStatus.CANCELLED,
        PredictionStatus.TIMEOUT,
        PredictionStatus.DELETED,
    }
)


def _none_as_default(default: Any) -> Any:
    """A before-validator: the service sends `null` where it means "none yet"."""

    def check(value: Any) -> Any:
        return default() if value is None else value

    return check


class PredictionUrls(BaseModel):
    model_config = ConfigDict(extra="allow")

    get: str | None = None


class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")

    inference: int | None = Field(default=None, description="Inference time in milliseconds")

    @field_validator("inference", mode="before")
    @classmethod
    def _whole_ms(cls, v: Any) -> Any:
        return round(v) if isinstance(v, float) else v


class Prediction(BaseModel):
    """The `data` of a prediction envelope. Extra fields from the service are kept, not lost;
    `null` lists and an empty `created_at` read as "none"."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str
    model: str = ""
    outputs: list[str] = Field(default_factory=list)
    urls: PredictionUrls = Field(default_factory=PredictionUrls)
    has_nsfw_contents: list[bool] = Field(default_factory=list)
    status: PredictionStatus
    created_at: datetime | None = None
    error: str | None = ""
    timings: Timings | None = None
    code: int | None = Field(
        default=None, description="Task error code of a failed task; 0 (success) reads as None"
    )
    input: dict[str, Any] | None = Field(default=None, description="Echoed by history/webhooks")
    execution_time: float | None = Field(
        default=None,
        alias="executionTime",
        description="Milliseconds; history items and webhooks carry it instead of timings",
    )

    _lists = field_validator("outputs", "has_nsfw_contents", mode="before")(_none_as_default(list))
    _urls = field_validator("urls", mode="before")(_none_as_default(dict))

    @field_validator("created_at", mode="before")
    @classmethod
    def _blank_time(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("code", mode="before")
    @classmethod
    def _zero_is_success(cls, v: Any) -> Any:
        return None if v in (0, "0") else v

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def inference_ms(self) -> int | None:
        if self.timings is not None and self.timings.inference is not None:
            return self.timings.inference
        return None if self.execution_time is None else round(self.execution_time)


class HistoryPage(BaseModel):
    """One page of `POST /api/v3/predictions` (the account's task history)."""

    model_config = ConfigDict(extra="allow")

    items: list[Prediction] = Field(default_factory=list)
    page: int = 1
    page_size: int = 0
    total: int | None = None

    _items = field_validator("items", mode="before")(_none_as_default(list))


class UploadResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    download_url: str
    filename: str | None = None
    size: int | None = None
    type: str | None = None


HistoryStatus = Literal["created", "processing", "completed", "failed"]

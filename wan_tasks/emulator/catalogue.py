"""What the emulator says about its model: the `/api/v3/models` catalogue entry with the
request schema, and prices (`/api/v3/model/pricing` and `/api/v3/model/price`).

The schema is written out from the documented request fields (the model's API page, see
/work/shared/seed and docs/wavespeed-api.md), in the shape WaveSpeed's MCP server and CLI read:
`api_schema.api_schemas[0].request_schema` with `properties`, `required` and
`x-order-properties`. tests/test_emulator_service.py checks it against `I2VRequest`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from wan_tasks.api.models import MAX_LORAS, MAX_SEED, MODEL_ID, PRICE_USD

_LORA_LIST: dict[str, Any] = {
    "type": "array",
    "maxItems": MAX_LORAS,
    "default": [],
    "items": {
        "type": "object",
        "required": ["path", "scale"],
        "properties": {
            "path": {"type": "string", "description": "Path to the LoRA model"},
            "scale": {
                "type": "number",
                "minimum": 0.0,
                "maximum": 4.0,
                "default": 1.0,
                "description": "Scale of the LoRA model",
            },
        },
    },
}

REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {
            "type": "string",
            "format": "uri",
            "x-ui-component": "uploader",
            "description": "The image for generating the output.",
        },
        "prompt": {"type": "string", "description": "The positive prompt for the generation."},
        "negative_prompt": {
            "type": "string",
            "default": "",
            "description": "The negative prompt for the generation.",
        },
        "last_image": {
            "type": "string",
            "format": "uri",
            "x-ui-component": "uploader",
            "description": "The last image for generating the output.",
        },
        "duration": {
            "type": "integer",
            "enum": [5, 8],
            "default": 5,
            "description": "The duration of the generated media in seconds.",
        },
        "loras": {**_LORA_LIST, "description": "List of LoRAs to apply (max 3)."},
        "high_noise_loras": {
            **_LORA_LIST,
            "description": "List of high noise LoRAs to apply (max 3).",
        },
        "low_noise_loras": {
            **_LORA_LIST,
            "description": "List of low noise LoRAs to apply (max 3).",
        },
        "seed": {
            "type": "integer",
            "minimum": -1,
            "maximum": MAX_SEED,
            "default": -1,
            "description": "The random seed to use for the generation. -1 means a "
            "random seed will be used.",
        },
    },
    "x-order-properties": [
        "image",
        "prompt",
        "negative_prompt",
        "last_image",
        "duration",
        "loras",
        "high_noise_loras",
        "low_noise_loras",
        "seed",
    ],
}

BASE_PRICE = PRICE_USD[5]
# JSONata, as the catalogue's `formula` (the MCP server reads its variables): 0.10 / 0.16.
FORMULA = '{"total_price": base_price * duration / 5}'


def catalogue(base_url: str) -> list[dict[str, Any]]:
    """`GET /api/v3/models` -> `data`: a list with this model's entry."""
    return [
        {
            "model_id": MODEL_ID,
            "name": "Wan 2.2 I2V 480p LoRA Ultra Fast",
            "description": "Wan 2.2 A14B image to video at 480p, ultra fast, with up to 3 LoRAs "
            "per expert (emulated).",
            "type": "image-to-video",
            "base_price": float(BASE_PRICE),
            "sort_order": 1,
            "formula": FORMULA,
            "api_schema": {
                "api_schemas": [
                    {
                        "type": "model_run",
                        "method": "POST",
                        "api_path": f"/api/v3/{MODEL_ID}",
                        "request_schema": REQUEST_SCHEMA,
                    }
                ]
            },
        }
    ]


def price(model_id: Any, inputs: Any) -> tuple[Decimal, None] | tuple[None, str]:
    """The price of one run, or (None, the reason naming the field)."""
    if model_id != MODEL_ID:
        return None, f"model not found: {model_id!r}"
    if inputs is None:
        inputs = {}
    if not isinstance(inputs, dict):
        return None, "invalid parameter inputs: must be an object"
    duration = inputs.get("duration", 5)
    if isinstance(duration, bool) or duration not in PRICE_USD:
        return None, "invalid parameter duration: must be 5 or 8"
    return PRICE_USD[int(duration)], None

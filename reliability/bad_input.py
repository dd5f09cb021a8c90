"""The bad-input table: malformed requests, files, templates and manifests.

Each case must be rejected locally, before any HTTP call, with an error that names the field
(or the row and field). `python -m reliability.bad_input` prints the table; the test suite runs
the same cases.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wan_tasks.api.models import I2VRequest
from wan_tasks.core.manifest import parse_manifest
from wan_tasks.errors import ManifestError
from wan_tasks.flows.options import ArchiveOptions

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "wan_tasks" / "assets" / "sample.png"
URL = "https://example.com/a.png"


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # request | file | template | manifest
    build: Callable[[Path], Any]  # makes the input (files go in the given folder)
    field: str  # what the error must name
    rule: str  # words the error must contain


@dataclass(frozen=True)
class Outcome:
    case: Case
    rejected: bool
    message: str

    @property
    def ok(self) -> bool:
        text = self.message.lower()
        return self.rejected and self.case.field.lower() in text and self.case.rule.lower() in text


def _req(**fields: Any) -> Callable[[Path], Any]:
    base: dict[str, Any] = {"image": URL, "prompt": "p"}
    base.update(fields)
    return lambda _: {k: v for k, v in base.items() if v is not ...}


def _file(name: str, content: bytes | None = None, size: int | None = None
          ) -> Callable[[Path], Any]:
    def build(folder: Path) -> dict[str, Any]:
        path = folder / name
        if size is not None:
            with path.open("wb") as fh:
                fh.truncate(size)  # sparse: a "huge" file without writing it
        else:
            path.write_bytes(content or b"")
        return {"image": str(path), "prompt": "p"}
    return build


def _manifest(name: str, content: bytes) -> Callable[[Path], Any]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content)
        return path
    return build


def _jsonl(*rows: Any) -> bytes:
    good = json.dumps({"id": "good", "image": str(SAMPLE), "prompt": "fine"})
    return "\n".join([good, *[r if isinstance(r, str) else json.dumps(r) for r in rows]]).encode()


LORA = {"path": "https://example.com/l.safetensors", "scale": 1.0}

CASES: list[Case] = [
    Case("image missing", "request", _req(image=...), "image", "field required"),
    Case("prompt missing", "request", _req(prompt=...), "prompt", "field required"),
    Case("prompt blank", "request", _req(prompt="  "), "prompt", "blank"),
    Case("prompt is a number", "request", _req(prompt=3), "prompt", "valid string"),
    Case("image is a list", "request", _req(image=[URL]), "image", "valid string"),
    Case("image ftp URL", "request", _req(image="ftp://h/a.png"), "image", "http(s) url"),
    Case("image data URI", "request", _req(image="data:image/png;base64,AA"), "image",
         "http(s) url"),
    Case("image URL without host", "request", _req(image="https:///a.png"), "image", "no host"),
    Case("image URL too long", "request", _req(image="https://h/" + "a" * 3000), "image",
         "longer than"),
    Case("last_image bad scheme", "request", _req(last_image="s3://b/k.png"), "last_image",
         "http(s) url"),
    Case("negative_prompt not text", "request", _req(negative_prompt=["x"]), "negative_prompt",
         "valid string"),
    Case("duration 6", "request", _req(duration=6), "duration", "5 or 8"),
    Case("duration '5' as text", "request", _req(duration="5"), "duration", "5 or 8"),
    Case("seed -2", "request", _req(seed=-2), "seed", "greater than or equal to -1"),
    Case("seed 2^31", "request", _req(seed=2**31), "seed", "less than or equal"),
    Case("seed 1.5", "request", _req(seed=1.5), "seed", "valid integer"),
    Case("seed true", "request", _req(seed=True), "seed", "valid integer"),
    Case("4 loras", "request", _req(loras=[LORA] * 4), "loras", "at most 3"),
    Case("4 high-noise loras", "request", _req(high_noise_loras=[LORA] * 4), "high_noise_loras",
         "at most 3"),
    Case("4 low-noise loras", "request", _req(low_noise_loras=[LORA] * 4), "low_noise_loras",
         "at most 3"),
    Case("lora scale 4.5", "request", _req(loras=[{"path": "p", "scale": 4.5}]),
         "loras.0.scale", "less than or equal to 4"),
    Case("lora scale -1", "request", _req(loras=[{"path": "p", "scale": -1}]), "loras.0.scale",
         "greater than or equal to 0"),
    Case("lora scale inf", "request", _req(loras=[{"path": "p", "scale": float("inf")}]),
         "loras.0.scale", "finite"),
    Case("lora without path", "request", _req(loras=[{"scale": 1}]), "loras.0.path",
         "field required"),
    Case("loras not a list", "request", _req(loras="a=1"), "loras", "valid list"),
    Case("unknown field (typo)", "request", _req(negative_promt="x"), "negative_promt",
         "extra inputs"),
    Case("text file named .png", "file", _file("notes.png", b"hello"), "image",
         "not an image of a supported type"),
    Case("empty file", "file", _file("empty.png", b""), "image", "is empty"),
    Case("huge file (31 MiB)", "file", _file("huge.png", size=31 * 1024 * 1024), "image",
         "the limit is"),
    Case("local file missing", "file", lambda f: {"image": str(f / "nope.png"), "prompt": "p"},
         "image", "does not exist"),
    Case("a folder, not a file", "file", lambda f: {"image": str(f), "prompt": "p"}, "image",
         "not a regular file"),
    Case("key template with ..", "template", lambda _: "../{prediction_id}.mp4",
         "key_template", "'..'"),
    Case("key template absolute", "template", lambda _: "/etc/{prediction_id}.mp4",
         "key_template", "absolute"),
    Case("key template without unique field", "template", lambda _: "{prefix}/{date}.mp4",
         "key_template", "{prediction_id} or {sha256}"),
    Case("key template unknown field", "template", lambda _: "{prefix}/{user}/{sha256}.mp4",
         "key_template", "unknown field"),
    Case("key template control character", "template", lambda _: "a\nb/{prediction_id}.mp4",
         "key_template", "control characters"),
    Case("JSONL row not JSON", "manifest", _manifest("m.jsonl", _jsonl("{oops")), "row 2",
         "not valid json"),
    Case("JSONL row not an object", "manifest", _manifest("m.jsonl", _jsonl("[1, 2]")), "row 2",
         "object"),
    Case("JSONL row bad duration", "manifest",
         _manifest("m.jsonl", _jsonl({"image": URL, "prompt": "p", "duration": 7})), "duration",
         "5 or 8"),
    Case("JSONL row non-UTF-8", "manifest",
         _manifest("m.jsonl", _jsonl() + b'\n{"image": "\xff", "prompt": "p"}'), "row 2",
         "utf-8"),
    Case("JSONL duplicate id", "manifest",
         _manifest("m.jsonl", _jsonl({"id": "good", "image": URL, "prompt": "p"})), "row 2",
         "duplicate"),
    Case("CSV seed not a number", "manifest",
         _manifest("m.csv", f"image,prompt,seed\n{SAMPLE},p,1\n{URL},p,abc\n".encode()), "seed",
         "integer"),
    Case("CSV short row", "manifest",
         _manifest("m.csv", f"image,prompt,seed\n{SAMPLE},p,1\n{URL}\n".encode()), "row 3",
         "cells"),
    Case("CSV bad lora cell", "manifest",
         _manifest("m.csv", f"image,prompt,loras\n{SAMPLE},p,\n{URL},p,x=heavy\n".encode()),
         "loras", "not a number"),
    Case("CSV unknown column", "manifest",
         _manifest("m.csv", f"image,prompt,sead\n{URL},p,1\n".encode()), "sead", "unknown"),
    Case("CSV not UTF-8", "manifest",
         _manifest("m.csv", b"image,prompt\nhttps://x/a.png,caf\xe9\n"), "m.csv", "utf-8"),
    Case("manifest of unknown type", "manifest", _manifest("m.xlsx", b"PK"), "m.xlsx",
         ".jsonl"),
    Case("empty manifest", "manifest", _manifest("m.jsonl", b"\n\n"), "m.jsonl", "no rows"),
]


def check(case: Case, folder: Path) -> Outcome:
    built = case.build(folder)
    try:
        if case.kind in ("request", "file"):
            I2VRequest.model_validate(built)
        elif case.kind == "template":
            ArchiveOptions(key_template=built)
        else:
            items = parse_manifest(built.read_bytes(), name=built.name, base_dir=folder)
            bad = [i for i in items if not i.ok]
            if not bad:
                return Outcome(case, False, "accepted")
            return Outcome(case, True, " | ".join(i.error or "" for i in bad))
    except (ValidationError, ManifestError, ValueError) as exc:
        return Outcome(case, True, str(exc))
    return Outcome(case, False, "accepted")


def run(folder: Path) -> list[Outcome]:
    outcomes = []
    for i, case in enumerate(CASES):
        sub = folder / f"case-{i:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        outcomes.append(check(case, sub))
    return outcomes


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outcomes = run(Path(tmp))
    width = max(len(o.case.name) for o in outcomes)
    for o in outcomes:
        first = o.message.replace("\n", " ")
        print(f"{'ok ' if o.ok else 'BAD'} {o.case.name:<{width}}  {first[:110]}")
    good = sum(o.ok for o in outcomes)
    print(f"{good} passed, {len(outcomes) - good} failed")
    return 0 if good == len(outcomes) else 1


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    raise SystemExit(main())

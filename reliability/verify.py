"""Independent accounting after a reliability run: what landed, what was lost, what was paid
twice. Reads only the bucket and the service's history, never the flows' own reports."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.core.manifest import parse_manifest


@dataclass
class Accounting:
    expected: int = 0
    archived_verified: int = 0
    corrupt: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # manifest items with no verified object
    duplicate_objects: int = 0  # more than one video object for one request
    submissions: int = 0
    distinct_inputs: int = 0
    duplicate_submissions: int = 0
    resubmitted_after_failure: int = 0

    def as_row(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "archived_verified": self.archived_verified,
            "lost": len(self.lost),
            "corrupt": len(self.corrupt),
            "duplicate_objects": self.duplicate_objects,
            "submissions": self.submissions,
            "duplicate_submissions": self.duplicate_submissions,
            "resubmitted_after_failure": self.resubmitted_after_failure,
        }


def manifest_items(manifest: Path) -> set[str]:
    """The item ids of the valid rows of a manifest."""
    items = parse_manifest(manifest.read_bytes(), name=manifest.name, base_dir=manifest.parent)
    return {i.item_id for i in items if i.request is not None}


def account(
    s3: Any, bucket: str, prefix: str, manifest: Path, client: WaveSpeedClient
) -> Accounting:
    wanted = manifest_items(manifest)
    acc = Accounting(expected=len(wanted))
    landed: Counter[str] = Counter()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith(".mp4"):
                continue
            got = s3.get_object(Bucket=bucket, Key=obj["Key"])
            data, meta = got["Body"].read(), got["Metadata"]
            try:
                sidecar = json.loads(
                    s3.get_object(Bucket=bucket, Key=obj["Key"].removesuffix(".mp4") + ".json")[
                        "Body"
                    ].read()
                )
            except s3.exceptions.NoSuchKey:
                acc.corrupt.append(f"{obj['Key']} (no manifest)")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if not digest == meta.get("sha256") == sidecar.get("sha256"):
                acc.corrupt.append(obj["Key"])
                continue
            # By item, so a resubmitted attempt (its own request key) counts for its item.
            landed[sidecar.get("item_id", "")] += 1
    acc.archived_verified = sum(1 for item in wanted if landed.get(item))
    acc.lost = sorted(item for item in wanted if not landed.get(item))
    acc.duplicate_objects = sum(n - 1 for n in landed.values() if n > 1)
    # Every task the service holds, grouped by item (prompt and seed are unique per item in
    # these suites; input URLs are not, since each attempt uploads its image again).
    groups: dict[tuple[str, int], list[str]] = {}
    # Paged until an empty page: a short page is not the end when the service caps page_size
    # below what was asked (the soak caps it at 5).
    page_no = 1
    seen: set[str] = set()
    while True:
        page = client.history(page=page_no, page_size=100)
        fresh = [item for item in page.items if item.id not in seen]
        if not fresh:
            break
        for item in fresh:
            seen.add(item.id)
            inp = item.input or {}
            groups.setdefault((str(inp.get("prompt")), int(inp.get("seed", -1))), []).append(
                item.status.value
            )
        page_no += 1
    acc.submissions = sum(len(v) for v in groups.values())
    acc.distinct_inputs = len(groups)
    # A failed task is not a paid video; a second live or completed task for one item is.
    acc.duplicate_submissions = sum(
        max(0, sum(1 for st in v if st != "failed") - 1) for v in groups.values()
    )
    acc.resubmitted_after_failure = sum(
        sum(1 for st in v if st == "failed") for v in groups.values() if len(v) > 1
    )
    return acc

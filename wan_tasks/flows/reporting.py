"""What a person sees of a run: a JSONL summary next to the outputs, and Prefect artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
from decimal import Decimal
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from wan_tasks.flows.models import VideoOutcome
from wan_tasks.integration.runtime import s3_client
from wan_tasks.storage.archive import ArchiveTarget
from wan_tasks.storage.keys import sanitise_prefix, sanitise_segment

logger = logging.getLogger(__name__)


def write_summary(target: ArchiveTarget, manifest: str, outcomes: list[VideoOutcome],
                  label: str) -> str:
    """One JSON line per item at {prefix}/batches/{manifest}/{label}.jsonl; returns its URI."""
    stem = sanitise_segment(Path(manifest).stem)
    key = "/".join(p for p in (sanitise_prefix(target.prefix), "batches", stem,
                               f"{sanitise_segment(label)}.jsonl") if p)
    # A summary outlives any presigned link (and a link is a bearer credential while it
    # lives): rows keep the s3:// URIs, never the signed links; errors are already scrubbed.
    body = b"".join(
        json.dumps(o.model_dump(mode="json", exclude={"presigned_url"}), sort_keys=True).encode()
        + b"\n" for o in outcomes)
    import base64

    s3_client(target.s3_block).put_object(
        Bucket=target.bucket, Key=key, Body=body, ContentType="application/x-ndjson",
        ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
    )
    return f"s3://{target.bucket}/{key}"


def _presign(uri: str | None, s3_block: str | None, expiry: int = 3600) -> str | None:
    if not uri or not uri.startswith("s3://"):
        return None
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    url: str = s3_client(s3_block).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expiry)
    return url


def _cell(text: str | None, limit: int = 160) -> str:
    text = (text or "").replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def publish_artifacts(outcomes: list[VideoOutcome], *, title: str,
                      s3_block: str | None = None) -> None:
    """A table of the videos with links and the total cost, and a picture per video."""
    total = sum((o.cost_usd for o in outcomes if o.status == "archived"), Decimal("0"))
    rows = [
        {
            "item": o.item_id, "status": o.status, "seed": o.seed,
            "cost_usd": str(o.cost_usd) if o.status == "archived" else "",
            "video": o.presigned_url or "", "s3_uri": o.s3_uri or "",
            "error": _cell(o.error),
        }
        for o in outcomes
    ]
    counts = {s: sum(1 for o in outcomes if o.status == s)
              for s in ("archived", "failed", "invalid", "skipped")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    # _sync: these run in the async flows' worker thread, where Prefect would otherwise hand
    # back an un-awaited coroutine.
    create_table_artifact(  # type: ignore[call-arg]
        key="wan-videos", table=rows,
        description=f"{title}: {summary}; total cost ${total}", _sync=True,
    )
    lines = [f"# {title}", "", f"{summary}. Total cost **${total}**.", ""]
    for o in outcomes:
        if o.status != "archived":
            lines.append(f"- **{o.item_id}** {o.status}: {_cell(o.error, 300)}")
            continue
        sheet = _presign(o.contact_sheet_uri, s3_block)
        lines.append(f"### {o.item_id} (seed {o.seed}, ${o.cost_usd})")
        if sheet:
            lines.append(f"![first, middle and last frame of {o.item_id}]({sheet})")
        lines.append(f"[video]({o.presigned_url}) · `{o.s3_uri}` · sha256 `{o.sha256}`")
        lines.append("")
    create_markdown_artifact(key="wan-video-sheets", markdown="\n".join(lines),  # type: ignore[call-arg]
                             description=f"{title}: contact sheets", _sync=True)

"""What a person sees of a run: a JSONL summary next to the outputs, Prefect artifacts, and
local copies of the videos (for a store that stops with its process)."""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from wan_tasks.devstack.embedded import wan_home
from wan_tasks.flows.models import VideoOutcome
from wan_tasks.flows.options import DEFAULT_ARTIFACT_KEY
from wan_tasks.integration.runtime import s3_client
from wan_tasks.storage.archive import ArchiveTarget
from wan_tasks.storage.keys import sanitise_prefix, sanitise_segment

logger = logging.getLogger(__name__)


def write_summary(
    target: ArchiveTarget, manifest: str, outcomes: list[VideoOutcome], label: str
) -> str:
    """One JSON line per item at {prefix}/batches/{manifest}/{label}.jsonl; returns its URI."""
    stem = sanitise_segment(Path(manifest).stem)
    key = "/".join(
        p
        for p in (
            sanitise_prefix(target.prefix),
            "batches",
            stem,
            f"{sanitise_segment(label)}.jsonl",
        )
        if p
    )
    # A summary outlives any presigned link (and a link is a bearer credential while it
    # lives): rows keep the s3:// URIs, never the signed links; errors are already scrubbed.
    body = b"".join(
        json.dumps(o.model_dump(mode="json", exclude={"presigned_url"}), sort_keys=True).encode()
        + b"\n"
        for o in outcomes
    )
    import base64

    s3_client(target.s3_block).put_object(
        Bucket=target.bucket,
        Key=key,
        Body=body,
        ContentType="application/x-ndjson",
        ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
    )
    return f"s3://{target.bucket}/{key}"


def _presign(uri: str | None, s3_block: str | None, expiry: int = 3600) -> str | None:
    if not uri or not uri.startswith("s3://"):
        return None
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    url: str = s3_client(s3_block).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expiry
    )
    return url


def _cell(text: str | None, limit: int = 160) -> str:
    text = (text or "").replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _lifetime(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def local_name(outcome: VideoOutcome) -> str:
    """A file name for a person: the batch row's id, else (one video) the prediction id."""
    if outcome.item_id and outcome.item_id != "video":
        return sanitise_segment(outcome.item_id)
    return sanitise_segment(outcome.prediction_id or "video")


def copy_outputs(
    outcomes: list[VideoOutcome],
    dest: Path,
    s3_block: str | None = None,
    *,
    mirror_keys: bool = False,
) -> dict[str, list[Path]]:
    """Download each archived video (checked against its recorded SHA-256) and its contact
    sheet into `dest`: `{item}.mp4` and `{item}.sheet.jpg`, or with `mirror_keys` at their S3
    keys. Returns the files per item id."""
    copied: dict[str, list[Path]] = {}
    client = s3_client(s3_block)
    for o in outcomes:
        if o.status != "archived" or not o.s3_uri:
            continue
        files = []
        for uri, suffix in ((o.s3_uri, ".mp4"), (o.contact_sheet_uri, ".sheet.jpg")):
            if not uri:
                continue
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            path = dest / key if mirror_keys else dest / f"{local_name(o)}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            data: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            if suffix == ".mp4" and o.sha256 and hashlib.sha256(data).hexdigest() != o.sha256:
                raise ValueError(f"{uri} does not match its recorded sha256 {o.sha256}")
            path.write_bytes(data)
            files.append(path.resolve())
        copied[o.item_id] = files
    return copied


def publish_artifacts(
    outcomes: list[VideoOutcome],
    *,
    title: str,
    target: ArchiveTarget,
    key: str = DEFAULT_ARTIFACT_KEY,
    embedded_store: str | None = None,
    refund_expected: Decimal = Decimal("0"),
) -> None:
    """A table of the videos (short links, the reason for each one that did not land, the
    links' lifetime) and a page with each video's contact sheet, under `key` and
    `{key}-sheets`.

    `embedded_store`: the endpoint of an embedded store, which stops with its process, so
    its links die with it; the videos and sheets are then also copied to
    `$WAN_TASKS_HOME/videos` (at their keys) for a person to open, and the artifacts say so.
    """
    expiry = target.presign_expiry_s
    local: dict[str, list[Path]] = {}
    if embedded_store:
        local = copy_outputs(outcomes, wan_home() / "videos", target.s3_block, mirror_keys=True)
    total = sum((o.cost_usd for o in outcomes if o.status == "archived"), Decimal("0"))
    links = {
        o.item_id: (
            _presign(o.s3_uri, target.s3_block, expiry),
            _presign(o.contact_sheet_uri, target.s3_block, expiry),
        )
        for o in outcomes
        if o.status == "archived"
    }
    rows = []
    for o in outcomes:
        video, sheet = links.get(o.item_id, (None, None))
        row: dict[str, object] = {
            "item": o.item_id,
            "status": o.status,
            "reason": ""
            if o.status == "archived"
            else _cell(
                f"{o.error_type}: {o.error}"
                if o.error_type and o.error_type not in (o.error or "")
                else o.error
            ),
            "video": f"[video]({video})" if video else "",
            "sheet": f"[sheet]({sheet})" if sheet else "",
            "cost_usd": str(o.cost_usd) if o.status == "archived" else "",
            "seed": o.seed,
            "s3_uri": o.s3_uri or "",
        }
        if embedded_store:
            row["local_copy"] = str(local[o.item_id][0]) if local.get(o.item_id) else ""
        rows.append(row)
    counts = {
        s: sum(1 for o in outcomes if o.status == s)
        for s in ("archived", "failed", "invalid", "skipped")
    }
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    refunds = (
        f"; ${refund_expected} paid for tasks the service failed, refunded by it (within about "
        "3 h; counted as spent until then)"
        if refund_expected
        else ""
    )
    if embedded_store:
        where = (
            f"links point at the embedded store ({embedded_store}) and work only while it "
            f"runs (it stops with this run); local copies in {wan_home() / 'videos'}"
        )
    else:
        where = f"links expire {_lifetime(expiry)} after this run (archive.presign_expiry_s)"
    lines = [f"# {title}", "", f"{summary}. Total cost **${total}**{refunds}. Links: {where}.", ""]
    for o in outcomes:
        if o.status != "archived":
            lines.append(f"- **{o.item_id}** {o.status}: {_cell(o.error, 300)}")
            continue
        video, sheet = links[o.item_id]
        lines.append(f"### {o.item_id} (seed {o.seed}, ${o.cost_usd})")
        if sheet:
            lines.append(f"![first, middle and last frame of {o.item_id}]({sheet})")
        lines.append(f"[video]({video}) · `{o.s3_uri}` · sha256 `{o.sha256}`")
        if local.get(o.item_id):
            lines.append(f"local copy: `{local[o.item_id][0]}`")
        lines.append("")

    # The two writes go out together (each a Prefect API round trip, ~0.05 s of a single
    # video's run on SQLite), each with this thread's context: the flow run they belong to.
    # _sync: these run in the async flows' worker thread, where Prefect would otherwise hand
    # back an un-awaited coroutine.
    def table() -> object:
        return create_table_artifact(  # type: ignore[call-arg]
            key=key,
            table=rows,
            description=f"{title}: {summary}; total cost ${total}{refunds}; {where}",
            _sync=True,
        )

    def sheets() -> object:
        return create_markdown_artifact(
            key=f"{key}-sheets",
            markdown="\n".join(lines),  # type: ignore[call-arg]
            description=f"{title}: contact sheets",
            _sync=True,
        )

    with ThreadPoolExecutor(2, thread_name_prefix="wan-artifacts") as pool:
        writes = [pool.submit(contextvars.copy_context().run, write) for write in (table, sheets)]
    errors = [e for e in (w.exception() for w in writes) if e is not None]
    for later in errors[1:]:  # the first is raised; a second is not lost
        logger.warning("the run's contact-sheet artifact failed too: %r", later)
    if errors:
        raise errors[0]

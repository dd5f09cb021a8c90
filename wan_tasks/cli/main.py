"""`wan-video`: the command line, for people who do not write Python.

Results for people go to stdout; diagnostics go to stderr and logging. Input a person can fix (a
missing manifest, a header typo, a bad row, a bad option) exits with status 2 and one line per
problem, before any server starts or anything is submitted; a run whose videos did not all land
exits 1 after printing its report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError

from wan_tasks.emulator.config import EmulatorConfig
from wan_tasks.emulator.server import Emulator, load_config_file

if TYPE_CHECKING:
    from wan_tasks.core.manifest import ManifestItem
    from wan_tasks.flows.models import BatchReport

# The temporary Prefect server a command starts when PREFECT_API_URL is unset: Prefect's own
# default (30 s, retried once) is not enough on a loaded 2-core machine.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 180
# WaveSpeed's account tiers: (concurrent tasks, video submissions per minute).
TIERS: dict[str, tuple[int, int]] = {
    "bronze": (2, 2),
    "silver": (300, 500),
    "gold": (3000, 3000),
    "ultra": (10000, 5000),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage first), status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_emulator(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    api_key = (
        args.api_key or os.environ.get("WAVESPEED_EMULATOR_KEY") or settings.pop("api_key", None)
    )
    if not api_key:
        _out("error: --api-key (or WAVESPEED_EMULATOR_KEY) is required")
        return 2
    for name in (
        "tier",
        "latency_s",
        "time_scale",
        "concurrency",
        "submits_per_minute",
        "rate_window_s",
        "sync_timeout_s",
        "output_ttl_s",
    ):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.render_once:
        settings["render_once"] = True
    try:
        config = EmulatorConfig(api_key=api_key, **settings)
    except ValidationError as exc:
        _out(f"error: emulator settings: {_validation_message(exc)}")
        return 2
    emulator = Emulator(config, args.host, args.port)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # SIGTERM stops it as cleanly as Ctrl-C
    per_minute = config.submits_per_minute or "no cap"
    _out(
        f"WaveSpeed emulator on {emulator.base_url}, tier {config.tier}: "
        f"{config.concurrency} tasks at once, {per_minute} video submissions a minute "
        "(Ctrl-C to stop)"
    )
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()
    return 0


def _request_from_args(args: argparse.Namespace) -> Any:
    from wan_tasks.api.models import I2VRequest
    from wan_tasks.core.manifest import parse_lora_cell

    fields: dict[str, Any] = {
        "image": args.image,
        "prompt": args.prompt,
        "duration": args.duration,
        "seed": args.seed,
    }
    if args.last_image:
        fields["last_image"] = args.last_image
    if args.negative_prompt:
        fields["negative_prompt"] = args.negative_prompt
    for name in ("loras", "high_noise_loras", "low_noise_loras"):
        cell = getattr(args, name)
        if cell:
            fields[name] = parse_lora_cell(cell, name)
    return I2VRequest.model_validate(fields)


def _options(args: argparse.Namespace) -> tuple[Any, Any]:
    from wan_tasks.flows.options import ArchiveOptions, RunOptions
    from wan_tasks.integration.limits import LimitSettings

    if args.budget is not None:
        try:
            budget: Decimal | None = Decimal(args.budget)
        except InvalidOperation:
            raise ValueError(f"--budget: not a number: {args.budget!r}") from None
    else:
        budget = None
    archive = ArchiveOptions(
        bucket=args.bucket, prefix=args.prefix, presign_expiry_s=args.link_expiry_s
    )
    options = RunOptions(
        credentials_block=args.credentials_block,
        budget_usd=budget,
        limits=LimitSettings(per_minute=args.rate_limit),
        artifact_key=args.artifact_key,
    )
    return archive, options


def _bad_options(exc: Exception) -> int:
    msg = _validation_message(exc) if isinstance(exc, ValidationError) else str(exc)
    _err(f"error: {msg}")
    return 2


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        request = _request_from_args(args)
        archive, options = _options(args)
    except (ValidationError, ValueError) as exc:
        return _bad_options(exc)
    from wan_tasks.devstack.embedded import embedded_defaults
    from wan_tasks.errors import WanTasksError
    from wan_tasks.flows.generate import generate_video
    from wan_tasks.flows.reporting import copy_outputs

    # The embedded store (when no bucket is configured) lives as long as this block, so the
    # copies are taken while it still runs.
    with embedded_defaults(
        s3=not (archive.bucket or archive.s3_block), emulator=not options.credentials_block
    ) as services:
        try:
            outcome = asyncio.run(
                generate_video(request, variant=args.variant, archive=archive, options=options)
            )
        except WanTasksError as exc:
            _err(f"error: {type(exc).__name__}: {exc}")
            return 1
        copies = copy_outputs([outcome], Path(args.out), archive.s3_block) if args.out else {}
    result = outcome.model_dump(mode="json")
    if services.s3_endpoint:
        result["presigned_url"] = None  # its store has stopped: the link would be dead
        result["note"] = "archived in the embedded store, which stopped with this command; " + (
            "open the local copies" if copies else "pass --out DIR for copies you can open"
        )
    if copies:
        result["local_copies"] = [str(p) for p in copies.get(outcome.item_id, [])]
    _out(json.dumps(result, indent=2))
    return 0


def _read_manifest(location: str) -> list[ManifestItem] | None:
    """The manifest, parsed and validated before anything starts. None: an s3:// manifest in
    a store that only the run itself configures (the flow reads and checks it then).
    Raises ValueError with the one line to print."""
    from wan_tasks.core.manifest import parse_manifest
    from wan_tasks.errors import ManifestError

    try:
        if location.startswith("s3://"):
            from wan_tasks import settings

            if not settings.current().bucket:
                return None
            from wan_tasks.integration.runtime import s3_client

            bucket, _, key = location.removeprefix("s3://").partition("/")
            if not bucket or not key:
                raise ValueError(f"manifest: {location!r} is not s3://bucket/key")
            try:
                body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
            except Exception as exc:
                raise ValueError(f"manifest: cannot read {location}: {exc}") from None
            return parse_manifest(body, name=key)
        path = Path(location).expanduser()
        if not path.is_file():
            raise ValueError(f"manifest: no file at {location!r}")
        return parse_manifest(path.read_bytes(), name=path.name, base_dir=path.parent.resolve())
    except ManifestError as exc:
        raise ValueError(str(exc)) from None


def _dry_run(args: argparse.Namespace, items: list[ManifestItem], budget: Decimal | None) -> int:
    from wan_tasks import settings
    from wan_tasks.cli.dryrun import plan_batch

    plan = plan_batch(items, bucket=args.bucket or settings.current().bucket)
    _out(f"dry run of {args.manifest}: nothing is submitted, no server is started")
    _out(f"already submitted (ledger): {plan.ledger}")
    for r in plan.rows:
        what = r.item.error if r.status == "invalid" else r.status
        duration = f"{r.item.request.duration}s" if r.item.request else "-"
        _out(f"{r.item.item_id:>12}  row {r.item.row:<5}  {duration:>3}  ${r.cost_usd:<5}  {what}")
    new = [r for r in plan.rows if r.cost_usd > 0]
    invalid = sum(1 for r in plan.rows if r.status == "invalid")
    free = len(plan.rows) - len(new) - invalid
    _out(
        f"bill: ${plan.bill_usd} for {len(new)} new videos (at most: rows no ledger or cache "
        f"vouches for are priced as new); {free} would cost nothing; {invalid} invalid"
    )
    if budget is not None and plan.bill_usd > budget:
        covered, spent = 0, Decimal("0")
        for r in new:
            if spent + r.cost_usd > budget:
                break
            spent += r.cost_usd
            covered += 1
        _out(
            f"budget ${budget} covers {covered} of the {len(new)} new videos; the rest would "
            "be skipped"
        )
    return 2 if invalid else 0


class _NoBatchTraceback(logging.Filter):
    """The terminal gets the batch's report, not the traceback of its BatchIncompleteError
    (which Prefect logs as the flow run fails; the run's logs in Prefect keep it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from wan_tasks.errors import BatchIncompleteError

        return not (record.exc_info and isinstance(record.exc_info[1], BatchIncompleteError))


@contextlib.contextmanager
def _quiet_batch_traceback() -> Iterator[None]:
    from prefect.logging.handlers import APILogHandler

    handlers = [h for h in logging.getLogger().handlers if not isinstance(h, APILogHandler)]
    quiet = _NoBatchTraceback()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _report_from_state(state: Any) -> tuple[BatchReport | None, str]:
    if state.is_completed():
        return state.result(), ""
    exc = state.result(raise_on_failure=False)
    return getattr(exc, "report", None), f"{type(exc).__name__}: {exc}"


def cmd_batch(args: argparse.Namespace) -> int:
    try:
        items = _read_manifest(args.manifest)
    except ValueError as exc:
        _err(f"error: {exc}")
        return 2
    invalid = [i for i in items or [] if not i.ok]
    if invalid and not args.dry_run and not args.skip_invalid:
        for item in invalid:
            _err(f"error: {item.error}")
        _err(
            f"error: {args.manifest}: {len(invalid)} of {len(items or [])} rows are invalid "
            "and nothing was started; fix them, or pass --skip-invalid to run the "
            f"{len(items or []) - len(invalid)} valid rows (the run then ends Failed)"
        )
        return 2
    try:
        archive, options = _options(args)
    except (ValidationError, ValueError) as exc:
        return _bad_options(exc)
    if args.dry_run:
        if items is None:
            _err(
                "error: --dry-run needs a local manifest, or WAN_TASKS_BUCKET for an s3:// "
                "one (the embedded store is not started for a dry run)"
            )
            return 2
        return _dry_run(args, items, options.budget_usd)

    from wan_tasks.cli.live import live_progress
    from wan_tasks.devstack.embedded import embedded_defaults
    from wan_tasks.errors import BatchIncompleteError
    from wan_tasks.flows.generate import generate_batch
    from wan_tasks.flows.reporting import copy_outputs

    with embedded_defaults(
        s3=not (archive.bucket or archive.s3_block), emulator=not options.credentials_block
    ) as services:
        with live_progress(), _quiet_batch_traceback():
            # Failed when any video did not land, as from Python or a deployment; the report
            # travels on the state's exception.
            state = generate_batch(
                args.manifest, archive=archive, options=options, return_state=True
            )
        report, failure = _report_from_state(state)
        copies = (
            copy_outputs(report.outcomes, Path(args.out), archive.s3_block)
            if args.out and report
            else {}
        )
    if report is None:
        _err(f"error: the batch failed: {failure}")
        return 1
    for o in report.outcomes:
        if o.status == "archived":
            where = str(copies[o.item_id][0]) if copies.get(o.item_id) else o.s3_uri
        else:
            where = f"{o.error_type}: {o.error}"
        _out(f"{o.item_id:>12}  {o.status:<8}  {where}")
    _out(
        f"{report.archived}/{report.total} archived, new spend ${report.new_spend_usd}; "
        f"summary {report.summary_uri}"
    )
    if report.refund_expected_usd:
        _out(
            f"  of which ${report.refund_expected_usd} paid for tasks the service failed; "
            "it refunds failed tasks (within about 3 h)"
        )
    if services.s3_endpoint:
        _out(
            "the embedded store stopped with this command"
            + (
                f"; copies in {Path(args.out).resolve()}"
                if copies
                else "; pass --out DIR for copies you can open"
            )
        )
    if report.archived < report.total:
        _out(str(BatchIncompleteError("re-run the same command to complete the rest")))
        return 1
    return 0


def temporary_server_warning() -> str | None:
    """What to tell a person whose command talks to a temporary Prefect server."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    if current.api.url:
        return None
    return (
        "warning: PREFECT_API_URL is not set: this starts a temporary Prefect server on "
        f"the database in {current.home}; only runs on this machine with the same "
        "PREFECT_HOME and no PREFECT_API_URL see these limits. Set PREFECT_API_URL for "
        "the server your flows use."
    )


def cmd_limits(args: argparse.Namespace) -> int:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from wan_tasks.integration.limits import LimitSettings, reset_in_flight

    names = LimitSettings(in_flight=args.in_flight_name, per_minute=args.per_minute_name)
    in_flight, per_minute = args.in_flight, args.per_minute
    if args.tier:
        tier_in_flight, tier_per_minute = TIERS[args.tier]
        in_flight = in_flight or tier_in_flight
        per_minute = per_minute or tier_per_minute
    warning = temporary_server_warning()
    if warning:
        _err(warning)
    assert names.in_flight and names.per_minute
    if args.reset:
        reset_in_flight(names)
        _out(f"freed every slot of {names.in_flight}")
    with get_client(sync_client=True) as client:
        # Only what was named changes; nothing named: show them.
        if in_flight is not None:
            client.upsert_global_concurrency_limit_by_name(names.in_flight, in_flight)
        if per_minute is not None:
            # A slot decays after 60/per_minute s: at most `per_minute` submits a minute.
            client.upsert_global_concurrency_limit_by_name(
                names.per_minute, per_minute, slot_decay_per_second=per_minute / 60.0
            )
        for name, kind in ((names.in_flight, "in flight"), (names.per_minute, "per minute")):
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                hint = (
                    "flows that use it fail; set it with --in-flight N or --tier"
                    if kind == "in flight"
                    else "opt-in; set it with --per-minute N"
                )
                _out(f"{name}: not set ({hint})")
                continue
            if kind == "in flight":
                _out(f"{name}: {limit.limit} videos in flight ({limit.active_slots} taken now)")
            else:
                _out(
                    f"{name}: {limit.limit} submits per minute (slot decay "
                    f"{limit.slot_decay_per_second:g}/s; flows take it when asked: "
                    f"--rate-limit {name}, or options.limits.per_minute)"
                )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from wan_tasks.api.models import PRICE_USD
    from wan_tasks.integration.check import check_account
    from wan_tasks.integration.limits import LimitSettings

    names = LimitSettings(in_flight=args.in_flight_name, per_minute=args.per_minute_name)
    if args.spend:
        _out(
            f"--spend: one real 5 s video (${PRICE_USD[5]} on the real service) once every "
            "other check has passed"
        )
    report = check_account(
        credentials_block=args.credentials_block,
        tier=args.tier,
        bucket=args.bucket,
        s3_block=args.s3_block,
        prefix=args.prefix,
        limits=names,
        spend=args.spend,
    )
    _out(f"wan-video check: {report.base_url or 'no service'}")
    for line in report.lines():
        _out(line)
    return report.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from wan_tasks.cli.demo import run_demo

    result = run_demo(Path(args.out))
    _out(f"archived:      {result.s3_uri}")
    _out(f"sidecar:       {result.sidecar_uri}")
    _out(f"local copy:    {result.video}  ({result.info})")
    _out(f"contact sheet: {result.contact_sheet}")
    _out(
        f"prediction {result.prediction_id}, seed {result.seed}, ${result.cost_usd} (emulated, "
        "nothing was spent)"
    )
    return 0


def _add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="first frame: URL or local file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--last-image", dest="last_image")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--duration", type=int, default=5, help="5 or 8 seconds")
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--variant", default="", help="another take of the same request")
    for name in ("loras", "high-noise-loras", "low-noise-loras"):
        p.add_argument(
            f"--{name}", dest=name.replace("-", "_"), help="path=scale;path=scale or JSON"
        )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket", help="S3 bucket (default $WAN_TASKS_BUCKET, else embedded)")
    p.add_argument("--prefix", default="videos")
    p.add_argument("--budget", help="dollar cap on new spend for this run")
    p.add_argument(
        "--credentials-block",
        dest="credentials_block",
        help="saved WaveSpeedCredentials block (default: WAVESPEED_API_KEY)",
    )
    p.add_argument(
        "--rate-limit",
        dest="rate_limit",
        metavar="NAME",
        help="also take a slot of this per-minute limit per submit (opt-in; create "
        "it with `wan-video limits --per-minute N`)",
    )
    p.add_argument(
        "--artifact-key",
        dest="artifact_key",
        default="wan-videos",
        help="key of the run's artifacts (lowercase letters, digits, dashes)",
    )
    p.add_argument(
        "--link-expiry-s",
        dest="link_expiry_s",
        type=_positive,
        default=3600,
        help="lifetime of the presigned links (default 3600 = 1 h)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="also copy the videos and contact sheets here (needed to keep them "
        "when the store is the embedded one, which stops with the command)",
    )


BATCH_EPILOG = """\
A manifest has one video per row: JSONL (one JSON object a line; .jsonl, .ndjson) or CSV with
a header (.csv). Keys / columns: image (required), prompt (required), last_image,
negative_prompt, duration (5 or 8), seed (-1: derived from the request), loras,
high_noise_loras, low_noise_loras (CSV: path=scale;path=scale or a JSON list), id (letters,
digits, . _ -; default row-NNNNN), variant (another take). Relative image paths resolve from
the manifest's folder. Example (JSONL):
  {"id": "lake", "image": "photos/lake.png", "prompt": "slow drift over the lake"}
The README's "Manifests" section has the full format.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wan-video", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="one video from the bundled image, offline, archived")
    demo.add_argument("--out", default="var/demo", help="where to put local copies")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate and archive one video")
    _add_request_args(gen)
    _add_run_args(gen)
    gen.set_defaults(func=cmd_generate)

    batch = sub.add_parser(
        "batch",
        help="generate a manifest (JSONL/CSV, path or s3://)",
        epilog=BATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate and archive every row of a manifest; checked before anything "
        "starts (bad input: exit 2), exit 1 when any video did not land.",
    )
    batch.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="the manifest: a local .jsonl/.ndjson/.csv file, or s3://bucket/key (format below)",
    )
    batch.add_argument(
        "--dry-run",
        dest="dry_run",
        action="store_true",
        help="validate every row, show what is already archived or cached, print "
        "the bill; submits nothing and starts no server",
    )
    batch.add_argument(
        "--skip-invalid",
        dest="skip_invalid",
        action="store_true",
        help="run the valid rows even when some are invalid (the run ends Failed)",
    )
    _add_run_args(batch)
    batch.set_defaults(func=cmd_batch)

    lim = sub.add_parser(
        "limits",
        help="show, create or update the concurrency limits",
        description="With no option: show the limits. An option changes only what it names.",
    )
    lim.add_argument(
        "--in-flight",
        dest="in_flight",
        type=_positive,
        default=None,
        help="the account's concurrent-task cap",
    )
    lim.add_argument(
        "--per-minute",
        dest="per_minute",
        type=_positive,
        default=None,
        help="the account's submits-per-minute cap",
    )
    lim.add_argument(
        "--tier",
        choices=sorted(TIERS, key=lambda t: TIERS[t]),
        help="set both from the account tier's caps: "
        + ", ".join(f"{t} {c} in flight / {m} a minute" for t, (c, m) in TIERS.items()),
    )
    lim.add_argument("--in-flight-name", default="wan-video-in-flight")
    lim.add_argument("--per-minute-name", default="wan-video-submits-per-minute")
    lim.add_argument("--reset", action="store_true", help="free stuck in-flight slots")
    lim.set_defaults(func=cmd_limits)

    chk = sub.add_parser(
        "check",
        help="before you spend: key, balance, model and price, "
        "tier vs limits, S3 write; nothing is submitted unless --spend",
    )
    chk.add_argument(
        "--tier",
        choices=("bronze", "silver", "gold", "ultra"),
        help="the account's tier (the API does not say): compared with the limits",
    )
    chk.add_argument("--bucket", help="archive bucket to probe (default $WAN_TASKS_BUCKET)")
    chk.add_argument("--s3-block", dest="s3_block", help="a saved prefect-aws S3Bucket block")
    chk.add_argument("--prefix", default="videos", help="where the probe object goes")
    chk.add_argument(
        "--credentials-block",
        dest="credentials_block",
        help="saved WaveSpeedCredentials block (default: WAVESPEED_API_KEY)",
    )
    chk.add_argument("--in-flight-name", default="wan-video-in-flight")
    chk.add_argument(
        "--per-minute-name",
        default=None,
        help="the per-minute limit the flows take (--rate-limit), if any",
    )
    chk.add_argument(
        "--spend",
        action="store_true",
        help="also make one real 5 s video end to end and print its cost",
    )
    chk.set_defaults(func=cmd_check)

    emu = sub.add_parser("emulator", help="run the local WaveSpeed API emulator")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=0, help="0 picks a free port")
    emu.add_argument("--api-key", help="the key clients must send (or WAVESPEED_EMULATOR_KEY)")
    emu.add_argument("--config", help="JSON file with EmulatorConfig fields (faults etc.)")
    emu.add_argument(
        "--tier",
        choices=("test", "bronze", "silver", "gold", "ultra"),
        help="account tier caps, tasks at once / video submissions a minute: bronze 2/2, "
        "silver 300/500, gold 3000/3000, ultra 10000/5000; default: test (3 at once, "
        "no per-minute cap, keeps tests fast)",
    )
    emu.add_argument(
        "--latency-s",
        dest="latency_s",
        type=float,
        help="emulated inference time of a task (default 4)",
    )
    emu.add_argument(
        "--time-scale",
        dest="time_scale",
        type=float,
        help="multiplies every emulated delay, the minute included (default 1)",
    )
    emu.add_argument("--concurrency", type=int, help="tasks at once (overrides the tier)")
    emu.add_argument(
        "--submits-per-minute",
        dest="submits_per_minute",
        type=int,
        help="video submissions a minute (overrides the tier)",
    )
    emu.add_argument(
        "--rate-window-s",
        dest="rate_window_s",
        type=float,
        help="length of the per-minute window in seconds (default 60)",
    )
    emu.add_argument(
        "--sync-timeout-s",
        dest="sync_timeout_s",
        type=float,
        help="enable_sync_mode waits this long, then answers 5004 (default 90)",
    )
    emu.add_argument("--output-ttl-s", dest="output_ttl_s", type=float)
    emu.add_argument(
        "--render-once",
        dest="render_once",
        action="store_true",
        help="render each distinct input once and reuse the MP4",
    )
    emu.set_defaults(func=cmd_emulator)
    return parser


def _prepare_environment() -> None:
    """Before Prefect is imported: a startup timeout for the temporary server that holds on a
    loaded machine, its task-run recorder set for batches (both only where not set), and
    PREFECT_HOME's folder (Prefect creates only its last level, with a warning when the
    parent is missing)."""
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(STARTUP_TIMEOUT_S))
    if not os.environ.get("PREFECT_API_URL"):
        from wan_tasks.devstack.prefect_server import BATCH_SERVER_SETTINGS

        for name, value in BATCH_SERVER_SETTINGS.items():
            os.environ.setdefault(name, value)
    home = os.environ.get("PREFECT_HOME")
    if home:
        with contextlib.suppress(OSError):
            Path(home).expanduser().mkdir(parents=True, exist_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prepare_environment()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    return result


if __name__ == "__main__":
    raise SystemExit(main())

"""`wan-video`: the command line, for people who do not write Python.

Results for people go to stdout; diagnostics go to logging. Bad input exits with status 2 and
a message naming the field, before anything is submitted.
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
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wan_tasks.emulator.config import EmulatorConfig
from wan_tasks.emulator.server import Emulator, load_config_file


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()
    )


def cmd_emulator(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    api_key = args.api_key or os.environ.get("WAVESPEED_EMULATOR_KEY") or settings.pop(
        "api_key", None
    )
    if not api_key:
        _out("error: --api-key (or WAVESPEED_EMULATOR_KEY) is required")
        return 2
    for name in ("tier", "latency_s", "time_scale", "concurrency", "submits_per_minute",
                 "rate_window_s", "sync_timeout_s", "output_ttl_s"):
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
    _out(f"WaveSpeed emulator on {emulator.base_url}, tier {config.tier}: "
         f"{config.concurrency} tasks at once, {per_minute} video submissions a minute "
         "(Ctrl-C to stop)")
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()
    return 0


def _request_from_args(args: argparse.Namespace) -> Any:
    from wan_tasks.api.models import I2VRequest
    from wan_tasks.core.manifest import parse_lora_cell

    fields: dict[str, Any] = {"image": args.image, "prompt": args.prompt,
                              "duration": args.duration, "seed": args.seed}
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

    archive = ArchiveOptions(bucket=args.bucket, prefix=args.prefix)
    options = RunOptions(
        credentials_block=args.credentials_block,
        budget_usd=Decimal(args.budget) if args.budget is not None else None,
        limits=LimitSettings(per_minute=args.rate_limit),
    )
    return archive, options


def cmd_generate(args: argparse.Namespace) -> int:
    from wan_tasks.flows.generate import generate_video

    try:
        request = _request_from_args(args)
        archive, options = _options(args)
    except (ValidationError, ValueError) as exc:
        msg = _validation_message(exc) if isinstance(exc, ValidationError) else str(exc)
        _out(f"error: {msg}")
        return 2
    outcome = asyncio.run(generate_video(request, variant=args.variant, archive=archive,
                                         options=options))
    _out(json.dumps(outcome.model_dump(mode="json"), indent=2))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from wan_tasks.errors import BatchIncompleteError
    from wan_tasks.flows.generate import generate_batch

    try:
        archive, options = _options(args)
    except (ValidationError, ValueError) as exc:
        _out(f"error: {exc}")
        return 2
    try:
        report = generate_batch(args.manifest, archive=archive, options=options,
                                fail_on_item_error=False)
    except ValueError as exc:
        _out(f"error: {exc}")
        return 2
    for o in report.outcomes:
        where = o.s3_uri if o.status == "archived" else f"{o.error_type}: {o.error}"
        _out(f"{o.item_id:>12}  {o.status:<8}  {where}")
    _out(f"{report.archived}/{report.total} archived, new spend ${report.new_spend_usd}; "
         f"summary {report.summary_uri}")
    if report.archived < report.total:
        _out(str(BatchIncompleteError("re-run the same command to complete the rest")))
        return 1
    return 0


def cmd_limits(args: argparse.Namespace) -> int:
    from wan_tasks.integration.limits import LimitSettings, ensure_limits, reset_in_flight

    names = LimitSettings(in_flight=args.in_flight_name, per_minute=args.per_minute_name)
    if args.reset:
        reset_in_flight(names)
        _out(f"freed every slot of {names.in_flight}")
        return 0
    ensure_limits(args.in_flight, args.per_minute, names=names)
    _out(f"{names.in_flight}: {args.in_flight} in flight")
    if args.per_minute is not None:
        _out(f"{names.per_minute}: {args.per_minute} submits per minute (flows take it when "
             f"asked: --rate-limit {names.per_minute}, or options.limits.per_minute)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from wan_tasks.api.models import PRICE_USD
    from wan_tasks.integration.check import check_account
    from wan_tasks.integration.limits import LimitSettings

    names = LimitSettings(in_flight=args.in_flight_name, per_minute=args.per_minute_name)
    if args.spend:
        _out(f"--spend: one real 5 s video (${PRICE_USD[5]} on the real service) once every "
             "other check has passed")
    report = check_account(credentials_block=args.credentials_block, tier=args.tier,
                           bucket=args.bucket, s3_block=args.s3_block, prefix=args.prefix,
                           limits=names, spend=args.spend)
    _out(f"wan-video check: {report.base_url or 'no service'}")
    for line in report.lines():
        _out(line)
    return report.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from wan_tasks.cli.demo import run_demo

    result = run_demo(Path(args.out))
    _out(f"archived:      {result.s3_uri}")
    _out(f"manifest:      {result.sidecar_uri}")
    _out(f"local copy:    {result.video}  ({result.info})")
    _out(f"contact sheet: {result.contact_sheet}")
    _out(f"prediction {result.prediction_id}, seed {result.seed}, ${result.cost_usd} (emulated, "
         "nothing was spent)")
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
        p.add_argument(f"--{name}", dest=name.replace("-", "_"),
                       help="path=scale;path=scale or JSON")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket", help="S3 bucket (default $WAN_TASKS_BUCKET, else embedded)")
    p.add_argument("--prefix", default="videos")
    p.add_argument("--budget", help="dollar cap on new spend for this run")
    p.add_argument("--credentials-block", dest="credentials_block",
                   help="saved WaveSpeedCredentials block (default: WAVESPEED_API_KEY)")
    p.add_argument("--rate-limit", dest="rate_limit", metavar="NAME",
                   help="also take a slot of this per-minute limit per submit (opt-in; create "
                        "it with `wan-video limits --per-minute N`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-video", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="one video from the bundled image, offline, archived")
    demo.add_argument("--out", default="var/demo", help="where to put local copies")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate and archive one video")
    _add_request_args(gen)
    _add_run_args(gen)
    gen.set_defaults(func=cmd_generate)

    batch = sub.add_parser("batch", help="generate a manifest (JSONL/CSV, path or s3://)")
    batch.add_argument("manifest")
    _add_run_args(batch)
    batch.set_defaults(func=cmd_batch)

    lim = sub.add_parser("limits", help="create or update the concurrency limits")
    lim.add_argument("--in-flight", dest="in_flight", type=int, default=3,
                     help="the account's concurrent-task cap")
    lim.add_argument("--per-minute", dest="per_minute", type=int, default=None,
                     help="the account's submits-per-minute cap")
    lim.add_argument("--in-flight-name", default="wan-video-in-flight")
    lim.add_argument("--per-minute-name", default="wan-video-submits-per-minute")
    lim.add_argument("--reset", action="store_true", help="free stuck in-flight slots")
    lim.set_defaults(func=cmd_limits)

    chk = sub.add_parser("check", help="before you spend: key, balance, model and price, "
                         "tier vs limits, S3 write; nothing is submitted unless --spend")
    chk.add_argument("--tier", choices=("bronze", "silver", "gold", "ultra"),
                     help="the account's tier (the API does not say): compared with the limits")
    chk.add_argument("--bucket", help="archive bucket to probe (default $WAN_TASKS_BUCKET)")
    chk.add_argument("--s3-block", dest="s3_block", help="a saved prefect-aws S3Bucket block")
    chk.add_argument("--prefix", default="videos", help="where the probe object goes")
    chk.add_argument("--credentials-block", dest="credentials_block",
                     help="saved WaveSpeedCredentials block (default: WAVESPEED_API_KEY)")
    chk.add_argument("--in-flight-name", default="wan-video-in-flight")
    chk.add_argument("--per-minute-name", default=None,
                     help="the per-minute limit the flows take (--rate-limit), if any")
    chk.add_argument("--spend", action="store_true",
                     help="also make one real 5 s video end to end and print its cost")
    chk.set_defaults(func=cmd_check)

    emu = sub.add_parser("emulator", help="run the local WaveSpeed API emulator")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=0, help="0 picks a free port")
    emu.add_argument("--api-key", help="the key clients must send (or WAVESPEED_EMULATOR_KEY)")
    emu.add_argument("--config", help="JSON file with EmulatorConfig fields (faults etc.)")
    emu.add_argument(
        "--tier", choices=("test", "bronze", "silver", "gold", "ultra"),
        help="account tier caps, tasks at once / video submissions a minute: bronze 2/2, "
             "silver 300/500, gold 3000/3000, ultra 10000/5000; default: test (3 at once, "
             "no per-minute cap, keeps tests fast)",
    )
    emu.add_argument("--latency-s", dest="latency_s", type=float,
                     help="emulated inference time of a task (default 4)")
    emu.add_argument("--time-scale", dest="time_scale", type=float,
                     help="multiplies every emulated delay, the minute included (default 1)")
    emu.add_argument("--concurrency", type=int, help="tasks at once (overrides the tier)")
    emu.add_argument("--submits-per-minute", dest="submits_per_minute", type=int,
                     help="video submissions a minute (overrides the tier)")
    emu.add_argument("--rate-window-s", dest="rate_window_s", type=float,
                     help="length of the per-minute window in seconds (default 60)")
    emu.add_argument("--sync-timeout-s", dest="sync_timeout_s", type=float,
                     help="enable_sync_mode waits this long, then answers 5004 (default 90)")
    emu.add_argument("--output-ttl-s", dest="output_ttl_s", type=float)
    emu.add_argument("--render-once", dest="render_once", action="store_true",
                     help="render each distinct input once and reuse the MP4")
    emu.set_defaults(func=cmd_emulator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

"""The deployments of prefect.yaml, served from one long-lived process: no work pool, no worker.

    PREFECT_API_URL=http://your-server:4200/api python -m deployments.serve [--limit N]

Built from deployments/prefect.yaml (names, entrypoints, parameters, schedules, triggers,
deployment concurrency, and the limits of its `ensure_limits` build step), so the two ways
never drift apart. Flow runs execute as subprocesses of this process, in the repository root,
with its environment: set the WaveSpeed and S3 variables here as you would on a worker.

Serve these or deploy them to a pool, not both against one server: the names are the same,
and whichever registered last owns them. A server is required: the temporary one Prefect
starts when PREFECT_API_URL is unset runs no scheduler, so schedules would never fire.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]  # no stubs installed
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentTriggerTypes
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Schedule
from pydantic import TypeAdapter

from wan_tasks.integration.limits import ensure_limits

logger = logging.getLogger("deployments.serve")

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
_LIMITS_STEP = "wan_tasks.integration.limits.ensure_limits"
_SCHEDULE_KEYS = (
    "interval",
    "cron",
    "rrule",
    "timezone",
    "anchor_date",
    "day_or",
    "active",
    "parameters",
    "slug",
)
_triggers: TypeAdapter[DeploymentTriggerTypes] = TypeAdapter(DeploymentTriggerTypes)


def read_config(prefect_file: Path = PREFECT_FILE) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
    return config


def _schedule(spec: dict[str, Any]) -> Schedule:
    fields = {k: spec[k] for k in _SCHEDULE_KEYS if k in spec}
    if isinstance(fields.get("interval"), int | float):
        fields["interval"] = timedelta(seconds=fields["interval"])
    return Schedule(**fields)


def _concurrency(spec: Any) -> int | ConcurrencyLimitConfig | None:
    if isinstance(spec, dict):
        return ConcurrencyLimitConfig.model_validate(spec)
    return int(spec) if spec is not None else None


def load_deployments(prefect_file: Path = PREFECT_FILE) -> list[RunnerDeployment]:
    """One RunnerDeployment per deployment of the file. Entrypoints are relative to the
    repository root, which must be the working directory (it also is for the flow runs)."""
    deployments = []
    for spec in read_config(prefect_file).get("deployments", []):
        flow: Any = load_flow_from_entrypoint(spec["entrypoint"])
        triggers = [
            _triggers.validate_python({"name": f"{spec['name']}__automation_{i}", **trigger})
            for i, trigger in enumerate(spec.get("triggers") or [], start=1)
        ]
        deployment: RunnerDeployment = flow.to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters"),
            schedules=[_schedule(s) for s in spec.get("schedules") or []],
            triggers=triggers,
            concurrency_limit=_concurrency(spec.get("concurrency_limit")),
        )
        # Prefect derives the entrypoint from the file that defines the function (inside the
        # installed package); runs load the flow from the same entrypoint as prefect.yaml.
        deployment.entrypoint = spec["entrypoint"]
        deployments.append(deployment)
    return deployments


def ensure_limits_from_config(prefect_file: Path = PREFECT_FILE) -> None:
    """What `prefect deploy` does in its build step: create the limits where missing."""
    for step in read_config(prefect_file).get("build") or []:
        if _LIMITS_STEP in step:
            inputs = {k: v for k, v in step[_LIMITS_STEP].items() if k not in ("id", "requires")}
            ensure_limits(**inputs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="most flow runs at once in this process (default: no limit)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:
            logger.error(
                "PREFECT_API_URL is not set: serve against a running Prefect server "
                "(the temporary one runs no scheduler)"
            )
            return 2
    os.chdir(REPO)  # entrypoints, manifests and images in parameters are repository-relative
    ensure_limits_from_config()
    serve(*load_deployments(), limit=args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One attempt at a batch, in its own process, so a harness can kill -9 it anywhere.

Reads everything from the environment the harness sets (PREFECT_API_URL, PREFECT_HOME,
WAVESPEED_*, AWS_*, WAN_TASKS_BUCKET) and the options as JSON. Exit 0 when every video landed.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    # after the env is set
    from wan_tasks.errors import BatchIncompleteError
    from wan_tasks.flows.generate import generate_batch
    from wan_tasks.flows.options import RunOptions

    manifest, options_json = sys.argv[1], sys.argv[2]
    report_path = sys.argv[3] if len(sys.argv) > 3 else None
    options = RunOptions.model_validate(json.loads(options_json))
    try:
        report = generate_batch(manifest, options=options, fail_on_item_error=False)
    except BatchIncompleteError:
        return 1
    if report_path:
        with open(report_path, "w", encoding="utf-8") as fh:
            fh.write(report.model_dump_json())
    return 0 if report.archived == report.total else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The batch's live progress line in a terminal (rich), and nothing when output is not one.

The line itself comes from `wan_tasks.flows.progress` (the same text the run logs for the
Prefect UI); this module only draws it, pinned under the scrolling log.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from wan_tasks.flows.progress import Snapshot, watch


@contextmanager
def live_progress(enabled: bool | None = None) -> Iterator[None]:
    """Show each progress snapshot of this process's runs on stderr while the block runs.
    `enabled=None`: only when stderr is a terminal (pipes and CI logs get the log lines)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(stderr=True)
    with Live(
        Text("starting…"),
        console=console,
        refresh_per_second=4,
        redirect_stderr=True,
        transient=False,
    ) as live:

        def draw(snap: Snapshot) -> None:
            live.update(Text(snap.line(), style="bold"))

        with watch(draw):
            yield

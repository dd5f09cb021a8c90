"""What a cancelled flow run does with the paid work it has in flight.

Prefect does not interrupt a flow run's process when the run is cancelled from the UI or the
API (a deployment's worker ends the process; a run started from Python just goes on). A
`CancelWatch` reads the run's state every few seconds and, once it is Cancelling or Cancelled,
tells the lanes to start nothing new; then, by `RunOptions.on_cancel`:

- `"detach"` (the default): predictions already submitted are kept. They are paid for, and
  their ids are in the ledger from the moment the service answered, so the videos the run
  still gets to wait for are archived, and whatever it does not (a killed process) is
  reconnected to and archived by the next run of the same manifest. A paid video is never
  thrown away.
- `"cancel_remote"`: every prediction still in flight is cancelled at the service (DELETE,
  which the service may refund in part), as Dagster does for remote work; a re-run submits
  those videos again as new attempts.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Literal

logger = logging.getLogger(__name__)

OnCancel = Literal["detach", "cancel_remote"]
POLL_S = 2.0


class CancelWatch:
    """A daemon thread that watches one flow run's state; `stopped` is set on cancellation."""

    def __init__(
        self, flow_run_id: str | None, on_cancel: Callable[[], None], *, every_s: float = POLL_S
    ) -> None:
        self.flow_run_id = flow_run_id
        self.stopped = threading.Event()
        self._done = threading.Event()
        self._on_cancel = on_cancel
        self._every_s = every_s
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CancelWatch:
        if self.flow_run_id:
            # In the caller's context: the flow's Prefect client serves the watch too (a
            # client of its own would load the CA bundle again, beside the run's first steps).
            self._thread = threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._watch,),
                name="wan-cancel-watch",
                daemon=True,
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=self._every_s * 3)

    def trigger(self, reason: str) -> None:
        """Stop now (also from outside the watcher: a termination signal in the flow)."""
        if self.stopped.is_set():
            return
        logger.warning("%s: starting no new videos", reason)
        self.stopped.set()
        try:
            self._on_cancel()
        except Exception:
            logger.exception("handling the cancellation failed")

    def _watch(self) -> None:
        from prefect.client.orchestration import get_client

        assert self.flow_run_id is not None
        with get_client(sync_client=True) as client:
            while not self._done.wait(self._every_s):
                try:
                    state = client.read_flow_run(self.flow_run_id).state  # type: ignore[arg-type]
                except Exception as exc:  # the server away for a moment: look again later
                    logger.debug("could not read the flow run's state: %s", exc)
                    continue
                if state is not None and (state.is_cancelling() or state.is_cancelled()):
                    self.trigger("the flow run was cancelled")
                    return


__all__ = ["POLL_S", "CancelWatch", "OnCancel"]

"""A spending cap for one flow run: new submissions stop once the next would exceed it."""

from __future__ import annotations

import threading
from decimal import Decimal

from wan_tasks.errors import BudgetExceededError


class Budget:
    """Thread-safe reservations against a dollar limit. Only new, paid submissions reserve:
    cached or already-submitted videos cost nothing again."""

    def __init__(self, limit_usd: Decimal | float | str | None) -> None:
        self.limit = None if limit_usd is None else Decimal(str(limit_usd))
        self._spent = Decimal("0")
        self._held: dict[str, Decimal] = {}
        self._lock = threading.Lock()

    @property
    def spent(self) -> Decimal:
        with self._lock:
            return self._spent

    def reserve(self, key: str, cost: Decimal) -> None:
        with self._lock:
            if key in self._held:
                return
            if self.limit is not None and self._spent + cost > self.limit:
                raise BudgetExceededError(
                    f"budget ${self.limit} reached (${self._spent} committed); "
                    f"this video (${cost}) was not submitted. Raise budget_usd to continue."
                )
            self._held[key] = cost
            self._spent += cost

    def release(self, key: str) -> None:
        """Give back a reservation whose submit certainly created no task."""
        with self._lock:
            cost = self._held.pop(key, None)
            if cost is not None:
                self._spent -= cost

    def __repr__(self) -> str:
        return f"Budget(limit={self.limit}, spent={self._spent})"

"""The memory reports of served requests, held from the end of generation until the response carries them.

Generation runs on transformers' inference thread and the response is written by the request's handler on the event
loop; the two meet here, keyed by the server's request id.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class ReportLedger:
    """A bounded, thread-safe map request id -> report summary. Reports nobody takes (a client that went away) are
    dropped oldest first once `capacity` are held."""

    def __init__(self, capacity: int = 256):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._reports: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, report: dict[str, Any]) -> None:
        with self._lock:
            self._reports[request_id] = report
            self._reports.move_to_end(request_id)
            while len(self._reports) > self.capacity:
                self._reports.popitem(last=False)

    def take(self, request_id: str) -> dict[str, Any] | None:
        """The report of `request_id`, removed from the ledger; None if there is none (yet)."""
        with self._lock:
            return self._reports.pop(request_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reports)


#: the process's ledger: custom generate functions write it, the chat handler reads it
LEDGER = ReportLedger()

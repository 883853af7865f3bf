"""Per-key request and token rates over a sliding minute (429 with Retry-After when a key is over).

The windows live in memory, guarded by a lock (admission runs in worker threads, settlement on the
event loop); with several gateway replicas each enforces its own share.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Literal

from ray_app.accounting.keys import KeyRecord

__all__ = ["RateLimited", "RateWindows"]

_WINDOW_S = 60.0


class RateLimited(Exception):
    def __init__(self, key_id: str, limit: Literal["rpm", "tpm"], retry_after_s: float, detail: str):
        self.key_id, self.limit, self.retry_after_s = key_id, limit, retry_after_s
        super().__init__(f"key {key_id}: {detail}; retry after {retry_after_s:.1f}s")


class RateWindows:
    def __init__(self, default_rpm: int | None, default_tpm: int | None, clock: Callable[[], float] = time.time):
        self.default_rpm, self.default_tpm = default_rpm, default_tpm
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, deque[float]] = defaultdict(deque)
        self._tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def admit(self, key: KeyRecord, tokens: int) -> None:
        """Count one request of about ``tokens`` tokens against the key's windows, or raise RateLimited."""
        rpm = key.rpm if key.rpm is not None else self.default_rpm
        tpm = key.tpm if key.tpm is not None else self.default_tpm
        with self._lock:
            now = self._clock()
            requests, used = self._requests[key.key_id], self._tokens[key.key_id]
            while requests and requests[0] <= now - _WINDOW_S:
                requests.popleft()
            while used and used[0][0] <= now - _WINDOW_S:
                used.popleft()
            if rpm is not None and len(requests) >= rpm:
                raise RateLimited(key.key_id, "rpm", requests[len(requests) - rpm] + _WINDOW_S - now,
                                  f"{rpm} requests per minute")
            if tpm is not None:
                if tokens > tpm:
                    raise RateLimited(key.key_id, "tpm", _WINDOW_S,
                                      f"request needs ~{tokens} tokens, more than the {tpm} tokens per minute limit")
                total = sum(n for _, n in used)
                if total + tokens > tpm:
                    raise RateLimited(key.key_id, "tpm", _free_at(used, total + tokens - tpm) - now,
                                      f"{tpm} tokens per minute")
            requests.append(now)
            used.append((now, tokens))

    def settle(self, key_id: str, estimated_tokens: int, actual_tokens: int) -> None:
        """Correct the token window once the real usage of an admitted request is known."""
        if actual_tokens != estimated_tokens:
            with self._lock:
                self._tokens[key_id].append((self._clock(), actual_tokens - estimated_tokens))


def _free_at(used: deque[tuple[float, int]], excess: int) -> float:
    freed = 0
    for ts, n in used:
        freed += n
        if freed >= excess:
            return ts + _WINDOW_S
    return used[-1][0] + _WINDOW_S

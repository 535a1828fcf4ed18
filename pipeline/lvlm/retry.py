"""Retry timing: which failures are retried, how long to wait, and the requests-per-minute cap.

Full jitter (sleep uniform(0, min(cap, base * 2**n))) spreads the retries of many workers that
failed together, so a 429 storm does not come back as a synchronised second storm. A server's
Retry-After (seconds or an HTTP date) wins over the computed backoff, capped so that a bogus
value cannot park a worker for hours.
"""
from __future__ import annotations

import asyncio
import email.utils
import random
import time
from datetime import timezone
from typing import Optional

# Causes a request is retried for (the stats count retries under these names).
RETRY_CAUSES = ("429", "5xx", "timeout", "connection")


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent
    or unreadable. A date in the past means 0."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(retry_number: int, base_s: float, cap_s: float, rng: random.Random,
                  retry_after_s: Optional[float] = None, retry_after_cap_s: float = 60.0) -> float:
    """Seconds to sleep before retry number `retry_number` (1 = first retry)."""
    if retry_after_s is not None:
        return min(retry_after_s, retry_after_cap_s)
    return rng.uniform(0.0, min(cap_s, base_s * (2 ** (retry_number - 1))))


class TokenBucket:
    """An asyncio requests-per-minute cap: `rate` tokens a second, bursts up to `burst`.
    One per event loop (it is used from the backend's own loop only)."""

    def __init__(self, rpm: float, burst: Optional[float] = None):
        self.rate = rpm / 60.0
        self.capacity = burst if burst is not None else max(1.0, self.rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self._lock: Optional[asyncio.Lock] = None

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # FIFO: waiters take tokens in arrival order
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


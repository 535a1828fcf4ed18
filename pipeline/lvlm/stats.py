"""Counters of one backend instance, as a plain dict that merges across workers.

    items               requests given to run_inference (cache hits included)
    requests            HTTP requests sent / sequences generated (retries and re-asks included)
    ok, cache_hits      answers returned; of them, answers read from the cache
    cached_failures     final failures of an earlier run read from the cache (not asked again)
    cache_writes        answers stored (cache_write_errors: could not be stored)
    reasks              re-asks after an invalid / schema-invalid answer
    response_format_refused  400s to response_format json_schema (openai backend)
    prompt_tokens, completion_tokens   as the server reported them (cache hits not counted)
    retries_by_cause    {"429", "5xx", "timeout", "connection": retries made for that cause}
    failures_by_reason  {ledger reason: results with ok=False}
    peak_in_flight      most requests in flight at once in this backend (merged: the highest)
    latency_ms          p50/p90/p99 of requests that got an HTTP answer (or of generate() calls)

Latency is kept as a log-spaced histogram (5 % wide buckets) rather than a sample list: it stays
a few hundred numbers for any run length, adds up across workers exactly, and its percentiles are
within 2.5 % of the true ones.
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Iterable

_RATIO = 1.05
_LOG_RATIO = math.log(_RATIO)
COUNTERS = ("items", "requests", "ok", "cache_hits", "cached_failures", "cache_writes", "cache_write_errors",
            "reasks", "response_format_refused", "prompt_tokens", "completion_tokens")
NESTED = ("retries_by_cause", "failures_by_reason")
PERCENTILES = (50, 90, 99)


def _bucket(ms: float) -> int:
    return math.floor(math.log(max(ms, 0.01)) / _LOG_RATIO)


def _bucket_value(index: int) -> float:
    return _RATIO ** (index + 0.5)  # geometric middle of the bucket


def percentiles(hist: dict) -> dict:
    """{"p50": ms, "p90": ms, "p99": ms, "count": n} from a {bucket: count} histogram."""
    items = sorted((int(k), int(v)) for k, v in hist.items() if int(v) > 0)
    total = sum(v for _, v in items)
    out: dict = {"count": total}
    for p in PERCENTILES:
        if not total:
            out[f"p{p}"] = None
            continue
        rank, seen = math.ceil(total * p / 100), 0
        for index, count in items:
            seen += count
            if seen >= rank:
                out[f"p{p}"] = round(_bucket_value(index), 1)
                break
    return out


class LvlmStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter({name: 0 for name in COUNTERS})
        self.retries_by_cause: Counter = Counter()
        self.failures_by_reason: Counter = Counter()
        self.latency_hist: Counter = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def retry(self, cause: str) -> None:
        with self._lock:
            self.retries_by_cause[cause] += 1

    def failure(self, reason: str) -> None:
        with self._lock:
            self.failures_by_reason[reason] += 1

    def latency(self, ms: float) -> None:
        with self._lock:
            self.latency_hist[_bucket(ms)] += 1

    def enter(self, n: int = 1) -> None:
        with self._lock:
            self.in_flight += n
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self, n: int = 1) -> None:
        with self._lock:
            self.in_flight -= n

    def as_dict(self) -> dict:
        with self._lock:
            hist = {str(k): v for k, v in sorted(self.latency_hist.items())}
            return {
                **dict(self.counts),
                "retries_by_cause": dict(self.retries_by_cause),
                "failures_by_reason": dict(self.failures_by_reason),
                "peak_in_flight": self.peak_in_flight,
                "latency_ms": {**percentiles(hist), "hist": hist},
                "workers": 1,
            }


def merge_stats(stats: Iterable[dict]) -> dict:
    """Combine stats() dicts of several workers: counts add up, peak_in_flight is the highest
    single worker's peak, latency percentiles are recomputed from the summed histograms."""
    counts: Counter = Counter({name: 0 for name in COUNTERS})
    nested = {name: Counter() for name in NESTED}
    hist: Counter = Counter()
    peak = workers = 0
    for one in stats:
        for name in COUNTERS:
            counts[name] += int(one.get(name, 0))
        for name in NESTED:
            nested[name].update(one.get(name, {}))
        hist.update({str(k): int(v) for k, v in one.get("latency_ms", {}).get("hist", {}).items()})
        peak = max(peak, int(one.get("peak_in_flight", 0)))
        workers += int(one.get("workers", 1))
    hist_sorted = {k: hist[k] for k in sorted(hist, key=int)}
    return {**dict(counts), **{k: dict(v) for k, v in nested.items()}, "peak_in_flight": peak,
            "latency_ms": {**percentiles(hist_sorted), "hist": hist_sorted}, "workers": workers}

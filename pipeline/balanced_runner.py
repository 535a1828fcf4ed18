"""Beam's local runner with each step's work handed out as the workers finish, not in fixed halves.

FnApiRunner's ParallelBundleManager cuts a step's input into one part per worker up front and
waits for the slowest part. On the 20k-photo build with 2 workers one worker then idled for
2.7-5 s at the end of the first step (of ~28 s): the parts held the same number of photos, but one
worker ran ~10% slower (the two vCPUs of this machine do not run alike). The writer's step is worse
off, since its elements are whole shards of uneven size. Here a step's input is cut into parts
that the workers take one after the other as they finish one; a slower worker simply does fewer.
The parts shrink as the step goes on (guided self-scheduling: each takes 1/(2 x workers) of what
is left, down to 1/(FINE_PARTS_PER_WORKER x workers) of the step), so the workers start on large
parts and end within a small one of each other: with 4 equal parts per worker, the first step of
the 20k build still ended up to a quarter-part (~1 s) apart. The fine parts go out largest first
(by encoded bytes), so that the last parts are small ones: the writer's elements are shards of
a few hundred to a few thousand samples, and in input order a big shard could come last while
the other worker idled (0.3 s of the 20k build's 2 s write step). The price is more, smaller bundles:
each DoFn's start/finish of bundle, and a stash file and a ledger piece per bundle
(pipeline.stash, pipeline.build).

Only the work's distribution changes: the same BundleManager runs each part on a worker, with the
runner's own buffers, splitting and results (merged as Beam merges them). Stateful steps and a
single worker keep Beam's plain BundleManager, as in FnApiRunner.
"""
from __future__ import annotations

import queue
import threading

from apache_beam.metrics import monitoring_infos
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner

FINE_PARTS_PER_WORKER = 16  # the smallest part: 1/16 of a worker's share of the step


def guided_sizes(n: int, workers: int) -> list[int]:
    """How many of `n` fine parts each part takes, in order: half of a worker's share of what
    is left, at least one (for 32 fine parts and 2 workers: 8, 6, 5, 4, 3, 2, 1, 1, 1, 1)."""
    sizes = []
    while n > 0:
        size = max(1, -(-n // (2 * workers)))
        sizes.append(size)
        n -= size
    return sizes


class _OnOneWorker:
    """A step's BundleContextManager pinned to one worker handler: BundleManager picks a bundle's
    worker from `worker_handlers` by a process-wide counter, so a list of one is that worker."""

    def __init__(self, context, handler):
        self._context = context
        self.worker_handlers = [handler]

    def __getattr__(self, name):
        return getattr(self._context, name)


def _has_data(part: dict) -> bool:
    return any(any(chunk for chunk in chunks) for chunks in part.values())


def _size(part: dict) -> int:
    return sum(len(chunk) for chunks in part.values() for chunk in chunks)


def plan_parts(fine: list[dict], workers: int) -> list[dict]:
    """Fine parts ({input name: [encoded chunks]}) merged into the parts the workers take, in
    order: largest fine parts first, grouped by guided_sizes. Sized over the fine parts that hold
    data: a step of a few large elements (the writer's shards) has most of its fine parts empty,
    and its parts should shrink by elements."""
    fine = sorted((piece for piece in fine if _has_data(piece)), key=_size, reverse=True)
    parts, start = [], 0
    for size in guided_sizes(len(fine), workers):
        merged: dict = {}
        for piece in fine[start:start + size]:
            for name, chunks in piece.items():
                merged.setdefault(name, []).extend(chunks)
        parts.append(merged)
        start += size
    return parts


class BalancedBundleManager(fn_runner.ParallelBundleManager):
    """ParallelBundleManager whose workers pull parts from a queue (see the module docstring)."""

    def process_bundle(self, inputs, expected_outputs, fired_timers, expected_output_timers,
                       dry_run: bool = False):
        n_fine = self._num_workers * FINE_PARTS_PER_WORKER
        fine: list[dict] = [{} for _ in range(n_fine)]
        for name, buffer in inputs.items():
            # A buffer may come back in fewer parts (Beam's grouping buffer keeps its first cut).
            for ix, part in enumerate(buffer.partition(n_fine)):
                fine[ix][name] = part
        parts = plan_parts(fine, self._num_workers) or [{name: [] for name in inputs}]
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for ix, part in enumerate(parts):
            # The first part always runs and carries the fired timers, as in Beam's manager.
            if ix == 0 or _has_data(part):
                todo.put((part, fired_timers if ix == 0 else {}))
        results: list = []
        failures: list[BaseException] = []
        lock = threading.Lock()

        def work(handler) -> None:
            pinned = _OnOneWorker(self.bundle_context_manager, handler)
            while not failures:
                try:
                    part, timers = todo.get_nowait()
                except queue.Empty:
                    return
                manager = fn_runner.BundleManager(pinned, self._progress_frequency,
                                                  cache_token_generator=self._cache_token_generator)
                try:
                    outcome = manager.process_bundle(part, expected_outputs, timers,
                                                     expected_output_timers, dry_run)
                except BaseException as exc:  # noqa: BLE001 - raised in the runner's thread below
                    with lock:
                        failures.append(exc)
                    return
                with lock:
                    results.append(outcome)

        threads = [threading.Thread(target=work, args=(handler,), name=f"mg-geo-bundles-{i}", daemon=True)
                   for i, handler in enumerate(self.bundle_context_manager.worker_handlers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return _merged(results)


def _merged(results: list):
    """(InstructionResponse, split results) of all parts, merged as ParallelBundleManager does."""
    merged = None
    splits: list = []
    for result, split_results in results:
        splits += split_results
        if merged is None:
            merged = result
            continue
        merged = beam_fn_api_pb2.InstructionResponse(
            process_bundle=beam_fn_api_pb2.ProcessBundleResponse(
                monitoring_infos=monitoring_infos.consolidate(
                    list(result.process_bundle.monitoring_infos)
                    + list(merged.process_bundle.monitoring_infos))),
            error=result.error or merged.error)
    assert merged is not None
    return merged, splits


class BalancedFnApiRunner(fn_runner.FnApiRunner):
    """FnApiRunner that hands out each parallel step's work in parts as workers finish."""

    def _get_bundle_manager(self, bundle_context_manager):
        manager = super()._get_bundle_manager(bundle_context_manager)
        if type(manager) is fn_runner.ParallelBundleManager:  # noqa: E721 - exactly Beam's
            return BalancedBundleManager(bundle_context_manager, self._progress_frequency,
                                         cache_token_generator=manager._cache_token_generator)
        return manager

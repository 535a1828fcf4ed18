"""Beam worker settings that Beam has no option for: how much output a bundle buffers before
handing it to the runner, and how long a bundle's end waits for Beam's state sampler.

Beam's SDK harness buffers each output of a bundle in a native stream until it holds 10 MB
(`data_plane._DEFAULT_SIZE_FLUSH_THRESHOLD`, bound as a default argument of the buffering
streams), growing the stream by doubling. The build's first step has several outputs (the thin
records, the dedupe group entries, the cells), so on the in-process runner, and in each local
worker, tens of MB of native memory sat in half-full streams: on a 20k-photo build the peak was
491-495 MiB with 10 MB and 475-482 MiB with 1 MB (bench/bench_memory.py), at the same speed. Gaps
between flushes of 1 MB are still far above gRPC's per-message costs.

Beam's state sampler (the thread that samples which step a bundle is in, for its time-per-step
metrics) sleeps between samples, growing its sleep from 2 ms to 200 ms as a bundle runs, and a
bundle ends only when that thread, woken by its sleep, has exited: every bundle longer than a
second waited 100 ms on average, with both CPUs idle. The local runner hands a step out in many
parts (pipeline.balanced_runner): py-spy showed each worker of a 20k-photo build waiting there
0.6 s of its ~18 s. Sampling every 20 ms bounds that wait at 20 ms; the thread's wake-ups cost
microseconds (it runs without the GIL).

Applied by run_build before it forks its workers: the in-process runner and the workers forked
from the build's process use it; fresh interpreters and remote workers keep Beam's own. (It
changes the process's Beam for good: a build's process is one that builds.)
If a Beam release changes these streams, nothing is changed (and the log says so)."""
from __future__ import annotations

import logging

from apache_beam.runners.worker import data_plane, statesampler

OUTPUT_FLUSH_BYTES = 1 << 20
STATE_SAMPLING_MS = 20
log = logging.getLogger(__name__)


def _default_index(function, name: str):
    """Where `name`'s default sits in function.__defaults__; None where the parameter or its
    default is not there (a changed Beam: left alone)."""
    code = function.__code__
    names = code.co_varnames[:code.co_argcount]
    first = len(names) - len(function.__defaults__ or ())
    return names.index(name) - first if name in names and names.index(name) >= first else None


def _set_default(function, name: str, value) -> None:
    defaults = list(function.__defaults__)
    defaults[_default_index(function, name)] = value
    function.__defaults__ = tuple(defaults)


def shorten_state_sampling(period_ms: int = STATE_SAMPLING_MS) -> bool:
    """Make the bundles' state samplers sample every `period_ms` (see the module docstring); False
    (and a debug line) where StateSampler no longer looks as expected."""
    init = statesampler.StateSampler.__init__
    if _default_index(init, "sampling_period_ms") is None:
        log.debug("Beam's StateSampler changed; its sampling period is left alone")
        return False
    _set_default(init, "sampling_period_ms", period_ms)
    return True


def limit_output_buffers(flush_bytes: int = OUTPUT_FLUSH_BYTES) -> bool:
    """Make the SDK harness's buffering output streams flush at `flush_bytes`; False (and a
    debug line) where their constructors no longer look as expected."""
    inits = [cls.__init__ for cls in (data_plane.SizeBasedBufferingClosableOutputStream,
                                      data_plane.TimeBasedBufferingClosableOutputStream)]
    if any(_default_index(init, "size_flush_threshold") is None for init in inits):
        log.debug("Beam's output streams changed; their buffer size is left alone")
        return False
    for init in inits:
        _set_default(init, "size_flush_threshold", flush_bytes)
    return True

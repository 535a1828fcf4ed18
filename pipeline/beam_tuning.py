"""A Beam worker setting that Beam has no option for: how much output a bundle buffers before
handing it to the runner.

Beam's SDK harness buffers each output of a bundle in a native stream until it holds 10 MB
(`data_plane._DEFAULT_SIZE_FLUSH_THRESHOLD`, bound as a default argument of the buffering
streams), growing the stream by doubling. The build's first step has several outputs (the thin
records, the dedupe group entries, the cells), so on the in-process runner, and in each local
worker, tens of MB of native memory sat in half-full streams: on a 20k-photo build the peak was
491-495 MiB with 10 MB and 475-482 MiB with 1 MB (bench/bench_memory.py), at the same speed. Gaps
between flushes of 1 MB are still far above gRPC's per-message costs.

Applied by run_build before it forks its workers: the in-process runner and the workers forked
from the build's process use it; fresh interpreters and remote workers keep Beam's own. (It
changes the process's Beam for good: a build's process is one that builds.)
If a Beam release changes these streams, nothing is changed (and the log says so)."""
from __future__ import annotations

import logging

from apache_beam.runners.worker import data_plane

OUTPUT_FLUSH_BYTES = 1 << 20
log = logging.getLogger(__name__)


def limit_output_buffers(flush_bytes: int = OUTPUT_FLUSH_BYTES) -> bool:
    """Make the SDK harness's buffering output streams flush at `flush_bytes`; False (and a
    debug line) where their constructors no longer look as expected."""
    classes = (data_plane.SizeBasedBufferingClosableOutputStream,
               data_plane.TimeBasedBufferingClosableOutputStream)
    for cls in classes:
        code = cls.__init__.__code__
        names = code.co_varnames[1:code.co_argcount]
        defaults = cls.__init__.__defaults__ or ()
        if "size_flush_threshold" not in names or len(defaults) != len(names):
            log.debug("Beam's %s changed; its output buffer size is left alone", cls.__name__)
            return False
    for cls in classes:
        code = cls.__init__.__code__
        names = code.co_varnames[1:code.co_argcount]
        defaults = list(cls.__init__.__defaults__)
        defaults[names.index("size_flush_threshold")] = flush_bytes
        cls.__init__.__defaults__ = tuple(defaults)
    return True

"""The SDK harness's output streams hand data over in 1 MB pieces once pipeline.build is loaded."""
from __future__ import annotations

from apache_beam.runners.worker import data_plane

import pipeline.build  # noqa: F401 - importing it applies pipeline.beam_tuning
from pipeline.beam_tuning import OUTPUT_FLUSH_BYTES, limit_output_buffers


def _flushes(time_limit_ms: int) -> list[int]:
    flushed: list[int] = []
    stream = data_plane.ClosableOutputStream.create(lambda data: None, lambda data: flushed.append(len(data)),
                                                    time_limit_ms)
    chunk = b"x" * (256 << 10)
    for _ in range(12):  # 3 MB, element by element as the harness writes them
        stream.write(chunk)
        stream.maybe_flush()
    stream.close()
    return flushed


def test_output_streams_flush_at_one_megabyte():
    assert limit_output_buffers() is True
    for time_limit_ms in (0, 60_000):  # size-based, and time-based with a far-off timer
        flushed = _flushes(time_limit_ms)
        # Beam's own 10 MB would not flush 3 MB at all before close.
        assert len(flushed) == 2 and all(OUTPUT_FLUSH_BYTES < n <= OUTPUT_FLUSH_BYTES + (256 << 10) for n in flushed)

"""The SDK harness's output streams hand data over in 1 MB pieces once limit_output_buffers ran,
and a bundle's end waits for its state sampler at most STATE_SAMPLING_MS once
shorten_state_sampling ran (run_build runs both before forking its workers)."""
from __future__ import annotations

import time

from apache_beam.runners.worker import data_plane, statesampler
from apache_beam.utils.counters import CounterFactory

from pipeline.beam_tuning import (OUTPUT_FLUSH_BYTES, STATE_SAMPLING_MS, limit_output_buffers,
                                  shorten_state_sampling)


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


def test_a_bundle_end_waits_at_most_one_short_sampling_period():
    """Beam's own sleeps grow from 2 ms to 200 ms while a bundle runs (by 1.2 s they are 200 ms),
    and stopping the sampler (every bundle's end) waits for the current sleep to end: with Beam's
    period these stops would wait about 135 and 85 ms."""
    assert shorten_state_sampling() is True
    waits = []
    for running_s in (1.2, 1.25):
        sampler = statesampler.StateSampler("test", CounterFactory())
        assert sampler.sampling_period_ms == STATE_SAMPLING_MS
        sampler.start()
        time.sleep(running_s)
        start = time.perf_counter()
        sampler.stop()
        waits.append(time.perf_counter() - start)
    assert max(waits) < 0.06, waits


def test_a_build_applies_it_in_its_own_process_only(tmp_path, exif_samples):
    """Importing pipeline.build changes nothing; run_build does, before it forks its workers."""
    from fresh_process import run_python

    script = (
        "import sys\n"
        "from apache_beam.runners.worker import data_plane\n"
        "from pipeline.build import BuildConfig, run_build\n"
        "from apache_beam.runners.worker import statesampler\n"
        "from apache_beam.utils.counters import CounterFactory\n"
        "size = lambda: data_plane.SizeBasedBufferingClosableOutputStream.__init__.__defaults__[2]\n"
        "period = lambda: statesampler.StateSampler('t', CounterFactory()).sampling_period_ms\n"
        "print(size(), period())\n"
        "run_build(BuildConfig(sources=[sys.argv[1]], out=sys.argv[2]), [])\n"
        "print(size(), period())\n")
    done = run_python(["-c", script, f"exif:{exif_samples / 'gps'}", str(tmp_path / "out")])
    assert done.stdout.split()[-4:] == [str(10 << 20), "200", str(OUTPUT_FLUSH_BYTES), str(STATE_SAMPLING_MS)]

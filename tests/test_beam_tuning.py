"""The SDK harness's output streams hand data over in 1 MB pieces once limit_output_buffers ran
(run_build runs it before forking its workers)."""
from __future__ import annotations

from apache_beam.runners.worker import data_plane

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


def test_a_build_applies_it_in_its_own_process_only(tmp_path, exif_samples):
    """Importing pipeline.build changes nothing; run_build does, before it forks its workers."""
    from fresh_process import run_python

    script = (
        "import sys\n"
        "from apache_beam.runners.worker import data_plane\n"
        "from pipeline.build import BuildConfig, run_build\n"
        "size = lambda: data_plane.SizeBasedBufferingClosableOutputStream.__init__.__defaults__[2]\n"
        "print(size())\n"
        "run_build(BuildConfig(sources=[sys.argv[1]], out=sys.argv[2]), [])\n"
        "print(size())\n")
    done = run_python(["-c", script, f"exif:{exif_samples / 'gps'}", str(tmp_path / "out")])
    assert done.stdout.split()[-2:] == [str(10 << 20), str(OUTPUT_FLUSH_BYTES)]

"""Issue 17: OUT is ours before a build replaces what is in it, one build at a time writes it,
the same source twice is refused, and every bad flag or failure ends in one line and a status."""
from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from pipeline.cli import main
from fresh_process import REPO, child_env


@pytest.fixture
def photos(tmp_path, exif_samples):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("DSCN0010.jpg", "DSCN0021.jpg"):
        shutil.copy(exif_samples / "gps" / name, folder / name)
    return folder


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "mg-geo" in line or "Traceback" in line]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_the_same_source_twice_stops_with_one_line(photos, tmp_path, capsys):
    """Before: every sample went twice into one tar, which webdataset refuses to read."""
    out = tmp_path / "out"
    assert main(["build", "--source", f"exif:{photos}", "--source", f"exif:{photos}/", "--out", str(out)]) == 2
    assert "given twice" in one_error_line(capsys)
    assert not out.exists()


def test_an_out_mg_geo_did_not_make_is_refused_unless_overwrite(photos, capsys):
    """`--out .` in a photo folder deleted the user's README.md; now OUT must carry mg-geo's mark."""
    (photos / "README.md").write_text("my holiday notes\n")
    argv = ["build", "--source", f"exif:{photos}", "--out", str(photos)]
    assert main(argv) == 2
    assert "was not made by mg-geo" in one_error_line(capsys) and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert (photos / "README.md").read_text() == "my holiday notes\n"
    assert sorted(p.name for p in photos.iterdir()) == ["DSCN0010.jpg", "DSCN0021.jpg", "README.md"]
    assert main([*argv, "--overwrite"]) == 0
    assert (photos / ".mg-geo").is_file() and "# MG-Geo corpus" in (photos / "README.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0  # marked now: a rerun replaces its own outputs without being told


def test_a_second_build_into_a_locked_out_stops(photos, tmp_path, capsys):
    """Two builds into one OUT mixed their shards and manifests, both exit 0. A live process
    holding OUT's lock stops the second; a dead one's lock is taken over."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".mg-geo").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        import socket
        (out / ".mg-geo.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        argv = ["build", "--source", f"exif:{photos}", "--out", str(out)]
        assert main(argv) == 2
        assert f"in use by another build (pid {holder.pid}" in one_error_line(capsys)
        assert sorted(p.name for p in out.iterdir()) == [".mg-geo", ".mg-geo.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the holder is gone: its lock is stale
    assert not (out / ".mg-geo.lock").exists() and (out / "report.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--max_side", "256"], "unknown flag --max_side (neither mg-geo nor Apache Beam knows it); did you mean --max-side?"),
    (["--clue-fraction", "0.1"], "did you mean --clue-target?"),
    (["--max-side", "0"], "argument --max-side: must be >= 32"),
    (["--dedupe-radius", "-1"], "argument --dedupe-radius: must be >= 0"),
    (["--max-place-km", "nan"], "argument --max-place-km: must be a finite number"),
    (["--runner", "NoSuchRunner"], "--runner: Unexpected pipeline runner: NoSuchRunner"),
    (["--dry_run"], "argument --dry_run: expected one argument"),
])
def test_a_bad_flag_is_one_line_and_exit_2(photos, tmp_path, capsys, flags, message):
    """Before: unknown flags were dropped by Beam with a warning (a build at 768 for --max_side
    256); bad numbers and runners ended in tracebacks of 24-209 lines."""
    out = tmp_path / "out"
    assert main(["build", "--source", f"exif:{photos}", "--out", str(out), *flags]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()  # nothing touched


def _limit_file_size():
    # A disk that fills up: every write past 64 KB fails (EFBIG) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))


def test_a_full_disk_is_one_line_exit_1_and_leaves_no_partial_file(photos, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--source", f"exif:{photos}",
                           "--out", str(out)], env=child_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size)
    assert done.returncode == 1, done.stderr[-2000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("mg-geo build:")]
    assert len(ours) == 1 and "failed:" in ours[0] and "Traceback" not in done.stderr, done.stderr[-3000:]
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == [".mg-geo"], left  # no half shard, no _tmp, no lock


def test_the_progress_line_says_records_per_stage_rate_and_time_left():
    """A long build said nothing on the driver between its start and its report."""
    from pipeline.beam.wrapper import Progress

    counts = {"read": {"in": 300, "out": 290, "rejected": 10}, "image": {"in": 150, "out": 150, "rejected": 0}}
    progress = Progress(total_inputs=900, counts=counts)
    line = progress.line(now=progress.started + 60)
    assert line == ("build running 60s; read 300 done (5.0/s, 10 rejected); image 150 done (2.5/s, 0 rejected); "
                    "~120s left of the first stage (300/900 inputs)")
    assert "worker processes" in Progress(counts={}).line(now=progress.started + 1)


def test_verbose_is_mg_geo_debug_not_beams(photos, tmp_path, capsys):
    """-v printed 3,600 lines of Beam's debug output for a small build."""
    assert main(["-v", "build", "--source", f"exif:{photos}", "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert not [line for line in lines if " apache_beam." in line and (" DEBUG " in line or " INFO " in line)]
    assert len(lines) < 100, len(lines)


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_partial_file(tmp_path):
    """Ctrl-C in the middle of a build printed a long traceback and left OUT/_tmp behind. The
    signal is sent as soon as the job has stashed records (OUT/_tmp exists): mid-way, with
    thousands of records still to go."""
    import time

    from pipeline.io.sample_set import write_samples

    photos, out = tmp_path / "photos", tmp_path / "out"
    write_samples(str(photos / "0"), 200, seed=3)
    for i in range(1, 15):  # 3,000 inputs (copies: dedupe's work), so the job runs for seconds
        shutil.copytree(photos / "0", photos / str(i))
    # As from a terminal: a test run started in the background (CI under `&`) ignores SIGINT, and a
    # child would inherit that; Python only turns SIGINT into KeyboardInterrupt where it is not ignored.
    build = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", "--source", f"exif:{photos}",
                              "--out", str(out)], env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "_tmp").exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert build.poll() is None, "the build ended before it could be interrupted"
    build.send_signal(signal.SIGINT)
    _, stderr = build.communicate(timeout=120)
    assert build.returncode == 130, stderr[-2000:]
    ours = [line for line in stderr.splitlines() if line.startswith("mg-geo build:")]
    assert len(ours) == 1 and "interrupted" in ours[0] and "Traceback" not in stderr, stderr[-3000:]
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == [".mg-geo"], left  # no half shard, no _tmp, no lock

"""`build --download` with the download beside the build (pipeline.download_background): the
build reads each shard once img2dataset has finished it, makes the same corpus as downloading
first, and a download that fails ends the build with the download's own error."""
from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fresh_process import REPO, child_env
from pipeline.download import DownloadIncomplete
from pipeline.gc_pause import gc_paused
from pipeline.download_background import BackgroundDownload, DownloadHelper, ShardWait, _process_running, start_helper

GPS = ["DSCN0010", "DSCN0012", "DSCN0021", "DSCN0025", "DSCN0027", "DSCN0029", "DSCN0038", "DSCN0040"]


def _status(path: Path, **status) -> None:
    path.write_text(json.dumps(status))


def test_a_shard_is_read_once_img2dataset_marks_it_finished(tmp_path):
    shard = tmp_path / "00003.tar"
    wait = ShardWait(os.getpid(), str(tmp_path / "status.json"))  # a process that runs
    marker = threading.Timer(0.3, (tmp_path / "00003_stats.json").write_text, ["{}"])
    started = time.perf_counter()
    marker.start()
    wait.wait(str(shard))
    assert 0.25 < time.perf_counter() - started < 5


def test_a_shard_the_download_ended_without_raises_its_reason(tmp_path):
    _status(tmp_path / "status.json", ok=False, error="img2dataset did not finish shard(s) 00001")
    with pytest.raises(DownloadIncomplete, match=r"00001.tar: img2dataset did not finish shard\(s\) 00001"):
        ShardWait(os.getpid(), str(tmp_path / "status.json")).wait(str(tmp_path / "00001.tar"))
    (tmp_path / "00000_stats.json").write_text("{}")  # finished before the download failed: read
    ShardWait(os.getpid(), str(tmp_path / "status.json")).wait(str(tmp_path / "00000.tar"))


def test_a_download_process_gone_without_a_report_ends_the_wait(tmp_path):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while _process_running(pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # ended, not yet reaped: a zombie, which does not run
        with pytest.raises(DownloadIncomplete, match=f"process {pid} ended without a report"):
            ShardWait(pid, str(tmp_path / "status.json")).wait(str(tmp_path / "00000.tar"))
    finally:
        os.waitpid(pid, 0)
    assert not _process_running(pid)


class _FakeDownload:
    """What BackgroundDownload needs of a PreparedDownload: spec, tmp and run()."""

    def __init__(self, tmp: Path, outcome):
        self.spec, self.tmp, self.outcome = "table:urls.csv", str(tmp), outcome

    def run(self):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if self.outcome == "sleep":
            time.sleep(60)
        return self.outcome


def test_the_child_reports_a_summary_or_the_download_error(tmp_path):
    done = BackgroundDownload(_FakeDownload(tmp_path, {"rows": 3, "downloaded": 2}))
    assert done.finish() == {"rows": 3, "downloaded": 2} and done.failed() is None
    (tmp_path / "status.json").unlink()
    failed = BackgroundDownload(_FakeDownload(tmp_path, DownloadIncomplete("shard 00002 lost")))
    with pytest.raises(DownloadIncomplete, match="shard 00002 lost"):
        failed.finish()
    assert failed.failed() == "shard 00002 lost"


def test_stop_ends_a_download_still_running(tmp_path):
    running = BackgroundDownload(_FakeDownload(tmp_path, "sleep"))
    started = time.perf_counter()
    running.stop()
    assert time.perf_counter() - started < 10 and running.exit_code == -15  # SIGTERM, reaped
    assert not _process_running(running.pid)


@pytest.mark.parametrize("download, sources, beam_args, switch", [
    (False, ["table:t.csv"], [], "1"),                      # no --download
    (True, ["exif:photos"], [], "1"),                       # nothing to download
    (True, ["table:t.csv"], ["--runner=DataflowRunner"], "1"),  # the download runs first there
    (True, ["table:t.csv"], ["--dry_run=True"], "1"),
    (True, ["table:t.csv"], [], "0"),                       # MG_GEO_FORK_WORKERS=0
])
def test_no_helper_where_no_download_runs_beside_the_build(monkeypatch, download, sources, beam_args, switch):
    monkeypatch.setenv("MG_GEO_FORK_WORKERS", switch)
    assert start_helper(download, sources, beam_args) is None


def test_a_helper_not_handed_a_download_ends_and_is_reaped(monkeypatch):
    monkeypatch.setenv("MG_GEO_FORK_WORKERS", "1")
    monkeypatch.setattr("pipeline.download_background.may_fork", lambda *a, **k: True)  # this process has threads
    helper = start_helper(True, ["table:t.csv"], [])
    assert isinstance(helper, DownloadHelper) and _process_running(helper.pid)
    helper.close()
    assert not _process_running(helper.pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(helper.pid, os.WNOHANG)  # reaped already


def test_a_helper_runs_the_download_it_is_handed_even_without_img2dataset_imported(monkeypatch, tmp_path):
    """The early import is only a head start: where it fails, the download runs and reports
    (here a stand-in download that succeeds)."""
    def no_img2dataset():
        raise ImportError("No module named 'img2dataset'")
    monkeypatch.setattr("pipeline.download_background.import_img2dataset", no_img2dataset)
    helper = DownloadHelper()
    running = BackgroundDownload(_FakeDownload(tmp_path, {"rows": 2, "downloaded": 2}), helper)
    assert running.pid == helper.pid and running.finish() == {"rows": 2, "downloaded": 2}
    helper.close()  # nothing left to reap: BackgroundDownload did


class _GcState(_FakeDownload):
    def run(self):
        return {"gc_enabled": gc.isenabled()}


def test_a_helper_forked_while_the_collector_is_paused_collects_during_its_download(tmp_path):
    """The command line forks it inside its gc pause (pipeline.gc_pause)."""
    with gc_paused():
        helper = DownloadHelper()
    running = BackgroundDownload(_GcState(tmp_path, None), helper)
    assert running.finish() == {"gc_enabled": True}


def test_a_helper_gone_before_its_download_is_replaced_by_a_fresh_child(tmp_path):
    helper = DownloadHelper()
    os.kill(helper.pid, signal.SIGKILL)
    while _process_running(helper.pid):
        time.sleep(0.01)
    running = BackgroundDownload(_FakeDownload(tmp_path, {"rows": 1, "downloaded": 1}), helper)
    assert running.pid != helper.pid and running.finish() == {"rows": 1, "downloaded": 1}
    with pytest.raises(ChildProcessError):
        os.waitpid(helper.pid, os.WNOHANG)  # the dead helper was reaped


def _table(tmp_path: Path, exif_samples: Path) -> Path:
    """Local photo paths (img2dataset fetches them as file:// URLs), one missing file, one row
    without coordinates: 10 rows in 2 shards of 5."""
    table = tmp_path / "photos.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "lat", "lon"])
        for i, name in enumerate(GPS):
            writer.writerow([name, exif_samples / "gps" / f"{name}.jpg", f"{43.4667 + i / 1000:.4f}", "11.8833"])
        writer.writerow(["missing", tmp_path / "not-there.jpg", "43.0", "11.0"])
        writer.writerow(["no-lat", exif_samples / "gps" / "DSCN0010.jpg", "", "11.0"])
    return table


def _build(table: Path, out: Path, fork: str, script: str | None = None):
    import subprocess
    import sys

    argv = ["build", "--source", f"table:{table}", "--image-column", "path", "--out", str(out), "--download",
            "--download-processes", "2", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    code = script or "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=child_env(MG_GEO_FORK_WORKERS=fork, NO_ALBUMENTATIONS_UPDATE="1"))


def _corpus(out: Path) -> tuple:
    key = lambda r: (r["source"], r["input_id"])  # noqa: E731 - ledger pieces merge in any order
    tars = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "meta").rglob("*.tar"))}
    return (tars, pq.read_table(out / "manifest.parquet").to_pylist(),
            sorted(pq.read_table(out / "rejected.parquet").to_pylist(), key=key))


def test_the_build_beside_the_download_makes_the_corpus_of_a_download_first(tmp_path, exif_samples):
    table, out = _table(tmp_path, exif_samples), tmp_path / "out"
    beside = _build(table, out, "1")
    assert beside.returncode == 0, beside.stderr[-3000:]
    assert "while the build reads its finished shards" in beside.stderr
    report = json.loads((out / "report.json").read_text())
    tars, manifest, ledger = _corpus(out)
    # The same OUT (sample keys come from the source, which names OUT/_download/), downloaded anew.
    shutil.rmtree(out)
    first = _build(table, out, "0")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "while the build reads its finished shards" not in first.stderr
    assert (tars, manifest, ledger) == _corpus(out)
    assert len(manifest) == len(GPS) and {r["reason"] for r in ledger} == {"download_failed", "coords_missing"}
    assert report["conservation_ok"] and report["inputs_total"] == len(GPS) + 2
    assert report["stages"]["source"]["wait_micros"] > 0  # waited for shards, not counted as work


# Notes whether Beam was loaded when the command forked the download's process, and whether that
# process was then handed the download.
SPY_ON_HELPER = """
import json, sys
from pipeline import download_background as bg
seen = {}
init, hand_over = bg.DownloadHelper.__init__, bg.DownloadHelper.hand_over
def spy_init(self):
    seen["beam_loaded_at_fork"] = "apache_beam" in sys.modules
    init(self)
def spy_hand_over(self, *args):
    seen["handed_over"] = True
    hand_over(self, *args)
bg.DownloadHelper.__init__, bg.DownloadHelper.hand_over = spy_init, spy_hand_over
from pipeline.cli import main
code = main(sys.argv[1:])
print("SEEN " + json.dumps(seen))
sys.exit(code)
"""


def test_the_download_process_is_forked_before_beam_is_imported(tmp_path, exif_samples):
    """So that it imports img2dataset while the build's process imports Beam (the module docstring)."""
    done = _build(_table(tmp_path, exif_samples), tmp_path / "out", "1", SPY_ON_HELPER)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.split("SEEN ", 1)[1])
    assert seen == {"beam_loaded_at_fork": False, "handed_over": True}
    assert len(pq.read_table(tmp_path / "out" / "manifest.parquet")) == len(GPS)


# The download fails after the build has started (img2dataset wrote no shard): the workers waiting
# for the shards stop, and the command reports the download's error, as a download first would.
FAILING_DOWNLOAD = """
import sys, time
from pipeline import download
def run(self):
    time.sleep(0.5)
    raise download.DownloadIncomplete("img2dataset did not finish shard(s) 00000, 00001 (injected)")
download.PreparedDownload.run = run
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_download_fails_the_build_with_its_reason(tmp_path, exif_samples):
    done = _build(_table(tmp_path, exif_samples), tmp_path / "out", "1", FAILING_DOWNLOAD)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "while the build reads its finished shards" in done.stderr
    assert done.stderr.rstrip().endswith(
        "mg-geo build: error: img2dataset did not finish shard(s) 00000, 00001 (injected) (run again to resume)")
    assert not (tmp_path / "out" / "manifest.parquet").exists()

"""The plots' helper process (pipeline.plotter): the same PNGs as drawing them in the build's
process, and a helper that dies or fails leaves the plots (or the error) to the build."""
from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

from fresh_process import child_env, run_mg_geo, run_python
from pipeline.stats import make_plots


def _pngs(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "plots").glob("*.png"))}


def test_the_helper_draws_what_the_build_process_draws(tmp_path, exif_samples):
    out = tmp_path / "out"
    run_mg_geo(["build", "--source", f"exif:{exif_samples}", "--out", str(out)], child_env())
    report = json.loads((out / "report.json").read_text())
    assert report["timing"]["plots_process"] is True
    drawn_by_helper = _pngs(out)
    assert set(drawn_by_helper) == {"world_map.png", "countries.png", "splits.png", "rejections.png"}
    assert report["plots"] == [f"plots/{name}" for name in
                               ("world_map.png", "countries.png", "splits.png", "rejections.png")]
    assert make_plots(str(out), report) == report["plots"]  # drawn again, here, over them
    assert _pngs(out) == drawn_by_helper


# In a fresh process (a test process holds threads; a fork of it could inherit a held lock).
FALLBACKS = textwrap.dedent("""
    import json, os, signal, sys
    from pipeline.plotter import Plotter
    from pipeline.stats import make_plots
    out, broken = sys.argv[1], sys.argv[2]
    report = json.load(open(os.path.join(out, "report.json")))
    expected = make_plots(out, report)

    killed = Plotter()
    os.kill(killed.pid, signal.SIGKILL)  # died: the build draws the plots itself
    assert killed.make_plots(out, report) == expected

    failing = Plotter()  # drawing raises (a broken manifest): the build draws, and raises the same error
    try:
        failing.make_plots(broken, report)
    except Exception as exc:
        print("raised", type(exc).__name__)
    unused = Plotter()
    unused.close()  # the build failed before the plots: the helper leaves when told
    print("ok")
""")


def test_a_helper_that_died_or_failed_leaves_the_plots_to_the_build(tmp_path, exif_samples):
    out = tmp_path / "out"
    run_mg_geo(["build", "--source", f"exif:{exif_samples / 'gps'}", "--out", str(out)], child_env())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.parquet").write_bytes(b"not a parquet file")
    done = run_python(["-c", FALLBACKS, str(out), str(tmp_path / "broken")], timeout=120)
    assert done.stdout.split() == ["raised", "ArrowInvalid", "ok"], done.stdout
    assert "the plots' process ended early" in done.stderr
    assert "the plots' process failed; drawing them here" in done.stderr

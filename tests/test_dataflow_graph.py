"""The Dataflow job graph is translated and checked offline (Beam's --dry_run=True): no
credentials, no staging bucket touched, nothing submitted. Needs the `gcp` extra."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient",
                    reason="Dataflow needs the gcp extra: pip install -e '.[gcp]'")

from pipeline.cli import main  # noqa: E402


def test_dataflow_accepts_the_job_graph_without_submitting(exif_samples, tmp_path, capsys):
    out = tmp_path / "never-written"
    rc = main(["build", "--source", f"exif:{exif_samples / 'gps'}", "--out", str(out),
               "--runner=DataflowRunner", "--dry_run=True", "--project=mg-geo-test", "--region=europe-west4",
               "--temp_location=gs://mg-geo-test-bucket/tmp"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dry_run"] and summary["runner"] == "DataflowRunner"
    assert summary["job_name"] and summary["transforms"] > 50
    assert not out.exists()  # a dry run writes nothing

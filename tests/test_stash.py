"""The stash: whole records written once, thin copies flowing on, whole records read back."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that

from pipeline.core.record import Record, make_key
from pipeline.io.stash import STASH_DIR, BundleStash, StashReader, load, stash, unstash


def _whole(i: int) -> Record:
    input_id = f"photo_{i}.jpg"
    return Record(key=make_key("exif:/x", input_id), source="exif:/x", input_id=input_id,
                  image_bytes=bytes([i % 256]) * (1000 + i), lat=1.0 + i, lon=2.0,
                  image={"sha256": f"{i:064x}", "phash": f"{i:016x}", "jpeg_bytes": 1000 + i, "width": 9},
                  location={"country_code": "FR", "country": "France"}, meta={"messages": [i]})


def test_bundle_stash_appends_records_to_one_file_and_gives_them_back(tmp_path):
    wholes = [_whole(i) for i in range(30)]
    already = stash(_whole(99), str(tmp_path))  # a thin copy passes through untouched

    def check(thin_copies):
        thin_copies = sorted(thin_copies, key=lambda r: r.input_id)
        assert len(thin_copies) == 31
        refs = [r.stash_ref for r in thin_copies if r.key != already.key]
        assert len({ref.rpartition("#")[0] for ref in refs}) == 1  # one bundle, one file
        assert all(r.image_bytes is None and r.meta is None for r in thin_copies)
        by_key = {w.key: w for w in wholes}
        for thin in thin_copies:
            if thin.key == already.key:
                assert thin == already
                continue
            back = unstash(thin.replace(split="val"))
            assert back == by_key[thin.key].replace(split="val")
            assert load(thin.stash_ref, None) == by_key[thin.key]
        # The writer's reader: each file opened once, the records read back in any order.
        with StashReader() as reader:
            for thin in reversed(thin_copies):
                want = _whole(99) if thin.key == already.key else by_key[thin.key]
                assert reader.load(thin.stash_ref, "test") == want.replace(split="test")
            assert len(reader.streams) == 1  # the bundle's file; stash()'s own file is read whole
        assert not reader.streams

    with beam.Pipeline(runner=FnApiRunner()) as p:
        thin = p | beam.Create(wholes + [already]) | beam.ParDo(BundleStash(str(tmp_path)))
        assert_that(thin, check)
    files = sorted((tmp_path / STASH_DIR).iterdir())
    assert len(files) == 2  # the bundle's file, and stash()'s file for the one passed through
    assert sum(f.stat().st_size for f in files if f.suffix == ".records") > sum(1000 + i for i in range(30))

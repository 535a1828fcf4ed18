"""Dedupe: banding finds every pair within the radius, components keep one deterministic image,
real re-encoded copies are caught and distinct photos are not, and Beam matches the reference."""
from __future__ import annotations

import hashlib
import io
import random
import apache_beam as beam
import imagehash
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipeline.global_steps import dedupe
from pipeline.beam.wrapper import stage_metrics
from pipeline.global_steps.dedupe import (Dedupe, ImageInfo, band_keys, band_layout, dedupe_records,
                             edges_in_group, find_duplicates, group_edges, group_entries,
                             image_info, pack_member, pack_shard, plan_rejects, resolve, shard_edges,
                             shard_of, unpack_member, unpack_shard)
from pipeline.core.record import Record
from pipeline.global_steps.unionfind import UnionFind

def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def flip(value: int, n_bits: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), n_bits):
        value ^= 1 << bit
    return value


def make_record(key: str, data: bytes, source: str = "test") -> Record:
    """A record as the image stage leaves it: facts about the source bytes."""
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        phash = str(imagehash.phash(im))
    return Record(key=key, source=source, input_id=key + ".jpg", image_bytes=data, lat=1.0, lon=2.0,
                  image={"sha256": hashlib.sha256(data).hexdigest(), "phash": phash,
                         "orig_width": width, "orig_height": height})


def synthetic(key: str, phash: int, sha: str = "", area: int = 100) -> Record:
    return Record(key=key, source="test", input_id=key,
                  image={"sha256": sha or hashlib.sha256(key.encode()).hexdigest(),
                         "phash": f"{phash:016x}", "orig_width": area, "orig_height": 1})


def clustered_infos(seed: int = 7) -> list[ImageInfo]:
    """Clusters of near hashes, some pairs beyond the radius, some exact byte copies."""
    rng = random.Random(seed)
    infos = []
    for c in range(60):
        centre = rng.getrandbits(64)
        for m in range(rng.randint(1, 8)):
            sha = f"sha-{c}" if m < 2 and c % 3 == 0 else f"sha-{c}-{m}"
            infos.append(ImageInfo(f"c{c:02d}m{m}", sha, flip(centre, rng.randint(0, 6), rng),
                                   rng.choice([100, 200, 300])))
    return infos


def jpeg(im: Image.Image, quality: int = 60) -> bytes:
    out = io.BytesIO()
    im.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo_records(exif_samples) -> dict[str, Record]:
    """Every GPS photo, plus: an exact copy of one under another name, a resized re-encoded
    copy of another, and a cropped re-encoded copy of a third (a near duplicate whose phash
    really differs)."""
    gps = exif_samples / "gps"
    paths = sorted(gps.glob("*.jpg"))
    assert len(paths) >= 5, gps
    records = {p.stem.lower(): make_record(p.stem.lower(), p.read_bytes()) for p in paths}
    records["copy_of_0010"] = make_record("copy_of_0010", (gps / "DSCN0010.jpg").read_bytes())
    with Image.open(gps / "DSCN0012.jpg") as im:
        records["small_0012"] = make_record("small_0012", jpeg(im.resize((320, 240), Image.LANCZOS)))
    with Image.open(gps / "DSCN0025.jpg") as im:
        records["crop_0025"] = make_record("crop_0025", jpeg(im.crop((8, 8, 632, 472))))
    return records


# --- banding -------------------------------------------------------------------------------

@pytest.mark.parametrize("radius", [0, 1, 4, 7, 63])
def test_bands_cover_all_64_bits(radius):
    layout = band_layout(radius)
    assert len(layout) == radius + 1
    assert sum(width for _, width in layout) == 64
    assert [shift for shift, _ in layout] == [sum(w for _, w in layout[:i]) for i in range(len(layout))]


@pytest.mark.parametrize("radius", [-1, 64, 2.5, True, "4"])
def test_bad_radius_is_refused(radius):
    with pytest.raises((ValueError, TypeError)):
        band_layout(radius)
    with pytest.raises((ValueError, TypeError)):
        Dedupe(radius=radius)


@pytest.mark.parametrize("radius", [0, 2, 4, 8])
def test_pigeonhole_every_pair_within_radius_shares_a_band(radius):
    rng = random.Random(radius)
    for _ in range(500):
        a = rng.getrandbits(64)
        b = flip(a, rng.randint(0, radius), rng)
        assert set(band_keys(f"{a:016x}", radius)) & set(band_keys(b, radius))


def test_band_keys_refuses_malformed_hash():
    for bad in ["abc", "zzzzzzzzzzzzzzzz", None, -1, 1 << 64]:
        with pytest.raises(ValueError):
            band_keys(bad, 4)


@pytest.mark.parametrize("block_cells", [dedupe._BLOCK_CELLS, 500])
def test_edges_in_group_equals_brute_force(monkeypatch, block_cells):
    monkeypatch.setattr(dedupe, "_BLOCK_CELLS", block_cells)  # 500: many row blocks
    rng = random.Random(1)
    base = rng.getrandbits(64)
    hashes = [flip(base, rng.randint(0, 7), rng) for _ in range(120)] + [base] * 5
    items = [(f"k{i:03d}", h) for i, h in enumerate(hashes)]
    got = UnionFind(k for k, _ in items)
    for a, b, d in edges_in_group(items, radius=4):
        assert d == hamming(dict(items)[a], dict(items)[b]) <= 4
        got.union(a, b)
    want = UnionFind(k for k, _ in items)
    for i, (ka, ha) in enumerate(items):
        for kb, hb in items[i + 1:]:
            if hamming(ha, hb) <= 4:
                want.union(ka, kb)
    assert sorted(map(sorted, got.components())) == sorted(map(sorted, want.components()))


def test_find_duplicates_matches_all_pairs_on_clustered_hashes():
    """Many clusters of near hashes (some pairs beyond the radius, some exact byte copies):
    the banded search yields exactly the components of the all-pairs comparison."""
    infos = clustered_infos()
    rejects = find_duplicates(infos, radius=4)

    uf = UnionFind(i.key for i in infos)
    for i, a in enumerate(infos):
        for b in infos[i + 1:]:
            if a.sha256 == b.sha256 or hamming(a.phash, b.phash) <= 4:
                uf.union(a.key, b.key)
    by_key = {i.key: i for i in infos}
    expected_kept = {min(comp, key=lambda k: (-by_key[k].area, k)) for comp in uf.components()}
    assert set(by_key) - set(rejects) == expected_kept
    assert len(rejects) == len(infos) - len(uf.components())
    assert len(rejects) > 50  # the data really has duplicates


# --- resolve -------------------------------------------------------------------------------

def test_resolve_keeps_best_rank_per_component():
    edges = [("a", "b"), ("b", "c"), ("x", "y")]
    ranks = {"a": (-10, "a"), "b": (-50, "b"), "c": (-50, "c"), "x": (-1, "x"), "y": (-1, "y")}
    assert resolve(edges, ranks) == {"a": "b", "c": "b", "y": "x"}
    assert resolve([], ranks) == {}


# --- real photos ---------------------------------------------------------------------------

def test_distinct_photos_are_all_kept(photo_records):
    originals = [r for k, r in photo_records.items() if k.startswith("dscn")]
    kept, rejected = dedupe_records(originals)
    assert rejected == [] and len(kept) == len(originals)


def test_real_copies_are_found_and_originals_kept(photo_records):
    # preconditions: copies are new bytes; the crop's phash really differs, within the radius
    for copy, original in [("small_0012", "dscn0012"), ("crop_0025", "dscn0025")]:
        assert photo_records[copy].image["sha256"] != photo_records[original].image["sha256"]
    crop = photo_records["crop_0025"].image["phash"]
    assert 0 < hamming(int(crop, 16), int(photo_records["dscn0025"].image["phash"], 16)) <= 4

    kept, rejected = dedupe_records(photo_records.values())
    assert len(kept) + len(rejected) == len(photo_records)
    by_key = {r.key: r for r in rejected}
    assert set(by_key) == {"dscn0010", "small_0012", "crop_0025"}
    # exact copy: same area, so the smaller key stays ("copy_of_0010" < "dscn0010")
    assert by_key["dscn0010"].reason == "duplicate"
    assert "copy_of_0010" in by_key["dscn0010"].detail
    # re-encoded copies: the larger original stays
    assert by_key["small_0012"].reason == "near_duplicate" and "dscn0012" in by_key["small_0012"].detail
    assert by_key["crop_0025"].reason == "near_duplicate" and "dscn0025" in by_key["crop_0025"].detail
    assert all(r.stage == "dedupe" and "hamming" in r.detail for r in rejected)


def test_a_copy_held_out_for_test_is_the_one_kept(photo_records):
    """OSV-5M's test rows come with their split fixed to test: when one has a copy among the
    training rows, the test image stays and the copy goes, whatever their sizes and keys (keeping
    the larger or first-named one would leave the test image's twin in train)."""
    records = list(photo_records.values())
    test_copy = photo_records["dscn0010"].replace(split="test")  # loses on key to copy_of_0010
    test_small = photo_records["small_0012"].replace(split="test")  # loses on area to dscn0012
    records = [test_copy if r.key == "dscn0010" else test_small if r.key == "small_0012" else r for r in records]
    kept, rejected = dedupe_records(records)
    assert {"dscn0010", "small_0012"} <= {r.key for r in kept}
    by_key = {r.key: r for r in rejected}
    assert by_key["copy_of_0010"].reason == "duplicate" and by_key["dscn0012"].reason == "near_duplicate"


def test_chain_is_one_component_with_one_kept():
    a = 0x0123456789ABCDEF
    b = a ^ 0b111                 # 3 bits from a
    c = b ^ (0b111 << 20)         # 3 bits from b, 6 from a: only linked through b
    records = [synthetic("a", a, area=10), synthetic("b", b, area=30), synthetic("c", c, area=20)]
    kept, rejected = dedupe_records(records, radius=4)
    assert [r.key for r in kept] == ["b"]
    assert {r.key: r.reason for r in rejected} == {"a": "near_duplicate", "c": "near_duplicate"}
    # c is 3 bits from b, the one kept; a too
    assert all("kept b" in r.detail and "hamming 3" in r.detail for r in rejected)

    # a made the largest: it is kept, and c is 6 bits from it (beyond the radius, joined via b)
    kept, rejected = dedupe_records([synthetic("c", c), synthetic("b", b), synthetic("a", a, area=1000)])
    assert [r.key for r in kept] == ["a"]
    rejected = {r.key: r.detail for r in rejected}
    assert "kept a" in rejected["c"] and "hamming 6" in rejected["c"]


def test_radius_is_configurable():
    a = 0xFFFF0000FFFF0000
    records = [synthetic("a", a), synthetic("b", a ^ 0b11111)]  # 5 bits apart
    assert len(dedupe_records(records, radius=4)[1]) == 0
    assert len(dedupe_records(records, radius=5)[1]) == 1


def test_keep_is_independent_of_input_order(photo_records):
    records = list(photo_records.values())
    kept0, rejected0 = dedupe_records(records)
    rng = random.Random(3)
    for _ in range(5):
        rng.shuffle(records)
        kept, rejected = dedupe_records(records)
        assert {r.key for r in kept} == {r.key for r in kept0}
        assert set(rejected) == set(rejected0)


def test_records_without_hashes_are_kept():
    records = [Record(key="bare", source="t", input_id="bare"),
               Record(key="bad", source="t", input_id="bad", image={"phash": "nothex!!nothex!!"}),
               synthetic("x", 5), synthetic("y", 5)]
    assert image_info(records[0]) is None and image_info(records[1]) is None
    kept, rejected = dedupe_records(records)
    assert [r.key for r in kept] == ["bare", "bad", "x"]
    assert [r.key for r in rejected] == ["y"]


# --- Beam ----------------------------------------------------------------------------------

def test_beam_transform_matches_reference(photo_records):
    records = list(photo_records.values()) + [synthetic("a", 1 << 40), synthetic("b", (1 << 40) | 3),
                                              Record(key="bare", source="t", input_id="bare")]
    want_kept, want_rejected = dedupe_records(records)
    pipeline = beam.Pipeline(runner=FnApiRunner())
    kept, rejected = pipeline | beam.Create(records) | Dedupe(radius=4)
    assert_that(kept | beam.Map(lambda r: r.key), equal_to([r.key for r in want_kept]), label="kept")
    assert_that(rejected, equal_to(want_rejected), label="rejected")
    result = pipeline.run()
    result.wait_until_finish()

    counts = stage_metrics(result)["dedupe"]
    assert counts["in"] == len(records)
    assert counts["out"] == len(want_kept) and counts["rejected"] == len(want_rejected)
    assert counts["out"] + counts["rejected"] == counts["in"]
    assert counts["reason.duplicate"] == 1 and counts["reason.near_duplicate"] == 3
    assert counts["unhashed"] == 1


def test_exact_copy_stays_duplicate_whichever_edge_comes_first():
    """Only the sha256 group's members carry the sha256 (to keep the group-by small); its edge
    says the bytes are equal, in whatever order the runner hands the edges over."""
    sha, phash = "ab" * 32, 0x0123456789ABCDEF
    a, b = ImageInfo("a", sha, phash, 10), ImageInfo("b", sha, phash, 10)
    entries = group_entries(a) + group_entries(b)
    assert [unpack_member(m) for g, m in entries if g[0] == "sha"] == [a, b]
    assert all(unpack_member(m).sha256 == "" for g, m in entries if g[0] == "band")
    by_group = {}
    for group, member in entries:
        by_group.setdefault(group, []).append(member)
    band = group_edges(("band", 0, band_keys(phash)[0][1]), by_group[("band", 0, band_keys(phash)[0][1])])
    exact = group_edges(("sha", sha), by_group[("sha", sha)])
    assert band == [(a._replace(sha256=""), b._replace(sha256=""))] and exact == [(a, b)]
    for edges in (band + exact, exact + band):
        rejects = plan_rejects(edges)
        assert list(rejects) == ["b"] and rejects["b"].reason == "duplicate", rejects
    # Without the sha256 edge (different bytes, same picture) it is a near duplicate.
    assert plan_rejects(band)["b"].reason == "near_duplicate"


def test_member_packing_round_trips():
    for info in (ImageInfo("k-ü", "ab" * 32, (1 << 64) - 1, 12_000_000), ImageInfo("k", "", 0, 0),
                 ImageInfo("k", "x" * 300, None, 5), ImageInfo("t", "ab", 7, 9, held_out=2)):
        assert unpack_member(pack_member(info, True)) == info
        assert unpack_member(pack_member(info, False)) == info._replace(sha256="")


def test_shards_give_the_same_edges_as_the_groups():
    """Moving groups in packed shards (what the Beam plan shuffles) loses no group and mixes none:
    the shard step yields exactly the edges of every group taken one by one, in several blobs."""
    infos = clustered_infos()
    by_group, by_shard = {}, {}
    for info in infos:
        for group, member in group_entries(info, 4):
            by_group.setdefault(group, []).append(member)
            by_shard.setdefault(shard_of(group), []).append(member)
    assert len(by_shard) < len(by_group) / 4  # shards really hold several groups
    want = sorted((a.key, b.key) for g, ms in by_group.items() for a, b in group_edges(g, ms, 4))
    got = []
    for shard, members in by_shard.items():
        blobs = [pack_shard(members[:3]), pack_shard(members[3:]), pack_shard([])]  # as bundles hand them over
        got += [(a.key, b.key) for a, b in shard_edges(shard, blobs, 4)]
    assert sorted(got) == want and len(want) > 50
    assert plan_rejects(shard_edges(("sha", 0), [], 4)) == {}


def test_shard_packing_round_trips():
    members = [b"", b"x", bytes(range(256)) * 3, pack_member(ImageInfo("k-\u00fc", "ab" * 32, 5, 7), True)]
    assert list(unpack_shard(pack_shard(members))) == members
    assert list(unpack_shard(b"")) == []


def test_beam_transform_matches_reference_when_shards_are_handed_over_early(monkeypatch):
    """A worker hands a shard over as soon as it passes SHARD_FLUSH_BYTES (bounding its memory on a
    big bundle): many blobs per shard, same decisions as the reference."""
    monkeypatch.setattr(dedupe, "SHARD_FLUSH_BYTES", 200)
    records = [synthetic(i.key, i.phash, i.sha256, i.area) for i in clustered_infos(3)]
    want_kept, want_rejected = dedupe_records(records)
    assert len(want_rejected) > 50
    pipeline = beam.Pipeline(runner=FnApiRunner())
    kept, rejected = pipeline | beam.Create(records) | Dedupe(radius=4)
    assert_that(kept | beam.Map(lambda r: r.key), equal_to([r.key for r in want_kept]), label="kept")
    assert_that(rejected, equal_to(want_rejected), label="rejected")
    pipeline.run().wait_until_finish()


def test_beam_transform_without_any_duplicate_keeps_everything():
    """No edges at all: the plan's combine gives no element and the side input's default {} is the plan."""
    records = [synthetic("a", 0), synthetic("b", (1 << 64) - 1), Record(key="bare", source="t", input_id="bare")]
    pipeline = beam.Pipeline(runner=FnApiRunner())
    kept, rejected = pipeline | beam.Create(records) | Dedupe(radius=4)
    assert_that(kept | beam.Map(lambda r: r.key), equal_to(["a", "b", "bare"]), label="kept")
    assert_that(rejected, equal_to([]), label="rejected")
    pipeline.run().wait_until_finish()

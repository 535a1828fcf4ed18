"""Dedupe: drop exact duplicates (same sha256 of the source bytes) and near duplicates
(perceptual hashes within Hamming radius r) across every source, keeping one image per group.

Why not all pairs: n images give n^2/2 comparisons. Instead each 64-bit phash is cut into r+1
bands; by pigeonhole two hashes that differ in at most r bits agree exactly on at least one band,
so hashes are grouped by (band index, band value) and compared only inside a group. Exact copies
are grouped by sha256. Groups yield edges between duplicates (few: only duplicate pairs), which
are joined globally with union-find; each component keeps ONE image:

    keep rank = (larger original pixel area first, then smaller key)

The largest original is the best input for the clean JPEG; the key only breaks ties, so the
choice never depends on input order or on how the runner split the work.

A dropped image is rejected with reason "duplicate" when its bytes equal the kept image's bytes,
otherwise "near_duplicate"; the detail names the kept key and the Hamming distance of the two
phashes (that distance may exceed r when the two were linked through a chain A~B~C).

Pure functions (`band_keys`, `edges_in_group`, `resolve`, `dedupe_records`) are the reference;
the Beam transform `Dedupe` runs the same functions and moves only small hash facts through the
shuffle: records (which carry image bytes) are never grouped, only filtered against the result.
"""
from __future__ import annotations

import functools
import struct
import time
import zlib
from typing import Hashable, Iterable, Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from pipeline.beam.wrapper import METRIC_PREFIX, REJECTED, BundleCounts, plan_side_input, stage_work
from pipeline.core.record import Record, Reject
from pipeline.core.ledger import Rejection
from pipeline.global_steps.unionfind import UnionFind

STAGE = "dedupe"
METRICS_NAMESPACE = METRIC_PREFIX + STAGE
HASH_BITS = 64
DEFAULT_RADIUS = 4
# Rows per block in the vectorised comparison: bounds memory to about BLOCK * group size words
# even when a band value is shared by very many hashes.
_BLOCK_CELLS = 1 << 22


class ImageInfo(NamedTuple):
    """What dedupe needs of a record; small, so it can go through a shuffle."""
    key: str
    sha256: str            # "" when unknown
    phash: Optional[int]   # 64-bit perceptual hash, None when missing or malformed
    area: int              # original width * height, 0 when unknown
    held_out: int = 0      # 2: the source fixed the record's split to test, 1: to val (kept first)


def parse_phash(value) -> Optional[int]:
    """16 hex chars (imagehash's str()) or an int -> 64-bit int; anything else -> None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < (1 << HASH_BITS) else None
    if isinstance(value, str) and len(value) == HASH_BITS // 4:
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None


def image_info(record: Record) -> Optional[ImageInfo]:
    """None when the record has neither a sha256 nor a phash: nothing to compare it by."""
    image = record.image or {}
    sha = image.get("sha256") or ""
    sha = sha if isinstance(sha, str) else ""
    phash = parse_phash(image.get("phash"))
    if not sha and phash is None:
        return None
    return ImageInfo(record.key, sha, phash, _int(image.get("orig_width")) * _int(image.get("orig_height")),
                     HELD_OUT.get(record.split or "", 0))


def _int(value) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


# Before dedupe only a source sets a split (OSV-5M's test rows): a copy held out for evaluation is
# the one kept, or its twin would stay in train while the test image is dropped (a leak).
HELD_OUT = {"test": 2, "val": 1}


def keep_rank(info: ImageInfo) -> tuple:
    """Smaller is kept: a copy whose split a source fixed to test (then val) first, then the
    larger original pixel area, then the smaller key."""
    return (-info.held_out, -info.area, info.key)


@functools.lru_cache(maxsize=None, typed=True)
def band_layout(radius: int) -> tuple[tuple[int, int], ...]:
    """(shift, width) of each of the radius+1 bands, widths as equal as possible (sum 64)."""
    if not isinstance(radius, int) or isinstance(radius, bool) or not 0 <= radius < HASH_BITS:
        raise ValueError(f"dedupe radius must be an int in [0, {HASH_BITS - 1}], got {radius!r}")
    n = radius + 1
    base, extra = divmod(HASH_BITS, n)
    layout, shift = [], 0
    for i in range(n):
        width = base + (1 if i < extra else 0)
        layout.append((shift, width))
        shift += width
    return tuple(layout)


@functools.lru_cache(maxsize=None, typed=True)
def _band_masks(radius: int) -> tuple[int, ...]:
    return tuple(((1 << width) - 1) << shift for shift, width in band_layout(radius))


def band_keys(phash, radius: int = DEFAULT_RADIUS) -> list[tuple[int, int]]:
    """(band index, band value) for each of the radius+1 bands of a phash (hex or int)."""
    value = parse_phash(phash)
    if value is None:
        raise ValueError(f"not a 64-bit phash: {phash!r}")
    return [(i, (value >> shift) & ((1 << width) - 1))
            for i, (shift, width) in enumerate(band_layout(radius))]


def popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(values.shape + (8,))
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def edges_in_group(items: Iterable[tuple[str, object]], radius: int = DEFAULT_RADIUS,
                   band: Optional[int] = None) -> list[tuple[str, str, int]]:
    """(key_a, key_b, hamming distance) for the pairs of one group whose phashes differ in at
    most `radius` bits. items: (key, phash hex or int).

    Identical hashes are chained (n-1 edges, distance 0) instead of compared pairwise, so a
    flood of one hash (blank frames) costs linear time. With `band` (the group's band index)
    a pair is emitted only in the lowest band on which it agrees, so a pair that shares several
    bands is not emitted once per band."""
    masks = _band_masks(radius)
    by_hash: dict[int, list[str]] = {}
    for key, phash in items:
        value = parse_phash(phash)
        if value is not None:
            by_hash.setdefault(value, []).append(key)
    for keys in by_hash.values():
        keys.sort()
    edges: list[tuple[str, str, int]] = []
    if not band:  # identical hashes agree on band 0: that group chains them
        for keys in by_hash.values():
            edges += [(keys[0], other, 0) for other in keys[1:]]
    if len(by_hash) < 2:
        return edges
    values = sorted(by_hash)
    reps = [by_hash[v][0] for v in values]  # one key stands for all keys of an identical hash
    hashes = np.array(values, dtype=np.uint64)
    earlier = np.array(masks[:band] if band else [], dtype=np.uint64)
    n = len(values)
    block = max(1, _BLOCK_CELLS // n)
    columns = np.arange(n)
    for start in range(0, n - 1, block):
        rows = slice(start, min(start + block, n))
        xor = hashes[rows, None] ^ hashes[None, :]
        dist = popcount(xor)
        close = (dist <= radius) & (columns[None, :] > np.arange(rows.start, rows.stop)[:, None])
        for mask in earlier:  # agreeing on an earlier band: that band's group emits the pair
            close &= (xor & mask) != 0
        for i, j in zip(*np.nonzero(close)):
            edges.append((reps[start + i], reps[j], int(dist[i, j])))
    return edges


def exact_edges(keys: Iterable[str]) -> list[tuple[str, str, int]]:
    """Keys sharing one sha256: a chain from the smallest key (n-1 edges suffice to join them)."""
    keys = sorted(keys)
    return [(keys[0], other, 0) for other in keys[1:]]


def resolve(edges: Iterable[Sequence[Hashable]], ranks: Mapping[Hashable, tuple]) -> dict:
    """Join edges (key_a, key_b, ...) into components; keep the key of smallest rank in each
    (ranks: every key of the edges -> a sortable rank, see keep_rank).
    Returns {dropped_key: kept_key}; keys that are in no edge are not in it (they are kept)."""
    uf = UnionFind()
    for edge in edges:
        uf.union(edge[0], edge[1])
    mapping = {}
    for component in uf.components():
        kept = min(component, key=lambda k: (ranks[k], k))
        mapping.update({k: kept for k in component if k != kept})
    return mapping


# A group member as one bytes object: phash, has-phash, area, held-out, sha256 length, sha256 text, key.
# The local runner keeps every grouped value decoded until the group-by is read, and an image joins
# radius+1 band groups: one small bytes object per membership instead of a tuple of a str and two
# ints (~90 instead of ~210 bytes, one allocation instead of four) keeps the group-by's memory
# from growing faster than it must with the corpus (bench/bench_memory.py).
_MEMBER_HEAD = struct.Struct(">Q?QBH")


def pack_member(info: ImageInfo, with_sha: bool) -> bytes:
    sha = info.sha256.encode("utf-8") if with_sha else b""
    return (_MEMBER_HEAD.pack(info.phash or 0, info.phash is not None, info.area, info.held_out, len(sha))
            + sha + info.key.encode("utf-8"))


def unpack_member(data: bytes) -> ImageInfo:
    phash, has_phash, area, held_out, n_sha = _MEMBER_HEAD.unpack_from(data)
    head = _MEMBER_HEAD.size
    return ImageInfo(data[head + n_sha:].decode("utf-8"), data[head:head + n_sha].decode("utf-8"),
                     phash if has_phash else None, area, held_out)


def group_entries(info: ImageInfo, radius: int = DEFAULT_RADIUS) -> list[tuple[tuple, bytes]]:
    """The groups an image joins: its sha256 and each (band, value) of its phash. Only the sha256
    group's member carries the sha256 (the bands compare phashes); `plan_rejects` takes it from
    there to tell the same bytes (duplicate) from the same picture (near duplicate)."""
    entries = [(("sha", info.sha256), pack_member(info, True))] if info.sha256 else []
    if info.phash is not None:
        entries += [(("band", i, v), pack_member(info, False)) for i, v in band_keys(info.phash, radius)]
    return entries


def group_edges(group: tuple, members: Iterable[bytes], radius: int = DEFAULT_RADIUS
                ) -> list[tuple[ImageInfo, ImageInfo]]:
    """Duplicate pairs inside one group (members as `group_entries` made them), as pairs of
    ImageInfo (the resolve step needs their ranks and hashes). Reduced to a spanning forest: a
    burst of n mutually similar photos sends n-1 edges to the global step, not n^2/2; components
    stay the same."""
    by_key = {info.key: info for info in map(unpack_member, members)}
    if len(by_key) < 2:
        return []
    if group[0] == "sha":
        edges = exact_edges(by_key)
    else:
        edges = edges_in_group(((k, i.phash) for k, i in by_key.items()), radius, band=group[1])
    forest, out = UnionFind(), []
    for a, b, _ in edges:
        if forest.find(a) != forest.find(b):
            forest.union(a, b)
            out.append((by_key[a], by_key[b]))
    return out


def plan_rejects(info_edges: Iterable[tuple[ImageInfo, ImageInfo]]) -> dict[str, Reject]:
    """All duplicate edges of the run -> {dropped_key: Reject naming the kept key}."""
    info_edges = list(info_edges)
    infos: dict[str, ImageInfo] = {}
    for info in (info for edge in info_edges for info in edge):
        if info.sha256 or info.key not in infos:  # only the sha groups' members carry the sha256
            infos[info.key] = info
    mapping = resolve([(a.key, b.key) for a, b in info_edges],
                      {k: keep_rank(i) for k, i in infos.items()})
    return {dropped: _reject(infos[dropped], infos[kept]) for dropped, kept in mapping.items()}


def _reject(dropped: ImageInfo, kept: ImageInfo) -> Reject:
    distance = ""
    if dropped.phash is not None and kept.phash is not None:
        distance = f", phash hamming {bin(dropped.phash ^ kept.phash).count('1')}"
    if dropped.sha256 and dropped.sha256 == kept.sha256:
        return Reject("duplicate", f"same bytes (sha256) as kept {kept.key}{distance}")
    return Reject("near_duplicate", f"near duplicate of kept {kept.key}{distance}")


def find_duplicates(infos: Iterable[ImageInfo], radius: int = DEFAULT_RADIUS) -> dict[str, Reject]:
    """The whole step without Beam: {dropped_key: Reject}."""
    groups: dict[tuple, list[ImageInfo]] = {}
    for info in infos:
        for group, entry in group_entries(info, radius):
            groups.setdefault(group, []).append(entry)
    edges = [e for group, members in groups.items() for e in group_edges(group, members, radius)]
    return plan_rejects(edges)


def dedupe_records(records: Iterable[Record], radius: int = DEFAULT_RADIUS
                   ) -> tuple[list[Record], list[Rejection]]:
    """Reference semantics of `Dedupe`: (kept records in input order, rejections)."""
    records = list(records)
    rejects = find_duplicates(filter(None, map(image_info, records)), radius)
    kept = [r for r in records if r.key not in rejects]
    rejected = [Rejection.of(r, STAGE, rejects[r.key]) for r in records if r.key in rejects]
    return kept, rejected


# The group-by moves shards of groups, packed, not one element per group entry: every image
# joins radius+1 band groups and its sha256 group, and a runner holding and encoding each entry
# on its own was the build's memory peak (bench/bench_memory.py). A group's shard is
# a few bits of its hash; a worker appends the members it makes to one byte string per shard and
# hands those over once per bundle (or when one grows past SHARD_FLUSH_BYTES), so the group-by
# holds a few hundred byte strings. The shard step splits them into the groups again.
SHARD_BITS = 4
SHARD_FLUSH_BYTES = 1 << 18
_SHARD_MASK = (1 << SHARD_BITS) - 1
_MEMBER_LENGTH = struct.Struct(">I")


def shard_of(group: tuple) -> tuple:
    """("sha", n) or ("band", band index, n): the shard (n < 2**SHARD_BITS) a group is moved in."""
    if group[0] == "sha":
        return ("sha", zlib.crc32(group[1].encode("utf-8")) & _SHARD_MASK)
    return ("band", group[1], group[2] & _SHARD_MASK)


def _framed(member: bytes) -> bytes:
    return _MEMBER_LENGTH.pack(len(member)) + member


def pack_shard(members: Iterable[bytes]) -> bytes:
    return b"".join(map(_framed, members))


def unpack_shard(blob: bytes) -> Iterable[bytes]:
    at, size = 0, len(blob)
    while at < size:
        (length,) = _MEMBER_LENGTH.unpack_from(blob, at)
        at += _MEMBER_LENGTH.size
        yield blob[at:at + length]
        at += length


def _group_of(shard: tuple, member: bytes, radius: int) -> tuple:
    """The group a member of this shard was made for (the inverse of group_entries' keys)."""
    phash, _, _, _, n_sha = _MEMBER_HEAD.unpack_from(member)
    if shard[0] == "sha":
        return ("sha", member[_MEMBER_HEAD.size:_MEMBER_HEAD.size + n_sha].decode("utf-8"))
    shift, width = band_layout(radius)[shard[1]]
    return ("band", shard[1], (phash >> shift) & ((1 << width) - 1))


def shard_edges(shard: tuple, blobs: Iterable[bytes], radius: int = DEFAULT_RADIUS
                ) -> list[tuple[ImageInfo, ImageInfo]]:
    """`group_edges` of every group in one shard (blobs as `pack_shard` made them)."""
    groups: dict[tuple, list[bytes]] = {}
    for blob in blobs:
        for member in unpack_shard(blob):
            groups.setdefault(_group_of(shard, member, radius), []).append(member)
    return [edge for group, members in groups.items() if len(members) > 1
            for edge in group_edges(group, members, radius)]


class _ShardedEntries(beam.DoFn):
    """records -> (shard, packed members), each shard's members of a bundle in one element.
    Its time is dedupe's work."""

    def __init__(self, radius: int):
        self.radius = radius

    def setup(self):
        self.counts = BundleCounts(METRICS_NAMESPACE)

    def start_bundle(self):
        self.shards: dict[tuple, bytearray] = {}

    def process(self, record: Record):
        start = time.perf_counter()
        info = image_info(record)
        full = []
        for group, member in (group_entries(info, self.radius) if info is not None else ()):
            shard = shard_of(group)
            packed = self.shards.get(shard)
            if packed is None:
                packed = self.shards[shard] = bytearray()
            packed += _framed(member)
            if len(packed) >= SHARD_FLUSH_BYTES:  # bounds a worker's memory on a big bundle
                full.append((shard, bytes(packed)))
                del self.shards[shard]
        self.counts.add_micros_since(start)
        return full

    def finish_bundle(self):
        for shard, packed in self.shards.items():
            yield GlobalWindows.windowed_value((shard, bytes(packed)))
        self.shards = {}
        self.counts.flush()


class _PartitionFn(beam.DoFn):
    """Records against the global plan (a side input): kept, or one rejection row."""

    def setup(self):
        self.counts = BundleCounts(METRICS_NAMESPACE)

    def process(self, record: Record, rejects: dict):
        self.counts.add("in")
        reject = rejects.get(record.key)
        if reject is None:
            if image_info(record) is None:
                self.counts.add("unhashed")  # no sha256/phash: kept, but could not be compared
            self.counts.add("out")
            yield record
            return
        self.counts.add("rejected")
        self.counts.add("reason." + reject.reason)
        yield beam.pvalue.TaggedOutput(REJECTED, Rejection.of(record, STAGE, reject))

    def finish_bundle(self):
        self.counts.flush()


class Dedupe(beam.PTransform):
    """records -> (kept records, rejections with stage "dedupe").

    radius: largest phash Hamming distance that counts as a near duplicate (0..63, default 4;
    0 = identical phash only). Global: every record must be in the input PCollection."""

    def __init__(self, radius: int = DEFAULT_RADIUS, label: str = STAGE):
        super().__init__(label=label)
        band_layout(radius)  # a bad radius fails when the graph is built, not on a worker
        self.radius = radius

    def plan(self, records):
        """The global decision as one element {dropped_key: Reject}, for a side input; no element
        when there are no duplicates (the side input's default {} stands in)."""
        radius = self.radius
        return (records
                | "ShardEntries" >> beam.ParDo(_ShardedEntries(radius))
                | "Group" >> beam.GroupByKey()
                | "Edges" >> stage_work(STAGE, shard_edges, radius, star=True)
                | "AllEdges" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
                | "Resolve" >> stage_work(STAGE, plan_rejects, flat=False))

    def expand(self, records):
        result = records | "Partition" >> beam.ParDo(
            _PartitionFn(), plan_side_input(self.plan(records))).with_outputs(REJECTED, main="kept")
        return result.kept, result[REJECTED]

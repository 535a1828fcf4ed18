"""Reading a test split back from the corpus: OUT/{part}/{split}/*.tar, KEY.jpg + KEY.json."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import webdataset as wds


@dataclass
class ShardSample:
    key: str
    jpeg: bytes
    record: dict   # KEY.json: record.to_json() plus "part"


def shard_paths(out: str, part: str, split: str = "test") -> list[str]:
    """The finished shards of one part/split, sorted (the writer renames a shard into place only
    when complete, so *.tar never matches a half-written one)."""
    return sorted(glob.glob(os.path.join(out, part, split, "*.tar")))


def expand(patterns: Iterable[str]) -> list[str]:
    """Shard arguments as given: files, directories (their *.tar) or glob patterns."""
    paths: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths += sorted(glob.glob(os.path.join(pattern, "*.tar")))
        else:
            paths += sorted(glob.glob(pattern)) or [pattern]
    return paths


def iter_samples(paths: list[str]) -> Iterator[ShardSample]:
    """Samples in shard order. A member pair lacking its jpg or json is skipped: the writer never
    makes one, so it can only be a foreign tar, which has no ground truth to score against."""
    if not paths:
        return
    # shardshuffle=False: evaluation order = file order, so reruns write identical files.
    dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False)
    for sample in dataset:
        if "jpg" not in sample or "json" not in sample:
            continue
        yield ShardSample(sample["__key__"], sample["jpg"], json.loads(sample["json"]))

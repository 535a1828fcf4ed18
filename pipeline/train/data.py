"""Training data: the corpus shards streamed with webdataset, mixed by part weights, resumable.

Each (rank, DataLoader worker) reads an endless, seeded stream:
- per part, shard URLs in a shuffled order (the same order on every rank, one order per pass)
  dealt out so that every rank and worker reads different shards (what wds.split_by_node and
  wds.split_by_worker do), or, with resampling, shards drawn at random with replacement
  (wds.ResampledShards) - the webdataset recipe for several GPUs, where an exact split would leave
  ranks with unequal sample counts and a collective would wait forever;
- samples through a shuffle buffer (wds.shuffle);
- parts mixed by a seeded weighted draw (stage 1: Meta; stage 2: Clue + Dialogue + Meta replay).

Streams never end: the run length is a number of steps, the same on every rank. Because a stream
is a pure function of (seed, rank, worker), the data position is just "how far each worker got";
a resumed run skips that many samples (cheap: tar reading only, no decoding) and sees exactly what
an uninterrupted run would have seen. DataLoader workers hand out batches round-robin from worker
0, so a resumed run rotates the worker roles to keep the batch order too.
"""
from __future__ import annotations

import glob
import json
import logging
import random
import tarfile
from collections import Counter
from typing import Iterator, Optional

import torch

log = logging.getLogger("pipeline.train")

MAX_CONSECUTIVE_DROPS = 1000  # a stream that yields nothing trainable is a configuration error


def find_shards(root: str, part: str, split: str) -> list[str]:
    """The shard URLs of one (part, split), sorted; local paths or any FileSystems URL."""
    pattern = f"{root.rstrip('/')}/{part}/{split}/{part}-{split}-*.tar"
    if "://" in root:
        from apache_beam.io.filesystems import FileSystems

        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    return sorted(glob.glob(pattern))


def _open(url: str):
    if "://" in url:
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.open(url)
    return open(url, "rb")


def count_samples(shards: list[str]) -> int:
    """Samples in these shards: from the writer's _stats.json beside each shard, else by listing
    the tar (a sample is one KEY.json member)."""
    total = 0
    for url in shards:
        try:
            with _open(url[: -len(".tar")] + "_stats.json") as stream:
                total += int(json.loads(stream.read())["samples"])
                continue
        except (OSError, KeyError, ValueError):
            pass
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            total += sum(1 for member in tar if member.name.endswith(".json"))
    return total


def default_epoch_samples(counts: dict[str, int], weights: dict[str, float]) -> int:
    """Mixed samples until the part that runs out first has been seen once on average (stage 2:
    one pass over Clue/Dialogue, with the Meta replay on top)."""
    return max(1, int(min(counts[p] / w for p, w in weights.items())))


def _part_urls(shards: list[str], part: str, seed: int, slot: int, slots: int, resample: bool) -> Iterator[dict]:
    if resample:
        rng = random.Random(f"{seed}/{part}/resample/{slot}")
        while True:
            yield {"url": rng.choice(shards)}
    epoch = 0
    while True:
        order = list(shards)
        random.Random(f"{seed}/{part}/pass/{epoch}").shuffle(order)  # same on every rank and worker
        for url in order[slot::slots]:
            yield {"url": url}
        epoch += 1


class MixedShardStream(torch.utils.data.IterableDataset):
    """An endless stream of encoded examples for one rank.

    start_positions: {logical worker: samples of its mixed stream already consumed};
    worker_offset: physical worker w plays logical worker (w + offset) % workers."""

    def __init__(self, shards: dict[str, list[str]], weights: dict[str, float], encoder, *, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle_buffer: int = 1000, resample: str = "auto",
                 start_positions: Optional[dict[int, int]] = None, worker_offset: int = 0):
        missing = [p for p in weights if not shards.get(p)]
        if missing:
            raise ValueError(f"no shards for part(s) {', '.join(missing)}")
        self.shards, self.weights, self.encoder = shards, weights, encoder
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer, self.resample = shuffle_buffer, resample
        self.start_positions = dict(start_positions or {})
        self.worker_offset = worker_offset
        self.last_error = ""

    def _raw_part(self, part: str, slot: int, slots: int) -> Iterator[dict]:
        import webdataset as wds

        shards = self.shards[part]
        resample = self.resample == "on" or (self.resample == "auto" and self.world > 1)
        if not resample and len(shards) < slots:
            log.warning("part %s has %d shards for %d rank x worker slots: resampling it", part, len(shards), slots)
            resample = True
        urls = _part_urls(shards, part, self.seed, slot, slots, resample)
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(urls)
        rng = random.Random(f"{self.seed}/{part}/shuffle/{slot}")
        return iter(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples))

    def mixed(self, worker: int, workers: int) -> Iterator[tuple[str, dict]]:
        """(part, raw webdataset sample) forever, for this rank and logical worker."""
        slots, slot = self.world * workers, self.rank * workers + worker
        streams = {p: self._raw_part(p, slot, slots) for p in self.weights}
        parts, weights = list(self.weights), list(self.weights.values())
        rng = random.Random(f"{self.seed}/mix/{slot}")
        while True:
            part = rng.choices(parts, weights)[0] if len(parts) > 1 else parts[0]
            yield part, next(streams[part])

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        worker = (physical + self.worker_offset) % workers
        skip = self.start_positions.get(worker, 0)
        dropped, in_a_row = Counter(), 0
        for position, (part, raw) in enumerate(self.mixed(worker, workers)):
            if position < skip:
                continue
            example, reason = self._encode(part, raw)
            if example is None:
                dropped[reason] += 1
                in_a_row += 1
                if dropped[reason] <= 3 and reason == "encode_error":
                    log.warning("sample dropped: %s", self.last_error)
                if in_a_row >= MAX_CONSECUTIVE_DROPS:
                    raise RuntimeError(f"{in_a_row} samples in a row could not be used: {dict(dropped)}; "
                                       f"last error: {self.last_error}")
                continue
            in_a_row = 0
            example.update(_position=position, _worker=worker, _part=part, _dropped=dict(dropped))
            yield example

    def _encode(self, part: str, raw: dict):
        try:
            record = json.loads(raw["json"])
        except (KeyError, ValueError):
            return None, "bad_json"
        sample = record.get(part) or {}
        messages = sample.get("messages")
        if not messages:
            return None, "no_messages"
        try:
            return self.encoder.encode(messages, raw.get("jpg"))
        except ValueError as exc:  # ConversationError included: this sample's text defeats the template
            self.last_error = f"{raw.get('__key__')}: {exc}"
            return None, "encode_error"


def make_loader(stream: MixedShardStream, batch_size: int, num_workers: int, pad_token_id: int):
    import functools

    from pipeline.train.collate import pad_collate

    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers,
        collate_fn=functools.partial(pad_collate, pad_token_id=pad_token_id),
        worker_init_fn=_one_thread if num_workers else None,
        prefetch_factor=4 if num_workers else None)


def _one_thread(_worker_id: int) -> None:
    """Workers only tokenise and resize; one thread each leaves the cores to the model."""
    torch.set_num_threads(1)

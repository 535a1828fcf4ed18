"""Training data: the corpus shards streamed, mixed by part weights, batched (or packed) in the
DataLoader workers, resumable by seeking.

Each (rank, DataLoader worker) reads an endless, seeded stream:
- per part, shard URLs in a shuffled order (the same order on every rank, one order per pass)
  dealt out so that every rank and worker reads different shards (what webdataset's split_by_node
  and split_by_worker do), or, with resampling, shards drawn at random with replacement (the
  webdataset recipe for several GPUs, where an exact split would leave ranks with unequal sample
  counts and a collective would wait forever);
- samples (the tar members sharing a key, grouped as webdataset groups them) through a seeded
  shuffle buffer;
- parts mixed by a seeded weighted draw (stage 1: Meta; stage 2: Clue + Dialogue + Meta replay);
- batches formed in the worker: `batch_size` samples padded to the longest, or with packing
  `batch_size` rows of whole samples concatenated up to `max_length` tokens (collate.py).

Streams never end: the run length is a number of steps, the same on every rank. The position of a
stream is small and explicit: per part the shard cursor, the byte offset of the next unread sample
in the current shard, the (shard, offset) of each sample in the shuffle buffer and the random
states. Every batch carries its worker's position after it; a checkpoint stores the last one per
worker, and a resumed run opens the recorded shard at the recorded offset and re-reads only the
buffered samples (one seek each), instead of reading every sample consumed before. DataLoader
workers hand out batches round-robin from worker 0, so a resumed run rotates the worker roles to
keep the batch order too.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import random
import re
import tarfile
from collections import Counter
from typing import Iterator, Optional

import torch

log = logging.getLogger("pipeline.train")

MAX_CONSECUTIVE_DROPS = 1000  # a stream that yields nothing trainable is a configuration error
# webdataset's grouping: "dir/KEY.ext.more" -> key "dir/KEY", extension "ext.more".
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


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


# -- one shard, from a byte offset -------------------------------------------------------------

def _seek(stream, offset: int) -> None:
    if not offset:
        return
    try:
        stream.seek(offset)
    except (OSError, io.UnsupportedOperation, AttributeError):  # a stream without seek: read past
        left = offset
        while left:
            chunk = stream.read(min(left, 1 << 20))
            if not chunk:
                raise OSError(f"shard ends before offset {offset}")
            left -= len(chunk)


def _samples_in(stream, base: int, url: str, limit: Optional[int] = None) -> Iterator[tuple[int, dict, Optional[int]]]:
    """(offset of the sample's first member, sample, offset of the next sample or None at the end)
    from a tar stream positioned at byte `base` of the shard; `limit` stops after that many."""
    current, offset, found = None, 0, 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            match = _KEY_EXT.match(member.name)
            if not match or (member.name.startswith("__") and "/" not in member.name):
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield offset, current, base + member.offset
                    found += 1
                    if limit is not None and found >= limit:
                        return
                current, offset = {"__key__": key, "__url__": url}, base + member.offset
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield offset, current, None


def read_shard(url: str, start: int = 0) -> Iterator[tuple[int, dict, Optional[int]]]:
    """The samples of one shard from byte `start` (a sample's first header) on."""
    with _open(url) as stream:
        _seek(stream, start)
        yield from _samples_in(stream, start, url)


def read_samples_at(url: str, offsets: list[int]) -> dict[int, dict]:
    """{offset: sample} for samples starting at these byte offsets of one shard: one open, one
    seek per sample."""
    out = {}
    with _open(url) as stream:
        for offset in sorted(set(offsets)):
            _seek(stream, offset)
            for found, sample, _ in _samples_in(stream, offset, url, limit=1):
                if found != offset:
                    raise OSError(f"{url}: no sample starts at byte {offset}")
                out[offset] = sample
    return out


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


# -- one part for one (rank, worker) slot ------------------------------------------------------

class PartStream:
    """Endless raw samples of one part for one slot: shards in order (or resampled), samples
    through a shuffle buffer. state()/restore() are what a checkpoint needs to continue it."""

    def __init__(self, shards: list[str], part: str, seed: int, slot: int, slots: int, resample: bool,
                 buffer_size: int):
        self.shards, self.part, self.slot, self.slots = shards, part, slot, slots
        self.resample = resample
        self.size = max(1, buffer_size)
        self.seed = seed
        self.url_rng = random.Random(f"{seed}/{part}/resample/{slot}")
        self.rng = random.Random(f"{seed}/{part}/shuffle/{slot}")
        self.passes, self.index = 0, 0  # shard cursor without resampling: pass number, index in it
        self.shard: Optional[int] = None  # shard being read (index into shards) and its next offset
        self.offset = 0
        self.buffer: list[dict] = []
        self.refs: list[list[int]] = []  # [shard, offset] of each buffered sample, kept in step
        self.read = 0  # samples read from tar files (a resumed stream reads only its buffer again)
        self._reader = None
        self._failures = 0

    def _next_shard(self) -> int:
        if self.resample:
            return self.url_rng.randrange(len(self.shards))
        while True:
            order = list(range(len(self.shards)))
            random.Random(f"{self.seed}/{self.part}/pass/{self.passes}").shuffle(order)  # same on every rank
            mine = order[self.slot::self.slots]
            if self.index < len(mine):
                self.index += 1
                return mine[self.index - 1]
            self.passes, self.index = self.passes + 1, 0

    def _next_raw(self) -> tuple[list[int], dict]:
        while True:
            if self._reader is None:
                if self.shard is None:
                    self.shard, self.offset = self._next_shard(), 0
                self._reader = read_shard(self.shards[self.shard], self.offset)
            try:
                offset, sample, following = next(self._reader)
            except StopIteration:
                self._reader, self.shard = None, None
                continue
            except (OSError, tarfile.TarError) as exc:  # a broken shard is skipped, as webdataset's warn_and_continue
                log.warning("shard %s: %s; skipping the rest of it", self.shards[self.shard], exc)
                self._reader, self.shard = None, None
                self._failures += 1
                if self._failures > 2 * len(self.shards) + 2:
                    raise RuntimeError(f"part {self.part}: no shard can be read (last: {exc})") from exc
                continue
            self._failures = 0
            self.read += 1
            ref = [self.shard, offset]
            if following is None:
                self._reader.close()
                self._reader, self.shard = None, None
            else:
                self.offset = following
            return ref, sample

    def __next__(self) -> dict:
        while len(self.buffer) < self.size:
            ref, sample = self._next_raw()
            self.buffer.append(sample)
            self.refs.append(ref)
        k = self.rng.randrange(len(self.buffer))
        sample = self.buffer[k]
        self.buffer[k], self.refs[k] = self.buffer[-1], self.refs[-1]
        self.buffer.pop()
        self.refs.pop()
        return sample

    def state(self) -> dict:
        return {"passes": self.passes, "index": self.index, "url_rng": _rng_state(self.url_rng),
                "shard": self.shard, "offset": self.offset, "buffer": list(self.refs), "rng": _rng_state(self.rng)}

    def restore(self, state: dict) -> None:
        """Continue from state(): seek the current shard, re-read the buffered samples by offset."""
        self.passes, self.index = state["passes"], state["index"]
        _set_rng_state(self.url_rng, state["url_rng"])
        _set_rng_state(self.rng, state["rng"])
        self.shard, self.offset = state["shard"], state["offset"]
        if self._reader is not None:
            self._reader.close()
        self._reader = None
        by_shard: dict[int, list[int]] = {}
        for shard, offset in state["buffer"]:
            by_shard.setdefault(shard, []).append(offset)
        found = {shard: read_samples_at(self.shards[shard], offsets) for shard, offsets in by_shard.items()}
        self.refs = [list(ref) for ref in state["buffer"]]
        self.buffer = [found[shard][offset] for shard, offset in self.refs]
        self.read += len(self.buffer)

    def __iter__(self):
        return self


# -- the mixed, batched stream of one rank ---------------------------------------------------------

class WorkerStream:
    """One logical worker's stream: the parts mixed by weight, encoded, batched or packed."""

    def __init__(self, owner: "MixedShardStream", worker: int, workers: int):
        self.owner = owner
        slots, slot = owner.world * workers, owner.rank * workers + worker
        resample = owner.resample == "on" or (owner.resample == "auto" and owner.world > 1)
        self.parts = {}
        for part in owner.weights:
            shards = owner.shards[part]
            part_resample = resample
            if not resample and len(shards) < slots:
                log.warning("part %s has %d shards for %d rank x worker slots: resampling it", part, len(shards), slots)
                part_resample = True
            self.parts[part] = PartStream(shards, part, owner.seed, slot, slots, part_resample, owner.shuffle_buffer)
        self.mix_rng = random.Random(f"{owner.seed}/mix/{slot}")
        self.names, self.weights = list(owner.weights), list(owner.weights.values())
        self.position = 0   # mixed samples drawn
        self.dropped: Counter = Counter()
        self.pending: Optional[tuple[str, dict]] = None  # packing: a sample drawn for the next row
        self.pending_state: Optional[dict] = None

    def raw(self) -> tuple[str, dict]:
        part = self.mix_rng.choices(self.names, self.weights)[0] if len(self.names) > 1 else self.names[0]
        self.position += 1
        return part, next(self.parts[part])

    def state(self) -> dict:
        return {"parts": {p: s.state() for p, s in self.parts.items()}, "mix": _rng_state(self.mix_rng),
                "position": self.position, "dropped": dict(self.dropped)}

    def restore(self, state: dict) -> None:
        for part, part_state in state["parts"].items():
            self.parts[part].restore(part_state)
        _set_rng_state(self.mix_rng, state["mix"])
        self.position = int(state["position"])
        self.dropped = Counter(state.get("dropped", {}))

    def example(self) -> tuple[str, dict]:
        """The next sample that encodes to a trainable example (the others are counted)."""
        in_a_row = 0
        while True:
            part, raw = self.raw()
            example, reason = self.owner._encode(part, raw)
            if example is not None:
                return part, example
            self.dropped[reason] += 1
            in_a_row += 1
            if self.dropped[reason] <= 3 and reason == "encode_error":
                log.warning("sample dropped: %s", self.owner.last_error)
            if in_a_row >= MAX_CONSECUTIVE_DROPS:
                raise RuntimeError(f"{in_a_row} samples in a row could not be used: {dict(self.dropped)}; "
                                   f"last error: {self.owner.last_error}")

    def batch(self) -> tuple[list, list[str], dict]:
        """(examples or packs, their parts, the stream state right after them)."""
        size, pack_to = self.owner.batch_size, self.owner.pack_tokens
        if not pack_to:
            drawn = [self.example() for _ in range(size)]
            return [e for _, e in drawn], [p for p, _ in drawn], self.state()
        packs, parts = [], []
        for _ in range(size):
            pack, tokens = [], 0
            while True:
                if self.pending is None:
                    self.pending_state = self.state()  # the position before it: it may go to the next batch
                    self.pending = self.example()
                part, example = self.pending
                length = len(example["input_ids"])
                if pack and tokens + length > pack_to:
                    break
                pack.append(example)
                parts.append(part)
                tokens += length
                self.pending = None
                if tokens >= pack_to:
                    break
            packs.append(pack)
        return packs, parts, self.pending_state if self.pending is not None else self.state()


class MixedShardStream(torch.utils.data.IterableDataset):
    """An endless stream of collated batches for one rank.

    start_states: {logical worker: WorkerStream.state() after the last batch trained on};
    worker_offset: physical worker w plays logical worker (w + offset) % workers.
    pack_tokens: 0 = pad each batch; N = each row packs whole samples up to N tokens.
    flatten: with packing, concatenate the rows into one (flash-attention varlen)."""

    def __init__(self, shards: dict[str, list[str]], weights: dict[str, float], encoder, *, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle_buffer: int = 1000, resample: str = "auto",
                 start_states: Optional[dict[int, dict]] = None, worker_offset: int = 0, batch_size: int = 1,
                 pack_tokens: int = 0, flatten: bool = False, pad_token_id: int = 0):
        missing = [p for p in weights if not shards.get(p)]
        if missing:
            raise ValueError(f"no shards for part(s) {', '.join(missing)}")
        self.shards, self.weights, self.encoder = shards, weights, encoder
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer, self.resample = shuffle_buffer, resample
        self.start_states = dict(start_states or {})
        self.worker_offset = worker_offset
        self.batch_size, self.pack_tokens, self.flatten = batch_size, pack_tokens, flatten
        self.pad_token_id = pad_token_id
        self.last_error = ""

    def worker_stream(self, worker: int, workers: int) -> WorkerStream:
        stream = WorkerStream(self, worker, workers)
        if worker in self.start_states:
            stream.restore(self.start_states[worker])
        return stream

    def mixed(self, worker: int, workers: int) -> Iterator[tuple[str, dict]]:
        """(part, raw sample) forever, for this rank and logical worker."""
        stream = self.worker_stream(worker, workers)
        while True:
            yield stream.raw()

    def __iter__(self):
        from pipeline.train.collate import pack_collate, pad_collate

        info = torch.utils.data.get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        worker = (physical + self.worker_offset) % workers
        stream = self.worker_stream(worker, workers)
        while True:
            examples, parts, state = stream.batch()
            if self.pack_tokens:
                batch = pack_collate(examples, self.pad_token_id, flatten=self.flatten)
                tokens = sum(len(e["input_ids"]) for pack in examples for e in pack)
            else:
                batch = pad_collate(examples, self.pad_token_id)
                tokens = sum(len(e["input_ids"]) for e in examples)
            # Bookkeeping for the trainer (never given to the model).
            batch["_meta"] = {"worker": worker, "parts": parts, "state": state, "tokens": tokens,
                              "dropped": dict(state["dropped"]), "read": sum(p.read for p in stream.parts.values())}
            yield batch

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


def default_workers(local_ranks: int = 1) -> int:
    """DataLoader workers per rank sized to the CPUs this process may use: one core per rank is
    left to the training process itself, at most 8 workers (decoding a JPEG and tokenising a
    conversation take milliseconds; more workers only hold more memory)."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_ranks) - 1))


def make_loader(stream: MixedShardStream, num_workers: int, pin_memory: bool = False, prefetch: int = 4):
    """Batches come collated from the dataset (batch_size=None): decoding, the processor and the
    padding or packing all run in the workers; pinned memory lets the copy to the GPU overlap."""
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        worker_init_fn=_one_thread if num_workers else None,
        prefetch_factor=prefetch if num_workers else None,
        persistent_workers=False)


def _one_thread(_worker_id: int) -> None:
    """Workers only tokenise and resize; one thread each leaves the cores to the model."""
    torch.set_num_threads(1)

"""How many samples and bytes a shard holds; in a module of its own (no Beam import) so that the
`mg-geo` command line can show the defaults without loading the writer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardLimits:
    max_samples: int = 5000
    max_bytes: int = 256 * 1024 * 1024
    # Readers take whole shards (webdataset splits shards over nodes and DataLoader workers), and
    # so does the build's writer step: a split of a few thousand samples in one or two shards
    # leaves most readers idle. A (part, split) gets at least min_shards shards as long as each
    # still holds min_shard_samples samples.
    min_shards: int = 8
    min_shard_samples: int = 250

    def __post_init__(self):
        if min(self.max_samples, self.max_bytes, self.min_shards, self.min_shard_samples) < 1:
            raise ValueError("shard limits must be positive")

"""Inputs and outputs: sources, download, stash, shards (tar writer/reader), manifest, OUT."""

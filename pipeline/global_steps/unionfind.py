"""Disjoint sets over hashable items: the global steps (dedupe, split) join linked items into
components. Plain Python on purpose: it runs once, on the few items that are linked at all."""
from __future__ import annotations

from typing import Hashable, Iterable


class UnionFind:
    def __init__(self, items: Iterable[Hashable] = ()):
        self.parent: dict = {}
        self.size: dict = {}
        for item in items:
            self.add(item)

    def add(self, item: Hashable) -> None:
        if item not in self.parent:
            self.parent[item] = item
            self.size[item] = 1

    def find(self, item: Hashable) -> Hashable:
        self.add(item)
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]  # path halving keeps later finds short
            item = parent[item]
        return item

    def union(self, a: Hashable, b: Hashable) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:  # union by size bounds the tree depth
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def components(self) -> list[list]:
        """Every component as a list of its items (a lone item is a component of one)."""
        groups: dict = {}
        for item in self.parent:
            groups.setdefault(self.find(item), []).append(item)
        return list(groups.values())

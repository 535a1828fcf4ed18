"""Pausing Python's cyclic garbage collector while a burst of long-lived objects is made."""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """No collections inside; the collector is left as it was found (a caller's gc.disable() stands).

    For bursts of objects that hold no garbage cycles and live on: module imports, tables of
    ~10^5 small objects. Each burst otherwise triggers collections that walk all of them again and
    find nothing (the imports of Beam and our stages: 0.3-0.4 s of 1.9 s; a place table: more than
    making its objects)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

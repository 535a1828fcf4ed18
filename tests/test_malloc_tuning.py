"""glibc's mmap threshold is fixed by a build: a big buffer freed late in the job is unmapped, not
kept in the heap (pipeline/malloc_tuning.py). Checked in fresh processes through malloc's own count
of mapped blocks."""
from __future__ import annotations

import pytest

from fresh_process import child_env, run_python
from pipeline import malloc_tuning

pytestmark = pytest.mark.skipif(malloc_tuning.glibc() is None, reason="not glibc")

# How many own mappings a 1 MiB buffer takes, right after an 8 MiB buffer was freed (which, left
# alone, raises glibc's threshold to 8 MiB: the 1 MiB buffer then comes from the heap).
PROBE = """
import ctypes, sys
from pipeline import malloc_tuning
libc = malloc_tuning.glibc()
fields = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
class MallInfo2(ctypes.Structure):
    _fields_ = fields
libc.mallinfo2.restype = MallInfo2
def own_mappings_of_1mib():
    big = bytearray(8 << 20)
    del big
    before = libc.mallinfo2().hblks
    buf = bytearray(1 << 20)
    taken = libc.mallinfo2().hblks - before
    del buf
    return taken
"""


def test_fixed_threshold_keeps_big_buffers_in_their_own_mappings():
    left_alone = run_python(["-c", PROBE + "print(own_mappings_of_1mib())"])
    fixed = run_python(["-c", PROBE + "print(malloc_tuning.fix_mmap_threshold(), own_mappings_of_1mib())"])
    assert left_alone.stdout.split() == ["0"] and fixed.stdout.split() == ["True", "1"]


def test_the_users_own_setting_is_left_alone():
    script = PROBE + "print(malloc_tuning.fix_mmap_threshold(), own_mappings_of_1mib())"
    env = child_env(MALLOC_MMAP_THRESHOLD_=str(16 << 20))
    assert run_python(["-c", script], env=env).stdout.split() == ["False", "0"]


def test_a_build_fixes_it_before_its_job(tmp_path, exif_samples):
    """run_build fixes it itself (before it forks workers); importing pipeline.build does not."""
    script = (
        "import sys\n"
        "from pipeline import malloc_tuning\n"
        "from pipeline.build import BuildConfig, run_build\n"
        "calls, fix = [], malloc_tuning.fix_mmap_threshold\n"
        "malloc_tuning.fix_mmap_threshold = lambda *a: calls.append(fix(*a))\n"
        "print(calls)\n"
        "run_build(BuildConfig(sources=[sys.argv[1]], out=sys.argv[2]), [])\n"
        "print(calls)\n")
    done = run_python(["-c", script, f"exif:{exif_samples / 'gps'}", str(tmp_path / "out")])
    assert done.stdout.split()[-2:] == ["[]", "[True]"]

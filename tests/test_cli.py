"""The `mg-geo` entry point's own behaviour (each command has its own tests)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.gc_pause import gc_paused

ROOT = str(Path(__file__).parents[1])


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_leaves_the_collector_as_it_was(enabled):
    (gc.enable if enabled else gc.disable)()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled() == enabled
        with pytest.raises(ImportError), gc_paused():
            import pipeline.no_such_module  # noqa: F401
        assert gc.isenabled() == enabled
    finally:
        gc.enable()


def test_main_leaves_the_collector_on_and_nothing_frozen_by_default(capsys):
    frozen = gc.get_freeze_count()
    assert main(["build", "--source", "exif:/nonexistent/photos", "--out", "/tmp/x"]) == 2
    assert gc.isenabled() and gc.get_freeze_count() == frozen  # main() is also called by tests, notebooks
    assert "does not exist" in capsys.readouterr().err


def test_the_command_line_is_made_without_beam_or_torch():
    """`mg-geo --help` and every command's flags load neither (pipeline.commands: heavy imports
    happen inside a command's run); the writer's shard limits and the clue/dialogue flags live in
    light modules for this."""
    code = ("import sys, pipeline.cli; pipeline.cli.make_parser(); "
            "print(sorted(m for m in ('apache_beam', 'torch') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"

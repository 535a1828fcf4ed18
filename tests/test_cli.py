"""The `mg-geo` entry point's own behaviour (each command has its own tests)."""
from __future__ import annotations

import gc

import pytest

from pipeline.cli import main
from fresh_process import run_python
from pipeline.gc_pause import gc_paused


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
    done = run_python(["-c", code])
    assert done.stdout.strip() == "[]"

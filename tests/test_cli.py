"""The `mg-geo` entry point's own behaviour (each command has its own tests)."""
from __future__ import annotations

from pipeline.cli import main
from fresh_process import run_python


def test_a_missing_source_folder_is_one_line_and_exit_2(capsys):
    assert main(["build", "--source", "exif:/nonexistent/photos", "--out", "/tmp/x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_command_line_is_made_without_beam_or_torch():
    """`mg-geo --help` and every command's flags load neither (pipeline.commands: heavy imports
    happen inside a command's run); the writer's shard limits and the clue/dialogue flags live in
    light modules for this."""
    code = ("import sys, pipeline.cli; pipeline.cli.make_parser(); "
            "print(sorted(m for m in ('apache_beam', 'torch') if m in sys.modules))")
    done = run_python(["-c", code])
    assert done.stdout.strip() == "[]"

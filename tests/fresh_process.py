"""Running our code in a process of its own, as a user runs it.

What must be seen as `mg-geo` runs on a user's machine (its exit status, its output, Beam's
multi_processing workers started from it) runs in a fresh child process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def child_env(*paths: Path | str, drop: tuple[str, ...] = (), **extra: str) -> dict:
    """This process's environment, `paths` (default: the repository) first on PYTHONPATH, the
    names in `drop` removed, `extra` set."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, paths or (REPO,)), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def run_python(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process (text output captured); fails the test on a non-zero exit."""
    done = subprocess.run([sys.executable, *args], env=env or child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_mg_geo(argv: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mg-geo ARGV` in a fresh process, as a user runs it."""
    return run_python(["-m", "pipeline.cli", *argv], env, timeout)

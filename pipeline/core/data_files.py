"""Where the versioned data files (prompts/, schemas/) live, installed or not.

They sit at the top of the repository, beside `pipeline/`. An editable install (and a checkout on
PYTHONPATH) finds them there; a regular install (the sdist that Dataflow workers build from
`--setup_file`) gets them through setup.py's data_files under `<prefix>/share/mg-geo/`.
"""
from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]  # pipeline/core/ -> the repository
_SHARE = Path(sys.prefix) / "share" / "mg-geo"


def data_path(relative: str) -> Path:
    """`relative` like 'schemas/record.schema.json' -> an existing path, or FileNotFoundError."""
    for root in (_REPO, _SHARE):
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"MG-Geo data file {relative!r} not found under {_REPO} or {_SHARE}; "
                            "reinstall the package (pip install -e .) so prompts/ and schemas/ come along")


@lru_cache(maxsize=None)
def load_json(relative: str) -> dict:
    return json.loads(data_path(relative).read_text(encoding="utf-8"))

"""Shared test fixtures: the real sample photos and a place to write generated inputs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# `pytest tests/...` puts only tests/ on sys.path; the package under test lives in the repo root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

EXIF_SAMPLES = REPO_ROOT.parent / "shared" / "data" / "exif-samples"


@pytest.fixture(scope="session", autouse=True)
def geo_cache_dir(tmp_path_factory):
    """The geo tables' on-disk cache (pipeline.geo.cache) lives in a temporary folder for the
    session, never in ~/.cache; subprocesses the tests start inherit the variable."""
    path = tmp_path_factory.mktemp("geo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MG_GEO_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def exif_samples() -> Path:
    """Real camera JPEGs (gps/, orientation/, invalid/, misc/, corrupted.jpg); see SOURCE.md there.

    Missing samples are an error, not a skip: the tests that need them would prove nothing."""
    if not (EXIF_SAMPLES / "gps").is_dir():
        pytest.fail(f"test data missing: {EXIF_SAMPLES} (expected ../shared/data/exif-samples "
                    f"beside the repository root)", pytrace=False)
    return EXIF_SAMPLES


@pytest.fixture
def tmp_images(tmp_path: Path):
    """Write generated inputs: tmp_images("name.jpg", data) -> Path of the written file."""
    def write(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path
    return write


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny LLaVA built from a config (tests/tiny_vlm.py), saved to a folder."""
    from tiny_vlm import build_tiny_vlm
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Tiny shards of every part (tests/tiny_corpus.py): 8 samples, 4 per shard."""
    from tiny_corpus import write_tiny_corpus
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"), samples=8, per_shard=4)

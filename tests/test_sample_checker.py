"""The writer's fast schema check (fastjsonschema) must judge every sample as jsonschema does."""
from __future__ import annotations

import copy

import jsonschema
import pytest

from pipeline.beam.graph import record_stages
from pipeline.beam.run import BuildConfig
from pipeline.core.data_files import load_json
from pipeline.io.sources import parse_source
from pipeline.core.stage import run_stages
from pipeline.beam.write_parts import RECORD_SCHEMA, SampleChecker
from pipeline.io.shards import sample_body

SCHEMA = load_json(RECORD_SCHEMA)


@pytest.fixture(scope="module")
def real_bodies(exif_samples):
    """KEY.json bodies of the real GPS photos, made by the build's own stages."""
    source = parse_source(f"exif:{exif_samples / 'gps'}")
    records = [r for unit in source.units() for r, reject in source.records(unit) if reject is None]
    kept, _ = run_stages(record_stages(BuildConfig(sources=[], out="unused")), records)
    assert len(kept) >= 5, "the shared GPS photos should give samples"
    return [sample_body(r.replace(split="train"), "meta") for r in kept]


def _mutations(body: dict):
    """(what, broken copy): one schema violation each, of every kind the schema checks."""
    def edit(fn):
        b = copy.deepcopy(body)
        fn(b)
        return b
    yield "lat out of range", edit(lambda b: b.update(lat=91.0))
    yield "lat as text", edit(lambda b: b.update(lat="48.1"))
    yield "key pattern", edit(lambda b: b.update(key="Bad Key"))
    yield "unknown split", edit(lambda b: b.update(split="dev"))
    yield "part without its sample", edit(lambda b: b.update(part="clue"))
    yield "meta not a sample", edit(lambda b: b.update(meta={"x": 1}))
    yield "too few messages", edit(lambda b: b["meta"].update(messages=b["meta"]["messages"][:1]))
    yield "unknown role", edit(lambda b: b["meta"]["messages"][0].update(role="robot"))
    yield "phash pattern", edit(lambda b: b["image"].update(phash="zz"))
    yield "width zero", edit(lambda b: b["image"].update(width=0))
    yield "missing city", edit(lambda b: b["location"].pop("city"))
    yield "country code pattern", edit(lambda b: b["location"].update(country_code="xx"))
    yield "missing location", edit(lambda b: b.pop("location"))
    yield "provenance not text", edit(lambda b: b.update(provenance={"id": 3}))


def test_real_samples_pass_both_checks(real_bodies):
    checker = SampleChecker(SCHEMA)
    reference = jsonschema.Draft202012Validator(SCHEMA)
    for body in real_bodies:
        assert reference.is_valid(body)
        assert checker.problem(body) == ""
        checker.fast(body)  # the fast path itself accepts it (no fall back to the reference)


def test_every_violation_is_caught_by_the_fast_check_and_explained(real_bodies):
    checker = SampleChecker(SCHEMA)
    reference = jsonschema.Draft202012Validator(SCHEMA)
    for body in real_bodies:
        for what, broken in _mutations(body):
            assert not reference.is_valid(broken), what
            with pytest.raises(Exception):
                checker.fast(broken)
            problem = checker.problem(broken)
            assert problem, what
    location_problem = checker.problem(dict(_mutations(real_bodies[0]))["missing city"])
    assert location_problem.startswith("location:") and "city" in location_problem

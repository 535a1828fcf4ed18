"""End to end: the whole build with the Clue and Dialogue parts against a loopback OpenAI-compatible
server (tests/fake_openai_server.py) answering through tests/llm_responder.py.

Runs `mg-geo build --parts meta,clue,dialogue` (in process, and as a real subprocess for the
kill test) on the shared GPS photos plus generated ones, and checks the issue's promises on the
real outputs: every input in exactly one place per part; faults counted under their cause and
failed answers in the ledger; requests in flight bounded by --lvlm-concurrency; a rerun served from
OUT/_cache/lvlm; a SIGKILLed run resumed without asking again what it already had; shards readable
with plain webdataset; the api key nowhere; a clear stop when no LVLM is usable.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from fake_openai_server import Fault, FakeOpenAIServer
from fresh_process import run_mg_geo
from llm_responder import MISBEHAVIOURS, SmartResponder, request_kind
from pipeline.cli import main
from pipeline.lvlm import openai_backend
from pipeline.lvlm.retry import backoff_delay
from pipeline.io.sample_set import write_samples

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-mggeo-TEST-4c1d9e7a0b3f"  # recognisable in any file or log it might leak into
CONCURRENCY = 4
TIMEOUT_S = 1.0
MAX_ATTEMPTS = 3
LLM_PARTS = ("clue", "dialogue")
DIALOGUE_TARGET = 14  # of 21 records: an absolute, country-balanced target leaves 7 not selected
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


# --- helpers -----------------------------------------------------------------------------------

def build_argv(sources, out: Path, endpoint: str, *extra: str) -> list:
    argv = ["build"]
    for spec in sources:
        argv += ["--source", spec]
    return argv + ["--out", str(out), "--parts", "meta,clue,dialogue", "--lvlm-endpoint", endpoint,
                   "--lvlm-model", "fake-vlm", "--lvlm-timeout", str(TIMEOUT_S),
                   "--lvlm-concurrency", str(CONCURRENCY), "--lvlm-max-attempts", str(MAX_ATTEMPTS), *extra]


@contextlib.contextmanager
def captured_output():
    """Everything the build says: stdout, stderr and every log record down to DEBUG."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def run_cli(argv: list) -> tuple[int, str, float]:
    started = time.monotonic()
    with captured_output() as out:
        rc = main(["-vv", *argv])  # -vv: the HTTP client's own debug lines too (the key must not be in them)
    return rc, out.getvalue(), time.monotonic() - started


def count_inputs(spec: str) -> int:
    """Inputs of an exif source counted without the pipeline: files named like images."""
    return sum(1 for p in Path(spec.split(":", 1)[1]).rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def manifest(out: Path) -> list:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def ledger(out: Path) -> list:
    return pq.read_table(out / "rejected.parquet").to_pylist()


def shard_samples(out: Path, part: str) -> dict:
    """key -> (split directory, json body, jpg bytes) of every sample of a part, read with plain
    webdataset (no decoding helpers of ours)."""
    found = {}
    for shard in sorted((out / part).rglob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            body = json.loads(sample["json"])
            assert body["key"] not in found, f"{body['key']} twice in {part}"
            found[body["key"]] = (shard.parent.name, body, sample["jpg"])
    return found


def image_keys(out: Path) -> dict:
    """sha256 of the JPEG the LVLM was shown (= the shard's KEY.jpg) -> record key."""
    return {hashlib.sha256(jpg).hexdigest(): key for key, (_, _, jpg) in shard_samples(out, "meta").items()}


def comparable(body: dict, part: str) -> dict:
    """A part's sample. Whether its answers came from the cache is deliberately not in it (that
    would make a resumed run's shards differ from a fresh one's), so it must compare equal."""
    assert "cached" not in body[part]["usage"]
    return body[part]


def assert_nothing_lost(out: Path, report: dict, sources: list) -> dict:
    """Every input is in exactly one place per part, checked from the files (not from the
    report's own arithmetic), then against the report. Returns {part: not-selected keys}."""
    rows, rejected = manifest(out), ledger(out)
    assert report["conservation_ok"] is True, report["conservation"]
    inputs = {spec: count_inputs(spec) for spec in sources}
    assert report["inputs"] == inputs
    gone = Counter((r["source"], r["input_id"]) for r in rejected if r["part"] == "")
    meta = Counter((r["source"], r["input_id"]) for r in rows if r["part"] == "meta")
    assert not (set(gone) & set(meta)) and max((gone + meta).values()) == 1
    for spec, n in inputs.items():
        assert sum(1 for s, _ in gone + meta if s == spec) == n, spec
    meta_keys = {r["key"] for r in rows if r["part"] == "meta"}
    not_selected = {}
    for part in LLM_PARTS:
        samples = [r["key"] for r in rows if r["part"] == part]
        part_rows = [r["key"] for r in rejected if r["part"] == part]
        assert len(set(samples)) == len(samples) and len(set(part_rows)) == len(part_rows), part
        assert not set(samples) & set(part_rows), part
        assert set(samples) | set(part_rows) <= meta_keys, part
        assert set(shard_samples(out, part)) == set(samples), part  # the manifest tells the truth
        missing = meta_keys - set(samples) - set(part_rows)
        not_selected[part] = missing
        for spec in sources:
            counts = report["conservation"][spec]["parts"][part]
            src_keys = {r["key"] for r in rows if r["part"] == "meta" and r["source"] == spec}
            assert counts["not_selected"] == len(missing & src_keys), (spec, part)
            assert counts["samples"] == len(set(samples) & src_keys), (spec, part)
            assert counts["ok"] is True
    return not_selected


def files_containing(root: Path, needle: bytes) -> list:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def fast_backoff(retry_number, base_s, cap_s, rng, retry_after_s=None, retry_after_cap_s=60.0):
    """The backoff with test-sized base and cap; a server's Retry-After is still obeyed."""
    return backoff_delay(retry_number, 0.01, 0.05, rng, retry_after_s, retry_after_cap_s)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, exif_samples) -> list:
    generated = tmp_path_factory.mktemp("llm-inputs") / "samples"
    write_samples(str(generated), 12, seed=3)  # 12 good photos on six continents + 4 bad files
    return [f"exif:{exif_samples / 'gps'}", f"exif:{generated}"]


@pytest.fixture(scope="module")
def api_key_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", SECRET)
        for name in ("MG_GEO_LVLM_ENDPOINT", "MG_GEO_LVLM_MODEL"):
            mp.delenv(name, raising=False)
        yield


# --- a clean run, and a second run into the same OUT ---------------------------------------------

@pytest.fixture(scope="module")
def clean(tmp_path_factory, sources, api_key_env):
    root = tmp_path_factory.mktemp("llm-clean")
    out = root / "out"
    responder = SmartResponder()
    with FakeOpenAIServer(responder, latency_s=0.05, api_key=SECRET) as server:
        argv = build_argv(sources, out, server.base_url, "--dialogue-target", str(DIALOGUE_TARGET))
        rc, log1, took1 = run_cli(argv)
        first = {"rc": rc, "log": log1, "seconds": took1, "requests": server.count,
                 "peak_in_flight": server.peak_in_flight,
                 "authorization": {r.authorization for r in server.requests}}
        first_out = root / "first"
        shutil.copytree(out, first_out)
        server.reset()
        rc, log2, took2 = run_cli(argv)
        second = {"rc": rc, "log": log2, "seconds": took2, "requests": server.count}
    print(f"\nclean build: {first['requests']} requests, peak {first['peak_in_flight']} in flight, "
          f"{took1:.1f} s; rerun: {second['requests']} requests, {took2:.1f} s")
    return {"out": first_out, "rerun_out": out, "first": first, "second": second,
            "report": json.loads((first_out / "report.json").read_text()), "responder": responder}


def test_clean_build_loses_nothing_in_any_part(clean, sources):
    assert clean["first"]["rc"] == 0, clean["first"]["log"][-3000:]
    report = clean["report"]
    not_selected = assert_nothing_lost(clean["out"], report, sources)
    meta_keys = {r["key"] for r in manifest(clean["out"]) if r["part"] == "meta"}
    assert len(meta_keys) == 21  # 9 shared GPS photos + 12 generated; the 4 bad files are in the ledger
    # A good answer for every request: every selected record got its sample.
    assert report["samples"]["clue"]["total"] == 21 and not not_selected["clue"]
    assert report["samples"]["dialogue"]["total"] == DIALOGUE_TARGET
    assert len(not_selected["dialogue"]) == 21 - DIALOGUE_TARGET
    assert not [r for r in ledger(clean["out"]) if r["part"]]


def test_two_worker_build_selects_the_same_dialogue_records(clean, sources, api_key_env, tmp_path):
    """The count target's chosen keys reach the stage in each worker process as a side input (the
    records are no longer split and flattened back, which Beam's local runner was seen to lose
    records from): the same records get a dialogue, and every input is accounted for. The workers
    are separate processes, so the LVLM client starts in each of them."""
    out = tmp_path / "mp"
    with FakeOpenAIServer(SmartResponder(), latency_s=0.01, api_key=SECRET) as server:
        argv = build_argv(sources, out, server.base_url, "--dialogue-target", str(DIALOGUE_TARGET),
                          "--direct_num_workers=2", "--direct_running_mode=multi_processing")
        # `mg-geo build` in a process of its own, as a user runs it.
        done = run_mg_geo(argv)
    assert SECRET not in done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert_nothing_lost(out, report, sources)
    chosen = {r["key"] for r in manifest(out) if r["part"] == "dialogue"}
    assert chosen == {r["key"] for r in manifest(clean["out"]) if r["part"] == "dialogue"}
    assert len(chosen) == DIALOGUE_TARGET


def test_requests_in_flight_stay_within_the_concurrency(clean):
    report = clean["report"]
    peak = clean["first"]["peak_in_flight"]
    assert 1 < peak <= CONCURRENCY
    assert report["lvlm"]["peak_in_flight"] <= CONCURRENCY
    assert report["lvlm"]["requests"] == clean["first"]["requests"]  # the report counts what was sent


def test_rerun_into_the_same_out_is_served_from_the_cache(clean):
    first, second = clean["first"], clean["second"]
    assert second["rc"] == 0, second["log"][-3000:]
    assert first["requests"] > 40 and second["requests"] == 0
    cache = clean["rerun_out"] / "_cache" / "lvlm"
    entries = list(cache.rglob("*.json"))
    assert len(entries) == first["requests"]  # one validated answer per request, kept by the build
    report = json.loads((clean["rerun_out"] / "report.json").read_text())
    assert report["lvlm"]["requests"] == 0 and report["lvlm"]["cache_hits"] == first["requests"]
    for part in LLM_PARTS:
        before, after = shard_samples(clean["out"], part), shard_samples(clean["rerun_out"], part)
        assert set(before) == set(after) and before
        for key, (split, body, jpg) in before.items():
            assert after[key][0] == split and after[key][2] == jpg
            assert comparable(after[key][1], part) == comparable(body, part)


def test_llm_shards_open_with_plain_webdataset(clean):
    out = clean["out"]
    meta = shard_samples(out, "meta")
    splits = {(r["part"], r["key"]): r["split"] for r in manifest(out)}
    wrong_first = right_first = 0
    for part in LLM_PARTS:
        samples = shard_samples(out, part)
        assert samples
        for key, (split, body, jpg) in samples.items():
            sample = body[part]
            # The same record in the same split as its meta sample (and the same picture).
            assert split == body["split"] == meta[key][0] == splits[("meta", key)] == splits[(part, key)]
            assert jpg == meta[key][2]
            for field in ("messages", "prompt_version", "schema_version", "backend", "model", "params", "usage"):
                assert field in sample, (part, field)
            assert sample["backend"] == "openai" and sample["model"] == "fake-vlm"
            assert sample["prompt_version"] == f"{part}/v2"
            assert sample["schema_version"] == ("clue-schema/v2" if part == "clue" else "prediction-schema/v1")
            assert sample["params"] == {"max_tokens": 512, "seed": 0, "temperature": 0.0}
            assert sample["usage"]["requests"] >= 1 and sample["usage"]["prompt_tokens"] > 0
            messages = sample["messages"]
            roles = [m["role"] for m in messages]
            assert roles == ["user", "assistant"] * (len(messages) // 2) and len(messages) >= 2
            assert messages[0]["content"][0] == {"type": "image"}
            _final_answer_line_is_the_truth(part, sample, body)
            if part == "clue":
                assert len(sample["clues"]) >= 2 and sample["country"] == body["location"]["country"]
                assert "train" not in messages[1]
                continue
            first_level = sample["first_guess_correct_level"]
            first_answer = messages[1]
            if first_level == "none":  # a wrong first guess: context only, never a training target
                wrong_first += 1
                assert first_answer["train"] is False and len(messages) >= 4
            else:
                right_first += 1
                assert "train" not in first_answer
            assert "train" not in messages[-1]  # the final answer is always trained on
    assert wrong_first and right_first


def _final_answer_line_is_the_truth(part: str, sample: dict, body: dict) -> None:
    """The last assistant answer's line (pipeline.evaluate.answer_line) reads back to the record's
    truth (pipeline.geo.claims), no finer than the sample's evidence, with the photo's coordinates."""
    from pipeline.evaluate.answer_line import parse_answer
    from pipeline.geo.claims import claims
    from pipeline.geo.places import haversine_km
    from pipeline.stages.quality import fold

    claim = claims(body["location"])
    parsed = parse_answer(sample["messages"][-1]["content"][0]["text"])
    assert parsed and fold(parsed["country"]) == fold(claim["country"]), (part, parsed, claim)
    for level in ("region", "city"):
        if parsed.get(level):
            assert fold(parsed[level]) == fold(claim[level]), (part, level, parsed, claim)
    if part == "clue":  # the responder's finest clue is about the region: no town in the answer
        assert "city" not in parsed and sample["answer_level"] == "region"
        assert fold(parsed.get("region")) == fold(claim["region"])
    assert haversine_km(parsed["lat"], parsed["lon"], body["lat"], body["lon"]) < 20


def test_api_key_leaks_nowhere(clean):
    first = clean["first"]
    assert first["authorization"] == {f"Bearer {SECRET}"}  # it was used ...
    for out in (clean["out"], clean["rerun_out"]):
        assert (out / "_cache" / "lvlm").is_dir()
        assert files_containing(out, SECRET.encode()) == []  # ... and written nowhere
    # The capture holds the HTTP client's own debug lines (each POST), where a header would show.
    assert "POST" in first["log"]
    assert SECRET not in first["log"] and SECRET not in clean["second"]["log"]


# --- faults ----------------------------------------------------------------------------------------

class FaultScript:
    """A FakeOpenAIServer fault plan: the first distinct images seen for a request kind get that
    kind's scenarios in order (one per image; a scenario is server faults for the image's next
    requests of that kind, or a misbehaviour of the responder). Remembers who got what, so the test
    can find each image's record afterwards."""

    def __init__(self, scenarios: dict, responder: SmartResponder):
        self.pending = {kind: list(items) for kind, items in scenarios.items()}
        self.responder = responder
        self.assigned: dict = {}   # (kind, image sha256) -> scenario label
        self.queues: dict = {}
        self.lock = threading.Lock()

    def __call__(self, seen):
        key = (request_kind(seen.prompt), seen.image_sha256[0] if seen.image_sha256 else "")
        with self.lock:
            if key not in self.queues:
                self.queues[key] = []
                if self.pending.get(key[0]):
                    label, faults = self.pending[key[0]].pop(0)
                    self.assigned[key] = label
                    if label in MISBEHAVIOURS:
                        self.responder.misbehave[key[1]] = label
                    else:
                        self.queues[key] = [f if isinstance(f, Fault) else Fault(f) for f in faults]
            queue = self.queues[key]
            return queue.pop(0) if queue else None


RETRY_AFTER_S = 0.5
SCENARIOS = {
    "clue": [
        ("429", [Fault("429", retry_after=str(RETRY_AFTER_S))]),
        ("500", ["500"]),
        ("slow", [Fault("slow", delay_s=3.0)]),
        ("drop", ["drop"]),
        ("refusal", ["refusal"]),
        ("invalid_json", ["invalid_json", "invalid_json"]),      # the re-ask fails too
        ("schema_violation", ["schema_violation", "schema_violation"]),
        ("500_persistent", ["500"] * MAX_ATTEMPTS),
        ("slow_persistent", [Fault("slow", delay_s=3.0)] * MAX_ATTEMPTS),
        ("wrong_country", []),
        ("few_clues", []),
    ],
    "guess": [("refusal_text", ["refusal_text"])],
    "revision": [("miss_truth", [])],
}
# What each scenario must leave: (part, ledger reason), or None for a sample after retries.
EXPECTED = {
    ("clue", "429"): None, ("clue", "500"): None, ("clue", "slow"): None, ("clue", "drop"): None,
    ("clue", "refusal"): ("clue", "refusal"), ("clue", "invalid_json"): ("clue", "invalid_json"),
    ("clue", "schema_violation"): ("clue", "schema_invalid"),
    ("clue", "500_persistent"): ("clue", "retries_exhausted"),
    ("clue", "slow_persistent"): ("clue", "timeout"),
    ("clue", "wrong_country"): ("clue", "wrong_country"), ("clue", "few_clues"): ("clue", "too_few_clues"),
    ("guess", "refusal_text"): ("dialogue", "refusal"),
    ("revision", "miss_truth"): ("dialogue", "revision_missed_truth"),
}


@pytest.fixture(scope="module")
def faulted(tmp_path_factory, sources, api_key_env):
    out = tmp_path_factory.mktemp("llm-faults") / "out"
    responder = SmartResponder()
    script = FaultScript(SCENARIOS, responder)
    with pytest.MonkeyPatch.context() as mp, \
            FakeOpenAIServer(responder, latency_s=0.02, api_key=SECRET) as server:
        mp.setattr(openai_backend, "backoff_delay", fast_backoff)
        server.fault_plan = script
        rc, log, took = run_cli(build_argv(sources, out, server.base_url))
        requests = list(server.requests)
    print(f"\nfaulted build: {len(requests)} requests, {took:.1f} s")
    return {"rc": rc, "log": log, "out": out, "requests": requests, "script": script,
            "report": json.loads((out / "report.json").read_text())}


def test_faulted_build_loses_nothing(faulted, sources):
    assert faulted["rc"] == 0, faulted["log"][-3000:]
    assert all(not items for items in faulted["script"].pending.values())  # every scenario was played
    not_selected = assert_nothing_lost(faulted["out"], faulted["report"], sources)
    assert not not_selected["clue"] and not not_selected["dialogue"]  # failures are ledger rows, not gaps


def test_each_fault_is_counted_under_its_cause(faulted):
    lvlm = faulted["report"]["lvlm"]
    served = Counter(r.fault for r in faulted["requests"])
    assert served["429"] == 1 and served["500"] == 1 + MAX_ATTEMPTS and served["drop"] == 1
    assert lvlm["retries_by_cause"]["429"] == 1
    assert lvlm["retries_by_cause"]["5xx"] == served["500"] - 1         # the last 500 is a failure
    assert lvlm["retries_by_cause"]["connection"] == 1
    assert lvlm["retries_by_cause"]["timeout"] >= 1 + (MAX_ATTEMPTS - 1)  # slow, then slow x3
    assert lvlm["failures_by_reason"] == {"refusal": 2, "invalid_json": 1, "schema_invalid": 1,
                                          "retries_exhausted": 1, "timeout": 1}
    assert lvlm["reasks"] == 2
    assert lvlm["requests"] == len(faulted["requests"])
    assert lvlm["peak_in_flight"] <= CONCURRENCY


def test_retry_after_is_obeyed(faulted):
    by_image: dict = {}
    for r in faulted["requests"]:
        if request_kind(r.prompt) == "clue":
            by_image.setdefault(r.image_sha256[0], []).append(r)
    limited = next(rs for rs in by_image.values() if rs[0].fault == "429")
    assert len(limited) == 2 and limited[1].fault == "ok"
    assert limited[1].started - limited[0].finished >= RETRY_AFTER_S - 0.05


def test_failed_answers_are_ledger_rows_with_reason_and_part(faulted):
    out, script = faulted["out"], faulted["script"]
    keys = image_keys(out)
    rows = {(r["key"], r["part"]): r for r in ledger(out) if r["part"]}
    samples = {part: set(shard_samples(out, part)) for part in LLM_PARTS}
    expected_rows = set()
    for (kind, image), label in script.assigned.items():
        key = keys[image]
        want = EXPECTED[(kind, label)]
        if want is None:
            assert key in samples["clue"], (label, "a transient fault must not cost the sample")
            continue
        part, reason = want
        row = rows.get((key, part))
        assert row is not None and row["reason"] == reason and row["stage"] == part, (label, row)
        assert row["detail"] and key not in samples[part]
        expected_rows.add((key, part))
    assert set(rows) == expected_rows  # no other record lost a clue or dialogue sample


def test_a_rerun_does_not_ask_again_where_the_answer_stayed_invalid(faulted, sources, api_key_env):
    """Refusals and answers still invalid after the re-ask were paid for: the cache keeps them as
    final failures, so a rerun into the same OUT (against a server that now answers everything)
    sends none of those requests again and keeps their ledger rows; a request whose earlier
    failure got no answer at all (retries exhausted, timeout) is asked again."""
    final = {"refusal", "invalid_json", "schema_violation", "refusal_text"}
    paid = {_signature(r) for r in faulted["requests"] if r.fault in final}
    assert paid
    with pytest.MonkeyPatch.context() as mp, \
            FakeOpenAIServer(SmartResponder(), latency_s=0.0, api_key=SECRET) as server:
        mp.setattr(openai_backend, "backoff_delay", fast_backoff)
        rc, log, _ = run_cli(build_argv(sources, faulted["out"], server.base_url))
        again = list(server.requests)
    assert rc == 0, log[-3000:]
    assert not paid & {_signature(r) for r in again}
    reasons = Counter(r["reason"] for r in ledger(faulted["out"]) if r["part"])
    assert reasons["refusal"] == 2 and reasons["invalid_json"] == 1 and reasons["schema_invalid"] == 1
    report = json.loads((faulted["out"] / "report.json").read_text())
    assert report["lvlm"]["cached_failures"] == 4  # those four, read back instead of asked
    assert not reasons["retries_exhausted"] and not reasons["timeout"]  # asked again, answered now


# --- killed mid-way, then resumed --------------------------------------------------------------------

def _cli_process(argv: list, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MG_GEO_LVLM_")}
    env.update(PYTHONPATH=str(REPO), OPENAI_API_KEY=SECRET)
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "-v", *argv], cwd=str(REPO),
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def _signature(seen) -> tuple:
    return seen.prompt, tuple(seen.image_sha256)


def test_killed_run_resumes_without_repeating_received_answers(tmp_path, exif_samples, api_key_env):
    sources = [f"exif:{exif_samples / 'gps'}"]
    out = tmp_path / "out"
    cache = out / "_cache" / "lvlm"
    responder = SmartResponder()
    with FakeOpenAIServer(responder, latency_s=0.2, api_key=SECRET) as server:
        argv = build_argv(sources, out, server.base_url)
        started = time.monotonic()
        proc = _cli_process(argv, tmp_path / "killed.log")
        # Kill once the client has some answers (in its cache), with more still to ask.
        while proc.poll() is None and time.monotonic() - started < 120 and \
                (not cache.is_dir() or len(list(cache.rglob("*.json"))) < 8):
            time.sleep(0.02)
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.3)  # handlers still sleeping through their latency finish (into a dead socket)
        run1 = list(server.requests)

        # What the killed client had received: the answers it had written to the cache, found
        # by (image, answer text); the responder's answer depends on the request alone.
        answer_of = {(prompt, (image,)): text for _, image, prompt, text in responder.answers}
        cached = {(e["image_sha256"], e["text"]) for e in
                  (json.loads(p.read_text()) for p in cache.rglob("*.json"))}
        received = {_signature(r) for r in run1
                    if r.image_sha256 and (r.image_sha256[0], answer_of.get(_signature(r))) in cached}
        in_flight = [r for r in run1 if r.finished is None or r.finished >= killed_at]

        server.latency_s = 0.02  # the rerun (in process: its logs are captured) need not wait
        rc, log, took = run_cli(argv)
        assert rc == 0, log[-3000:]
        run2 = server.requests[len(run1):]

    print(f"\nkill test: {len(run1)} requests before SIGKILL at {killed_at - started:.1f} s "
          f"({len(received)} answers cached, {len(in_flight)} in flight); rerun: {len(run2)} requests, "
          f"{took:.1f} s")
    assert len(received) >= 8 and len(cached) == len(received)
    # An answer the server delivered well before the kill was cached on receipt, not at the end.
    settled = {_signature(r) for r in run1 if r.status == 200 and r.finished < killed_at - 1.0}
    assert settled <= received
    sent_before = {_signature(r) for r in run1}
    repeated = [r for r in run2 if _signature(r) in sent_before]
    print(f"kill test: {len(repeated)} request(s) of the killed run asked again")
    assert not [r for r in repeated if _signature(r) in received]
    # A repeat is legitimate only for a request whose answer the client never got: in flight at
    # the kill (or delivered in the last instant before it, not yet cached).
    late = {_signature(r) for r in run1 if r.finished is None or r.finished >= killed_at - 1.0}
    assert {_signature(r) for r in repeated} <= late
    assert len({_signature(r) for r in run2}) == len(run2)  # nothing asked twice after the restart

    report = json.loads((out / "report.json").read_text())
    assert report["conservation_ok"] and report["samples"]["clue"]["total"] == 9
    assert report["samples"]["dialogue"]["total"] == 9
    assert report["lvlm"]["requests"] == len(run2) and report["lvlm"]["cache_hits"] == len(received)
    assert SECRET not in (tmp_path / "killed.log").read_text() and SECRET not in log
    assert files_containing(out, SECRET.encode()) == []


# --- no LVLM at all --------------------------------------------------------------------------------

BEAM_IMPORT_NOISE = {"WARNING:root:apitools not found, and bigquery client libraries are not available "
                     "despite the import not raising an ImportError."}


def test_no_endpoint_and_no_weights_stops_at_once(tmp_path, exif_samples):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MG_GEO_LVLM_", "HF_", "TRANSFORMERS_")) and k != "OPENAI_API_KEY"}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "empty-hf-home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--source", f"exif:{exif_samples / 'gps'}",
                           "--out", str(out), "--parts", "meta,clue"],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    # Apache Beam logs one warning of its own while being imported, before mg-geo runs; apart from
    # it, stderr is the one message.
    lines = [line for line in done.stderr.splitlines() if line.strip() and line not in BEAM_IMPORT_NOISE]
    assert len(lines) == 1 and lines[0].startswith("mg-geo build: error: "), done.stderr
    assert "--lvlm-endpoint" in lines[0] and "--parts meta" in lines[0]
    assert done.stdout == ""
    assert not out.exists() or not any(out.iterdir())  # nothing was built

"""The openai backend against the loopback fake server: messages on the wire, faults counted by
cause, bounded real concurrency, the response cache (rerun and SIGKILL resume), the json_schema
400 fallback, and the api key kept out of logs and cache files."""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from fake_openai_server import FakeOpenAIServer, Fault, faults_by_marker
from pipeline.lvlm import (LvlmOptions, LvlmRequest, LvlmUnavailable, add_lvlm_arguments, check_backend,
                           make_backend, merge_stats, options_from_args)
from pipeline.lvlm.answers import check_answer
from pipeline.lvlm.retry import parse_retry_after

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-5ecret-DO-NOT-LOG-0123456789"
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
    "additionalProperties": False, "required": ["country", "item"],
    "properties": {"country": {"type": "string", "minLength": 2}, "item": {"type": "integer"}},
}


def responder(seen, body):
    """A valid answer that names the item the prompt asked about."""
    return {"country": "France", "item": int(re.search(r"item-(\d+)", seen.prompt).group(1))}


@pytest.fixture(scope="module")
def jpegs(exif_samples):
    """Small JPEGs made from the real GPS photos, like the image stage's output."""
    out = []
    for path in sorted((exif_samples / "gps").glob("*.jpg"))[:4]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((96, 96))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
            out.append(buf.getvalue())
    return out


def request(i, jpegs, schema=SCHEMA, prompt_version="clue/v1", **params) -> LvlmRequest:
    image = jpegs[i % len(jpegs)]
    return LvlmRequest(
        messages=[{"role": "system", "content": [{"type": "text", "text": "You annotate photos."}]},
                  {"role": "user", "train": False,
                   "content": [{"type": "image"}, {"type": "text", "text": f"Where was item-{i} taken?"}]}],
        image_jpeg=image, image_sha256=LvlmRequest.sha256(image), schema=schema, schema_name="clue",
        schema_version="clue-schema/v1", prompt_version=prompt_version, params=params,
        request_id=f"key{i}/clue")


@pytest.fixture
def server():
    with FakeOpenAIServer(responder, api_key=KEY, record_bodies=True) as s:
        yield s


def backend_for(server, tmp_path, **overrides):
    options = dict(backend="openai", endpoint=server.base_url, model="fake-vlm", api_key=KEY,
                   concurrency=8, cache_dir=str(tmp_path / "cache"), timeout_s=2.0,
                   backoff_base_s=0.01, backoff_cap_s=0.05, max_attempts=3)
    options.update(overrides)
    return make_backend(LvlmOptions(**options))


def test_answers_are_validated_and_sent_as_openai_chat_messages(server, tmp_path, jpegs):
    backend = backend_for(server, tmp_path)
    results = backend.run_inference([request(i, jpegs) for i in range(5)])
    backend.close()

    assert [r.parsed for r in results] == [{"country": "France", "item": i} for i in range(5)]
    assert all(r.ok and not r.cached and r.attempts == 1 and r.backend == "openai" and r.model == "fake-vlm"
               for r in results)
    assert all(r.usage["prompt_tokens"] > 0 and r.usage["completion_tokens"] > 0 for r in results)
    assert server.count == 5
    seen = sorted(server.requests, key=lambda s: s.prompt)[0]
    body = seen.body
    assert seen.authorization == f"Bearer {KEY}"
    assert body["model"] == "fake-vlm" and body["temperature"] == 0.0 and body["max_tokens"] == 512
    assert body["seed"] == 0
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "clue", "schema": SCHEMA, "strict": True}}
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You annotate photos."}
    assert set(user) == {"role", "content"}  # "train" is ours, not the API's
    image_part, text_part = user["content"]
    assert text_part == {"type": "text", "text": "Where was item-0 taken?"}
    assert image_part["type"] == "image_url"
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == jpegs[0]
    stats = backend.stats()
    assert stats["requests"] == 5 and stats["ok"] == 5 and stats["cache_writes"] == 5
    assert stats["prompt_tokens"] == sum(r.usage["prompt_tokens"] for r in results)
    assert stats["latency_ms"]["count"] == 5 and stats["latency_ms"]["p50"] > 0


def capture_all_logs(caplog):
    """DEBUG from every logger, including the HTTP stack's own (which we quiet otherwise)."""
    caplog.set_level(logging.DEBUG)
    for name in ("httpx2", "httpcore2", "openai"):
        caplog.set_level(logging.DEBUG, logger=name)


def test_each_fault_ends_under_its_cause_and_never_raises(server, tmp_path, jpegs, caplog):
    capture_all_logs(caplog)
    server.fault_plan = faults_by_marker({
        "item-0 ": [Fault("429", retry_after="0")],
        "item-1 ": ["500"],
        "item-2 ": [Fault("slow", delay_s=1.5)],
        "item-3 ": ["drop"],
        "item-4 ": ["invalid_json", "invalid_json"],
        "item-5 ": ["schema_violation", Fault("schema_violation", content='{"country": "F", "item": 5}')],
        "item-6 ": ["invalid_json"],                      # the re-ask gets a valid answer
        "item-7 ": ["refusal"],
        "item-8 ": ["refusal_text"],
        "item-9 ": ["400", "400"],                        # 400 without and with response_format
        "item-10 ": ["500", "500", "500"],
        "item-11 ": [Fault("slow", delay_s=1.5)] * 3,
        "item-12 ": ["bad_body"],
        "item-13 ": [Fault("429", retry_after="1")],
        "item-14 ": [Fault("429", retry_after="Wed, 21 Oct 2015 07:28:00 GMT")],  # a date in the past
        "item-15 ": [Fault("429", retry_after="100")],     # capped by retry_after_cap_s
    })
    backend = backend_for(server, tmp_path, timeout_s=0.5, retry_after_cap_s=1.2, concurrency=16)
    started = time.monotonic()
    results = backend.run_inference([request(i, jpegs) for i in range(17)])
    elapsed = time.monotonic() - started
    stats = backend.stats()
    backend.close()

    by_item = {i: r for i, r in enumerate(results)}
    ok = {i for i, r in by_item.items() if r.ok}
    assert ok == {0, 1, 2, 3, 6, 13, 14, 15, 16}
    assert all(by_item[i].parsed == {"country": "France", "item": i} for i in ok)
    expected = {4: "invalid_json", 5: "schema_invalid", 7: "refusal", 8: "refusal", 9: "http_4xx",
                10: "retries_exhausted", 11: "timeout", 12: "bad_response"}
    assert {i: by_item[i].reason for i in expected} == expected
    assert "HTTP 400" in by_item[9].detail
    assert "minLength" in by_item[5].detail or "too short" in by_item[5].detail  # the last answer's error
    assert by_item[10].attempts == 3 and "500" in by_item[10].detail
    assert by_item[4].attempts == 2 and by_item[6].attempts == 2  # one re-ask each
    assert stats["retries_by_cause"] == {"429": 4, "5xx": 1 + 2, "timeout": 1 + 2, "connection": 1}
    assert stats["failures_by_reason"] == {"invalid_json": 1, "schema_invalid": 1, "refusal": 2,
                                           "http_4xx": 1, "retries_exhausted": 1, "timeout": 1,
                                           "bad_response": 1}
    assert stats["reasks"] == 3 and stats["ok"] == 9 and stats["items"] == 17

    def gap(item):  # seconds between the first and second request for an item
        times = [s.started for s in server.requests if f"item-{item} " in s.prompt]
        return times[1] - times[0]
    assert 0.9 <= gap(13) < 1.2 + 0.5     # Retry-After: 1 honoured
    assert gap(14) < 0.5                  # a past HTTP date means "now"
    assert 1.1 <= gap(15) < 1.2 + 0.5     # Retry-After: 100 capped at 1.2 s
    assert elapsed < 4.0                  # faults overlap: one slow item does not hold the others

    # The re-ask carries the rejected answer and the reason, so it is not the same request again.
    reask = [s for s in server.requests if "item-6 " in s.prompt][1]
    assert "rejected (invalid_json" in reask.prompt
    # The 400 on item 9 was not about response_format: structured output stays on, and only
    # item 9's one try without it went out without it.
    plain = [s for s in server.requests if s.response_format is None]
    assert len(plain) == 1 and "item-9 " in plain[0].prompt
    assert stats["response_format_refused"] == 1

    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "HTTP Request: POST" in logged and "Authorization" not in logged  # really captured
    assert KEY not in logged


def test_concurrency_is_bounded_and_real(tmp_path, jpegs):
    with FakeOpenAIServer(responder, latency_s=0.2) as server:
        backend = backend_for(server, tmp_path, concurrency=4, cache_dir=None)
        started = time.monotonic()
        batches = [[request(i, jpegs) for i in range(k, k + 8)] for k in (0, 100)]
        # Two threads share the backend (Beam runs several DoFn threads per worker): the bound
        # is per backend, not per call.
        threads = [threading.Thread(target=backend.run_inference, args=(b,)) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        stats = backend.stats()
        backend.close()
    assert server.count == 16
    assert 1 < server.peak_in_flight <= 4
    assert stats["peak_in_flight"] == 4
    assert elapsed < 16 * 0.2 / 2  # serial would take 3.2 s; 4 at a time takes ~0.8 s


def test_requests_per_minute_cap(tmp_path, jpegs):
    with FakeOpenAIServer(responder) as server:
        backend = backend_for(server, tmp_path, rpm=600, cache_dir=None)  # 10/s, bursts of 10
        started = time.monotonic()
        results = backend.run_inference([request(i, jpegs) for i in range(20)])
        elapsed = time.monotonic() - started
        backend.close()
    assert all(r.ok for r in results)
    assert elapsed >= 0.9  # 10 at once, then 10 more at 10 per second


def test_a_rerun_sends_zero_requests_for_answers_it_has(server, tmp_path, jpegs):
    batch = [request(i, jpegs) for i in range(6)]
    first = backend_for(server, tmp_path)
    assert all(r.ok for r in first.run_inference(batch))
    first.close()
    assert server.count == 6

    server.reset()
    again = backend_for(server, tmp_path)  # a new worker / a new run, same cache directory
    renamed = [request(i, jpegs) for i in range(6)]
    for r in renamed:
        r.request_id = "another-run/" + r.request_id  # not part of the key
    results = again.run_inference(renamed)
    assert server.count == 0
    assert [r.parsed for r in results] == [{"country": "France", "item": i} for i in range(6)]
    assert all(r.cached and r.attempts == 0 for r in results)
    assert again.stats()["cache_hits"] == 6 and again.stats()["requests"] == 0

    # What the answer depends on is in the key: prompt version, sampling, image.
    changed = [request(0, jpegs, prompt_version="clue/v2"), request(1, jpegs, temperature=0.7),
               request(2, jpegs)]
    changed[2].image_jpeg = jpegs[3]
    changed[2].image_sha256 = LvlmRequest.sha256(jpegs[3])
    assert not any(r.cached for r in again.run_inference(changed))
    assert server.count == 3
    again.close()


def test_a_rerun_does_not_pay_again_for_answers_that_stayed_invalid(server, tmp_path, jpegs):
    """Items 1 and 4 get an answer that is not valid for the schema on every ask (the first ask and
    its re-ask): a final failure, paid for. The rerun reports the same failures from the cache and
    sends nothing; --lvlm-retry-failed asks again. A transport failure is never stored."""
    server.fault_plan = faults_by_marker({"item-1 ": ["schema_violation"] * 2, "item-4 ": ["schema_violation"] * 2,
                                          "item-2 ": ["500"] * 3})
    batch = [request(i, jpegs) for i in range(6)]
    first = backend_for(server, tmp_path)
    results = first.run_inference(batch)
    first.close()
    assert [r.ok for r in results] == [True, False, False, True, False, True]
    assert results[1].reason == results[4].reason == "schema_invalid" and results[2].reason != "schema_invalid"

    server.reset()
    again = backend_for(server, tmp_path)
    rerun = again.run_inference(batch)
    again.close()
    assert [(r.ok, r.reason) for r in rerun] == [(True, None), (False, "schema_invalid"), (True, None),
                                                  (True, None), (False, "schema_invalid"), (True, None)]
    assert rerun[1].cached and rerun[4].cached and not rerun[2].cached
    assert server.count == 1  # only item 2, whose earlier failure got no answer
    assert again.stats()["cached_failures"] == 2

    server.reset()
    retry = backend_for(server, tmp_path, retry_failed=True)
    assert all(r.ok for r in retry.run_inference(batch))  # the server answers well now
    retry.close()
    assert server.count == 2  # items 1 and 4 asked again; the rest were cached answers


def test_json_schema_400_falls_back_to_instructions_once(tmp_path, jpegs, caplog):
    caplog.set_level(logging.INFO)
    with FakeOpenAIServer(responder, reject_json_schema=True) as server:
        server.fault_plan = faults_by_marker({"item-7 ": ["schema_violation"] * 2})
        backend = backend_for(server, tmp_path, concurrency=4)
        first = backend.run_inference([request(i, jpegs) for i in range(8)])
        sent_first = server.count
        second = backend.run_inference([request(i, jpegs) for i in range(10, 16)])
        backend.close()
    assert all(r.ok for r in first[:7] + second)
    # The answer is still validated without response_format.
    assert first[7].reason == "schema_invalid"
    warnings = [r for r in caplog.records if "response_format" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    # Remembered: the second batch never offers json_schema again and carries the schema in
    # the prompt instead.
    later = server.requests[sent_first:]
    assert len(later) == 6 and all(s.response_format is None for s in later)
    assert all('"additionalProperties": false' in s.prompt for s in later)
    # Requests that went out before the first answer without response_format came back may
    # have been refused too; none after.
    assert 1 <= backend.stats()["response_format_refused"] <= 8


KILL_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import test_lvlm_openai as t
from pipeline.lvlm import LvlmOptions, make_backend
jpegs = [bytes.fromhex(h) for h in sys.argv[3].split(",")]
backend = make_backend(LvlmOptions(backend="openai", endpoint=sys.argv[1], model="fake-vlm",
                                   concurrency=2, cache_dir=sys.argv[2]))
results = backend.run_inference([t.request(i, jpegs) for i in range(int(sys.argv[4]))])
print("finished", sum(r.ok for r in results), flush=True)
"""


def test_a_run_killed_midway_resumes_without_repeating_answered_requests(tmp_path, jpegs):
    n = 16
    cache = tmp_path / "cache"
    with FakeOpenAIServer(responder, latency_s=0.15, api_key=KEY) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, server.base_url, str(cache),
             ",".join(j.hex() for j in jpegs[:2]), str(n)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while sum(s.status == 200 for s in server.requests) < 6:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        time.sleep(0.3)  # the answers it got are written to the cache within milliseconds
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        answered = {s.prompt for s in server.requests if s.status == 200 and s.finished < killed_at - 0.2}
        # In flight at the kill (2 at most), or answered in its last 0.2 s and maybe not cached yet.
        unsettled = {s.prompt for s in server.requests} - answered
        before = server.count
        assert 6 <= len(answered) < n

        server.reset()
        backend = backend_for(server, tmp_path, concurrency=4)
        results = backend.run_inference([request(i, jpegs[:2]) for i in range(n)])
        backend.close()

    assert [r.parsed for r in results] == [{"country": "France", "item": i} for i in range(n)]
    resent = [s.prompt for s in server.requests]
    assert len(resent) == len(set(resent))           # nothing asked twice in the rerun
    assert not answered & set(resent)                  # nothing already answered asked again
    assert len(resent) == sum(not r.cached for r in results) and 0 < len(resent) < n
    assert before + len(resent) <= n + len(unsettled)  # only unsettled requests were asked twice
    files = [p for p in cache.rglob("*") if p.is_file()]
    final = [p for p in files if p.name.endswith(".json")]
    assert len(final) == n and all(json.loads(p.read_text())["key"] == p.stem for p in final)
    for p in files:
        assert KEY not in p.read_text(errors="replace")


def test_the_api_key_stays_out_of_options_repr_stats_and_cache(server, tmp_path, jpegs, caplog):
    capture_all_logs(caplog)
    options = LvlmOptions(backend="openai", endpoint=server.base_url, model="fake-vlm", api_key=KEY,
                          cache_dir=str(tmp_path / "cache"))
    assert KEY not in repr(options) and KEY not in json.dumps(options.public_dict())
    backend = make_backend(options)
    results = backend.run_inference([request(i, jpegs) for i in range(3)])
    backend.close()
    assert all(r.ok for r in results)
    assert KEY not in json.dumps(backend.stats()) and KEY not in repr(results)
    cached = list((tmp_path / "cache").rglob("*.json"))
    assert len(cached) == 3
    assert all(KEY not in p.read_text() for p in cached)
    assert all(KEY not in f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert sum(s.authorization == f"Bearer {KEY}" for s in server.requests) == 3  # it was used


def test_model_name_comes_from_get_models_when_not_given(server, tmp_path, jpegs):
    backend = backend_for(server, tmp_path, model=None)
    backend.load_model()
    assert backend.model == "fake-vlm" and server.models_requests == 1
    assert backend.run_inference([request(0, jpegs)])[0].ok
    backend.close()


def test_bad_requests_become_results_not_exceptions(server, tmp_path, jpegs):
    no_image = request(0, jpegs)
    no_image.image_jpeg = None
    weird = request(1, jpegs, stop=object())  # params that cannot be JSON
    backend = backend_for(server, tmp_path)
    results = backend.run_inference([no_image, weird, request(2, jpegs)])
    backend.close()
    assert [r.reason for r in results] == ["invalid_request", "invalid_request", None]
    assert results[2].ok and server.count == 1


def test_check_backend_names_the_ways_out(server, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MG_GEO_LVLM_ENDPOINT", raising=False)
    with pytest.raises(LvlmUnavailable) as err:
        check_backend(LvlmOptions(model="no-such-org/no-such-vlm"))
    assert "--lvlm-endpoint" in str(err.value) and "--parts meta" in str(err.value)

    check_backend(LvlmOptions(endpoint=server.base_url, api_key=KEY))  # answers GET /models
    with pytest.raises(LvlmUnavailable, match="401"):
        check_backend(LvlmOptions(endpoint=server.base_url, api_key="sk-wrong"))
    port = server.port
    server.stop()
    started = time.monotonic()
    with pytest.raises(LvlmUnavailable) as err:
        check_backend(LvlmOptions(endpoint=f"http://127.0.0.1:{port}", api_key=KEY))
    assert "--parts meta" in str(err.value) and time.monotonic() - started < 6


def test_options_from_flags_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MG_GEO_LVLM_ENDPOINT", "http://gpu-box:8000")
    monkeypatch.setenv("MG_GEO_LVLM_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    add_lvlm_arguments(parser)
    options = options_from_args(parser.parse_args(["--out", str(tmp_path), "--lvlm-concurrency", "8",
                                                   "--lvlm-rpm", "120"]))
    assert options.base_url() == "http://gpu-box:8000/v1"
    assert options.model == "Qwen/Qwen2.5-VL-7B-Instruct" and options.api_key == KEY
    assert options.concurrency == 8 and options.rpm == 120 and options.max_attempts == 5
    assert options.cache_dir == os.path.join(str(tmp_path), "_cache", "lvlm")
    assert KEY not in repr(options)
    assert LvlmOptions(endpoint="http://h:1/api/v1/").base_url() == "http://h:1/api/v1"
    with pytest.raises(SystemExit):
        parser.parse_args(["--lvlm-api-key", KEY])  # no flag for the key: it would show in `ps`


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)


def test_answer_checks_shared_by_both_backends():
    assert check_answer('```json\n{"country": "Peru", "item": 1}\n```', SCHEMA).parsed == {"country": "Peru", "item": 1}
    assert check_answer('Sure! {"country": "Peru", "item": 1} Hope that helps.', SCHEMA).ok
    assert check_answer('{"country": "Peru"}', SCHEMA).reason == "schema_invalid"
    assert check_answer('[1, 2]', SCHEMA).reason == "invalid_json"
    assert check_answer("I'm sorry, I can't help with that.", SCHEMA).reason == "refusal"
    assert check_answer('{"country": "I\'m sorry land", "item": 2}', SCHEMA).ok
    assert check_answer(None, SCHEMA, refusal="no").reason == "refusal"
    assert check_answer("free text", None).ok and check_answer("", None).reason == "empty_answer"


def test_stats_merge_across_workers(server, tmp_path, jpegs):
    a = backend_for(server, tmp_path / "a")
    b = backend_for(server, tmp_path / "b")
    a.run_inference([request(i, jpegs) for i in range(3)])
    b.run_inference([request(i, jpegs) for i in range(5)])
    a.close()
    b.close()
    merged = merge_stats([a.stats(), b.stats()])
    assert merged["requests"] == 8 and merged["ok"] == 8 and merged["workers"] == 2
    assert merged["latency_ms"]["count"] == 8
    assert merged["peak_in_flight"] == max(a.stats()["peak_in_flight"], b.stats()["peak_in_flight"])
    assert min(a.stats()["latency_ms"]["p50"], b.stats()["latency_ms"]["p50"]) <= merged["latency_ms"]["p50"]
    assert merged["latency_ms"]["p99"] <= max(a.stats()["latency_ms"]["p99"], b.stats()["latency_ms"]["p99"])
    assert json.loads(json.dumps(merged)) == merged  # plain JSON: goes into report.json as is


def test_api_key_never_travels_in_a_pickled_job_graph(monkeypatch):
    """Runners upload and display the pickled graph; workers read the key from their own env."""
    import pickle

    from pipeline.lvlm.options import LvlmOptions
    monkeypatch.setenv("OPENAI_API_KEY", "sk-graph-secret-123")
    options = LvlmOptions(endpoint="http://127.0.0.1:9/v1")
    assert options.api_key == "sk-graph-secret-123"
    blob = pickle.dumps(options)
    assert b"sk-graph-secret-123" not in blob
    monkeypatch.setenv("OPENAI_API_KEY", "sk-worker-env")
    assert pickle.loads(blob).api_key == "sk-worker-env"

"""How close the openai backend gets to the request rate its concurrency allows.

A loopback fake server (its own process, so its GIL does not slow the client) answers every chat
request after a fixed latency. With `concurrency` requests always in flight the ideal rate is
concurrency / latency (32 / 50 ms = 640 requests/s); the client's overhead (building messages,
base64 images, JSON, the HTTP pool, validation, batch tails) shows up as the missing fraction.
Goal: >= 0.9. The client's CPU per request is printed too: the client is one event loop, so
1 / cpu_per_request is its ceiling on one free core, whatever else the machine is running.

    .venv/bin/python bench/bench_lvlm_client.py [--latency 0.05] [--concurrency 32] [--seconds 5]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.lvlm import LvlmOptions, LvlmRequest, make_backend  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "prompt_sha256"],
          "properties": {"answer": {"type": "string"}, "prompt_sha256": {"type": "string"}}}


def _jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (448, 336), (90, 140, 200)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _requests(start: int, n: int, image: bytes) -> list[LvlmRequest]:
    sha = LvlmRequest.sha256(image)
    return [LvlmRequest(
        messages=[{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": f"Where was photo {i} taken?"}]}],
        image_jpeg=image, image_sha256=sha, schema=SCHEMA, schema_name="bench", schema_version="v1",
        prompt_version="bench/v1", params={}, request_id=f"bench-{i}") for i in range(start, start + n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=320, help="requests per run_inference call")
    parser.add_argument("--cache", default=None, help="response cache directory (default: none)")
    args = parser.parse_args()

    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_openai_server.py"),
                               "--latency", str(args.latency)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split()[1]
        backend = make_backend(LvlmOptions(backend="openai", endpoint=url, model="fake-vlm",
                                           concurrency=args.concurrency, cache_dir=args.cache, timeout_s=10))
        backend.load_model()
        image = _jpeg()
        backend.run_inference(_requests(-args.concurrency, args.concurrency, image))  # warm the pool
        warm = backend.stats()["requests"]
        done, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < args.seconds:
            results = backend.run_inference(_requests(done, args.batch, image))
            bad = [r for r in results if not r.ok]
            if bad:
                raise SystemExit(f"{len(bad)} failed requests, e.g. {bad[0]}")
            done += len(results)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        stats = backend.stats()
        backend.close()
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    rate = done / elapsed
    ideal = args.concurrency / args.latency
    print(json.dumps({
        "requests": done, "seconds": round(elapsed, 2), "rate_per_s": round(rate, 1),
        "ideal_per_s": round(ideal, 1), "fraction_of_ideal": round(rate / ideal, 3),
        "http_requests": stats["requests"] - warm, "peak_in_flight": stats["peak_in_flight"],
        "latency_ms": {k: stats["latency_ms"][k] for k in ("p50", "p90", "p99")},
        "client_cpu_ms_per_request": round(cpu / done * 1000, 3),
        "cpu_ceiling_fraction": round(min(1.0, done / cpu / ideal), 3),
        "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "concurrency": args.concurrency, "server_latency_ms": args.latency * 1000, "batch": args.batch,
        "cache": bool(args.cache),
    }))


if __name__ == "__main__":
    main()

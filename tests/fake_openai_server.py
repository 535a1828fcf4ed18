"""A loopback OpenAI-compatible server for tests and benchmarks, with scriptable faults.

    from fake_openai_server import FakeOpenAIServer, Fault

    def responder(seen, body):          # the answer content for a request that is answered
        return {"country": "France"}    # dict -> JSON text; str -> sent as is

    with FakeOpenAIServer(responder, latency_s=0.05, api_key="sk-test") as server:
        server.base_url                 # http://127.0.0.1:PORT/v1
        server.add_faults("429", Fault("429", retry_after="1"), "500")   # next requests, in order
        server.fault_plan = faults_by_marker({"item-3": ["drop", "timeout"]})  # by prompt text
        ...
        server.requests                 # [SeenRequest], one per POST /v1/chat/completions
        server.peak_in_flight

It implements POST /v1/chat/completions and GET /v1/models, nothing else. Each chat request gets
one Fault (default "ok"): first from `fault_plan(seen)` if set, else from the queue filled by
add_faults(), else "ok"; `reject_json_schema=True` makes every request that carries
response_format json_schema a 400, like a server without structured output. Fault kinds:

    ok                  200 with the responder's answer
    429                 429 Too Many Requests; Retry-After = fault.retry_after (seconds or HTTP date)
    500                 500 Internal Server Error
    slow                answer only after fault.delay_s (make it longer than the client timeout)
    drop                close the connection without any response
    invalid_json        200 whose answer text is not JSON
    schema_violation    200 whose answer is a JSON object the schema rejects (or fault.content)
    refusal             200 with message.refusal set and no content (OpenAI's refusal field)
    refusal_text        200 whose answer is a refusal sentence without JSON
    reject_json_schema  400 if the request has response_format json_schema, else like ok
    400                 400 Bad Request
    bad_body            200 with a body that is not JSON at all

Runs on 127.0.0.1 with an OS-chosen port, in daemon threads; stop() (or leaving the `with`) ends
it and wakes any handler still sleeping. `python tests/fake_openai_server.py --latency 0.05`
runs one in its own process (the benchmark does, to keep its GIL away from the client) and
prints `URL <base_url>` once it listens.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Union

KINDS = ("ok", "429", "500", "slow", "drop", "invalid_json", "schema_violation", "refusal",
         "refusal_text", "reject_json_schema", "400", "bad_body")
REFUSAL_TEXT = "I'm sorry, but I can't help with identifying where this photo was taken."
# Breaks any schema with required properties or additionalProperties: false.
SCHEMA_VIOLATION = {"unexpected_field": 1}


@dataclass
class Fault:
    kind: str = "ok"
    retry_after: Optional[str] = None  # 429: Retry-After header value ("2" or an HTTP date)
    delay_s: float = 0.0               # extra wait before the response (any kind; "slow" needs it)
    content: Optional[str] = None      # answer text override (ok / schema_violation)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")


FaultLike = Union[Fault, str]


def as_fault(value: FaultLike) -> Fault:
    return value if isinstance(value, Fault) else Fault(value)


@dataclass
class SeenRequest:
    """What the server saw of one chat request (the full body only with record_bodies=True)."""
    index: int
    started: float                       # time.monotonic() on arrival
    model: str = ""
    prompt: str = ""                     # every text part of every message, joined by newlines
    image_sha256: list = field(default_factory=list)  # sha256 of each data-URL image
    response_format: Optional[str] = None  # its "type", or None
    params: dict = field(default_factory=dict)  # temperature, max_tokens, seed, ...
    authorization: str = ""              # the Authorization header as received
    fault: str = "ok"
    # What the server wrote and when (time.monotonic()); None: nothing (drop, stopped). A "slow"
    # answer may be written after the client has given up: check the client side for those.
    status: Optional[int] = None
    finished: Optional[float] = None
    body: Optional[dict] = None


Responder = Callable[[SeenRequest, dict], Union[dict, str]]
FaultPlan = Callable[[SeenRequest], Optional[FaultLike]]


def default_responder(seen: SeenRequest, body: dict) -> dict:
    return {"answer": "ok", "prompt_sha256": hashlib.sha256(seen.prompt.encode()).hexdigest()[:16]}


def faults_by_marker(plan: dict[str, list[FaultLike]]) -> FaultPlan:
    """A fault plan keyed by text in the prompt: a request whose prompt contains a marker gets that
    marker's next fault (then "ok" once the list is used up). Independent of arrival order, so it
    works with concurrent clients."""
    queues = {marker: [as_fault(f) for f in faults] for marker, faults in plan.items()}
    lock = threading.Lock()

    def fault_for(seen: SeenRequest) -> Optional[Fault]:
        with lock:
            for marker, queue in queues.items():
                if marker in seen.prompt:
                    return queue.pop(0) if queue else None
        return None
    return fault_for


class FakeOpenAIServer:
    def __init__(self, responder: Responder = default_responder, *, latency_s: float = 0.0,
                 model: str = "fake-vlm", api_key: Optional[str] = None,
                 reject_json_schema: bool = False, record_bodies: bool = False):
        self.responder = responder
        self.latency_s = latency_s          # every chat request waits this long (a model's time)
        self.model = model
        self.api_key = api_key              # when set, other keys get 401
        self.reject_json_schema = reject_json_schema
        self.record_bodies = record_bodies
        self.fault_plan: Optional[FaultPlan] = None
        self.requests: list[SeenRequest] = []
        self.models_requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._queue: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ---- control ----------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def add_faults(self, *faults: FaultLike) -> None:
        """Faults for the next chat requests, in arrival order."""
        with self._lock:
            self._queue.extend(as_fault(f) for f in faults)

    @property
    def count(self) -> int:
        return len(self.requests)

    def reset(self) -> None:
        """Forget the request log and the peak (faults and settings stay)."""
        with self._lock:
            self.requests = []
            self.peak_in_flight = 0

    # ---- per request (called from handler threads) ------------------------------------------
    def _begin(self, body: dict, authorization: str) -> tuple[SeenRequest, Fault]:
        seen = SeenRequest(index=-1, started=time.monotonic(), authorization=authorization)
        seen.model = str(body.get("model", ""))
        seen.prompt, seen.image_sha256 = _summarise(body.get("messages") or [])
        response_format = body.get("response_format")
        seen.response_format = response_format.get("type") if isinstance(response_format, dict) else None
        seen.params = {k: body[k] for k in ("temperature", "max_tokens", "seed", "top_p") if k in body}
        seen.body = body if self.record_bodies else None
        fault = None
        if self.fault_plan is not None:
            fault = self.fault_plan(seen)
        with self._lock:
            if fault is None and self._queue:
                fault = self._queue.pop(0)
            seen.index = len(self.requests)
            self.requests.append(seen)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        fault = as_fault(fault) if fault is not None else Fault()
        if self.reject_json_schema and fault.kind == "ok":
            fault = Fault("reject_json_schema")
        seen.fault = fault.kind
        return seen, fault

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


def _summarise(messages: list) -> tuple[str, list]:
    texts, images = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                data = url.split(",", 1)[1] if url.startswith("data:") and "," in url else ""
                images.append(hashlib.sha256(base64.b64decode(data)).hexdigest() if data else url)
    return "\n".join(texts), images


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a client opening 32 connections at once would
    # see dropped SYNs and 1 s retransmits, i.e. timeouts that no real server causes.
    request_queue_size = 1024


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive: the client's pool reuses connections
    timeout = 30                   # idle keep-alive connections end, so their threads do too
    # Headers and body are two writes; with Nagle on, the body waits for the client's delayed
    # ACK (~40 ms), which would add to every answer's latency.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet: tests read the request log instead
        pass

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self._json(404, _error("not found", "not_found"))
        if not self._authorized():
            return self._json(401, _error("invalid api key", "invalid_api_key"))
        with self.fake._lock:
            self.fake.models_requests += 1
        self._json(200, {"object": "list", "data": [
            {"id": self.fake.model, "object": "model", "created": 0, "owned_by": "fake"}]})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._json(404, _error("not found", "not_found"))
        if not self._authorized():
            return self._json(401, _error("invalid api key", "invalid_api_key"))
        try:
            body = json.loads(raw)
        except ValueError:
            return self._json(400, _error("body is not JSON", "invalid_request_error"))
        fake = self.fake
        seen, fault = fake._begin(body, self.headers.get("Authorization", ""))
        try:
            fake._sleep(fake.latency_s + fault.delay_s)
            if fake._stopping.is_set():
                return
            self._answer(seen, fault, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before the answer: nothing was delivered
        finally:
            fake._end()

    def _answer(self, seen: SeenRequest, fault: Fault, body: dict) -> None:
        kind = fault.kind
        if kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return self._json(429, _error("rate limit reached", "rate_limit_exceeded"), seen, headers)
        if kind == "500":
            return self._json(500, _error("internal error", "server_error"), seen)
        if kind == "400" or (kind == "reject_json_schema" and seen.response_format == "json_schema"):
            return self._json(400, _error("response_format json_schema is not supported"
                                          if kind != "400" else "bad request", "invalid_request_error"), seen)
        if kind == "bad_body":
            return self._send(200, b"<html>upstream proxy error</html>", "text/html", seen)
        refusal = None
        if kind == "refusal":
            content, refusal = None, REFUSAL_TEXT
        elif kind == "refusal_text":
            content = REFUSAL_TEXT
        elif kind == "invalid_json":
            content = 'Here is the answer: {"country": "Fra'
        elif kind == "schema_violation":
            content = fault.content if fault.content is not None else json.dumps(SCHEMA_VIOLATION)
        elif fault.content is not None:
            content = fault.content
        else:
            answer = self.fake.responder(seen, body)
            content = answer if isinstance(answer, str) else json.dumps(answer)
        completion = {
            "id": f"chatcmpl-fake-{seen.index}", "object": "chat.completion", "created": int(time.time()),
            "model": seen.model or self.fake.model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}],
            "usage": {"prompt_tokens": len(seen.prompt) // 4 + 1,
                      "completion_tokens": len(content or refusal or "") // 4 + 1,
                      "total_tokens": len(seen.prompt) // 4 + len(content or refusal or "") // 4 + 2},
        }
        self._json(200, completion, seen)

    def _authorized(self) -> bool:
        key = self.fake.api_key
        return key is None or self.headers.get("Authorization", "") == f"Bearer {key}"

    def _json(self, status: int, obj: dict, seen: Optional[SeenRequest] = None, headers=None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", seen, headers)

    def _send(self, status: int, data: bytes, content_type: str, seen: Optional[SeenRequest] = None,
              headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        if seen is not None:
            seen.status, seen.finished = status, time.monotonic()


def _error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": code, "code": code, "param": None}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible server until stdin closes.")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each chat request takes")
    parser.add_argument("--model", default="fake-vlm")
    args = parser.parse_args(argv)
    with FakeOpenAIServer(latency_s=args.latency, model=args.model) as server:
        print(f"URL {server.base_url}", flush=True)
        sys.stdin.read()  # the parent closes our stdin (or exits) to stop us
        print(f"REQUESTS {server.count} PEAK {server.peak_in_flight}", flush=True)


if __name__ == "__main__":
    main()

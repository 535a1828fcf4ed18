"""The `openai` backend: the openai package's async client against any OpenAI-compatible server
(vLLM, SGLang, TGI, Ollama, OpenAI).

One asyncio event loop per backend instance runs in a background thread for the life of the
worker, so the client's connection pool (bound to the loop it first ran on) is reused across
batches; run_inference() hands a batch to that loop and waits. A semaphore bounds requests in
flight, an optional token bucket caps requests per minute. The client's own retries are off:
retries (and their counting) happen here, per cause.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import random
import threading
import time
from typing import Optional

import openai

from pipeline.lvlm.answers import Verdict, check_answer, reask_messages, schema_problem, with_instructions
from pipeline.lvlm.cache import ResponseCache, cache_key, make_entry, make_failure_entry
from pipeline.lvlm.options import LvlmOptions
from pipeline.lvlm.retry import TokenBucket, backoff_delay, parse_retry_after
from pipeline.lvlm.stats import LvlmStats
from pipeline.lvlm.types import LvlmBackend, LvlmRequest, LvlmResult, LvlmUnavailable, unavailable_message

log = logging.getLogger(__name__)
_SCHEMA_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class _Answer:
    """One chat completion that came back, or why none did."""

    def __init__(self, text=None, refusal=None, usage=None, finish_reason=None, failure=None,
                 detail=""):
        self.text, self.refusal, self.finish_reason = text, refusal, finish_reason
        self.usage = usage or {"prompt_tokens": 0, "completion_tokens": 0}
        self.failure, self.detail = failure, detail


class OpenAIBackend(LvlmBackend):
    name = "openai"

    def __init__(self, options: LvlmOptions):
        if not options.base_url():
            raise LvlmUnavailable(unavailable_message("the openai backend has no endpoint"))
        self.options = options
        self.model = options.model or ""
        self._stats = LvlmStats()
        self._cache = ResponseCache(options.cache_dir) if options.cache_dir else None
        self._rng = random.Random()
        self._structured = True          # False once the server refused response_format json_schema
        self._load_lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._client: Optional[openai.AsyncOpenAI] = None
        self._semaphore: Optional[asyncio.Semaphore] = None
        self._bucket: Optional[TokenBucket] = None
        self._inflight: dict[str, asyncio.Future] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def load_model(self) -> None:
        """Start the loop thread and the client (idempotent); learn the model name from GET
        /models when none was given (a vLLM server serves exactly one)."""
        with self._load_lock:
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
                max_workers=min(16, self.options.concurrency), thread_name_prefix="lvlm-cache"))
            thread = threading.Thread(target=loop.run_forever, name="lvlm-openai-loop", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            try:
                self._call(self._open())
            except BaseException:
                self._loop = None
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                raise

    async def _open(self) -> None:
        o = self.options
        # The HTTP library logs every request at INFO: millions of lines on a real run. Quiet it
        # unless someone configured that logger on purpose. (openai 1.x uses httpx, 3.x httpx2.)
        for name in ("httpx", "httpx2"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        # Built from what openai exports, so this works whichever httpx flavour it ships with.
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(max_connections=o.concurrency,
                                                        max_keepalive_connections=o.concurrency)
        timeout = openai.Timeout(o.timeout_s, connect=min(o.timeout_s, 10.0))
        self._client = openai.AsyncOpenAI(
            base_url=o.base_url(),
            # Local servers (vLLM, Ollama) take any key; the client insists on one.
            api_key=o.api_key or "EMPTY",
            max_retries=0,
            timeout=timeout,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout),
        )
        self._semaphore = asyncio.Semaphore(o.concurrency)
        self._bucket = TokenBucket(o.rpm) if o.rpm else None
        if not self.model:
            try:
                page = await self._client.models.list(timeout=min(o.timeout_s, 10.0))
                ids = [m.id for m in page.data]
            except openai.APIError as exc:
                raise LvlmUnavailable(unavailable_message(
                    f"no --lvlm-model given and GET /models failed ({exc})")) from None
            if len(ids) != 1:
                raise LvlmUnavailable(f"no --lvlm-model given and the server lists {len(ids)} models "
                                      f"({ids[:10]}): pass --lvlm-model")
            self.model = ids[0]
            log.info("LVLM endpoint serves one model, using it: %s", self.model)

    def close(self) -> None:
        with self._load_lock:
            if self._loop is None:
                return
            loop, self._loop = self._loop, None
            try:
                asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
            loop.close()

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # ---- batches -----------------------------------------------------------------------------
    def run_inference(self, batch: list[LvlmRequest]) -> list[LvlmResult]:
        if not batch:
            return []
        self.load_model()
        return self._call(self._run_batch(list(batch)))

    def stats(self) -> dict:
        return self._stats.as_dict()

    async def _run_batch(self, batch: list[LvlmRequest]) -> list[LvlmResult]:
        self._stats.add("items", len(batch))
        results = await asyncio.gather(*(self._answer_safely(r) for r in batch))
        for result in results:
            if result.ok:
                self._stats.add("ok")
            else:
                self._stats.failure(result.reason)
        return list(results)

    async def _answer_safely(self, request: LvlmRequest) -> LvlmResult:
        try:
            params = self.options.sampling(request.params)
            key = cache_key(self.model, request, params)
        except Exception as exc:  # noqa: BLE001 - e.g. params that are not JSON
            return self._result(False, reason="invalid_request", detail=f"{type(exc).__name__}: {exc}")
        # Identical requests in flight at once (the same image and prompt twice in a batch, or
        # from two threads) share one answer instead of paying twice.
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        future = self._inflight[key] = self._loop.create_future()
        result = self._result(False, reason="internal_error", detail="cancelled")
        try:
            result = await self._answer(request, params, key)
        except Exception as exc:  # noqa: BLE001 - a failed request never raises out of run_inference
            log.exception("LVLM request %s failed inside the client", request.request_id)
            result = self._result(False, reason="internal_error", detail=f"{type(exc).__name__}: {exc}")
        finally:
            del self._inflight[key]
            future.set_result(result)
        return result

    async def _answer(self, request: LvlmRequest, params: dict, key: str) -> LvlmResult:
        if self._cache is not None:
            # A local miss is one stat() call: cheaper inline than a thread hop.
            entry = self._cache.get(key) if self._cache.is_local else \
                await asyncio.get_running_loop().run_in_executor(None, self._cache.get, key)
            failed = (entry or {}).get("failed")
            if failed and not self.options.retry_failed:
                self._stats.add("cached_failures")
                return self._result(False, text=entry.get("text"), reason=failed.get("reason") or "invalid_answer",
                                    detail=failed.get("detail") or "", usage=entry.get("usage") or {}, cached=True)
            if entry is not None and not failed and (request.schema is None or
                                      (entry.get("parsed") is not None and not schema_problem(entry["parsed"], request.schema))):
                self._stats.add("cache_hits")
                return self._result(True, parsed=entry.get("parsed"), text=entry.get("text"),
                                    usage=entry.get("usage") or {}, cached=True)
        try:
            image_url = _data_url(request)
        except ValueError as exc:
            return self._result(False, reason="invalid_request", detail=str(exc))

        messages = request.messages
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        attempts = 0
        for ask in range(self.options.reasks + 1):
            answer, sent = await self._complete(request, messages, params, image_url)
            attempts += sent
            for k in usage:
                usage[k] += answer.usage.get(k, 0)
            if answer.failure:
                return self._result(False, reason=answer.failure, detail=answer.detail,
                                    attempts=attempts, usage=usage)
            verdict = check_answer(answer.text, request.schema, answer.refusal)
            if verdict.ok:
                if self._cache is not None:
                    entry = make_entry(self.model, request, params, answer.text, verdict.parsed, usage)
                    # On a thread even when local: a write is several syscalls (create, write,
                    # rename) during which the loop goes on with other requests. The request's
                    # concurrency slot is already free here.
                    stored = await asyncio.get_running_loop().run_in_executor(None, self._cache.put, key, entry)
                    self._stats.add("cache_writes" if stored else "cache_write_errors")
                return self._result(True, parsed=verdict.parsed, text=answer.text, usage=usage,
                                    attempts=attempts)
            if answer.finish_reason == "length":
                verdict = Verdict(False, None, verdict.reason, verdict.detail + " (answer cut at max_tokens)")
            if verdict.reason in ("invalid_json", "schema_invalid") and ask < self.options.reasks:
                self._stats.add("reasks")
                messages = reask_messages(messages, answer.text, verdict)
                continue
            log.debug("LVLM %s rejected: %s %s", request.request_id, verdict.reason, verdict.detail)
            if self._cache is not None:  # a final answer, paid for: a rerun does not ask again
                entry = make_failure_entry(self.model, request, params, answer.text, verdict.reason,
                                           verdict.detail, usage)
                stored = await asyncio.get_running_loop().run_in_executor(None, self._cache.put, key, entry)
                self._stats.add("cache_writes" if stored else "cache_write_errors")
            return self._result(False, text=answer.text, reason=verdict.reason, detail=verdict.detail,
                                attempts=attempts, usage=usage)
        raise AssertionError("unreachable: the last ask always returns")

    async def _complete(self, request: LvlmRequest, messages: list[dict], params: dict,
                        image_url: Optional[str]) -> tuple[_Answer, int]:
        """One chat completion with retries: (answer or failure, requests sent)."""
        o = self.options
        sent = 0
        causes: list[str] = []
        fallback_try = False  # this request is re-sent without response_format after a 400
        while True:
            structured = self._structured and request.schema is not None and not fallback_try
            body = self._body(request, messages, params, image_url, structured)
            if self._bucket is not None:
                await self._bucket.acquire()
            retry_after = None
            async with self._semaphore:
                self._stats.enter()
                self._stats.add("requests")
                sent += 1
                started = time.perf_counter()
                try:
                    # The client's generic post() rather than chat.completions.create(): the
                    # typed call walks every message through its TypedDict transform and builds
                    # pydantic models of the answer, a quarter of the client's CPU, and the event
                    # loop's CPU bounds the request rate (bench/bench_lvlm_client.py). Same
                    # client, auth, timeouts, exceptions.
                    response = await self._client.post("/chat/completions", cast_to=object, body=body)
                    self._stats.latency((time.perf_counter() - started) * 1000)
                    answer = _read_completion(response)
                    self._stats.add("prompt_tokens", answer.usage["prompt_tokens"])
                    self._stats.add("completion_tokens", answer.usage["completion_tokens"])
                except openai.APITimeoutError:
                    cause, detail = "timeout", f"no answer within {o.timeout_s:g} s"
                except openai.APIConnectionError as exc:
                    cause, detail = "connection", f"connection failed: {exc.__cause__ or exc}"
                except openai.APIStatusError as exc:
                    self._stats.latency((time.perf_counter() - started) * 1000)
                    status = exc.status_code
                    detail = f"HTTP {status}: {_error_text(exc)}"
                    if status == 429:
                        cause = "429"
                        retry_after = _retry_after(exc.response.headers)
                    elif status >= 500:
                        cause = "5xx"
                    elif status == 400 and structured:
                        self._stats.add("response_format_refused")
                        fallback_try = True
                        continue
                    else:
                        return _Answer(failure="http_4xx", detail=detail), sent
                except openai.APIError as exc:  # a 2xx body that is not a chat completion
                    return _Answer(failure="bad_response", detail=f"{type(exc).__name__}: {exc}"[:300]), sent
                else:
                    if fallback_try and self._structured:
                        self._structured = False
                        log.warning("The LVLM server refused response_format json_schema (HTTP 400) and "
                                    "answered without it: asking for JSON in the prompt and validating "
                                    "answers with jsonschema for the rest of this run.")
                    return answer, sent
                finally:
                    self._stats.leave()
            causes.append(cause)
            if len(causes) >= o.max_attempts:
                reason = "timeout" if cause == "timeout" else "retries_exhausted"
                return _Answer(failure=reason, detail=f"{len(causes)} attempts failed "
                               f"({', '.join(causes)}); last: {detail}"), sent
            self._stats.retry(cause)
            await asyncio.sleep(backoff_delay(len(causes), o.backoff_base_s, o.backoff_cap_s, self._rng,
                                              retry_after, o.retry_after_cap_s))

    def _body(self, request: LvlmRequest, messages: list[dict], params: dict,
              image_url: Optional[str], structured: bool) -> dict:
        """The chat completions request body. Sampling parameters go in as they are: servers
        take their own extras (vLLM's top_k, repetition_penalty) the same way."""
        if request.schema is not None and not structured:
            messages = with_instructions(messages, request.schema)
        body: dict = {"model": self.model, "messages": to_openai_messages(messages, image_url), **params}
        if structured:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": _schema_name(request.schema_name), "schema": request.schema, "strict": True}}
        return body

    def _result(self, ok: bool, parsed=None, text=None, reason=None, detail="", usage=None,
                cached=False, attempts=0) -> LvlmResult:
        return LvlmResult(ok=ok, parsed=parsed, text=text, reason=reason, detail=detail,
                          usage=dict(usage or {"prompt_tokens": 0, "completion_tokens": 0}),
                          cached=cached, attempts=attempts, backend=self.name, model=self.model)


def to_openai_messages(messages: list[dict], image_url: Optional[str]) -> list[dict]:
    """HF chat messages -> OpenAI chat messages: the {"type": "image"} placeholder becomes an
    image_url part with the JPEG as a base64 data URL; extra keys ("train") are dropped; system
    and assistant turns become plain strings, which every compatible server accepts."""
    out = []
    for message in messages:
        role, content = message["role"], message.get("content")
        if isinstance(content, list):
            if role == "user":
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        parts.append({"type": "image_url", "image_url": {"url": image_url}})
                    elif part.get("type") == "text":
                        parts.append({"type": "text", "text": part.get("text", "")})
                content = parts
            else:
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        out.append({"role": role, "content": content})
    return out


def _data_url(request: LvlmRequest) -> Optional[str]:
    if not request.has_image():
        return None
    if not request.image_jpeg:
        raise ValueError("the messages have an image part but the request has no image_jpeg")
    return "data:image/jpeg;base64," + base64.b64encode(request.image_jpeg).decode("ascii")


def _read_completion(response) -> _Answer:
    """The answer out of a chat completion body (a dict; a non-JSON body arrives as str)."""
    try:
        choice = response["choices"][0]
        message = choice["message"]
        text, refusal = message.get("content"), message.get("refusal")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"content is {type(text).__name__}")
        usage = response.get("usage") or {}
        return _Answer(text=text, refusal=refusal, finish_reason=choice.get("finish_reason"),
                       usage={"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                              "completion_tokens": int(usage.get("completion_tokens") or 0)})
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        return _Answer(failure="bad_response",
                       detail=f"not a chat completion ({type(exc).__name__}: {exc}): {str(response)[:160]!r}")


def _retry_after(headers) -> Optional[float]:
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def _error_text(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("message") or body.get("error") or body
    return str(body if body is not None else exc.message)[:200]


def _schema_name(name: str) -> str:
    """OpenAI requires ^[a-zA-Z0-9_-]{1,64}$ for json_schema.name."""
    clean = "".join(c if c in _SCHEMA_NAME_OK else "_" for c in name or "answer")
    return clean[:64] or "answer"

"""Clue part: an LVLM, shown the photo AND its true location, explains which visible evidence points
there (GaGA's clue data). The structured answer (schemas/clue.schema.json) goes through the quality
filters of pipeline.stages.quality; a kept answer becomes a two-message chat sample in record.clue.

Also home of LvlmPartStage, the plumbing the clue and dialogue stages share: the backend (the
process-wide pipeline.lvlm.shared_backend(options), taken in setup(), or an injected instance),
the sampling params, the versioned prompts and schema, the selection, and one run_inference call
per batch whose failures become Rejects.
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from typing import Optional

from pipeline.core.prompt_files import Schema, load_prompt_set, load_schema
from pipeline.evaluate.answer_line import truth_answer_line
from pipeline.geo.claims import claims
from pipeline.stages.quality import ClueThresholds, check_claims, check_clue_answer, country_names, fold, supported_level
from pipeline.core.record import Record, Reject
from pipeline.core.choice import pick
from pipeline.stages.selection import Selection
from pipeline.core.stage import Outcome, Stage

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 16  # records per run_inference call; the backend runs them concurrently
_PROCESS_TAG = uuid.uuid4().hex[:12]  # ids and pids repeat across processes and machines


def place_text(location: dict, levels: tuple = ("city", "admin1", "country")) -> str:
    """'Lviv, Ukraine' style: the given levels, finest first, without empty or repeated names."""
    out: list = []
    for level in levels:
        value = str(location.get(level) or "").strip()
        if value and fold(value) not in {fold(v) for v in out}:
            out.append(value)
    return ", ".join(out)


def claim_text(claim: dict) -> str:
    """The claimed truth in words ('Lyon, Rhone-Alpes, France'; 'Rhone-Alpes, France' when the
    town is only near)."""
    return place_text({"city": "" if claim["city_near"] else claim["city"], "admin1": claim["region"],
                       "country": claim["country"]})


def _city_km(location: dict) -> str:
    km = location.get("truth_place_km")
    return f"{km:.0f}" if isinstance(km, (int, float)) else "25"


def user_message(text: str, image: bool = True) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant_message(text: str, train: bool = True) -> dict:
    message = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    if not train:
        message["train"] = False  # context only: the training loss skips it
    return message


class LvlmPartStage(Stage):
    """Shared by ClueStage and DialogueStage; see the module docstring."""

    prompt_set_name = ""
    schema_name = ""

    def __init__(self, options=None, *, backend=None, selection: Optional[Selection] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, params: Optional[dict] = None,
                 data_root: Optional[str] = None):
        """options: pipeline.lvlm.options.LvlmOptions (the backend is made from it in setup());
        backend: an LvlmBackend instance to use instead (tests, in-process runs);
        selection: which records get a sample (default every record);
        params: sampling overrides on top of the options' temperature/max_tokens/seed;
        data_root: a directory holding prompts/ and schemas/ (default: the installed ones)."""
        if options is None and backend is None:
            raise ValueError(f"{type(self).__name__} needs LvlmOptions or a backend instance")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.options = options
        self.selection = selection or Selection.every()
        self.batch_size = batch_size
        # Loaded here, not in setup(), so a missing or inconsistent prompt file stops the build
        # before any work; they are plain strings and dicts and pickle with the stage.
        self.prompts = load_prompt_set(self.prompt_set_name, data_root)
        self.schema: Schema = load_schema(self.schema_name, data_root)
        self.params = options.sampling(params) if options is not None else dict(sorted((params or {}).items()))
        self._backend = backend
        self._loaded = False
        self.names = None

    @property
    def backend(self):
        return self._backend

    def setup(self) -> None:
        if self._backend is None:
            # One loaded backend per process for equal options, shared by the clue and dialogue
            # stages and by every DoFn instance of a worker (one model copy, one connection pool).
            from pipeline.lvlm import shared_backend  # the LVLM stack is only needed by these parts
            self._backend = shared_backend(self.options)
        if not self._loaded:
            self._backend.load_model()  # idempotent by the LvlmBackend contract
            self._loaded = True
        if self.names is None:
            self.names = country_names()

    def use_side_input(self, keys) -> None:
        """The keys a count target chose (llm_parts.ApplySelected) once the job knows them all."""
        self.selection = Selection.of_keys(keys)

    def triage(self, records: list) -> tuple[list, list[int]]:
        """(outcomes, indices to work on): records not selected stay unchanged (no sample, no ledger
        row), records unfit for a request get their Reject, the rest are listed."""
        outcomes: list = list(records)
        todo = []
        for i, record in enumerate(records):
            if not self.selection(record.key):
                continue
            problem = self.input_problem(record)
            if problem:
                outcomes[i] = problem
            else:
                todo.append(i)
        return outcomes, todo

    def backend_stats(self) -> dict:
        """The backend's counters (requests, retries, cache hits, tokens, latency) for the report."""
        return self._backend.stats() if self._backend is not None else {}

    def stats_snapshot(self) -> Optional[tuple[str, int, dict]]:
        """The backend's cumulative counters for report.json; the clue and dialogue stages of a
        process share one backend (shared_backend), so the backend object is the identity."""
        if self._backend is None:
            return None
        return f"{_PROCESS_TAG}-{id(self._backend):x}", time.monotonic_ns(), self._backend.stats()

    def __getstate__(self):
        # A backend made in setup() holds connections or a model: never pickled with the stage.
        state = dict(self.__dict__)
        state["names"] = None
        if self.options is not None:
            state["_backend"], state["_loaded"] = None, False
        return state

    def infer(self, requests: list) -> list:
        """One run_inference call for the whole list; a backend that raises (it should not) turns
        into one failed result per request instead of a failed bundle."""
        if not requests:
            return []
        try:
            results = list(self._backend.run_inference(requests))
            if len(results) != len(requests):
                raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
            return results
        except Exception as exc:  # noqa: BLE001 - one broken call must not stop the run, see Stage
            log.exception("run_inference failed for %d %s requests", len(requests), self.name)
            return [Reject("lvlm_error", f"{type(exc).__name__}: {exc}")] * len(requests)

    def request(self, record: Record, text: str, purpose: str):
        from pipeline.lvlm.types import LvlmRequest

        return LvlmRequest(
            messages=[user_message(text)], image_jpeg=record.image_bytes,
            image_sha256=hashlib.sha256(record.image_bytes).hexdigest(),
            schema=self.schema.schema, schema_name=self.schema.name, schema_version=self.schema.version,
            prompt_version=self.prompts.version, params=dict(self.params),
            request_id=f"{record.key}:{purpose}")

    def answer_problem(self, result) -> Optional[Reject]:
        """A Reject when a result is not a usable answer: the backend's own reason passes
        through; an answer that does not match the schema after all is schema_invalid."""
        if isinstance(result, Reject):
            return result
        if not result.ok:
            return Reject(result.reason or "lvlm_failed", result.detail or "")
        if not isinstance(result.parsed, dict):
            return Reject("schema_invalid", "the backend returned no JSON object")
        problem = self.schema.problem(result.parsed)
        if problem:
            return Reject("schema_invalid", problem)
        return None

    def provenance(self, results: list) -> dict:
        """What every sample records about how it was made."""
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for r in results:
            for k in usage:
                usage[k] += int((r.usage or {}).get(k) or 0)
        # Answers, not whether this run read them from the cache: that would make a resumed run's
        # shards differ from a fresh one's (cache hits are counted in report.json instead).
        usage["requests"] = len(results)
        return {"prompt_version": self.prompts.version, "schema_version": self.schema.version,
                "backend": results[0].backend, "model": results[0].model, "params": dict(self.params),
                "usage": usage}

    def input_problem(self, record: Record) -> Optional[Reject]:
        if not record.location or not record.location.get("country"):
            return Reject("no_location", f"record reached the {self.name} stage without a location")
        if not record.image_bytes:
            return Reject("no_image", f"record reached the {self.name} stage without image bytes")
        return None


class ClueStage(LvlmPartStage):
    name = "clue"
    part = "clue"
    prompt_set_name = "clue"
    schema_name = "clue"

    def __init__(self, options=None, *, thresholds: Optional[ClueThresholds] = None, **kwargs):
        """thresholds: the quality filters' settings (pipeline.stages.quality.ClueThresholds); the rest
        as LvlmPartStage."""
        super().__init__(options, **kwargs)
        self.thresholds = thresholds or ClueThresholds()

    def process(self, record: Record) -> Outcome:
        return self.process_batch([record])[0]

    def process_batch(self, records: list) -> list:
        outcomes, todo = self.triage(records)
        requests = []
        for i in todo:
            record = records[i]
            claim = claims(record.location)
            text = self.prompts.render(
                "request", continent=claim["continent"], country=claim["country"], region=claim["region"],
                city=claim["city"], city_near=claim["city_near"], city_km=_city_km(record.location),
                place=claim_text(claim))
            requests.append(self.request(record, text, "clue"))
        for i, result in zip(todo, self.infer(requests)):
            outcomes[i] = self._safe_sample(records[i], result)
        return outcomes

    def _safe_sample(self, record: Record, result) -> Outcome:
        try:
            return self._sample(record, result)
        except Exception as exc:  # noqa: BLE001 - a bad answer never stops the run, see Stage
            log.exception("clue stage failed on %s", record.input_id)
            return Reject("internal_error", f"{type(exc).__name__}: {exc}")

    def _sample(self, record: Record, result) -> Outcome:
        problem = self.answer_problem(result)
        if problem:
            return problem
        parsed = result.parsed
        problem = check_clue_answer(parsed, record.location, self.names, self.thresholds)
        if problem:
            return problem
        claim = claims(record.location)
        problem = check_claims(parsed, claim)
        if problem:
            return problem
        # The answer names the finest level the clues support, no finer (and no finer than the truth).
        level = supported_level(parsed["clues"])
        clues = [{k: str(c.get(k) or "").strip() for k in ("category", "evidence", "implies", "level")}
                 for c in parsed["clues"]]
        question = self.prompts.phrase("questions", pick(record.key, "clue-question",
                                                          len(self.prompts.phrasing_lines("questions"))))
        answer = self.prompts.render("answer", clues=[_readable(c) for c in clues],
                                     reasoning=str(parsed.get("reasoning") or "").strip(),
                                     answer_line=truth_answer_line(record.location, record.lat, record.lon, level))
        sample = {"messages": [user_message(question), assistant_message(answer)],
                  "clues": clues, "reasoning": str(parsed.get("reasoning") or "").strip(),
                  "country": str(parsed.get("country") or "").strip(), "answer_level": level}
        sample.update(self.provenance([result]))
        return record.replace(clue=sample)


def _readable(clue: dict) -> dict:
    """Clue texts ready for a sentence: no trailing full stop, 'implies' in lower case unless it
    starts with a name ("Cyrillic script" stays, "The driving side" -> "the driving side")."""
    out = dict(clue)
    out["evidence"] = clue["evidence"].rstrip(" .")
    implies = clue["implies"].rstrip(" .")
    words = implies.split(" ", 1)
    if words and words[0].lower() in {"the", "a", "an", "this", "that", "it", "its", "likely", "probably"}:
        implies = implies[:1].lower() + implies[1:]
    out["implies"] = implies
    return out

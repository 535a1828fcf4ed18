"""The conversation behind `mg-geo chat`, without any terminal IO: give it a photo, it guesses with
its reasons; every line the user types (a hint, a correction, a question) goes into the
conversation and the model revises its guess. `pipeline.commands.chat` only reads and prints.

The photo goes through the corpus' own image stage (upright, RGB, metadata stripped, longer side
<= max_side), so the model sees the kind of picture it was trained and evaluated on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.evaluate import model
from pipeline.evaluate.answer_line import format_answer_line
from pipeline.evaluate.predictions import Prediction
from pipeline.stages.image import ImageStage
from pipeline.lvlm.types import LvlmBackend, LvlmResult
from pipeline.core.record import Record, Reject

DEFAULT_MAX_ROUNDS = 10
PROMPT_VERSION = model.PROMPT_VERSION + "+chat"
QUIT_COMMANDS = ("/quit", "/exit")
HELP = ("Type a hint or a correction (e.g. \"No, it's further south\" or \"The signs are in Portuguese\") "
        "and I will revise my guess. /quit ends the conversation.")


class PhotoError(ValueError):
    """The photo cannot be used (not an image, too small, truncated ...)."""


def load_photo(data: bytes, max_side: int = 768) -> bytes:
    """Source bytes -> the clean JPEG the image stage makes for the corpus."""
    outcome = ImageStage(max_side=max_side).safe_process(
        Record(key="chat", source="chat", input_id="chat", image_bytes=data))
    if isinstance(outcome, Reject):
        raise PhotoError(f"{outcome.reason}: {outcome.detail}")
    return outcome.image_bytes


@dataclass
class Reply:
    text: str                          # what to show the user
    prediction: Optional[Prediction]   # the parsed guess (None for commands / failures)
    done: bool = False                 # the conversation is over


def format_reply(prediction: Prediction, result: LvlmResult) -> str:
    if not prediction.usable:
        why = f": {result.detail}" if result.detail else ""
        return f"I could not produce a usable answer this time ({prediction.error}{why}). Try another hint."
    lines = [f"My guess: {model.describe(prediction)}."]
    if prediction.reasoning:
        lines.append(f"Why: {prediction.reasoning}")
    # The machine-readable last line, in the format eval reads back (pipeline.evaluate.answer_line).
    lines.append(format_answer_line({"city": prediction.city, "region": prediction.region,
                                     "country": prediction.country, "lat": prediction.lat, "lon": prediction.lon}))
    return "\n".join(lines)


class Assistant:
    """One conversation about one photo. `start()` once, then `handle(line)` per user line."""

    def __init__(self, backend: LvlmBackend, photo_jpeg: bytes, *, sampling: Optional[dict] = None,
                 max_rounds: int = DEFAULT_MAX_ROUNDS):
        if max_rounds < 0:
            raise ValueError("max_rounds must be >= 0")
        self.backend = backend
        self.photo = photo_jpeg
        self.sampling = dict(sampling or {})
        self.max_rounds = max_rounds
        self.messages: list[dict] = []
        self.rounds = 0          # user turns answered after the first guess
        self.done = False

    def start(self) -> Reply:
        if self.messages:
            raise RuntimeError("the conversation has already started")
        self.messages.append(model.image_question())
        reply = self._answer()
        if self.max_rounds == 0:
            self.done = reply.done = True
        return reply

    def handle(self, line: str) -> Optional[Reply]:
        """React to one line of user input; None for a blank line (nothing to answer)."""
        if self.done:
            raise RuntimeError("the conversation is over")
        if not self.messages:
            raise RuntimeError("call start() first")
        text = line.strip()
        if not text:
            return None
        if text.lower() in QUIT_COMMANDS:
            self.done = True
            return Reply("Goodbye.", None, done=True)
        if text.lower() == "/help":
            return Reply(HELP, None)
        if self.rounds >= self.max_rounds:
            self.done = True
            return Reply(f"That was the last of {self.max_rounds} rounds; goodbye.", None, done=True)
        self.rounds += 1
        self.messages.append(model.text_message("user", model.revision_request_text(text)))
        reply = self._answer()
        if self.rounds >= self.max_rounds:
            self.done = True
            reply.done = True
            reply.text += f"\n(That was the last of {self.max_rounds} rounds.)"
        return reply

    def _answer(self) -> Reply:
        request = model.make_request(list(self.messages), self.photo, sampling=self.sampling,
                                     request_id=f"chat/{self.rounds}", prompt_version=PROMPT_VERSION)
        [result] = model.run_batch(self.backend, [request])
        self.messages.append(model.text_message("assistant", model.history_text(result)))
        prediction = model.to_prediction("chat", result, stage=self.rounds)
        return Reply(format_reply(prediction, result), prediction)

"""`mg-geo chat`: the conversation logic with a scripted backend, and the command end to end against
a loopback OpenAI-compatible server (tests/fake_openai_server.py) with a scripted conversation."""
from __future__ import annotations

import argparse
import io
import json
import sys

import pytest
from fake_openai_server import FakeOpenAIServer

from pipeline.evaluate.assistant import Assistant, PhotoError, load_photo
from pipeline.commands import chat as chat_command
from pipeline.lvlm.types import LvlmBackend, LvlmResult

MADRID = {"country": "Spain", "region": "Community of Madrid", "city": "Madrid", "lat": 40.4168,
          "lon": -3.7038, "confidence": 0.35, "reasoning": "Dry hills and terracotta roofs."}
LISBON = {"country": "Portugal", "region": "Lisbon", "city": "Lisbon", "lat": 38.7223, "lon": -9.1393,
          "confidence": 0.7, "reasoning": "Portuguese on the signs and calcada pavements."}
PORTO = {"country": "Portugal", "region": "Porto", "city": "Porto", "lat": 41.1579, "lon": -8.6291,
         "confidence": 0.8, "reasoning": "A northern Portuguese city on a river with steep banks."}


def _last_user_text(messages) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            content = message["content"]
            return content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def scripted(messages) -> dict:
    """The model: Madrid at first; Lisbon once told about Portuguese; Porto once told 'north'."""
    text = _last_user_text(messages)
    if "north" in text.lower():
        return PORTO
    if "portuguese" in text.lower():
        return LISBON
    return MADRID


@pytest.fixture
def photo_path(exif_samples):
    return exif_samples / "gps" / "DSCN0010.jpg"


# ---- the conversation logic, no IO ------------------------------------------------------------
class ScriptedBackend(LvlmBackend):
    name, model = "fake", "scripted"

    def __init__(self, fail_first=False):
        self.requests = []
        self.fail_first = fail_first

    def load_model(self):
        pass

    def stats(self):
        return {}

    def run_inference(self, batch):
        out = []
        for request in batch:
            self.requests.append(request)
            if self.fail_first and len(self.requests) == 1:
                out.append(LvlmResult(False, None, "I'm sorry", "refusal", "model refused", {}, False, 1,
                                      "fake", "scripted"))
                continue
            answer = scripted(request.messages)
            out.append(LvlmResult(True, dict(answer), json.dumps(answer), None, "", {}, False, 1, "fake", "scripted"))
        return out


def test_assistant_guesses_then_revises(photo_path):
    backend = ScriptedBackend()
    photo = load_photo(photo_path.read_bytes(), max_side=256)
    assistant = Assistant(backend, photo, max_rounds=5)
    first = assistant.start()
    assert first.prediction.city == "Madrid" and "Madrid" in first.text and "Why: Dry hills" in first.text
    assert assistant.handle("   ") is None                      # blank lines are not turns
    second = assistant.handle("The signs are in Portuguese.")
    assert second.prediction.country == "Portugal" and "Lisbon" in second.text and not second.done
    third = assistant.handle("Further north, on a river.")
    assert third.prediction.city == "Porto"
    request = backend.requests[-1]
    assert [m["role"] for m in request.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert request.messages[0]["content"][0] == {"type": "image"}
    assert json.loads(request.messages[3]["content"][0]["text"])["city"] == "Lisbon"  # its own last answer
    assert request.image_jpeg == photo and request.schema_name == "prediction"
    bye = assistant.handle("/quit")
    assert bye.done and assistant.done and len(backend.requests) == 3


def test_assistant_rounds_are_bounded_and_failures_do_not_end_it(photo_path):
    backend = ScriptedBackend(fail_first=True)
    assistant = Assistant(backend, load_photo(photo_path.read_bytes()), max_rounds=1)
    first = assistant.start()
    assert first.prediction.error == "refusal" and "could not produce a usable answer" in first.text
    reply = assistant.handle("The signs are in Portuguese")
    assert reply.done and reply.prediction.city == "Lisbon" and "last of 1 rounds" in reply.text
    # the failed first answer still left an assistant turn, so the roles alternate
    assert [m["role"] for m in backend.requests[-1].messages] == ["user", "assistant", "user"]
    with pytest.raises(RuntimeError):
        assistant.handle("more")


def test_photo_that_is_not_an_image(exif_samples):
    with pytest.raises(PhotoError):
        load_photo(b"this is not a photo")
    assert load_photo((exif_samples / "gps" / "DSCN0012.jpg").read_bytes(), max_side=128)[:2] == b"\xff\xd8"


# ---- the command against a loopback OpenAI-compatible server ----------------------------------
def _server():
    return FakeOpenAIServer(lambda seen, body: scripted(body["messages"]), record_bodies=True)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(argv, stdin_text, monkeypatch, tty=False) -> int:
    parser = argparse.ArgumentParser(prog="mg-geo")
    sub = parser.add_subparsers(dest="command", required=True)
    chat_command.register(sub)
    args = parser.parse_args(argv)
    # a StringIO is not a tty: the command reads lines until EOF without prompting
    monkeypatch.setattr(sys, "stdin", (_Terminal if tty else io.StringIO)(stdin_text))
    return args.func(args)


def test_chat_scripted_conversation_over_http(photo_path, monkeypatch, capsys):
    with _server() as server:
        rc = _run(["chat", str(photo_path), "--lvlm-endpoint", server.base_url, "--lvlm-timeout", "10"],
                  "The signs are in Portuguese\n\nIt is further north, on a river\n/quit\nnever read\n",
                  monkeypatch)
        requests = list(server.requests)
    out = capsys.readouterr().out
    assert rc == 0
    assert out.index("My guess: Madrid") < out.index("My guess: Lisbon") < out.index("My guess: Porto")
    assert "Why: Portuguese on the signs" in out and out.rstrip().endswith("Goodbye.")
    assert "you>" not in out                           # no prompts when stdin is not a terminal
    assert len(requests) == 3                          # first guess + two revisions; "/quit" asks nothing
    assert not any(r.response_format for r in requests)  # the answer line is asked for, not forced JSON
    assert len({sha for r in requests for sha in r.image_sha256}) == 1   # the same photo every time
    last = requests[-1].body["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
    assert json.loads(last[1]["content"])["city"] == "Madrid"      # the model's own earlier answers
    assert json.loads(last[3]["content"])["city"] == "Lisbon"
    assert "further north" in _last_user_text(last)


def test_chat_stops_at_max_rounds_and_at_eof(photo_path, monkeypatch, capsys):
    with _server() as server:
        rc = _run(["chat", str(photo_path), "--lvlm-endpoint", server.base_url, "--max-rounds", "1"],
                  "The signs are in Portuguese\nfurther north\nand more\n", monkeypatch)
        assert rc == 0 and server.count == 2
        out = capsys.readouterr().out
        assert "last of 1 rounds" in out and "Porto" not in out
        rc = _run(["chat", str(photo_path), "--lvlm-endpoint", server.base_url], "", monkeypatch)  # EOF at once
        assert rc == 0 and server.count == 3
        assert "My guess: Madrid" in capsys.readouterr().out


def test_chat_prompts_on_a_terminal(photo_path, monkeypatch, capsys):
    with _server() as server:
        rc = _run(["chat", str(photo_path), "--lvlm-endpoint", server.base_url],
                  "/help\nThe signs are in Portuguese\n/quit\n", monkeypatch, tty=True)
        assert rc == 0 and server.count == 2   # /help and /quit ask the model nothing
    out = capsys.readouterr().out
    assert out.count("you> ") == 3 and "/quit ends the conversation" in out and "My guess: Lisbon" in out


def test_chat_bad_inputs(exif_samples, tmp_path, monkeypatch, capsys):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    assert _run(["chat", str(not_image), "--lvlm-endpoint", "http://127.0.0.1:9/v1"], "", monkeypatch) == 2
    assert "cannot use" in capsys.readouterr().err
    photo = str(exif_samples / "gps" / "DSCN0010.jpg")
    assert _run(["chat", photo, "--lvlm-backend", "openai"], "", monkeypatch) == 2  # no endpoint
    assert "no model to talk to" in capsys.readouterr().err

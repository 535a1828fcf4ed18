"""A small corpus in the build's shard layout, for the training tests.

OUT/{part}/{split}/{part}-{split}-NNNNNN.tar with KEY.jpg + KEY.json (the Record's json, as the
build writes it) and the shard's _stats.json, written by the build's own shard writer
(pipeline.io.shards.write_shard over pipeline.io.tar_writer, byte-identical to webdataset.TarWriter),
so the layout cannot drift from the real one. Each sample pairs a solid-colour photo with its place, so a model can learn it.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from pipeline.core.record import Record, make_key
from pipeline.io.shards import shard_path, write_shard

PLACES = [  # (colour, city, country, continent, lat, lon)
    ((220, 30, 30), "Paris", "France", "Europe", 48.86, 2.35),
    ((30, 200, 40), "Tokyo", "Japan", "Asia", 35.68, 139.69),
    ((40, 60, 220), "Lima", "Peru", "South America", -12.05, -77.04),
    ((230, 220, 40), "Nairobi", "Kenya", "Africa", -1.29, 36.82),
]
QUESTION = "Where was this photo taken?"


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _user(text: str, image: bool = False) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def _assistant(text: str, train: bool = True) -> dict:
    message = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    if not train:
        message["train"] = False
    return message


def _samples(place, wrong) -> dict:
    _, city, country, continent, lat, lon = place
    answer = f"{city}, {country}, {continent}. Coordinates: {lat:.2f}, {lon:.2f}."
    return {
        "meta": {"template_version": "test/v1",
                 "messages": [_user(QUESTION, image=True), _assistant(answer)], "qa": []},
        "clue": {"messages": [_user(QUESTION + " Think about the clues first.", image=True),
                              _assistant(f"The colours and the light suggest {continent}. So: {answer}")]},
        "dialogue": {"messages": [_user(QUESTION, image=True),
                                  _assistant(f"{wrong[1]}, {wrong[2]}.", train=False),
                                  _user("That is not right. Look again at the clues."),
                                  _assistant(f"You are right, it is {answer}")]},
    }


def write_tiny_corpus(out, samples: int = 8, per_shard: int = 4, splits=("train",),
                      parts=("meta", "clue", "dialogue")) -> Path:
    """Write `samples` samples per (part, split), `per_shard` to a shard; return OUT."""
    out = Path(out)
    for split in splits:
        records = []
        for i in range(samples):
            place, wrong = PLACES[i % len(PLACES)], PLACES[(i + 1) % len(PLACES)]
            input_id = f"{split}/photo_{i:04d}.jpg"
            records.append(Record(
                key=make_key("test:tiny", input_id), source="test:tiny", input_id=input_id,
                image_bytes=_jpeg(place[0]), lat=place[4], lon=place[5], split=split,
                location={"city": place[1], "country": place[2], "continent": place[3]},
                **_samples(place, wrong)))
        for part in parts:
            for n, start in enumerate(range(0, len(records), per_shard)):
                write_shard(str(out), shard_path(str(out), part, split, n), records[start:start + per_shard], part)
    return out


if __name__ == "__main__":  # python tests/tiny_corpus.py OUT
    import sys

    print(write_tiny_corpus(sys.argv[1] if len(sys.argv) > 1 else "tiny-corpus"))

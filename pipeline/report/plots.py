"""OUT/plots/*.png: pictures of what a build made and lost, drawn from its manifest and ledger.

Read through FileSystems (OUT may be gs://) and drawn on bare matplotlib Figures with the Agg
canvas: no pyplot, so no global figure state leaks between calls or into a caller's own plots.
A plot with nothing to show (no samples, no rejections) is skipped and not listed.
"""
from __future__ import annotations

import functools
import io
from collections import Counter

import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from pipeline.core.ledger import read_rows as ledger_rows
from pipeline.io import outdir
from pipeline.report.build_report import count_by, read_columns

PLOTS_DIR = "plots"
TOP_COUNTRIES = 30
SPLITS = ("train", "val", "test")
SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
OTHER_COLOUR = "#7f7f7f"        # a split name outside SPLITS (should not happen; still drawn)
OUTLINE_TOLERANCE_DEG = 0.1     # 1:10m outlines have ~550k vertices; ~40k draw in a blink
DPI = 100
MAX_DOTS = 100_000              # more samples: a density map (see world_map)
DOT_SIZE = 12 ** 0.5            # points: the dots of a scatter of size 12 (an area in points^2)
DENSITY_CELL_DEG = 1.0
PLOT_NAMES = ("world_map.png", "countries.png", "splits.png", "rejections.png")


def _first_part(report: dict, manifest_parts: list[str]) -> str | None:
    # Every part of a record shares its location, so one part's rows give each photo once;
    # meta is the part the report's country table counts too.
    parts = list(report.get("config", {}).get("parts") or []) + sorted(set(manifest_parts))
    return "meta" if "meta" in parts else (parts[0] if parts else None)


@functools.lru_cache(maxsize=1)
def country_outlines() -> list:
    """Simplified Natural Earth country borders as (N, 2) lon/lat arrays: from the geocoder's own
    polygons, not a second read of the shapefile, and kept in the geo cache (simplifying every
    vertex again would cost each build's plots most of their time)."""
    import shapely

    from pipeline.geo import cache
    from pipeline.geo.polygons import NE_ZIP

    depends = {"shapely": shapely.__version__, "geos": shapely.geos_version_string,
               "tolerance": OUTLINE_TOLERANCE_DEG}
    path = cache.cache_path("outlines", 1, NE_ZIP, depends)
    return cache.load_or_build(path, _build_outlines, _encode_outlines, _decode_outlines)


def _build_outlines() -> list:
    import shapely

    from pipeline.geo.polygons import load_country_index

    borders = shapely.boundary(shapely.simplify(load_country_index().geoms, OUTLINE_TOLERANCE_DEG))
    lines = shapely.get_parts(borders[~shapely.is_empty(borders)])
    return [shapely.get_coordinates(line) for line in lines if shapely.get_num_coordinates(line) >= 2]


def _encode_outlines(lines: list) -> tuple[dict, dict]:
    import numpy as np

    offsets = np.cumsum([0] + [len(line) for line in lines], dtype=np.int64)
    coords = np.concatenate(lines) if lines else np.zeros((0, 2))
    return {"coords": coords.astype(np.float64), "offsets": offsets}, {}


def _decode_outlines(arrays: dict, _meta: dict) -> list:
    import numpy as np

    from pipeline.geo.cache import CacheError

    coords, offsets = arrays["coords"], arrays["offsets"]
    if coords.ndim != 2 or coords.shape[1] != 2 or offsets[0] != 0 or offsets[-1] != len(coords) \
            or np.any(np.diff(offsets) < 2):
        raise CacheError("bad outline offsets")
    return np.split(coords, offsets[1:-1])


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # "tight": one layout pass per draw; "constrained" looks the same and runs a solver per figure.
    fig = Figure(figsize=(width, height), dpi=DPI, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def world_map(located):
    """Sample locations on country outlines: each sample a dot coloured by split, or, past
    MAX_DOTS samples (where dots only pile up and take long to draw: GaGA's corpus has millions),
    the count per DENSITY_CELL_DEG cell on a log scale. `located`: a table with split, lat, lon."""
    import numpy as np

    fig = _figure(12, 6.5)
    ax = fig.add_subplot()
    # One line broken by NaN rows, not a LineCollection of ~4,300 segments (which matplotlib
    # converts one masked array at a time: a sixth of the plots' time).
    gap = np.full((1, 2), np.nan)
    joined = np.concatenate([piece for line in country_outlines() for piece in (line, gap)] or [gap])
    outlines, = ax.plot(joined[:, 0], joined[:, 1], color="#b0b0b0", linewidth=0.4, zorder=1, gid="outlines")
    lons = located.column("lon").to_numpy(zero_copy_only=False)
    lats = located.column("lat").to_numpy(zero_copy_only=False)
    splits = located.column("split").to_numpy(zero_copy_only=False)
    names = sorted(set(splits.tolist()), key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    if len(lons) <= MAX_DOTS:
        for split in names:
            mine = splits == split
            # Markers of one line, stamped: ~1/3 less drawing than a scatter's path collection.
            ax.plot(lons[mine], lats[mine], linestyle="none", marker="o", markersize=DOT_SIZE, markeredgewidth=0,
                    color=SPLIT_COLOURS.get(split, OTHER_COLOUR), label=f"{split} ({int(mine.sum())})",
                    zorder=2, gid=f"samples-{split}")
        ax.legend(loc="lower left", title="split")
        title = f"Sample locations ({len(lons)})"
    else:
        from matplotlib.colors import LogNorm

        edges_lon = np.arange(-180, 180 + DENSITY_CELL_DEG, DENSITY_CELL_DEG)
        edges_lat = np.arange(-90, 90 + DENSITY_CELL_DEG, DENSITY_CELL_DEG)
        counts, _, _ = np.histogram2d(lats, lons, bins=(edges_lat, edges_lon))
        image = ax.imshow(np.ma.masked_equal(counts, 0), origin="lower", extent=(-180, 180, -90, 90),
                          norm=LogNorm(vmin=1, vmax=max(1.0, counts.max())), cmap="viridis",
                          interpolation="nearest", zorder=2, gid="samples-density")
        fig.colorbar(image, ax=ax, shrink=0.7, label=f"samples per {DENSITY_CELL_DEG:g} degree cell")
        outlines.set_zorder(3)  # over the cells: the borders stay readable where samples are dense
        per_split = ", ".join(f"{split} {int((splits == split).sum())}" for split in names)
        title = f"Sample locations ({len(lons)}: {per_split})"
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title)
    return fig


def countries_bar(rows: list[dict], part: str):
    from matplotlib.ticker import MaxNLocator

    counts = Counter()
    for r in rows:  # counted rows: {"country_code", "country", "n"}
        counts[(r["country_code"] or "?", r["country"] or "unknown")] += r["n"]
    top = counts.most_common(TOP_COUNTRIES)[::-1]  # barh draws bottom-up: largest on top
    fig = _figure(8, 1.5 + 0.28 * len(top))
    ax = fig.add_subplot()
    ax.barh([f"{name} ({cc})" for (cc, name), _ in top], [n for _, n in top], color=SPLIT_COLOURS["train"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("samples")
    ax.set_title(f"Samples per country, {part} part (top {len(top)} of {len(counts)})")
    return fig


def split_part_bars(rows: list[dict]):
    import numpy as np

    counts = Counter({(r["part"], r["split"]): r["n"] for r in rows})  # counted rows: {"part", "split", "n"}
    parts = sorted({p for p, _ in counts})
    splits = [s for s in SPLITS if any(k[1] == s for k in counts)] + sorted({s for _, s in counts} - set(SPLITS))
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(splits))
    width = 0.8 / len(parts)
    for i, part in enumerate(parts):
        bars = ax.bar(x + (i - (len(parts) - 1) / 2) * width, [counts[(part, s)] for s in splits], width, label=part)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, splits)
    ax.set_ylabel("samples")
    ax.set_title("Samples per split and part")
    ax.legend(title="part")
    return fig


def rejections_bar(ledger: list[dict]):
    from matplotlib.ticker import MaxNLocator

    counts = Counter((r["stage"], r["reason"]) for r in ledger)
    items = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))
    fig = _figure(8, 1.5 + 0.3 * len(items))
    ax = fig.add_subplot()
    bars = ax.barh([f"{stage}: {reason}" for (stage, reason), _ in items], [n for _, n in items], color="#d62728")
    ax.bar_label(bars, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("inputs rejected")
    ax.set_title(f"Rejections by stage and reason ({len(ledger)})")
    return fig


def _save(fig, out: str, name: str) -> str:
    rel = f"{PLOTS_DIR}/{name}"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = outdir.join(out, PLOTS_DIR, name)
    with FileSystems.create(path) as stream:
        stream.write(buf.getvalue())
    return rel


def plot_jobs(out: str, report: dict) -> list[tuple]:
    """(file name, draw function, its rows) for every plot with something to show, after OUT's
    previous plots are removed; `save_plot` draws one."""
    from pipeline.io.manifest import MANIFEST_SCHEMA

    # The columns the plots draw, not whole rows: a manifest has a row per sample.
    manifest = read_columns(outdir.join(out, "manifest.parquet"),
                            ["part", "split", "lat", "lon", "country_code", "country"], MANIFEST_SCHEMA)
    ledger = ledger_rows(out)
    part = _first_part(report, manifest.column("part").unique().to_pylist())
    in_part = manifest.filter(pc.equal(manifest["part"], part)) if part else manifest.slice(0, 0)
    located = in_part.filter(pc.and_(pc.is_valid(in_part["lat"]), pc.is_valid(in_part["lon"])))
    # A rerun replaces this module's plots; one that has nothing to show now must not linger.
    stale = [outdir.join(out, PLOTS_DIR, name) for name in PLOT_NAMES]
    stale = [path for path in stale if FileSystems.exists(path)]
    if stale:
        FileSystems.delete(stale)
    plots = [
        ("world_map.png", world_map, located.select(["split", "lat", "lon"])),
        ("countries.png", functools.partial(countries_bar, part=part),
         [{"country_code": cc, "country": name, "n": n}
          for (cc, name), n in count_by(in_part, ["country_code", "country"]).items()]),
        ("splits.png", split_part_bars,
         [{"part": p, "split": sp, "n": n} for (p, sp), n in count_by(manifest, ["part", "split"]).items()]),
        ("rejections.png", rejections_bar, ledger),
    ]
    return [job for job in plots if len(job[2])]


def save_plot(out: str, job: tuple) -> str:
    name, draw, rows = job
    return _save(draw(rows), out, name)


def make_plots(out: str, report: dict) -> list[str]:
    """Write OUT/plots/*.png from OUT's manifest and ledger; returns their paths relative to OUT."""
    return [save_plot(out, job) for job in plot_jobs(out, report)]

"""Plots of a build: real build on the sample photos, a hand-made multi-part OUT, an empty OUT."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.report import plots
from pipeline.beam.run import BuildConfig, run_build
from pipeline.core import ledger as ledger_file
from pipeline.io.manifest import MANIFEST_SCHEMA
from pipeline.commands import COMMANDS


def _cli_stats(out: Path) -> int:
    # Through the real CLI once the lead registers "stats"; until then the command's own run().
    if "stats" in COMMANDS:
        from pipeline.cli import main
        return main(["stats", str(out)])
    from pipeline.commands.stats import run
    return run(argparse.Namespace(out=str(out)))


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def _pixel_colours(png: Path, rows: list[dict], lon: float, lat: float) -> set[tuple[int, int, int]]:
    """RGB colours in a 5x5 box around where (lon, lat) lands in the saved map."""
    fig = plots.world_map(pa.Table.from_pylist(rows).select(["split", "lat", "lon"]))  # the saved file's layout
    fig.canvas.draw()
    x, y = fig.axes[0].transData.transform((lon, lat))
    with Image.open(png) as im:
        rgb = im.convert("RGB")
        px, py = round(x), round(rgb.height - y)  # display origin is bottom-left, image top-left
        return {rgb.getpixel((px + dx, py + dy)) for dx in range(-2, 3) for dy in range(-2, 3)}


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture(scope="module")
def built(exif_samples, tmp_path_factory) -> Path:
    """The real build: 10 GPS photos (Italy, Finland) plus misc/ (2 without GPS -> ledger)."""
    out = tmp_path_factory.mktemp("stats") / "out"
    run_build(BuildConfig(sources=[f"exif:{exif_samples / 'gps'}", f"exif:{exif_samples / 'misc'}"], out=str(out)), [])
    assert _cli_stats(out) == 0
    return out


def test_stats_on_real_build_writes_linked_pngs(built, capsys):
    rep = json.loads((built / "report.json").read_text())
    assert rep["plots"] == ["plots/world_map.png", "plots/countries.png", "plots/splits.png", "plots/rejections.png"]
    for rel in rep["plots"]:
        width, height = _png_size(built / rel)
        assert 400 <= width <= 2000 and 100 <= height <= 1500, (rel, width, height)
        assert (built / rel).stat().st_size > 5000
    card = (built / "README.md").read_text()
    assert "## Plots" in card
    for rel in rep["plots"]:
        assert f"![{rel}]({rel})" in card


def test_map_has_points_where_the_photos_are(built):
    rows = pq.read_table(built / "manifest.parquet").to_pylist()
    png = built / "plots" / "world_map.png"
    train = _rgb(plots.SPLIT_COLOURS["train"])
    finland = next(r for r in rows if r["country_code"] == "FI")
    italy = next(r for r in rows if r["country_code"] == "IT")
    assert train in _pixel_colours(png, rows, finland["lon"], finland["lat"])
    assert train in _pixel_colours(png, rows, italy["lon"], italy["lat"])
    # No photo in the US or the South Pacific: no sample colour there.
    assert train not in _pixel_colours(png, rows, -100.0, 40.0)
    assert train not in _pixel_colours(png, rows, -130.0, -30.0)


def _row(part, split, lat, lon, cc, country, i):
    base = {name: "" for name in MANIFEST_SCHEMA.names}
    return base | {"part": part, "split": split, "key": f"k{i}", "shard": f"{part}-{split}-000000.tar",
                   "source": "exif:/x", "input_id": f"{i}.jpg", "lat": lat, "lon": lon, "country_code": cc,
                   "country": country, "country_disagreement": False, "width": 10, "height": 10}


def _hand_made_out(tmp_path: Path, rows: list[dict], ledger: list[dict] | None) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "manifest.parquet")
    if ledger is not None:
        pq.write_table(pa.Table.from_pylist(ledger, schema=ledger_file.SCHEMA), out / ledger_file.LEDGER_FILE)
    rep = {"config": {"sources": ["exif:/x"], "parts": ["meta", "clue"], "max_side": 768,
                      "split_ratios": [0.9, 0.05, 0.05], "split_link_km": 1.0, "dedupe_radius": 4},
           "inputs_total": len(rows), "samples": {}, "shards": {}, "rejected_total": 0, "rejected": {},
           "countries": {}, "country_disagreements": 0, "conservation_ok": True}
    (out / "report.json").write_text(json.dumps(rep))
    return out


def test_splits_get_their_own_colours_and_no_ledger_skips_rejections(tmp_path):
    places = [("train", -33.87, 151.21, "AU", "Australia"), ("val", 35.68, 139.69, "JP", "Japan"),
              ("test", -1.29, 36.82, "KE", "Kenya")]
    rows = [_row(part, split, lat, lon, cc, name, i)
            for i, (split, lat, lon, cc, name) in enumerate(places) for part in ("meta", "clue")]
    out = _hand_made_out(tmp_path, rows, ledger=[])
    assert _cli_stats(out) == 0
    drawn = json.loads((out / "report.json").read_text())["plots"]
    assert drawn == ["plots/world_map.png", "plots/countries.png", "plots/splits.png"]
    assert not (out / "plots" / "rejections.png").exists()
    meta = [r for r in rows if r["part"] == "meta"]
    png = out / "plots" / "world_map.png"
    for split, lat, lon, _, _ in places:
        colours = _pixel_colours(png, meta, lon, lat)
        assert _rgb(plots.SPLIT_COLOURS[split]) in colours, split
        others = {_rgb(c) for s, c in plots.SPLIT_COLOURS.items() if s != split}
        assert not colours & others, split


def test_a_map_of_more_samples_than_dots_shows_their_density(tmp_path, monkeypatch):
    """Past MAX_DOTS (millions of samples in a real corpus) the map counts samples per cell."""
    import numpy as np

    monkeypatch.setattr(plots, "MAX_DOTS", 500)
    rng = np.random.default_rng(7)
    n = 2000  # around Nairobi, a dense few cells; one lone sample off Chile
    lats, lons = np.append(rng.normal(-1.29, 0.8, n), -30.5), np.append(rng.normal(36.82, 0.8, n), -75.5)
    table = pa.table({"split": ["train"] * n + ["test"], "lat": lats, "lon": lons})
    fig = plots.world_map(table)
    assert [a.get_gid() for a in fig.axes[0].get_images()] == ["samples-density"]
    assert fig.axes[0].get_title() == f"Sample locations ({n + 1}: train {n}, test 1)"
    assert len(fig.axes) == 2  # the map and its colour bar
    png = tmp_path / "map.png"
    fig.savefig(png, dpi=plots.DPI)
    fig.canvas.draw()
    with Image.open(png) as im:
        rgb = im.convert("RGB")

    def colour_at(lon, lat):
        x, y = fig.axes[0].transData.transform((lon, lat))
        return rgb.getpixel((round(x), round(rgb.height - y)))

    background = colour_at(-150.0, 0.0)  # the empty Pacific
    assert colour_at(36.82, -1.29) != background and colour_at(-75.5, -30.5) != background
    assert colour_at(36.82, -1.29) != colour_at(-75.5, -30.5)  # many samples, one sample: other colours


def test_empty_build_makes_no_plots_and_a_card_without_them(tmp_path):
    out = _hand_made_out(tmp_path, [], ledger=None)
    (out / "plots").mkdir()
    (out / "plots" / "world_map.png").write_bytes(b"stale")  # from an earlier run: must go
    assert plots.make_plots(str(out), json.loads((out / "report.json").read_text())) == []
    assert _cli_stats(out) == 0
    assert json.loads((out / "report.json").read_text())["plots"] == []
    assert not (out / "plots" / "world_map.png").exists()
    assert "## Plots" not in (out / "README.md").read_text()


def test_missing_report_exits_2_with_one_message(tmp_path, capsys):
    assert _cli_stats(tmp_path / "nothing") == 2
    err = capsys.readouterr().err
    assert "report.json not found" in err and err.count("\n") == 1

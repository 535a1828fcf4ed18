"""Claims match evidence: the clue filter and the truth view the Dialogue part speaks from."""
from __future__ import annotations

from pipeline.geo.claims import claims, truth_view
from pipeline.stages.quality import check_claims, names_finer_than, supported_level

LOC = {"continent": "Europe", "country": "France", "country_code": "FR", "admin1": "Baden-Wuerttemberg",
       "admin2": "", "city": "Kehl", "truth_region": "Alsace", "truth_city": "Strasbourg",
       "truth_city_near": False, "truth_level": "city"}


def clue(level):
    return {"category": "architecture", "evidence": "timber framed houses with steep roofs", "implies": "x",
            "level": level}


def test_claims_come_from_the_truth_not_reverse_geocoder():
    c = claims(LOC)
    assert (c["region"], c["city"], c["level"]) == ("Alsace", "Strasbourg", "city")
    near = claims({**LOC, "truth_city_near": True})
    assert near["level"] == "region" and near["city"] == "Strasbourg"
    view = truth_view({**LOC, "truth_city_near": True})
    assert (view["admin1"], view["city"], view["admin2"]) == ("Alsace", "", "")


def test_clue_summary_may_not_name_a_finer_level_than_its_clues():
    c = claims(LOC)
    assert supported_level([clue("country"), clue("continent")]) == "country"
    over = {"clues": [clue("country"), clue("country")], "reasoning": "All this points to Strasbourg, France."}
    reject = check_claims(over, c)
    assert reject and reject.reason == "claim_beyond_evidence" and "Strasbourg" in reject.detail
    ok = {"clues": [clue("country"), clue("region")], "reasoning": "This is Alsace, in France."}
    assert check_claims(ok, c) is None
    city = {"clues": [clue("city"), clue("country")], "reasoning": "Strasbourg, Alsace, France."}
    assert check_claims(city, c) is None
    vague = {"clues": [clue("continent"), clue("continent")], "reasoning": "Somewhere in France."}
    assert check_claims(vague, c).reason == "claim_beyond_evidence"


def test_a_name_equal_to_a_coarser_one_is_no_overclaim():
    c = claims({**LOC, "country": "Singapore", "truth_region": "", "truth_city": "Singapore"})
    assert names_finer_than("It is Singapore.", c, "country") == []

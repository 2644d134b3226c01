"""Every branch of the DR and DME rules on hand-built lesion inventories."""
from __future__ import annotations

import numpy as np
import pytest

from fundus_lib.data.grading import (PAPER_SEVERE_IHE_PER_QUADRANT, QUADRANTS, SEVERE_IHE_PER_QUADRANT, Lesion,
                                     LesionInventory, dme_grade, dr_grade, grade, haex_fovea_distance_dd,
                                     is_referable, lesion_counts, make_inventory, quadrant_counts, quadrant_of)

# A right eye: the disc is on the image's right, so nasal = larger x. Fovea at (200, 200), DD 50.
FOVEA = (200.0, 200.0)
DISC = (330.0, 190.0)
DD = 50.0
# One point inside each quadrant (x offset, y offset from the fovea), right eye.
OFFSETS = {"ST": (-60.0, -60.0), "SN": (60.0, -60.0), "IN": (60.0, 60.0), "IT": (-60.0, 60.0)}


def inventory(*lesions: tuple[str, float, float, float]) -> LesionInventory:
    return make_inventory(lesions, fovea=FOVEA, disc=DISC, disc_diameter=DD)


def at(quadrant: str, lesion: str, jitter: float = 0.0, size: float = 3.0) -> tuple[str, float, float, float]:
    dx, dy = OFFSETS[quadrant]
    return (lesion, FOVEA[0] + dx + jitter, FOVEA[1] + dy + jitter, size)


def ihe_per_quadrant(counts: dict[str, int]) -> list[tuple[str, float, float, float]]:
    return [at(q, "iHE", jitter=0.5 * i) for q, n in counts.items() for i in range(n)]


def test_quadrants_are_mirrored_between_eyes():
    x = np.array([150.0, 250.0, 250.0, 150.0])
    y = np.array([150.0, 150.0, 250.0, 250.0])
    right = quadrant_of(x, y, FOVEA, disc=(330.0, 190.0))
    left = quadrant_of(x, y, FOVEA, disc=(70.0, 190.0))
    assert right.tolist() == ["ST", "SN", "IN", "IT"]
    assert left.tolist() == ["SN", "ST", "IT", "IN"]
    # points on a dividing line go inferior and temporal
    assert quadrant_of(200.0, 200.0, FOVEA, DISC).item() == "IT"
    with pytest.raises(ValueError, match="nasal side undefined"):
        quadrant_of(1.0, 1.0, FOVEA, disc=(200.0, 100.0))


@pytest.mark.parametrize("lesions, expected", [
    ((), 0),
    ((at("ST", "FiP"),), 0),  # FiP alone is indirect evidence only
    ((at("ST", "MA"), at("IN", "MA")), 1),
    ((at("ST", "MA"), at("SN", "FiP")), 1),
    ((at("ST", "iHE"),), 2),
    ((at("IT", "HaEx"),), 0),  # HaEx alone is indirect evidence only (L-Net/SiAN Sec. 4.1)
    ((at("ST", "CWS"),), 0),  # so is CWS alone
    ((at("ST", "CWS"), at("IT", "HaEx")), 0),
    ((at("ST", "MA"), at("IN", "HaEx")), 2),  # HaEx beside MA
    ((at("ST", "MA"), at("SN", "iHE"), at("IN", "HaEx")), 2),
    ((at("ST", "MA"), at("ST", "CWS")), 1),  # CWS needs grade-2 evidence, MA alone is not
    ((at("ST", "iHE"), at("IT", "CWS")), 3),
    ((at("ST", "MA"), at("IN", "HaEx"), at("IT", "CWS")), 3),
    ((at("ST", "MA"), at("ST", "iHE"), at("IT", "CWS")), 3),
    ((at("ST", "NV"),), 4),
    ((at("ST", "vHE"),), 4),
    ((at("ST", "pHE"),), 4),
    ((at("ST", "NV"), at("ST", "FiP"), at("IN", "CWS"), at("IT", "MA")), 4),
])
def test_dr_grade_branches(lesions, expected):
    assert dr_grade(inventory(*lesions)) == expected


def test_dr3_needs_the_count_in_all_four_quadrants():
    k = SEVERE_IHE_PER_QUADRANT
    everywhere = {q: k for q in QUADRANTS}
    assert dr_grade(inventory(*ihe_per_quadrant(everywhere))) == 3  # boundary: exactly k counts
    one_short = dict(everywhere, IT=k - 1)
    assert dr_grade(inventory(*ihe_per_quadrant(one_short))) == 2
    three_quadrants_many = {"ST": 40, "SN": 40, "IN": 40, "IT": 0}
    assert dr_grade(inventory(*ihe_per_quadrant(three_quadrants_many))) == 2


def test_paper_threshold_is_over_twenty_per_quadrant():
    assert PAPER_SEVERE_IHE_PER_QUADRANT == 21
    twenty = inventory(*ihe_per_quadrant({q: 20 for q in QUADRANTS}))
    assert dr_grade(twenty, severe_ihe_per_quadrant=PAPER_SEVERE_IHE_PER_QUADRANT) == 2
    assert dr_grade(twenty, severe_ihe_per_quadrant=20) == 3
    with pytest.raises(ValueError, match="severe_ihe_per_quadrant"):
        dr_grade(twenty, severe_ihe_per_quadrant=0)


def test_dme_branches_and_boundary():
    assert dme_grade(inventory()) == 0
    assert dme_grade(inventory(at("ST", "iHE"), at("ST", "CWS"), at("IN", "NV"))) == 0  # only HaEx counts
    on_boundary = ("HaEx", FOVEA[0] + 30.0, FOVEA[1] + 40.0, 2.0)  # distance 50 = 1 DD exactly
    just_outside = ("HaEx", FOVEA[0] + 30.0, FOVEA[1] + 40.5, 2.0)
    far = ("HaEx", FOVEA[0] - 150.0, FOVEA[1], 2.0)
    assert dme_grade(inventory(on_boundary)) == 2
    assert dme_grade(inventory(just_outside)) == 1
    assert dme_grade(inventory(far, just_outside)) == 1
    assert dme_grade(inventory(far, on_boundary)) == 2
    assert haex_fovea_distance_dd(inventory(far)) == pytest.approx(3.0)
    assert haex_fovea_distance_dd(inventory()) == float("inf")


def test_referable_and_combined_grades():
    assert [is_referable(g) for g in range(5)] == [False, False, True, True, True]
    with pytest.raises(ValueError, match="dr must be"):
        is_referable(5)
    result = grade(inventory(("HaEx", FOVEA[0] + 10.0, FOVEA[1], 2.0)))
    assert (result.dr, result.dme, result.referable) == (0, 2, False)  # exudates alone: DME, not DR
    result = grade(inventory(("HaEx", FOVEA[0] + 10.0, FOVEA[1], 2.0), at("ST", "MA")))
    assert (result.dr, result.dme, result.referable) == (2, 2, True)
    assert grade(inventory(at("ST", "MA"))).referable is False


def test_counts_per_class_and_quadrant():
    inv = inventory(at("ST", "MA"), at("ST", "MA", 1.0), at("IN", "iHE"), at("IT", "HaEx"))
    assert lesion_counts(inv) == {"MA": 2, "iHE": 1, "HaEx": 1, "CWS": 0, "vHE": 0, "pHE": 0, "NV": 0, "FiP": 0}
    by_quadrant = quadrant_counts(inv)
    assert by_quadrant["MA"] == {"ST": 2, "SN": 0, "IN": 0, "IT": 0}
    assert by_quadrant["iHE"]["IN"] == 1 and by_quadrant["HaEx"]["IT"] == 1
    assert len(inv.of("MA")) == 2


def test_inventory_validation():
    with pytest.raises(ValueError, match="Lesion.lesion"):
        Lesion("EX", 1.0, 1.0, 1.0, "ST")
    with pytest.raises(ValueError, match="Lesion.size"):
        Lesion("MA", 1.0, 1.0, 0.0, "ST")
    with pytest.raises(ValueError, match="Lesion.quadrant"):
        Lesion("MA", 1.0, 1.0, 1.0, "north")
    wrong_quadrant = Lesion("MA", FOVEA[0] - 60.0, FOVEA[1] - 60.0, 2.0, "IN")  # really ST
    with pytest.raises(ValueError, match="lies in quadrant ST"):
        LesionInventory((wrong_quadrant,), FOVEA, DISC, DD)
    with pytest.raises(ValueError, match="disc_diameter"):
        LesionInventory((), FOVEA, DISC, 0.0)
    with pytest.raises(ValueError, match="lesion must be one of"):
        inventory().of("EX")

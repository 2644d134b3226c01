"""Shared source helpers: header matching, grade parsing, stem index, lesion columns, image checks."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fundus_lib.data.manifest import LESIONS, ManifestError
from fundus_lib.data.sources._common import (
    drop_repeated_rows, grade_column, image_problem, index_by_stem, is_os_junk, kaggle_name, lesion_fields,
    select_columns,
)


def test_select_columns_ignores_case_and_whitespace_and_drops_blank_rows():
    frame = pd.DataFrame({"Image name": ["a", None], "Risk of macular edema ": [" 1", None], "Unnamed: 3": [None, None]})
    table = select_columns(frame, {"name": "image name", "dme": "Risk of macular edema"}, dataset="X",
                           what="labels", path=Path("l.csv"))
    assert list(table.columns) == ["name", "dme"] and table.to_dict("list") == {"name": ["a"], "dme": ["1"]}
    with pytest.raises(ManifestError, match=r"X: labels l\.csv lacks column 'grade' \(found \['Image name', 'Risk"):
        select_columns(frame, {"g": "grade"}, dataset="X", what="labels", path=Path("l.csv"))


def test_grade_column_accepts_integral_floats_and_names_bad_rows():
    names = pd.Series(["a", "b", "c"])
    assert grade_column(pd.Series(["2", "0", "4.0"]), low=0, high=4, dataset="X", column="g", path=Path("p"),
                        names=names).tolist() == [2, 0, 4]
    for bad in (["2", "1.5", "0"], ["2", "5", "0"], ["2", None, "0"]):
        with pytest.raises(ManifestError, match=r"column 'g' of p must hold integers 0\.\.4.*b:"):
            grade_column(pd.Series(bad), low=0, high=4, dataset="X", column="g", path=Path("p"), names=names)
    allowed = grade_column(pd.Series(["2", None, "0"]), low=0, high=4, dataset="X", column="g", path=Path("p"),
                           names=names, allow_missing=True)
    assert allowed.isna().tolist() == [False, True, False]


def test_index_by_stem_is_case_insensitive_and_rejects_ambiguous_stems(tmp_path):
    for name in ("IM000013.JPG", "b.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    index = index_by_stem(tmp_path, "X")
    assert set(index) == {"im000013", "b"} and index["im000013"].name == "IM000013.JPG"
    (tmp_path / "b.jpg").write_bytes(b"x")
    with pytest.raises(ManifestError, match="two files share the name 'b'"):
        index_by_stem(tmp_path, "X")


def test_kaggle_name_and_lesion_fields():
    assert kaggle_name("10_left.jpeg", dataset="X", where=Path("p")) == ("10", "left")
    with pytest.raises(ManifestError, match="not of the form"):
        kaggle_name("left_10", dataset="X", where=Path("p"))
    row = lesion_fields({"MA": Path("/m.tif"), "CWS": None})
    assert (row["mask_MA"], row["lesion_MA"], row["lesion_CWS"]) == ("/m.tif", 1, 0)
    assert pd.isna(row["mask_CWS"]) and all(pd.isna(row[f"lesion_{lesion}"]) for lesion in LESIONS
                                              if lesion not in ("MA", "CWS"))
    with pytest.raises(ValueError, match="unknown lesions"):
        lesion_fields({"HE": None})


def test_image_problem_flags_black_and_truncated_images(tmp_path):
    array = np.zeros((64, 96, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "black.jpeg")
    array[20:40, 30:60] = 180
    Image.fromarray(array).save(tmp_path / "fundus.jpeg")
    (tmp_path / "cut.jpeg").write_bytes((tmp_path / "fundus.jpeg").read_bytes()[:300])
    assert image_problem(tmp_path / "fundus.jpeg") is None
    assert image_problem(tmp_path / "black.jpeg") == "black"
    assert image_problem(tmp_path / "cut.jpeg").startswith("unreadable")


def test_drop_repeated_rows_keeps_one_identical_copy_and_names_conflicting_lines():
    table = pd.DataFrame({"name": ["a.png", "b", "A", "c"], "dr": ["1", "2", "1", "0"]},
                         index=pd.Index([2, 3, 5, 6], name="line"))
    with pytest.warns(UserWarning, match=r"X: labels p lists 1 image\(s\) .* identical values; "
                                         r".*'a\.png' \(line 2, line 5\)"):
        kept = drop_repeated_rows(table, "name", dataset="X", what="labels", path=Path("p"))
    assert kept["name"].tolist() == ["a.png", "b", "c"]
    table.loc[5, "dr"] = "3"
    with pytest.raises(ManifestError, match=r"different values: 'a\.png' \(line 2: grade='1'; line 5: grade='3'\)"):
        drop_repeated_rows(table, "name", dataset="X", what="labels", path=Path("p"), headers={"dr": "grade"})


def test_os_junk_is_recognised_and_skipped_by_the_image_index(tmp_path):
    for name in (".DS_Store", "._a.png", "Thumbs.db", "desktop.ini", "a.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [is_os_junk(tmp_path / n) for n in (".DS_Store", "._a.png", "THUMBS.DB", "desktop.ini", "a.png")] == \
        [True, True, True, True, False]
    assert list(index_by_stem(tmp_path, "X")) == ["a"]

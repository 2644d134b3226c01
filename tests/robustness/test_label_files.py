"""Label files and dataset folders as users really have them, read through ``load_source``.

Each case starts from a fixture tree that mimics an official layout (fundus_lib.data.demo_layouts),
breaks one thing and expects either a ManifestError (or warning) naming the file, the line and
what is wrong, or the manifest of the intact tree.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from fundus_lib.data.manifest import ManifestError
from fundus_lib.data.sources import load_source
from fundus_lib.data.splits import LeakageError, assign_splits, check_no_leakage
from fundus_lib.data.synthetic import write_dataset
from fundus_lib.data.manifest import make_manifest
from fundus_lib.data.demo_layouts import (
    APTOS_LABELS, MESSIDOR_HEADER, MESSIDOR_ROWS, build_aptos, build_ddr, build_eyepacs, build_idrid, build_messidor,
    build_retinal_lesions, write_text,
)
from fundus_lib.data.xls_writer import write_xls

APTOS_HEADER = "id_code,diagnosis"
APTOS_ROWS = [f"{name},{grade}" for name, grade in APTOS_LABELS.items()]


def load_quietly(name: str, root: Path, **kwargs) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact tree loads without any warning
        return load_source(name, root, **kwargs)


@pytest.fixture
def aptos(tmp_path) -> Path:
    return build_aptos(tmp_path / "aptos")


# ---------------------------------------------------------------- CSV quirks that must load as intended

TOLERATED = {
    "windows_line_endings": lambda root: (root / "train.csv").write_bytes(
        ("\r\n".join([APTOS_HEADER, *APTOS_ROWS]) + "\r\n").encode()),
    "byte_order_mark": lambda root: (root / "train.csv").write_bytes(
        ("\ufeff" + "\n".join([APTOS_HEADER, *APTOS_ROWS]) + "\n").encode()),
    "bom_and_crlf": lambda root: (root / "train.csv").write_bytes(
        ("\ufeff" + "\r\n".join([APTOS_HEADER, *APTOS_ROWS]) + "\r\n").encode()),
    "extra_spaces_in_headers": lambda root: write_text(
        root / "train.csv", "\n".join([" id_code ,  diagnosis ", *APTOS_ROWS]) + "\n"),
    "blank_lines_and_padded_cells": lambda root: write_text(
        root / "train.csv", "\n".join([APTOS_HEADER, "", *(f" {row} " for row in APTOS_ROWS), "", ""]) + "\n"),
}


@pytest.mark.parametrize("case", list(TOLERATED))
def test_label_file_quirk_loads_like_the_clean_file(case, aptos):
    clean = load_quietly("aptos", aptos)
    TOLERATED[case](aptos)
    assert load_quietly("aptos", aptos).equals(clean)


# ---------------------------------------------------------------- broken label files: error names file + line

def aptos_case(lines: list[str]):
    return lambda root: write_text(root / "train.csv", "\n".join(lines) + "\n")


BROKEN = {
    "missing_column": (aptos_case(["id_code,grade", *APTOS_ROWS]),
                       r"APTOS: labels CSV .*train\.csv lacks column 'diagnosis' \(found \['id_code', 'grade'\]\)"),
    "empty_file": (lambda root: (root / "train.csv").write_bytes(b""),
                   r"APTOS: labels CSV .*train\.csv is empty \(0 bytes\)"),
    "header_only": (aptos_case([APTOS_HEADER]), r"APTOS: labels CSV .*train\.csv has a header but no rows"),
    "grade_out_of_range": (aptos_case([APTOS_HEADER, APTOS_ROWS[0], "001639a390f0,7", APTOS_ROWS[2]]),
                           r"APTOS: column 'diagnosis' of .*train\.csv must hold integers 0\.\.4 \(no blanks\); "
                           r"bad rows: \[\"001639a390f0: '7' \(line 3\)\"\]"),
    "grade_not_a_number": (aptos_case([APTOS_HEADER, *APTOS_ROWS[:2], "0024cdab0c1e,severe"]),
                           r"column 'diagnosis' of .*train\.csv .*0024cdab0c1e: 'severe' \(line 4\)"),
    "unknown_id": (aptos_case([*[APTOS_HEADER, *APTOS_ROWS], "ffffffffffff,1"]),
                   r"APTOS: image listed in .*train\.csv but missing on disk: .*train_images/ffffffffffff"),
    "conflicting_duplicate": (aptos_case([APTOS_HEADER, *APTOS_ROWS, "001639a390f0,3"]),
                              r"APTOS: labels CSV .*train\.csv lists 1 image\(s\) more than once with different "
                              r"values: '001639a390f0' \(line 3: diagnosis='4'; line 5: diagnosis='3'\)"),
    "conflicting_duplicate_other_spelling": (
        aptos_case([APTOS_HEADER, *APTOS_ROWS, "001639A390F0.png,0"]),
        r"more than once with different values: '001639a390f0' \(line 3: diagnosis='4'; line 5: diagnosis='0'\)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_label_file_is_named_with_its_line(case, aptos):
    write, message = BROKEN[case]
    write(aptos)
    with pytest.raises(ManifestError, match=message):
        load_source("aptos", aptos)


def test_identical_duplicate_rows_are_dropped_with_a_warning_naming_the_lines(aptos):
    clean = load_quietly("aptos", aptos)
    write_text(aptos / "train.csv", "\n".join([APTOS_HEADER, *APTOS_ROWS, APTOS_ROWS[0]]) + "\n")
    with pytest.warns(UserWarning, match=r"APTOS: labels CSV .*train\.csv lists 1 image\(s\) more than once with "
                                         r"identical values; the repeats are ignored: "
                                         r"'000c1434d8d7' \(line 2, line 5\)"):
        manifest = load_source("aptos", aptos)
    assert manifest.equals(clean)


# ---------------------------------------------------------------- other sources and formats

def ddr_list(root: Path, text: str) -> None:
    write_text(root / "DR_grading" / "train.txt", text)


SOURCE_CASES = {
    "ddr_grade_out_of_range": (
        "ddr_grading", build_ddr, lambda root: ddr_list(root, "007-0004-000.jpg 0\n\n007-0007-000.jpg 9\n"),
        r"DDR: column 'label' of .*train\.txt must hold integers 0\.\.5 .*007-0007-000\.jpg: '9' \(line 3\)"),
    "ddr_conflicting_duplicate": (
        "ddr_grading", build_ddr, lambda root: ddr_list(root, "007-0004-000.jpg 0\r\n007-0004-000.jpg 2\r\n"),
        r"DDR: grading list .*train\.txt lists 1 image\(s\) more than once with different values: "
        r"'007-0004-000\.jpg' \(line 1: label='0'; line 2: label='2'\)"),
    "ddr_zero_byte_mask": (
        "ddr_segmentation", build_ddr,
        lambda root: (root / "lesion_segmentation" / "train" / "label" / "EX" / "007-1789-100.tif").write_bytes(b""),
        r"^DDR: cannot read mask .*label/EX/007-1789-100\.tif"),
    "retinal_lesions_zero_byte_mask": (
        "retinal_lesions", build_retinal_lesions,
        lambda root: (root / "lesion_segs_896x896" / "10_left" / "microaneurysm.png").write_bytes(b""),
        r"^Retinal-Lesions: cannot read mask .*10_left/microaneurysm\.png"),
    "retinal_lesions_grade_out_of_range": (
        "retinal_lesions", build_retinal_lesions,
        lambda root: write_text(root / "dr_grades.csv", "image id,kaggle label,our label\n10_left,1,2\n"
                                                        "10_right,4,5\n4604_right,0,0\n"),
        r"Retinal-Lesions: column 'our label' of .*dr_grades\.csv must hold integers 0\.\.4 "
        r".*10_right: '5' \(line 3\)"),
    "idrid_zero_byte_mask_at_load_time": (
        "idrid_segmentation", build_idrid,
        lambda root: (root / "A. Segmentation" / "2. All Segmentation Groundtruths" / "a. Training Set"
                      / "1. Microaneurysms" / "IDRiD_01_MA.tif").write_bytes(b""),
        r"^IDRiD: mask file .*IDRiD_01_MA\.tif is empty \(0 bytes\)"),
    "idrid_grade_out_of_range": (
        "idrid_grading", build_idrid,
        lambda root: write_text(root / "B. Disease Grading" / "2. Groundtruths"
                                / "a. IDRiD_Disease Grading_Training Labels.csv",
                                "Image name,Retinopathy grade,Risk of macular edema ,,\nIDRiD_001,2,1,,\n"
                                "IDRiD_002,0,3,,\nIDRiD_003,4,2,,\n"),
        r"IDRiD: column 'Risk of macular edema' of .*Training Labels\.csv must hold integers 0\.\.2 .*"
        r"IDRiD_002: '3' \(line 3\)"),
    "messidor_conflicting_duplicate_in_workbook": (
        "messidor", build_messidor, None,
        r"Messidor: annotation workbook .*Annotation_Base11\.xls lists 1 image\(s\) more than once with different "
        r"values: .*row 2: .*row 4: "),
}


@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_source_error_names_dataset_file_and_line(case, tmp_path):
    source, build, corrupt, message = SOURCE_CASES[case]
    root = build(tmp_path / source)
    if corrupt is None:  # Messidor: rewrite a workbook with a repeated, regraded row
        rows = [list(row) for row in MESSIDOR_ROWS["Base11"]]
        write_xls(root / "Base11" / "Annotation_Base11.xls", [MESSIDOR_HEADER, *rows, rows[0][:2] + [3, 0]])
    else:
        corrupt(root)
    with pytest.raises(ManifestError, match=message):
        load_source(source, root)


def test_synthetic_label_file_errors_name_the_line(tmp_path):
    root = tmp_path / "synth"
    write_dataset(root, 3, size=64, seed=0)
    labels = (root / "labels.csv").read_text().splitlines()
    header = labels[0].split(",")
    row = labels[2].split(",")
    row[header.index("dr_grade")] = "6"
    (root / "labels.csv").write_text("\n".join([labels[0], labels[1], ",".join(row), *labels[3:]]) + "\n")
    with pytest.raises(ManifestError, match=r"synthetic: column 'dr_grade' of .*labels\.csv must hold integers "
                                            r"0\.\.4 .*synth_000001: 6 \(line 3\)"):
        load_source("synthetic", root)


# ---------------------------------------------------------------- OS junk in dataset folders

JUNK = [".DS_Store", "._microaneurysm.png", "Thumbs.db", "desktop.ini"]


@pytest.mark.parametrize("junk", JUNK)
def test_os_junk_in_a_retinal_lesions_mask_folder_is_ignored(junk, tmp_path):
    root = build_retinal_lesions(tmp_path / "rl")
    clean = load_quietly("retinal_lesions", root)
    (root / "lesion_segs_896x896" / "10_left" / junk).write_bytes(b"\x00\x01junk")
    assert load_quietly("retinal_lesions", root).equals(clean)


@pytest.mark.parametrize("junk", ["._IDRiD_01.jpg", ".DS_Store", "Thumbs.db"])
def test_os_junk_in_an_image_folder_is_not_listed_as_an_image(junk, tmp_path):
    root = build_idrid(tmp_path / "idrid")
    clean = load_quietly("idrid_segmentation", root)
    (root / "A. Segmentation" / "1. Original Images" / "a. Training Set" / junk).write_bytes(b"\x00\x01junk")
    assert load_quietly("idrid_segmentation", root).equals(clean)


def test_unknown_file_in_a_mask_folder_is_still_named(tmp_path):
    root = build_retinal_lesions(tmp_path / "rl")
    (root / "lesion_segs_896x896" / "10_left" / "haemorrhage.png").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"Retinal-Lesions: unexpected file .*10_left/haemorrhage\.png"):
        load_source("retinal_lesions", root)


# ---------------------------------------------------------------- partial downloads

def test_eyepacs_test_labels_without_test_images_load_the_training_set_with_a_warning(tmp_path):
    root = build_eyepacs(tmp_path / "eyepacs")
    for path in (root / "test").iterdir():
        path.unlink()
    (root / "test").rmdir()
    with pytest.warns(UserWarning) as caught:
        manifest = load_source("eyepacs", root)
    assert any(f"no test image folder {root / 'test'}" in str(w.message) for w in caught)
    assert set(manifest["split"]) == {"train"} and len(manifest) == 3  # 5 listed, one black, one truncated
    with pytest.raises(ManifestError, match=r"EyePACS: test image folder not found: .*eyepacs/test"):
        load_source("eyepacs", root, include_test=True)


# ---------------------------------------------------------------- patient ids typed by hand

def patients(ids: list[str]) -> pd.DataFrame:
    return make_manifest([{"image_id": f"img{i}", "image_path": f"/data/img{i}.png", "dr_grade": i % 2,
                           "patient_id": patient} for i, patient in enumerate(ids)])


@pytest.mark.parametrize("spelling", ["p17", " P17", "P17 ", "p17\t"])
def test_patient_ids_differing_in_case_or_spaces_are_one_patient(spelling):
    manifest = patients(["P17", spelling, "P18", "P19"])
    with pytest.raises(LeakageError, match=r"1 patient_id value\(s\) occur in more than one split") as error:
        check_no_leakage({"train": manifest.iloc[[0, 2]], "test": manifest.iloc[[1, 3]]})
    assert f"{'P17'!r} / {spelling!r}" in str(error.value) or f"{spelling!r} / {'P17'!r}" in str(error.value)
    many = patients([name for i in range(10) for name in (f"P{i}", f" p{i} ")])
    split = assign_splits(many, val=0.0, test=0.5, stratify=None, seed=0)
    assert (split.groupby(split["patient_id"].str.strip().str.lower())["split"].nunique() == 1).all()

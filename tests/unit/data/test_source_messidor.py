"""Messidor-1 source against a fixture tree with genuine .xls annotation workbooks: layout and
grades, published errata on and off, duplicates by name and by pixels, exam-level patients, junk."""
import shutil
import warnings
import zipfile
from pathlib import Path

import cv2
import pandas as pd
import pytest
import xlrd

from fundus_lib.data.manifest import ManifestError
from fundus_lib.data.sources.messidor import BASE33_DUPLICATES, BASES, ERRATA, load_messidor
from fundus_lib.data.splits import stratified_kfold
from fundus_lib.data.standins import save_image
from fundus_lib.data.xls_writer import write_xls
from fundus_lib.data.demo_layouts import (
    MESSIDOR_COPY, MESSIDOR_DEPARTMENTS, MESSIDOR_EXAMS, MESSIDOR_HEADER, MESSIDOR_ROWS, MESSIDOR_SPACED,
    build_messidor, textured_image, write_exam_list,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_messidor(tmp_path / "Messidor")


def _load(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_messidor(root, **kwargs)


def test_fixture_workbooks_are_genuine_xls(root):
    path = root / "Base11" / "Annotation_Base11.xls"
    assert path.read_bytes()[:8] == b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1"  # OLE2 compound document
    sheet = xlrd.open_workbook(str(path)).sheet_by_index(0)
    assert sheet.row_values(0) == MESSIDOR_HEADER
    assert sheet.cell(1, 2).ctype == xlrd.XL_CELL_NUMBER


def test_manifest_reads_every_base_grades_and_departments(root):
    manifest = _load(root).set_index("image_id")
    assert len(manifest) == 2 * len(BASES) == 24
    for base, rows in MESSIDOR_ROWS.items():
        for name, department, dr, dme in rows:
            row = manifest.loc[name[:-4]]
            assert (row["dr_grade"], row["dme_grade"], row["domain"]) == (dr, dme, department)
            assert row["referable"] == int(dr >= 2)
            assert Path(row["image_path"]) == (root / base / name).resolve()
    assert (manifest["source"] == "messidor").all() and manifest["split"].isna().all()
    assert set(manifest["domain"]) == set(MESSIDOR_DEPARTMENTS.values())
    assert manifest["eye"].isna().all() and pd.api.types.is_integer_dtype(manifest["referable"])


def test_spaced_workbook_name_is_read(root):
    assert (root / MESSIDOR_SPACED / f"Annotation {MESSIDOR_SPACED}.xls").is_file()
    manifest = _load(root, bases=(MESSIDOR_SPACED,))
    assert sorted(manifest["image_id"]) == sorted(name[:-4] for name, *_ in MESSIDOR_ROWS[MESSIDOR_SPACED])


def test_resaved_copy_is_found_by_pixels_reported_and_grouped(root):
    copy, original = MESSIDOR_COPY
    copy_path, original_path = root / "Base34" / f"{copy}.tif", root / "Base11" / f"{original}.tif"
    assert copy_path.read_bytes() != original_path.read_bytes()  # resized and re-saved: a file hash misses it
    with pytest.warns(UserWarning, match=r"1 image\(s\) are copies of others .*1 group\(s\) with different grades"):
        manifest = load_messidor(root)
    indexed = manifest.set_index("image_id")
    assert indexed.loc[copy, "duplicate_of"] == original
    assert indexed.loc[copy, "patient_id"] == indexed.loc[original, "patient_id"] == original
    assert manifest["duplicate_of"].notna().sum() == 1
    assert manifest.attrs["duplicates"] == {copy: original}
    conflict = manifest.attrs["duplicate_conflicts"][0]
    assert set(conflict) == {copy, original} and conflict[copy] != conflict[original]
    others = indexed.drop(index=[copy])
    assert (others["patient_id"] == others.index).all()


def test_duplicate_check_can_be_skipped(tmp_path):
    root = build_messidor(tmp_path / "Messidor", with_exams=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manifest = load_messidor(root, check_duplicates=False)
    assert manifest["duplicate_of"].isna().all() and manifest.attrs["duplicates"] == {}


def test_errata_update_replaces_the_original_with_a_warning(root):
    name, department, dr, dme = MESSIDOR_ROWS["Base11"][0]
    write_xls(root / "Base11" / "Annotation_Base11_update20161024.xls",
              [MESSIDOR_HEADER, [name, department, (dr + 1) % 4, dme], list(MESSIDOR_ROWS["Base11"][1])])
    with pytest.warns(UserWarning, match="errata update Annotation_Base11_update20161024.xls"):
        manifest = load_messidor(root, bases=("Base11",), check_duplicates=False)
    assert manifest.set_index("image_id").loc[name[:-4], "dr_grade"] == (dr + 1) % 4


def test_name_listed_twice_with_identical_values_keeps_one_row(root):
    rows = MESSIDOR_ROWS["Base21"]
    write_xls(root / "Base21" / "Annotation_Base21.xls", [MESSIDOR_HEADER, *map(list, rows), list(rows[0])])
    with pytest.warns(UserWarning, match=r"Annotation_Base21\.xls lists 1 image\(s\) more than once with identical "
                                         r"values; the repeats are ignored: .*\(row 2, row 4\)"):
        manifest = load_messidor(root, bases=("Base21",))
    assert len(manifest) == 2
    assert manifest.set_index("image_id").loc[rows[0][0][:-4], "dr_grade"] == rows[0][2]


def test_name_listed_twice_with_different_grades_is_an_error_naming_both_rows(root):
    rows = MESSIDOR_ROWS["Base21"]
    write_xls(root / "Base21" / "Annotation_Base21.xls", [MESSIDOR_HEADER, *map(list, rows), list(rows[0][:2]) + [3, 2]])
    with pytest.raises(ManifestError, match=r"Annotation_Base21\.xls lists 1 image\(s\) more than once with different "
                                            r"values: .*row 2: .*macular edema='1'; row 4: .*macular edema='2'"):
        load_messidor(root, bases=("Base21",))


def test_missing_workbook_is_named(root):
    (root / "Base13" / "Annotation_Base13.xls").unlink()
    with pytest.raises(ManifestError, match=r"annotation workbook of Base13 not found: expected .*Annotation_Base13\.xls"):
        _load(root)


def test_missing_base_folder_is_named(tmp_path):
    with pytest.raises(ManifestError, match="Base11 image folder not found: expected .*found neither"):
        _load(tmp_path)


def test_workbook_without_a_column_is_named(root):
    header = [column for column in MESSIDOR_HEADER if column != "Retinopathy grade"]
    write_xls(root / "Base14" / "Annotation_Base14.xls", [header, ["x.tif", "CHU de St Etienne", 0]])
    with pytest.raises(ManifestError, match=r"annotation workbook .*Annotation_Base14\.xls lacks column 'Retinopathy grade'"):
        _load(root)


def test_grade_outside_the_messidor_scale_is_named(root):
    rows = [list(row) for row in MESSIDOR_ROWS["Base22"]]
    rows[1][2] = 4  # Messidor DR grades stop at 3
    write_xls(root / "Base22" / "Annotation_Base22.xls", [MESSIDOR_HEADER, *rows])
    with pytest.raises(ManifestError, match=r"'Retinopathy grade' .*Annotation_Base22\.xls must hold integers 0\.\.3"):
        _load(root)


def test_listed_image_missing_on_disk_is_named(root):
    name = MESSIDOR_ROWS["Base31"][1][0]
    (root / "Base31" / name).unlink()
    with pytest.raises(ManifestError, match=f"image listed in .*Annotation_Base31.xls but missing on disk: .*{name}"):
        _load(root)


def test_unknown_base_is_rejected(root):
    with pytest.raises(ValueError, match="bases"):
        _load(root, bases=("Base15",))


def test_workbook_that_is_not_xls_is_named(root):
    (root / "Base23" / "Annotation_Base23.xls").write_text("Image name,Retinopathy grade\n")
    with pytest.raises(ManifestError, match=r"cannot read annotation workbook .*Annotation_Base23\.xls as an \.xls "
                                            r"workbook: found text starting 'Image name,Retinopathy grade.*'; expected "
                                            r"an Excel 97-2003 workbook"):
        _load(root)


# --- published errata ---------------------------------------------------------------------------

def _write_base(root: Path, base: str, rows: list[list], workbook: str | None = None, seed: int = 500) -> None:
    """Replace ``base`` by ``rows`` (image name, department, DR, DME) and a distinct photograph per row."""
    shutil.rmtree(root / base, ignore_errors=True)
    write_xls(root / base / (workbook or f"Annotation_{base}.xls"), [MESSIDOR_HEADER, *rows])
    for i, row in enumerate(rows):
        save_image(root / base / row[0], textured_image(seed + i))


def _errata_rows(base: str, grade: str) -> list[list]:
    """Sheet rows of the errata images of ``base`` with their "old" or "new" DR grade."""
    return [[f"{fix.image_id}.tif", MESSIDOR_DEPARTMENTS["1"], getattr(fix, grade), 0]
            for fix in ERRATA if fix.base == base]


@pytest.fixture
def errata_root(tmp_path: Path) -> Path:
    """Base11 and Base13 holding the four corrected images with the grades of the original sheets."""
    root = build_messidor(tmp_path / "Messidor", with_exams=True)
    _write_base(root, "Base11", _errata_rows("Base11", "old"), seed=500)
    _write_base(root, "Base13", _errata_rows("Base13", "old"), seed=600)
    return root


def _grades(manifest) -> dict[str, int]:
    return dict(zip(manifest["image_id"], manifest["dr_grade"].astype(int)))


def _errata_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "grade correction" in str(w.message)]


def test_errata_are_applied_by_default_and_each_reported_once(errata_root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = load_messidor(errata_root, bases=("Base11", "Base13"), check_duplicates=False)
    assert _grades(manifest) == {fix.image_id: fix.new for fix in ERRATA}
    [message] = _errata_warnings(caught)
    assert message.startswith("Messidor: applied 4 published grade correction(s)")
    for fix in ERRATA:
        assert message.count(fix.image_id) == 1 and f"{fix.image_id} dr_grade {fix.old} -> {fix.new}" in message
    assert len(manifest.attrs["errata_applied"]) == 4
    assert manifest.set_index("image_id").loc["20051020_63045_0100_PP", "referable"] == 0  # 3 -> 0


def test_errata_false_reproduces_the_original_sheets(errata_root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = load_messidor(errata_root, bases=("Base11", "Base13"), check_duplicates=False, errata=False)
    assert _grades(manifest) == {fix.image_id: fix.old for fix in ERRATA}
    assert _errata_warnings(caught) == [] and manifest.attrs["errata_applied"] == []


def test_errata_are_not_applied_twice_over_the_update_sheets(errata_root):
    _write_base(errata_root, "Base11", _errata_rows("Base11", "new"), seed=500,
                workbook="Annotation_Base11_update20161024.xls")
    write_xls(errata_root / "Base11" / "Annotation_Base11.xls", [MESSIDOR_HEADER, *_errata_rows("Base11", "old")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = load_messidor(errata_root, bases=("Base11", "Base13"), check_duplicates=False)
    assert _grades(manifest) == {fix.image_id: fix.new for fix in ERRATA}  # 1 -> 3 and 3 -> 1 not swapped back
    assert any("errata update Annotation_Base11_update20161024.xls" in str(w.message) for w in caught)
    [message] = _errata_warnings(caught)
    assert "applied 1 published" in message and "20060523_48477_0100_PP" in message  # only Base13 was old
    # errata=False picks the original sheet beside the update
    original = load_messidor(errata_root, bases=("Base11",), check_duplicates=False, errata=False)
    assert _grades(original) == {fix.image_id: fix.old for fix in ERRATA if fix.base == "Base11"}


def test_errata_false_with_only_the_update_sheet_sets_the_original_grades_back(errata_root):
    _write_base(errata_root, "Base11", _errata_rows("Base11", "new"), seed=500,
                workbook="Annotation_Base11_update20161024.xls")
    with pytest.warns(UserWarning, match=r"undid 3 published grade correction\(s\) \(errata=False"):
        manifest = load_messidor(errata_root, bases=("Base11",), check_duplicates=False, errata=False)
    assert _grades(manifest) == {fix.image_id: fix.old for fix in ERRATA if fix.base == "Base11"}


def test_grade_matching_neither_sheet_is_reported_and_left_as_read(errata_root):
    rows = _errata_rows("Base13", "old")
    rows[0][2] = 0  # neither 2 (original) nor 3 (corrected)
    write_xls(errata_root / "Base13" / "Annotation_Base13.xls", [MESSIDOR_HEADER, *rows])
    with pytest.warns(UserWarning, match=r"match neither the original sheet nor the ADCIS errata"
                                         r".*20060523_48477_0100_PP "
                                         r"dr_grade=0 \(original 2, corrected 3\)"):
        manifest = load_messidor(errata_root, bases=("Base13",), check_duplicates=False)
    assert _grades(manifest) == {"20060523_48477_0100_PP": 0}


# --- duplicates by name and by pixels -----------------------------------------------------------

def test_listed_base33_pair_is_a_duplicate_by_name_and_its_grade_conflict_reported(tmp_path):
    root = build_messidor(tmp_path / "Messidor", with_exams=True)
    first, second = BASE33_DUPLICATES[5]  # the pair ADCIS lists with DR 3 vs 2
    _write_base(root, "Base33", [[f"{first}.tif", MESSIDOR_DEPARTMENTS["3"], 3, 0],
                                 [f"{second}.tif", MESSIDOR_DEPARTMENTS["3"], 2, 0]], seed=700)
    with pytest.warns(UserWarning, match=r"1 image\(s\) are copies of others .*1 group\(s\) with different grades"):
        manifest = load_messidor(root, bases=("Base33",), check_duplicates=False)
    indexed = manifest.set_index("image_id")
    assert indexed.loc[second, "duplicate_of"] == first and pd.isna(indexed.loc[first, "duplicate_of"])
    assert indexed.loc[first, "patient_id"] == indexed.loc[second, "patient_id"]
    assert manifest.attrs["duplicate_conflicts"] == [{first: {"dr_grade": 3, "dme_grade": 0},
                                                      second: {"dr_grade": 2, "dme_grade": 0}}]
    # the fixture's two photographs differ, so the pixel check reports the listed pair it cannot confirm
    with pytest.warns(UserWarning, match=r"1 pair\(s\) listed as duplicates by the ADCIS erratum do not match "
                                         r"by pixels"):
        checked = load_messidor(root, bases=("Base33",))
    assert checked.set_index("image_id").loc[second, "duplicate_of"] == first


def test_listed_pair_confirmed_by_pixels_is_not_reported_as_unconfirmed(tmp_path):
    root = build_messidor(tmp_path / "Messidor", with_exams=True)
    first, second = BASE33_DUPLICATES[0]
    _write_base(root, "Base33", [[f"{first}.tif", MESSIDOR_DEPARTMENTS["3"], 1, 0],
                                 [f"{second}.tif", MESSIDOR_DEPARTMENTS["3"], 1, 0]], seed=800)
    photo = cv2.imread(str(root / "Base33" / f"{first}.tif"))
    cv2.imwrite(str(root / "Base33" / f"{second}.tif"), cv2.resize(photo, (96, 72), interpolation=cv2.INTER_AREA))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = load_messidor(root, bases=("Base33",))
    assert not [w for w in caught if "do not match by pixels" in str(w.message)]
    assert manifest.attrs["duplicates"] == {second: first} and manifest.attrs["duplicate_conflicts"] == []


# --- exam-level patients ------------------------------------------------------------------------

def test_exam_list_gives_exam_level_patients_and_eyes_and_copies_join_their_exam(tmp_path):
    root = build_messidor(tmp_path / "Messidor", with_exams=True)
    manifest = _load(root).set_index("image_id")
    (left11, right11), (left21, right21), _ = [(a[:-4], b[:-4]) for a, b in MESSIDOR_EXAMS]
    assert manifest.loc[left11, "patient_id"] == manifest.loc[right11, "patient_id"] == left11
    assert manifest.loc[left21, "patient_id"] == manifest.loc[right21, "patient_id"] == left21
    assert (manifest.loc[[left11, left21], "eye"] == "left").all()
    assert (manifest.loc[[right11, right21], "eye"] == "right").all()
    copy, original = MESSIDOR_COPY  # the copy of the Base11 left eye belongs to that exam
    assert original == left11 and manifest.loc[copy, "patient_id"] == left11
    unpaired = manifest.drop(index=[left11, right11, left21, right21, copy])
    assert (unpaired["patient_id"] == unpaired.index).all() and unpaired["eye"].isna().all()
    assert manifest.attrs["exams"] == str(root / "messidor-2.csv")


def test_grouped_folds_keep_exams_and_copies_together(tmp_path):
    root = build_messidor(tmp_path / "Messidor", with_exams=True)
    manifest = _load(root)
    exam_group = manifest["patient_id"] == MESSIDOR_EXAMS[0][0][:-4]
    assert exam_group.sum() == 3  # two eyes and the copy of one
    for seed in range(5):
        fold_of = {int(i): k for k, (_, val) in enumerate(stratified_kfold(manifest, 4, seed=seed)) for i in val}
        for _, rows in manifest.groupby("patient_id").groups.items():
            assert len({fold_of[manifest.index.get_loc(i)] for i in rows}) == 1


def test_a_copy_that_belongs_to_another_exam_joins_both_exams(tmp_path):
    root = build_messidor(tmp_path / "Messidor", with_exams=True)
    (left11, right11), (left21, right21), _ = [(a[:-4], b[:-4]) for a, b in MESSIDOR_EXAMS]
    photo = cv2.imread(str(root / "Base11" / f"{left11}.tif"))  # the Base21 right eye is a copy of the Base11 left eye
    cv2.imwrite(str(root / "Base21" / f"{right21}.tif"), cv2.resize(photo, (96, 72), interpolation=cv2.INTER_AREA))
    manifest = _load(root).set_index("image_id")
    copy, _ = MESSIDOR_COPY
    assert manifest.loc[right21, "duplicate_of"] == left11
    assert manifest.loc[[left11, right11, left21, right21, copy], "patient_id"].nunique() == 1


def test_exam_list_given_elsewhere_is_read(tmp_path):
    root = build_messidor(tmp_path / "Messidor")
    exams = write_exam_list(tmp_path / "Messidor-2" / "messidor-2.csv", MESSIDOR_EXAMS)
    manifest = _load(root, exams=exams)
    assert manifest["patient_id"].nunique() == len(manifest) - 3  # two exams merge two rows each, the copy one more


def test_without_exam_list_patients_are_per_image_with_a_warning(root):
    with pytest.warns(UserWarning, match=r"no Messidor-2 exam list .*patient_id is per image"):
        manifest = load_messidor(root, check_duplicates=False)
    assert (manifest["patient_id"] == manifest["image_id"]).all() and manifest["eye"].isna().all()


def test_exam_list_that_pairs_none_of_the_images_is_an_error(root, tmp_path):
    exams = write_exam_list(tmp_path / "other.csv", [("IM000013.JPG", "IM000012.JPG")])
    with pytest.raises(ManifestError, match=r"none of the 24 images is in the exam list .*other\.csv; expected the "
                                            r"Messidor-2 exam list"):
        _load(root, exams=exams)


# --- junk and nested downloads ------------------------------------------------------------------

def test_base_unpacked_into_a_folder_of_its_own_name_is_named(root):
    inner = root / "Base24" / "Base24"
    inner.mkdir()
    for path in list((root / "Base24").iterdir()):
        if path != inner:
            path.rename(inner / path.name)
    with pytest.raises(ManifestError, match=r"found a nested folder .*Base24/Base24 .*expected the TIFFs and "
                                            r"Annotation_Base24\.xls directly in .*Base24: move"):
        _load(root)


def test_base_left_zipped_is_named(root):
    shutil.make_archive(str(root / "Base32"), "zip", root / "Base32")
    shutil.rmtree(root / "Base32")
    with pytest.raises(ManifestError, match=r"Base32 image folder not found: expected .*Base32 holding .*found "
                                            r".*Base32\.zip still zipped"):
        _load(root)


def test_root_one_level_too_high_is_named(root):
    with pytest.raises(ManifestError, match=r"Base11 image folder not found: .*found .*Messidor/Base11 one level "
                                            r"deeper \(point root at .*Messidor\)"):
        _load(root.parent)


@pytest.mark.parametrize("content, found", [
    (b"<!DOCTYPE html><html><body>Please log in</body></html>", r"an HTML/XML page"),
    (b"PK\x03\x04" + bytes(60), r"a zip archive \(an \.xlsx workbook"),  # a truncated zip
    ("xlsx", r"a zip archive \(an \.xlsx workbook"),
    (b"", r"an empty file \(0 bytes\)"),
    (bytes(range(200, 256)) * 4, r"binary data starting c8 c9"),
])
def test_workbook_that_is_something_else_names_what_it_is(root, content, found):
    path = root / "Base31" / "Annotation_Base31.xls"
    if content == "xlsx":  # a well-formed Office Open XML package saved under the old name
        with zipfile.ZipFile(path, "w") as package:
            package.writestr("[Content_Types].xml", "<Types/>")
            package.writestr("xl/workbook.xml", "<workbook/>")
    else:
        path.write_bytes(content)
    with pytest.raises(ManifestError, match=rf"Annotation_Base31\.xls as an \.xls workbook: found {found}.*expected "
                                            r"an Excel 97-2003 workbook"):
        _load(root)

"""Messidor-1 source against a fixture tree with genuine .xls annotation workbooks."""
import warnings
from pathlib import Path

import pandas as pd
import pytest
import xlrd

from fundus_lib.data.manifest import ManifestError
from fundus_lib.data.sources.messidor import BASES, load_messidor
from tests.unit.data.source_fixtures import (
    MESSIDOR_COPY, MESSIDOR_DEPARTMENTS, MESSIDOR_HEADER, MESSIDOR_ROWS, MESSIDOR_SPACED, build_messidor,
)
from tests.unit.data.xls_writer import write_xls


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


def test_byte_identical_copy_is_reported_and_grouped(root):
    copy, original = MESSIDOR_COPY
    with pytest.warns(UserWarning, match=r"1 image\(s\) are byte-identical copies"):
        manifest = load_messidor(root)
    indexed = manifest.set_index("image_id")
    assert indexed.loc[copy, "duplicate_of"] == original
    assert indexed.loc[copy, "patient_id"] == indexed.loc[original, "patient_id"] == original
    assert manifest["duplicate_of"].notna().sum() == 1
    assert manifest.attrs["duplicates"] == {copy: original}
    others = indexed.drop(index=[copy])
    assert (others["patient_id"] == others.index).all()


def test_duplicate_check_can_be_skipped(root):
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
    with pytest.raises(ManifestError, match="Base11 image folder not found"):
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
    with pytest.raises(ManifestError, match=r"cannot read annotation workbook .*Annotation_Base23\.xls as an \.xls workbook"):
        _load(root)

"""fundus_lib.data.manifest: the common table, its validation, and image/mask reading rules."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fundus_lib.data.manifest import (LESIONS, MANIFEST_COLUMNS, ManifestError, make_manifest, read_image,
                                      read_mask, validate_manifest)


def test_make_manifest_adds_columns_in_order_with_nullable_types():
    manifest = make_manifest([{"image_id": "a", "image_path": "/x/a.png", "dr_grade": 2, "extra": 1},
                              {"image_id": "b", "image_path": "/x/b.png"}])
    assert list(manifest.columns[:len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert manifest.columns[-1] == "extra"
    assert str(manifest["dr_grade"].dtype) == "Int64" and manifest["dr_grade"].isna().tolist() == [False, True]
    assert (manifest["mask_rule"] == "nonzero").all()
    assert len(LESIONS) == 8 and "mask_FiP" in manifest.columns


def test_validation_lists_every_problem():
    rows = [{"image_id": "a", "image_path": "/a", "split": "training", "dr_grade": 7, "eye": "up",
             "lesion_MA": 2, "mask_rule": "nonzero"},
            {"image_id": "a", "image_path": "/b"}]
    with pytest.raises(ManifestError) as error:
        make_manifest(rows)
    message = str(error.value)
    for fragment in ("not unique: ['a']", "split has values ['training']", "eye has values ['up']",
                     "dr_grade outside 0..4", "lesion_MA must be 0, 1 or NA"):
        assert fragment in message


def test_validation_can_check_files(tmp_path):
    manifest = make_manifest([{"image_id": "a", "image_path": str(tmp_path / "missing.png")}])
    with pytest.raises(ManifestError, match="1 file\\(s\\) in image_path do not exist"):
        validate_manifest(manifest, check_files=True)
    with pytest.raises(ManifestError, match="lacks the standard columns"):
        validate_manifest(pd.DataFrame({"image_id": ["a"]}))


@pytest.mark.parametrize("mode, array", [
    ("L", np.full((6, 5), 200, np.uint8)),
    ("RGBA", np.full((6, 5, 3), 200, np.uint8)),
    ("I;16", np.full((6, 5), 40000, np.uint16)),
])
def test_read_image_always_gives_rgb_uint8(tmp_path, mode, array):
    path = tmp_path / f"image_{mode.replace(';', '')}.png"
    picture = Image.fromarray(array)
    (picture.convert("RGBA") if mode == "RGBA" else picture).save(path)
    assert Image.open(path).mode == mode
    image = read_image(path)
    assert image.shape == (6, 5, 3) and image.dtype == np.uint8
    assert (image == (255 if mode == "I;16" else 200)).all()


def test_read_image_names_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ManifestError, match="image file not found: .*nope.png"):
        read_image(tmp_path / "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ManifestError, match="cannot read image .*broken.png"):
        read_image(broken)


def test_mask_rules(tmp_path):
    values = np.array([[0, 76, 127, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "grey.png")
    assert read_mask(tmp_path / "grey.png").tolist() == [[False, True, True, True]]
    assert read_mask(tmp_path / "grey.png", "value255").tolist() == [[False, False, False, True]]
    red = np.zeros((1, 2, 3), np.uint8)
    red[0, 1, 0] = 255  # IDRiD: pure red lesion pixels
    Image.fromarray(red).save(tmp_path / "red.tif")
    assert read_mask(tmp_path / "red.tif").tolist() == [[False, True]]
    assert read_mask(None, shape=(2, 3)).sum() == 0
    with pytest.raises(ManifestError, match="needs the image shape"):
        read_mask(None)
    with pytest.raises(ManifestError, match="mask rule 'half' unknown"):
        read_mask(tmp_path / "grey.png", "half")


def test_lossy_masks_are_thresholded_not_compared(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=60)
    read = read_mask(tmp_path / "mask.jpg")
    assert read[10:22, 10:22].all() and not read[:4, :4].any()

"""CLPI patch labels: hand-computed grids, a brute-force reference, the paper's lesion-centred boxes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fundus_lib.data.manifest import LESIONS, make_manifest
from fundus_lib.data.patches import (PATCH_LESIONS, PatchLoader, class_map, crop_patches, grid_patch_labels,
                                     lesion_patch_centres, lesion_patch_set, patch_count_table)
from fundus_lib.data.transforms import normalize


def masks_with(shape: tuple[int, int], pixels: dict[str, list[tuple[int, int]]]) -> torch.Tensor:
    masks = torch.zeros(len(LESIONS), *shape)
    for lesion, points in pixels.items():
        for row, col in points:
            masks[LESIONS.index(lesion), row, col] = 1
    return masks


# 12 x 12 masks, window 6, stride 4 -> 3 x 3 windows starting at -1, 3, 7 (one pixel of padding).
TINY = masks_with((12, 12), {
    "MA": [(1, 1), (0, 4), (6, 5)],   # (1,1) centre of window (0,0); (0,4) in cell (0,1) but off-centre
    "iHE": [(5, 6), (10, 1)],         # window (1,1) also holds the MA at (6,5): haemorrhage wins
    "HaEx": [(9, 2)],                 # window (2,0) also holds the iHE at (10,1): exudate wins
    "CWS": [(2, 9)],                  # soft exudate counts as exudate
    "NV": [(5, 10)],                  # not a CLPI target: background
})


def test_centre_rule_by_hand():
    # centre=2: the middle 2 x 2 pixels of each window, rows/cols {1,2}, {5,6}, {9,10}.
    expected = torch.tensor([[1, 0, 3],
                             [0, 2, 0],
                             [3, 0, 0]])
    assert torch.equal(grid_patch_labels(TINY, window=6, stride=4, centre=2), expected)


def test_default_centre_is_the_stride_cell_by_hand():
    # centre=None -> 4 x 4 cells rows/cols {0-3}, {4-7}, {8-11}: the off-centre MA at (0,4) now counts.
    expected = torch.tensor([[1, 1, 3],
                             [0, 2, 0],
                             [3, 0, 0]])
    assert torch.equal(grid_patch_labels(TINY, window=6, stride=4), expected)


def test_paper_geometry_on_128_pixels():
    masks = masks_with((128, 128), {"HaEx": [(32, 96)], "MA": [(30, 30)]})
    # 68-pixel windows at stride 64 start at -2 and 62; their exact centres are rows/cols {31, 32} and {95, 96}.
    assert torch.equal(grid_patch_labels(masks, centre=2), torch.tensor([[0, 3], [0, 0]]))
    assert torch.equal(grid_patch_labels(masks), torch.tensor([[1, 3], [0, 0]]))


def reference_labels(masks: np.ndarray, window: int, stride: int, centre: int) -> np.ndarray:
    """Brute force: loop over windows and pixels of their centre region."""
    classes = np.zeros(masks.shape[1:], dtype=np.int64)
    for lesion, class_id in PATCH_LESIONS.items():
        classes = np.where(masks[LESIONS.index(lesion)] > 0, np.maximum(classes, class_id), classes)
    height, width = classes.shape
    out = np.zeros((height // stride, width // stride), dtype=np.int64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            top = stride * i - (window - stride) // 2 + (window - centre) // 2
            left = stride * j - (window - stride) // 2 + (window - centre) // 2
            for r in range(top, top + centre):
                for c in range(left, left + centre):
                    if 0 <= r < height and 0 <= c < width:
                        out[i, j] = max(out[i, j], classes[r, c])
    return out


@pytest.mark.parametrize("shape, window, stride, centre", [
    ((13, 17), 6, 4, 2), ((13, 17), 7, 4, 3), ((20, 20), 5, 5, 1), ((16, 24), 9, 4, 9), ((30, 22), 68, 8, 4),
])
def test_matches_brute_force_reference(shape, window, stride, centre):
    rng = np.random.default_rng(sum(shape) + window)
    masks = (rng.random((len(LESIONS), *shape)) < 0.03).astype(np.float32)
    got = grid_patch_labels(torch.from_numpy(masks), window=window, stride=stride, centre=centre)
    assert np.array_equal(got.numpy(), reference_labels(masks, window, stride, centre))


def test_batch_equals_single_images_and_numpy_input_works():
    rng = np.random.default_rng(1)
    batch = (rng.random((3, len(LESIONS), 24, 20)) < 0.05)
    together = grid_patch_labels(batch, window=6, stride=4)
    assert together.shape == (3, 6, 5) and together.dtype == torch.long
    for b in range(3):
        assert torch.equal(together[b], grid_patch_labels(torch.from_numpy(batch[b]), window=6, stride=4))


def test_class_map_takes_the_most_severe_lesion_per_pixel():
    masks = masks_with((2, 2), {"MA": [(0, 0), (0, 1)], "iHE": [(0, 1), (1, 0)], "HaEx": [(1, 0)], "vHE": [(1, 1)]})
    assert torch.equal(class_map(masks), torch.tensor([[1, 2], [3, 0]]))
    custom = class_map(masks, {"vHE": 2})
    assert torch.equal(custom, torch.tensor([[0, 0], [0, 2]]))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="LESIONS order"):
        grid_patch_labels(torch.zeros(4, 12, 12))
    with pytest.raises(ValueError, match="smaller than one patch stride"):
        grid_patch_labels(torch.zeros(8, 32, 128))
    with pytest.raises(ValueError, match="stride <= window"):
        grid_patch_labels(torch.zeros(8, 12, 12), window=4, stride=6)
    with pytest.raises(ValueError, match="centre"):
        grid_patch_labels(torch.zeros(8, 12, 12), window=6, stride=4, centre=7)
    with pytest.raises(ValueError, match="unknown lesions"):
        class_map(torch.zeros(8, 4, 4), {"HE": 2})


def test_lesion_centred_patches_follow_the_paper():
    masks = torch.zeros(len(LESIONS), 20, 20)
    masks[LESIONS.index("MA"), 2:5, 2:5] = 1            # MA region centred at (3, 3)
    masks[LESIONS.index("HaEx"), 8:13, 8:13] = 1        # exudate centred at (10, 10) ...
    masks[LESIONS.index("MA"), 10, 10] = 1              # ... sharing its centre with an MA: one exudate patch
    masks[LESIONS.index("iHE"), 15:18, 2:5] = 1         # haemorrhage centred at (16, 3) ...
    masks[LESIONS.index("MA"), 16, 3] = 1               # ... covering an MA's centre: haemorrhage wins
    masks[LESIONS.index("NV"), 0:3, 15:18] = 1          # not a target
    centres, labels = lesion_patch_centres(masks)
    assert centres.tolist() == [[3, 3], [10, 10], [16, 3]]
    assert labels.tolist() == [1, 3, 2]
    empty_centres, empty_labels = lesion_patch_centres(torch.zeros(len(LESIONS), 8, 8))
    assert empty_centres.shape == (0, 2) and empty_labels.shape == (0,)


def test_crop_patches_cuts_centred_windows_with_zero_padding():
    image = torch.arange(2 * 20 * 20, dtype=torch.float32).reshape(2, 20, 20) + 1
    patches = crop_patches(image, np.array([[3, 3], [10, 12]]), size=6)
    assert patches.shape == (2, 2, 6, 6)
    assert torch.equal(patches[0], image[:, 0:6, 0:6])      # centre at index size // 2 = 3
    assert torch.equal(patches[1], image[:, 7:13, 9:15])
    corner = crop_patches(image, [[0, 0]], size=4)[0]
    assert torch.all(corner[:, :2] == 0) and torch.all(corner[:, :, :2] == 0)
    assert torch.equal(corner[:, 2:, 2:], image[:, 0:2, 0:2])
    with pytest.raises(ValueError, match="inside"):
        crop_patches(image, [[20, 0]], size=4)


# --------------------------------------------------------------------------- patch sets from a manifest

def write_patch_fixture(root: Path) -> pd.DataFrame:
    """Three 96 x 96 photos: a DR2 image with MA and hard-exudate masks, a No-DR image whose field
    of view is the bright square rows/cols 20..75 (black around it), and a DR1 image without masks."""
    rng = np.random.default_rng(0)
    rows = []
    for name, grade in (("lesions", 2), ("nodr", 0), ("unmasked", 1)):
        image = rng.integers(60, 256, (96, 96, 3), dtype=np.uint8)
        if name == "nodr":
            image[:20] = image[76:] = image[:, :20] = image[:, 76:] = 0
        Image.fromarray(image).save(root / f"{name}.png")
        row = {"image_id": name, "image_path": str(root / f"{name}.png"), "dr_grade": grade, "source": "fixture"}
        if name != "unmasked":
            row.update({f"lesion_{lesion}": 0 for lesion in PATCH_LESIONS})
        rows.append(row)
    for lesion, box in (("MA", (slice(10, 13), slice(10, 13))), ("HaEx", (slice(50, 60), slice(40, 50)))):
        mask = np.zeros((96, 96), dtype=np.uint8)
        mask[box] = 255
        Image.fromarray(mask).save(root / f"lesions_{lesion}.png")
        rows[0].update({f"mask_{lesion}": str(root / f"lesions_{lesion}.png"), f"lesion_{lesion}": 1})
    return make_manifest(rows)


def test_lesion_patch_set_positives_from_masks_negatives_from_no_dr_images(tmp_path):
    manifest = write_patch_fixture(tmp_path)
    patch_set = lesion_patch_set(manifest, negatives_per_image=5, seed=1)
    assert patch_set["image"].dtype == torch.uint8 and patch_set["image"].shape == (7, 3, 68, 68)
    assert patch_set["patch_labels"].tolist() == [1, 3, 0, 0, 0, 0, 0]
    assert patch_set["image_id"] == ["lesions"] * 2 + ["nodr"] * 5   # the DR1 image without masks gives none
    lesion_image = torch.from_numpy(np.array(Image.open(tmp_path / "lesions.png"))).permute(2, 0, 1)
    assert torch.equal(patch_set["image"][:2], crop_patches(lesion_image, [[11, 11], [54, 44]]))
    centres = patch_set["image"][2:, :, 34, 34]  # the centre pixel of each negative lies in the field of view
    assert (centres.amax(dim=1) >= 60).all()
    assert lesion_patch_set(manifest, negatives_per_image=0)["patch_labels"].tolist() == [1, 3]


def test_patch_count_table_has_table_iii_layout(tmp_path):
    patch_set = lesion_patch_set(write_patch_fixture(tmp_path), negatives_per_image=3)
    table = patch_count_table({"train": patch_set})
    assert table.loc["train"].to_dict() == {"lesion images": 1, "background": 3, "microaneurysm": 1,
                                            "haemorrhage": 0, "exudate": 1}


def test_lesion_patch_set_rejects_bad_input(tmp_path):
    manifest = write_patch_fixture(tmp_path)
    with pytest.raises(ValueError, match="negatives_per_image"):
        lesion_patch_set(manifest, negatives_per_image=-1)
    with pytest.raises(ValueError, match="no patches"):
        lesion_patch_set(manifest[manifest["image_id"] == "unmasked"])


def toy_patch_set() -> dict:
    labels = torch.tensor([0] * 10 + [1] * 2 + [3] * 4)
    images = torch.arange(16, dtype=torch.uint8).view(16, 1, 1, 1).expand(16, 3, 68, 68).contiguous()
    return {"image": images, "patch_labels": labels, "image_id": [str(i) for i in range(16)]}


def test_patch_loader_serves_every_patch_once_or_balanced_classes():
    patch_set = toy_patch_set()
    plain = PatchLoader(patch_set, batch_size=5, shuffle=False, normalize=False)
    batches = list(plain)
    assert len(plain) == len(batches) == 4
    assert torch.equal(torch.cat([b["patch_labels"] for b in batches]), patch_set["patch_labels"])
    assert torch.equal(batches[0]["image"], patch_set["image"][:5].float() / 255)
    balanced = PatchLoader(patch_set, batch_size=4, per_class=6, generator=torch.Generator().manual_seed(0))
    labels = torch.cat([b["patch_labels"] for b in balanced])
    assert len(balanced) == 5 and torch.bincount(labels).tolist() == [6, 6, 0, 6]
    normalised = next(iter(PatchLoader(patch_set, batch_size=2, shuffle=False)))["image"]
    assert torch.allclose(normalised, normalize(patch_set["image"][:2].float() / 255))


def test_patch_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        PatchLoader(toy_patch_set(), batch_size=0)
    with pytest.raises(ValueError, match="per_class"):
        PatchLoader(toy_patch_set(), batch_size=2, per_class=0)

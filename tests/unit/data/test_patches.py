"""CLPI patch labels: hand-computed grids, a brute-force reference, the paper's lesion-centred boxes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.patches import (PATCH_LESIONS, class_map, crop_patches, grid_patch_labels,
                                     lesion_patch_centres)


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

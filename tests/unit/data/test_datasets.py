"""FundusDataset: requested keys only, labels, masks and their validity, resize, LR/HR, workers."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from fundus_lib.data.datasets import TASKS, FundusDataset
from fundus_lib.data.manifest import LESIONS, ManifestError, make_manifest
from fundus_lib.data.patches import grid_patch_labels
from fundus_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SHAPE = (40, 48)


def lesion_boxes(i: int) -> dict[str, tuple[int, int, int, int]]:
    """(top, left, height, width) of the drawn lesions of image ``i``."""
    return {"MA": (4 + i, 6, 4, 4), "HaEx": (20, 10 + i, 8, 12)}


def write_dataset(root: Path, n: int = 4, shape: tuple[int, int] = SHAPE, seed: int = 0) -> pd.DataFrame:
    """Random RGB PNGs with MA and hard-exudate rectangles (:func:`lesion_boxes`) as 0/255 mask PNGs.

    Per image: MA and HaEx outlined (lesion flag 1), iHE and CWS annotated absent (flag 0, no
    file), the other lesions not annotated (NA). Grades cycle; two images per patient.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image_path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(image_path)
        row = {"image_id": f"img{i}", "image_path": str(image_path), "dr_grade": i % 5, "dme_grade": i % 3,
               "source": "fixture", "patient_id": f"p{i // 2}", "lesion_iHE": 0, "lesion_CWS": 0}
        for lesion, (top, left, height, width) in lesion_boxes(i).items():
            mask = np.zeros(shape, dtype=np.uint8)
            mask[top:top + height, left:left + width] = 255
            mask_path = root / f"img{i}_{lesion}.png"
            Image.fromarray(mask).save(mask_path)
            row[f"mask_{lesion}"] = str(mask_path)
            row[f"lesion_{lesion}"] = 1
        rows.append(row)
    return make_manifest(rows)


def expected_masks(i: int, shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    masks = torch.zeros(len(LESIONS), *shape)
    for lesion, (top, left, height, width) in lesion_boxes(i).items():
        masks[LESIONS.index(lesion), top:top + height, left:left + width] = 1
    return masks


@pytest.fixture()
def manifest(tmp_path: Path) -> pd.DataFrame:
    return write_dataset(tmp_path)


def test_only_requested_keys_plus_image_and_meta(manifest):
    sample = FundusDataset(manifest, tasks=("dr",))[1]
    assert set(sample) == {"image", "dr", "meta"}
    assert sample["dr"].dtype == torch.long and sample["dr"].item() == 1
    assert sample["meta"] == {"image_id": "img1", "source": "fixture", "split": "", "index": 1}
    everything = FundusDataset(manifest, tasks=TASKS, image_size=32, patch_window=10, patch_stride=8)[0]
    assert set(everything) == set(TASKS) | {"image", "meta", "mask_valid"}


def test_image_is_imagenet_normalised_hr_image_is_not(manifest):
    sample = FundusDataset(manifest, tasks=("hr_image",))[0]
    raw = torch.from_numpy(np.array(Image.open(manifest.loc[0, "image_path"]))).permute(2, 0, 1) / 255
    assert sample["image"].shape == (3, *SHAPE) and sample["image"].dtype == torch.float32
    assert torch.allclose(sample["hr_image"], raw)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(sample["image"], (raw - mean) / std, atol=1e-6)
    plain = FundusDataset(manifest, tasks=("dr",), normalize=False)[0]
    assert torch.allclose(plain["image"], raw)


def test_masks_in_lesion_order_with_validity_and_presence(manifest):
    sample = FundusDataset(manifest, tasks=("masks", "lesion_present"))[2]
    assert sample["masks"].dtype == torch.float32
    assert torch.equal(sample["masks"], expected_masks(2))
    valid = dict(zip(LESIONS, sample["mask_valid"].tolist()))
    present = dict(zip(LESIONS, sample["lesion_present"].tolist()))
    assert valid == {"MA": 1, "iHE": 1, "HaEx": 1, "CWS": 1, "vHE": 0, "pHE": 0, "NV": 0, "FiP": 0}
    assert present == {"MA": 1, "iHE": 0, "HaEx": 1, "CWS": 0, "vHE": 0, "pHE": 0, "NV": 0, "FiP": 0}


def test_present_lesion_without_a_mask_file_is_not_valid(manifest):
    manifest.loc[0, "lesion_CWS"] = 1  # present, but no outline available
    sample = FundusDataset(manifest, tasks=("masks",))[0]
    cws = LESIONS.index("CWS")
    assert sample["mask_valid"][cws] == 0 and not sample["masks"][cws].any()


def test_value255_rule_drops_excluded_lesions(tmp_path):
    manifest = write_dataset(tmp_path, n=1)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[0:5, 0:5] = 255
    mask[10:15, 10:15] = 127  # Retinal-Lesions: lesion excluded from the experiments
    Image.fromarray(mask).save(manifest.loc[0, "mask_MA"])
    manifest["mask_rule"] = "value255"
    got = FundusDataset(manifest, tasks=("masks",))[0]["masks"][LESIONS.index("MA")]
    assert got.sum() == 25 and got[0:5, 0:5].all()


def test_resize_to_square_image_size(manifest):
    sample = FundusDataset(manifest, tasks=("masks",), image_size=24)[3]
    assert sample["image"].shape == (3, 24, 24) and sample["masks"].shape == (8, 24, 24)
    assert set(sample["masks"].unique().tolist()) <= {0.0, 1.0}
    # The HaEx rectangle covers 8 x 12 of 40 x 48 pixels; nearest neighbour keeps that share.
    assert abs(sample["masks"][LESIONS.index("HaEx")].mean().item() - 96 / 1920) < 0.02


def test_joint_transform_moves_masks_with_the_image(manifest):
    flip = v2.RandomHorizontalFlip(p=1.0)
    plain = FundusDataset(manifest, tasks=("masks", "hr_image"))[0]
    flipped = FundusDataset(manifest, tasks=("masks", "hr_image"), transform=flip)[0]
    assert torch.equal(flipped["hr_image"], plain["hr_image"].flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))


def test_patch_labels_come_from_the_final_masks(manifest):
    dataset = FundusDataset(manifest, tasks=("masks", "patch_labels"), patch_window=10, patch_stride=8)
    sample = dataset[1]
    assert sample["patch_labels"].shape == (5, 6) and sample["patch_labels"].dtype == torch.long
    assert torch.equal(sample["patch_labels"], grid_patch_labels(sample["masks"], window=10, stride=8))
    assert set(sample["patch_labels"].unique().tolist()) == {0, 1, 3}
    only_patches = FundusDataset(manifest, tasks=("patch_labels",), patch_window=10, patch_stride=8)[1]
    assert set(only_patches) == {"image", "patch_labels", "meta"}
    assert torch.equal(only_patches["patch_labels"], sample["patch_labels"])


def test_patch_labels_need_the_target_masks(manifest):
    manifest["lesion_iHE"] = pd.array([0, pd.NA, 0, 0], dtype="Int64")
    with pytest.raises(ManifestError, match=r"iHE.*\['img1'\]"):
        FundusDataset(manifest, tasks=("patch_labels",))


def test_lr_image_is_bicubic_downsample_of_hr(manifest):
    sample = FundusDataset(manifest, tasks=("lr_image", "hr_image"), image_size=32, lr_scale=4)[0]
    assert sample["lr_image"].shape == (3, 8, 8)
    expected = F.interpolate(sample["hr_image"][None], size=(8, 8), mode="bicubic", antialias=True)[0]
    assert torch.allclose(sample["lr_image"], expected.clamp(0, 1))
    assert 0.0 <= sample["lr_image"].min() and sample["lr_image"].max() <= 1.0
    with pytest.raises(ValueError, match="divisible by lr_scale"):
        FundusDataset(manifest, tasks=("lr_image",), image_size=30, lr_scale=4)
    with pytest.raises(ValueError, match="not divisible by lr_scale"):
        FundusDataset(manifest, tasks=("lr_image",), lr_scale=7)[0]  # 40 x 48 images, no resize


def test_missing_labels_fail_at_construction_naming_column_and_ids(manifest):
    manifest["dr_grade"] = pd.array([0, pd.NA, 2, pd.NA], dtype="Int64")
    with pytest.raises(ManifestError, match=r"dr_grade.*\['img1', 'img3'\]"):
        FundusDataset(manifest, tasks=("dr",))
    assert len(FundusDataset(manifest, tasks=("dme",))) == 4  # a label that is not asked for may be NA


def test_mask_without_presence_flag_is_rejected(manifest):
    manifest["lesion_MA"] = pd.array([1, 1, pd.NA, 1], dtype="Int64")
    with pytest.raises(ManifestError, match=r"mask_MA.*lesion_MA.*\['img2'\]"):
        FundusDataset(manifest, tasks=("masks",))


def test_bad_arguments(manifest):
    with pytest.raises(ValueError, match="valid tasks are"):
        FundusDataset(manifest, tasks=("dr", "grade"))
    with pytest.raises(ValueError, match="image_size"):
        FundusDataset(manifest, image_size=0)
    with pytest.raises(ValueError, match="lr_scale"):
        FundusDataset(manifest, lr_scale=0)
    with pytest.raises(ValueError, match="patch_stride"):
        FundusDataset(manifest, tasks=("patch_labels",), image_size=32)
    with pytest.raises(ValueError, match="centre"):
        FundusDataset(manifest, tasks=("patch_labels",), patch_window=10, patch_stride=8, patch_centre=11)
    with pytest.raises(ManifestError, match="empty"):
        FundusDataset(manifest.iloc[:0])
    assert FundusDataset(manifest, tasks="dme").tasks == ("dme",)


def test_mask_of_other_size_names_the_file(manifest):
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(manifest.loc[0, "mask_MA"])
    with pytest.raises(ManifestError, match="img0_MA.png"):
        FundusDataset(manifest, tasks=("masks",))[0]


def test_pickles_and_batches_through_two_workers(manifest):
    dataset = FundusDataset(manifest, tasks=("dr", "masks", "lesion_present"), image_size=32)
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[0]["masks"], dataset[0]["masks"])
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    batch = batches[1]
    assert batch["image"].shape == (2, 3, 32, 32) and batch["masks"].shape == (2, 8, 32, 32)
    assert batch["dr"].tolist() == [2, 3] and batch["mask_valid"].shape == (2, 8)
    assert batch["meta"]["image_id"] == ["img2", "img3"]

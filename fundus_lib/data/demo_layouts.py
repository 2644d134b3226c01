"""Tiny folders that copy each official dataset layout, quirks included.

Each ``build_<dataset>(root)`` writes a handful of tiny images, masks and label files under
``root`` exactly where and how the official download puts them, and returns ``root``: IDRiD's
trailing-space CSV header and red RGB TIFF masks, Messidor's ``.xls`` workbooks (one named with a
space) and a re-saved copy of one photograph, EyePACS's black and truncated images, DDR's label 5,
Retinal-Lesions' 127-valued excluded pixels. The constants next to each builder are what the
manifests read from them must contain.

Two users: notebook 02 shows how each source turns an official folder into a manifest (no real
dataset can ship with the course), and the unit tests of the sources check their layout
constants against data/README.md with the same trees (they import this module). Unlike the
stand-in trees of :mod:`fundus_lib.data.standins` (many synthetic photographs in the layouts the
sources define, for training through the real-data path), these
are written from data/README.md and keep every quirk, at a few pixels per image. They need NumPy,
OpenCV and Pillow only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from fundus_lib.data.standins import red_mask, save_image, write_text
from fundus_lib.data.xls_writer import write_xls

SIZE = (6, 8)  # (height, width) of every fixture image and mask


def write_image(path: Path, value: int = 120) -> Path:
    """A small RGB photograph-like image (format from the suffix)."""
    array = np.full((*SIZE, 3), value, dtype=np.uint8)
    array[..., 1] //= 2
    return save_image(path, array)


def write_mask(path: Path, pixels: Iterable[tuple[int, ...]], value: int = 255, red_rgb: bool = False) -> Path:
    """A mask that is 0 except at ``pixels`` ((row, col) -> ``value``, or (row, col, own value)):
    greyscale, or an IDRiD-style RGB image whose lesion pixels are pure red."""
    grey = np.zeros(SIZE, dtype=np.uint8)
    for pixel in pixels:
        grey[pixel[0], pixel[1]] = pixel[2] if len(pixel) == 3 else value
    return save_image(path, red_mask(grey > 0) if red_rgb else grey)


# --- IDRiD -------------------------------------------------------------------------------------

IDRID_GRADES = {"train": {"IDRiD_001": (2, 1), "IDRiD_002": (0, 0), "IDRiD_003": (4, 2)},
                "test": {"IDRiD_001": (3, 2), "IDRiD_002": (1, 0)}}
#: Segmentation images and the lesion pixels of their masks (a missing entry = no mask file).
IDRID_SEGMENTATION = {
    "train": {"IDRiD_01": {"MA": [(1, 1)], "HE": [(2, 2), (2, 3)], "EX": [(4, 5)], "SE": [(0, 7)]},
              "IDRiD_02": {"MA": [(3, 3)], "HE": [(1, 6)], "EX": [(5, 0)]}},  # no SE file
    "test": {"IDRiD_55": {"MA": [(0, 0)], "EX": [(2, 2)]}},                   # no HE, no SE file
}
IDRID_MASK_FOLDERS = {"MA": "1. Microaneurysms", "HE": "2. Haemorrhages", "EX": "3. Hard Exudates",
                      "SE": "4. Soft Exudates", "OD": "5. Optic Disc"}
IDRID_DISC = {"train": {"IDRiD_001": (3500.0, 1450.5), "IDRiD_002": (812.0, 1300.0)},
              "test": {"IDRiD_001": (3300.0, 1400.0)}}
IDRID_FOVEA = {"train": {"IDRiD_001": (2100.0, 1500.0)},  # IDRiD_002 has no fovea markup
               "test": {"IDRiD_001": (2000.0, 1450.0)}}
_IDRID_SPLITS = {"train": "a. Training Set", "test": "b. Testing Set"}


def build_idrid(root: Path) -> Path:
    """All three IDRiD parts: grading (trailing-space header, trailing empty columns and rows,
    train/test name collisions), segmentation (red RGB TIFF masks, missing SE files) and
    localisation (two markup CSVs per split with padding columns)."""
    grading = root / "B. Disease Grading"
    csv_names = {"train": "a. IDRiD_Disease Grading_Training Labels.csv",
                 "test": "b. IDRiD_Disease Grading_Testing Labels.csv"}
    for split, grades in IDRID_GRADES.items():
        for name in grades:
            write_image(grading / "1. Original Images" / _IDRID_SPLITS[split] / f"{name}.jpg")
        lines = ["Image name,Retinopathy grade,Risk of macular edema ,,,,"]
        lines += [f"{name},{dr},{dme},,,," for name, (dr, dme) in grades.items()]
        write_text(grading / "2. Groundtruths" / csv_names[split], "\n".join(lines + [",,,,,,"] * 2) + "\n")

    segmentation = root / "A. Segmentation"
    for split, images in IDRID_SEGMENTATION.items():
        truth = segmentation / "2. All Segmentation Groundtruths" / _IDRID_SPLITS[split]
        for folder in IDRID_MASK_FOLDERS.values():
            (truth / folder).mkdir(parents=True, exist_ok=True)
        for name, lesions in images.items():
            write_image(segmentation / "1. Original Images" / _IDRID_SPLITS[split] / f"{name}.jpg")
            for suffix, pixels in {**lesions, "OD": [(3, 6)]}.items():
                write_mask(truth / IDRID_MASK_FOLDERS[suffix] / f"{name}_{suffix}.tif", pixels, red_rgb=True)

    localisation = root / "C. Localization"
    markup_files = {
        ("disc", "train"): "1. Optic Disc Center Location/a. IDRiD_OD_Center_Training Set_Markups.csv",
        ("disc", "test"): "1. Optic Disc Center Location/b. IDRiD_OD_Center_Testing Set_Markups.csv",
        ("fovea", "train"): "2. Fovea Center Location/IDRiD_Fovea_Center_Training Set_Markups.csv",
        ("fovea", "test"): "2. Fovea Center Location/IDRiD_Fovea_Center_Testing Set_Markups.csv",
    }
    for (kind, split), relative in markup_files.items():
        points = (IDRID_DISC if kind == "disc" else IDRID_FOVEA)[split]
        lines = ["Image No,X- Coordinate,Y - Coordinate,,"]
        lines += [f"{name},{x:g},{y:g},," for name, (x, y) in points.items()]
        write_text(localisation / "2. Groundtruths" / relative, "\n".join(lines + [",,,,"]) + "\n")
        for name in points:
            write_image(localisation / "1. Original Images" / _IDRID_SPLITS[split] / f"{name}.jpg")
    return root


# --- Messidor-1 --------------------------------------------------------------------------------

MESSIDOR_HEADER = ["Image name", "Ophthalmologic department", "Retinopathy grade", "Risk of macular edema "]
MESSIDOR_DEPARTMENTS = {"1": "Service Ophtalmologie Lariboisière", "2": "CHU de St Etienne",
                        "3": "LaTIM - CHU de BREST"}
#: base -> rows of (image name, department, DR 0-3, DME 0-2): two images per base, all 12 bases.
MESSIDOR_ROWS = {
    f"Base{site}{part}": [(f"2005{site}{part}{j}0_{40000 + 10 * int(f'{site}{part}') + j}_0100_PP.tif",
                           MESSIDOR_DEPARTMENTS[site], (int(site) + int(part) + j) % 4, (int(part) + 2 * j) % 3)
                          for j in range(2)]
    for site in "123" for part in "1234"
}
#: Base12's workbook is named with a space, as in some copies of the download.
MESSIDOR_SPACED = "Base12"
#: (copy, original): the second Base34 image is a re-saved, resized copy of the first Base11 image
#: (same photograph, different bytes), as a copy made by re-encoding would be.
MESSIDOR_COPY = (MESSIDOR_ROWS["Base34"][1][0][:-4], MESSIDOR_ROWS["Base11"][0][0][:-4])
#: Two-eye exams of the fixture in the Messidor-2 exam list (left, right): both Base11 images and
#: both Base21 images; every other image is unpaired, as 142 real Messidor-1 images are.
MESSIDOR_EXAMS = [(MESSIDOR_ROWS["Base11"][0][0][:-4] + ".png", MESSIDOR_ROWS["Base11"][1][0][:-4] + ".png"),
                  (MESSIDOR_ROWS["Base21"][0][0][:-4] + ".png", MESSIDOR_ROWS["Base21"][1][0][:-4] + ".png"),
                  ("IM000013.JPG", "IM000012.JPG")]  # a Messidor-Extension exam: not in Messidor-1
TEXTURE_SIZE = (96, 128)  # (height, width) of the Messidor fixture photographs


def textured_image(seed: int) -> np.ndarray:
    """A small fundus-like RGB image: a bright disc with smooth random structure (a flat image
    has no pixel fingerprint) on a black surround - a 6 x 8 grid of random levels, enlarged
    with cubic interpolation, inside a centred circle."""
    grid = np.random.default_rng(seed).integers(60, 226, size=(6, 8, 3)).astype(np.uint8)
    photo = cv2.resize(grid, TEXTURE_SIZE[::-1], interpolation=cv2.INTER_CUBIC)
    rows, cols = np.ogrid[:TEXTURE_SIZE[0], :TEXTURE_SIZE[1]]
    outside = (rows - TEXTURE_SIZE[0] / 2) ** 2 + (cols - TEXTURE_SIZE[1] / 2) ** 2 > (0.48 * TEXTURE_SIZE[0]) ** 2
    photo[outside] = 0
    return photo


def write_exam_list(path: Path, exams: Iterable[tuple[str, str]]) -> Path:
    """A Messidor-2 exam list: header "left;right", one exam per line."""
    return write_text(path, "left;right\n" + "".join(f"{left};{right}\n" for left, right in exams))


def build_messidor(root: Path, with_exams: bool = False) -> Path:
    """The twelve Messidor bases: genuine .xls annotation workbooks (one named with a space),
    textured TIFF images, one image that is a re-saved, resized copy of another and, when
    ``with_exams``, the Messidor-2 exam list in the root."""
    for number, (base, rows) in enumerate(MESSIDOR_ROWS.items()):
        workbook = f"Annotation {base}.xls" if base == MESSIDOR_SPACED else f"Annotation_{base}.xls"
        write_xls(root / base / workbook, [MESSIDOR_HEADER, *[list(row) for row in rows]])
        for j, (name, *_labels) in enumerate(rows):
            save_image(root / base / name, textured_image(100 * number + j))
    copy, _original = MESSIDOR_COPY
    save_image(root / "Base34" / f"{copy}.tif", cv2.resize(textured_image(0), (96, 72), interpolation=cv2.INTER_AREA))
    if with_exams:
        write_exam_list(root / "messidor-2.csv", MESSIDOR_EXAMS)
    return root


# --- Messidor-2 --------------------------------------------------------------------------------

#: label rows: image_id, DR, DME, gradable ("" = blank).
MESSIDOR2_LABELS = [
    ("20051020_43808_0100_PP.png", "0", "0", "1"),
    ("20051020_43832_0100_PP.png", "2", "1", "1"),
    ("IM000013.jpg", "4", "1", "1"),     # file on disk is IM000013.JPG
    ("IM000012.jpg", "1", "0", "1"),
    ("IM000057.jpg", "", "", "0"),       # ungradable
    ("IM000056.jpg", "", "", "1"),       # blank grade
]
MESSIDOR2_FILES = ["20051020_43808_0100_PP.png", "20051020_43832_0100_PP.png", "IM000013.JPG",
                   "IM000012.JPG", "IM000057.JPG", "IM000056.JPG", "IM000099.JPG"]  # IM000099: no label
MESSIDOR2_EXAMS = [("20051020_43808_0100_PP.png", "20051020_43832_0100_PP.png"), ("IM000013.JPG", "IM000012.JPG"),
                   ("IM000057.JPG", "IM000056.JPG"), ("IM000099.JPG", "IM000098.JPG")]


def build_messidor2(root: Path) -> Path:
    """Messidor-2: mixed .png/.JPG images, the ADCIS exam list (';'-separated) and the adjudicated labels."""
    for name in MESSIDOR2_FILES:
        write_image(root / "IMAGES" / name)
    write_text(root / "messidor-2.csv", "left;right \n" + "".join(f"{a};{b}\n" for a, b in MESSIDOR2_EXAMS))
    lines = ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"]
    write_text(root / "messidor_data.csv", "\n".join(lines + [",".join(row) for row in MESSIDOR2_LABELS]) + "\n")
    return root


# --- APTOS -------------------------------------------------------------------------------------

APTOS_LABELS = {"000c1434d8d7": 2, "001639a390f0": 4, "0024cdab0c1e": 1}


def build_aptos(root: Path) -> Path:
    write_text(root / "train.csv", "id_code,diagnosis\n" + "".join(f"{k},{v}\n" for k, v in APTOS_LABELS.items()))
    for name in APTOS_LABELS:
        write_image(root / "train_images" / f"{name}.png")
    return root


# --- EyePACS -----------------------------------------------------------------------------------

EYEPACS_TRAIN = {"10_left": 0, "10_right": 0, "13_left": 1, "13_right": 2, "15_left": 4}
EYEPACS_TEST = {"1_left": (0, "Private"), "1_right": (3, "Public")}
EYEPACS_BLACK = "13_right"
EYEPACS_CORRUPT = "15_left"


def build_eyepacs(root: Path, with_test: bool = True) -> Path:
    """EyePACS: train images and labels (one image black, one truncated), optional test solution."""
    write_text(root / "trainLabels.csv", "image,level\n" + "".join(f"{k},{v}\n" for k, v in EYEPACS_TRAIN.items()))
    for name in EYEPACS_TRAIN:
        write_image(root / "train" / f"{name}.jpeg", value=0 if name == EYEPACS_BLACK else 150)
    corrupt = root / "train" / f"{EYEPACS_CORRUPT}.jpeg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    if with_test:
        write_text(root / "retinopathy_solution.csv", "image,level,Usage\n"
                   + "".join(f"{k},{v},{u}\n" for k, (v, u) in EYEPACS_TEST.items()))
        for name in EYEPACS_TEST:
            write_image(root / "test" / f"{name}.jpeg")
    return root


# --- DDR ---------------------------------------------------------------------------------------

DDR_GRADING = {"train": {"007-0004-000.jpg": 0, "007-0007-000.jpg": 2, "007-0011-000.jpg": 5},
               "valid": {"007-0025-000.jpg": 3}, "test": {"007-0031-000.jpg": 4, "007-0032-000.jpg": 5}}
#: segmentation images and lesion pixels per DDR lesion folder (every mask file exists; [] = blank).
DDR_SEGMENTATION = {
    "train": {"007-1789-100": {"EX": [(1, 1)], "HE": [], "MA": [(2, 2)], "SE": []}},
    "valid": {"007-2711-200": {"EX": [], "HE": [(3, 3)], "MA": [], "SE": [(4, 4)]}},
    "test": {"007-3001-100": {"EX": [], "HE": [], "MA": [], "SE": []}},
}


def build_ddr(root: Path) -> Path:
    """DDR: grading lists with label 5 (ungradable) and both tasks' folders; validation masks
    under 'segmentation label'."""
    for split, labels in DDR_GRADING.items():
        write_text(root / "DR_grading" / f"{split}.txt", "".join(f"{k} {v}\n" for k, v in labels.items()))
        for name in labels:
            write_image(root / "DR_grading" / split / name)
    for split, images in DDR_SEGMENTATION.items():
        split_dir = root / "lesion_segmentation" / split
        mask_dir = split_dir / ("segmentation label" if split == "valid" else "label")
        for stem, lesions in images.items():
            write_image(split_dir / "image" / f"{stem}.jpg")
            for lesion, pixels in lesions.items():
                write_mask(mask_dir / lesion / f"{stem}.tif", pixels)
    return root


# --- Retinal-Lesions ---------------------------------------------------------------------------

#: name -> (our label, kaggle label, {mask file stem: [(row, col, value)]}); None = no mask folder.
RETINAL_LESIONS = {
    "10_left": (2, 1, {"microaneurysm": [(1, 1, 255)], "retinal_hemorrhage": [(2, 2, 127)],
                       "hard_exudate": [(3, 3, 255), (3, 4, 127)]}),
    "10_right": (4, 4, {"neovascularization": [(0, 0, 255)], "vitreous_hemorrhage": [(5, 7, 255)],
                        "fibrous_proliferation": [(4, 4, 255)], "preretinal_hemorrhage": [(1, 2, 127)],
                        "cotton_wool_spots": [(2, 5, 255)]}),
    "4604_right": (0, 0, None),
}


def build_retinal_lesions(root: Path) -> Path:
    """Retinal-Lesions: images, per-image mask folders with 255 (kept) and 127 (excluded) pixels,
    one image without a mask folder, and the grades CSV."""
    lines = ["image id,kaggle label,our label"]
    for name, (ours, kaggle, masks) in RETINAL_LESIONS.items():
        lines.append(f"{name},{kaggle},{ours}")
        write_image(root / "images_896x896" / f"{name}.jpg")
        for stem, pixels in (masks or {}).items():
            write_mask(root / "lesion_segs_896x896" / name / f"{stem}.png", pixels)
    write_text(root / "dr_grades.csv", "\n".join(lines) + "\n")
    return root

"""Stand-in trees of the real datasets: the official on-disk layout, filled with synthetic photographs.

No real dataset may be downloaded in CI, yet every real-data path of the notebooks (source ->
splits -> field-of-view cache -> loaders -> the notebook's tables and figures) must run there.
``build_standin("idrid_grading", root, n=24)`` writes ``n`` synthetic fundus photographs, with
their generated DR / DME grades and lesion masks, into ``root`` exactly where and in the format
the official download keeps them (label files, folder and file names, split folders, mask
encodings), so ``load_source`` and ``load_dataset`` read it as they would read the real download.

The folder, file and column names come from the source modules (one definition of each layout);
the unit tests check those names against ``data/README.md`` with hand-made fixture trees that
reproduce each release's quirks. Stand-ins carry what the notebooks need instead: enough images
of each grade per split to train, validate and test, at a small size.

Grades are mapped onto each dataset's scale (Messidor DR 0-3, Messidor-2 DME 0/1); lesions onto
the masks the dataset annotates (IDRiD and DDR: MA, haemorrhages, hard and soft exudates).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.sources import ddr, eyepacs, idrid, messidor, retinal_lesions
from fundus_lib.data.synthetic import generate
from fundus_lib.data.xls_writer import write_xls


class Photo(NamedTuple):
    """One synthetic photograph to place in a tree: pixels, labels and its lesion masks (LESIONS order)."""

    image: np.ndarray   # (H, W, 3) uint8
    dr: int             # ICDR grade 0-4
    dme: int            # DME risk 0-2
    masks: np.ndarray   # (8, H, W) bool


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def save_image(path: Path, array: np.ndarray) -> Path:
    """Save an image array in the format of ``path``'s suffix (JPEG, PNG, TIFF), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def red_mask(mask: np.ndarray) -> np.ndarray:
    """An IDRiD-style RGB mask: lesion pixels pure red, the rest black."""
    grey = mask.astype(np.uint8) * 255
    return np.stack([grey, np.zeros_like(grey), np.zeros_like(grey)], axis=-1)


def _lesion(photo: Photo, lesion: str) -> np.ndarray:
    return photo.masks[LESIONS.index(lesion)]


def _split(photos: list[Photo], shares: dict[str, float]) -> dict[str, list[Photo]]:
    """Consecutive parts of ``photos`` per split, in proportion to ``shares`` (the last takes the rest)."""
    parts, start = {}, 0
    names = list(shares)
    for name in names:
        stop = len(photos) if name == names[-1] else start + round(shares[name] * len(photos))
        parts[name], start = photos[start:stop], stop
    return parts


def write_idrid_grading(root: Path, photos: list[Photo]) -> Path:
    """``B. Disease Grading``: JPEGs per official split (3-digit names restarting at IDRiD_001 in the
    test set) and the label CSVs with the trailing-space header and trailing empty columns."""
    part = root / "B. Disease Grading"
    header = ",".join(idrid.GRADING_COLUMNS.values()) + " ,,"
    for split, members in _split(photos, {"train": 0.75, "test": 0.25}).items():
        lines = [header]
        for number, photo in enumerate(members, start=1):
            name = f"IDRiD_{number:03d}"
            save_image(part / "1. Original Images" / idrid.SPLIT_FOLDERS[split] / f"{name}.jpg", photo.image)
            lines.append(f"{name},{photo.dr},{photo.dme},,")
        write_text(part / "2. Groundtruths" / idrid.GRADING_LABELS[split], "\n".join(lines) + "\n")
    return root


def write_idrid_segmentation(root: Path, photos: list[Photo]) -> Path:
    """``A. Segmentation``: 2-digit JPEG names and red RGB TIFF masks, a file only where the lesion
    is present (as in the release); the optic-disc folder exists but stays empty."""
    part = root / "A. Segmentation"
    number = 0
    for split, members in _split(photos, {"train": 2 / 3, "test": 1 / 3}).items():
        truth = part / "2. All Segmentation Groundtruths" / idrid.SPLIT_FOLDERS[split]
        for folder, _suffix in (*idrid.SEGMENTATION_MASKS.values(), idrid.OPTIC_DISC_MASKS):
            (truth / folder).mkdir(parents=True, exist_ok=True)
        for photo in members:
            number += 1
            name = f"IDRiD_{number:02d}"
            save_image(part / "1. Original Images" / idrid.SPLIT_FOLDERS[split] / f"{name}.jpg", photo.image)
            for lesion, (folder, suffix) in idrid.SEGMENTATION_MASKS.items():
                if _lesion(photo, lesion).any():
                    save_image(truth / folder / f"{name}_{suffix}.tif", red_mask(_lesion(photo, lesion)))
    return root


def write_messidor(root: Path, photos: list[Photo]) -> Path:
    """The twelve ``BaseXY`` folders: TIFF images and one ``Annotation_BaseXY.xls`` workbook each
    (DR capped at Messidor's grade 3)."""
    header = list(messidor.ANNOTATION_COLUMNS.values())
    for number, base in enumerate(messidor.BASES):
        rows = []
        for j, photo in enumerate(photos[number::len(messidor.BASES)]):
            name = f"20051{number:02d}{j:02d}_{40000 + 100 * number + j}_0100_PP.tif"
            save_image(root / base / name, photo.image)
            rows.append([name, "Service Ophtalmologie Lariboisière", min(photo.dr, 3), photo.dme])
        write_xls(root / base / f"Annotation_{base}.xls", [header, *rows])
    return root


def write_messidor2(root: Path, photos: list[Photo]) -> Path:
    """``IMAGES/`` (both eyes of an exam, PNG and JPG names), the exam list ``messidor-2.csv`` and
    the adjudicated labels ``messidor_data.csv`` (DME 0/1)."""
    labels = ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"]
    exams = ["left;right"]
    for exam in range(len(photos) // 2):
        pair = []
        for eye, photo in enumerate(photos[2 * exam:2 * exam + 2]):
            name = f"2005{exam:04d}_{43000 + 2 * exam + eye}_0100_PP.png" if exam % 2 else f"IM{2 * exam + eye:06d}.JPG"
            save_image(root / "IMAGES" / name, photo.image)
            labels.append(f"{name},{photo.dr},{min(photo.dme, 1)},1")
            pair.append(name)
        exams.append(";".join(pair))
    write_text(root / "messidor_data.csv", "\n".join(labels) + "\n")
    write_text(root / "messidor-2.csv", "\n".join(exams) + "\n")
    return root


def write_aptos(root: Path, photos: list[Photo]) -> Path:
    """``train.csv`` (``id_code,diagnosis``) and ``train_images/<id_code>.png``."""
    lines = ["id_code,diagnosis"]
    for number, photo in enumerate(photos):
        name = f"{0xA0000 + number:012x}"
        save_image(root / "train_images" / f"{name}.png", photo.image)
        lines.append(f"{name},{photo.dr}")
    write_text(root / "train.csv", "\n".join(lines) + "\n")
    return root


def write_eyepacs(root: Path, photos: list[Photo]) -> Path:
    """``train/`` and ``test/`` JPEGs named ``<patient>_<left|right>`` (two eyes per patient),
    ``trainLabels.csv`` and the test solution ``retinopathy_solution.csv``."""
    for split, members in _split(photos, {"train": 0.75, "test": 0.25}).items():
        lines = ["image,level" + (",Usage" if split == "test" else "")]
        for number, photo in enumerate(members):
            name = f"{10 + number // 2 + (1000 if split == 'test' else 0)}_{('left', 'right')[number % 2]}"
            save_image(root / split / f"{name}.jpeg", photo.image)
            lines.append(f"{name},{photo.dr}" + (",Public" if split == "test" else ""))
        write_text(root / (eyepacs.TRAIN_LABELS if split == "train" else eyepacs.TEST_LABELS), "\n".join(lines) + "\n")
    return root


def write_ddr_grading(root: Path, photos: list[Photo]) -> Path:
    """``DR_grading/{train,valid,test}.txt`` (``name label`` lines) and the JPEGs of each split."""
    for split, members in _split(photos, {"train": 0.6, "valid": 0.2, "test": 0.2}).items():
        lines = []
        for number, photo in enumerate(members):
            name = f"007-{number + 100 * list(ddr.SPLITS).index(split):04d}-{number % 3}00.jpg"
            save_image(root / "DR_grading" / split / name, photo.image)
            lines.append(f"{name} {photo.dr}")
        write_text(root / "DR_grading" / f"{split}.txt", "\n".join(lines) + "\n")
    return root


def write_ddr_segmentation(root: Path, photos: list[Photo]) -> Path:
    """``lesion_segmentation/<split>/image/*.jpg`` and a mask per lesion folder for every image
    (blank when absent), under ``label/`` (``segmentation label/`` for the validation split)."""
    for split, members in _split(photos, {"train": 0.6, "valid": 0.2, "test": 0.2}).items():
        split_dir = root / "lesion_segmentation" / split
        mask_dir = split_dir / ddr.MASK_FOLDERS[1 if split == "valid" else 0]
        for number, photo in enumerate(members):
            stem = f"007-{number + 100 * list(ddr.SPLITS).index(split):04d}-100"
            save_image(split_dir / "image" / f"{stem}.jpg", photo.image)
            for lesion, folder in ddr.SEGMENTATION_MASKS.items():
                save_image(mask_dir / folder / f"{stem}.tif", _lesion(photo, lesion).astype(np.uint8) * 255)
    return root


def write_retinal_lesions(root: Path, photos: list[Photo]) -> Path:
    """``images_896x896/<patient>_<eye>.jpg``, one PNG per present lesion (255 = lesion) under
    ``lesion_segs_896x896/<image>/`` and ``dr_grades.csv``."""
    stems = {lesion: stem for stem, lesion in retinal_lesions.MASK_FILES.items()}
    lines = ["image id,kaggle label,our label"]
    for number, photo in enumerate(photos):
        name = f"{20 + number // 2}_{('left', 'right')[number % 2]}"
        save_image(root / retinal_lesions.IMAGES / f"{name}.jpg", photo.image)
        for lesion in LESIONS:
            if _lesion(photo, lesion).any():
                save_image(root / retinal_lesions.MASKS / name / f"{stems[lesion]}.png",
                           _lesion(photo, lesion).astype(np.uint8) * 255)
        lines.append(f"{name},{photo.dr},{photo.dr}")
    write_text(root / retinal_lesions.GRADES, "\n".join(lines) + "\n")
    return root


#: Source name (as in ``fundus_lib.data.sources.SOURCES``) -> writer of its official layout.
WRITERS: dict[str, Callable[[Path, list[Photo]], Path]] = {
    "idrid_grading": write_idrid_grading, "idrid_segmentation": write_idrid_segmentation,
    "messidor": write_messidor, "messidor2": write_messidor2, "aptos": write_aptos, "eyepacs": write_eyepacs,
    "ddr_grading": write_ddr_grading, "ddr_segmentation": write_ddr_segmentation,
    "retinal_lesions": write_retinal_lesions,
}


def synthetic_photos(n: int, size: int, seed: int = 0) -> list[Photo]:
    """``n`` synthetic photographs with grades drawn from a balanced prior (every grade occurs)."""
    batch = generate(n, size, seed, prior="balanced")
    return [Photo(image, int(row.dr_grade), int(row.dme_grade), masks)
            for image, masks, row in zip(batch.images, batch.masks, batch.labels.itertuples())]


def build_standin(source: str, root: str | Path, n: int = 24, size: int = 96, seed: int = 0) -> Path:
    """Write a stand-in tree of ``source`` with ``n`` synthetic photographs of ``size`` px into ``root``.

    ``root`` is what a user passes as ``data_dir`` (the folder that holds the official download).
    Raises ValueError naming the known sources for an unknown one, and FileExistsError when
    ``root`` already holds files (a stand-in never mixes with other data).
    """
    if source not in WRITERS:
        raise ValueError(f"no stand-in for source {source!r}; known: {sorted(WRITERS)}")
    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"stand-in folder {root} is not empty")
    return WRITERS[source](root, synthetic_photos(n, size, seed))


__all__ = ["Photo", "WRITERS", "build_standin", "synthetic_photos", "save_image", "write_text", "red_mask"]

"""Train / validation / test splits and k-fold cross-validation without leakage.

Splits are stratified by a label column (default ``dr_grade``, so every grade is represented in
every split) and grouped by ``patient_id`` where the manifest has one (both eyes of a patient or
exam stay together: EyePACS, Messidor-2). Rows whose group is NA form singleton groups; rows
whose stratum is NA form their own stratum. The work is done by scikit-learn's
:class:`~sklearn.model_selection.StratifiedKFold` (no groups) and
:class:`~sklearn.model_selection.StratifiedGroupKFold` (groups).

:func:`check_no_leakage` is the guard to call before training: the same image (by id or path) or
the same patient in two splits makes validation scores optimistic, and raises loudly.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from fundus_lib.data.manifest import SPLITS, ManifestError, validate_manifest

#: Columns that identify an image or a person; a value shared by two splits is leakage.
LEAKAGE_KEYS: tuple[str, ...] = ("image_id", "patient_id", "image_path")


def patient_key(values: pd.Series) -> pd.Series:
    """Patient ids as compared for grouping and leakage: surrounding spaces stripped, case folded.

    Label files typed by hand spell one patient ``"P17"``, ``"p17"`` and ``" P17 "``; treating
    those as three patients would put one person's eyes in two splits.
    """
    return values.astype("string").str.strip().str.casefold()


class LeakageError(ManifestError):
    """The same image or patient appears in more than one split."""


def _column(manifest: pd.DataFrame, name: str | None, role: str) -> pd.Series | None:
    if name is None:
        return None
    if name not in manifest.columns:
        raise ValueError(f"{role} column {name!r} is not in the manifest; columns: {list(manifest.columns)}")
    return manifest[name]


def _strata(manifest: pd.DataFrame, stratify: str | None) -> np.ndarray:
    column = _column(manifest, stratify, "stratify")
    if column is None:
        return np.zeros(len(manifest), dtype=np.int64)
    return column.astype(object).where(column.notna(), "<NA>").astype(str).to_numpy()


def _groups(manifest: pd.DataFrame, group: str | None) -> np.ndarray | None:
    """Group labels compared as :func:`patient_key` (case and surrounding spaces ignored), or None
    when no row has one (plain stratified k-fold then applies)."""
    column = _column(manifest, group, "group")
    if column is None or column.isna().all():
        return None
    own = "image:" + manifest["image_id"].astype(str)
    return patient_key(column).astype(object).where(column.notna(), own).astype(str).to_numpy()


def stratified_kfold(manifest: pd.DataFrame, n_splits: int = 5, *, stratify: str | None = "dr_grade",
                     group: str | None = "patient_id", seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds as ``(train_positions, val_positions)`` pairs of row positions (``iloc``).

    Uses :class:`StratifiedGroupKFold` when ``group`` has any value, else :class:`StratifiedKFold`;
    both shuffle with ``seed``. Every row is in exactly one validation fold.
    """
    validate_manifest(manifest)
    if not isinstance(n_splits, int) or not 2 <= n_splits <= len(manifest):
        raise ValueError(f"n_splits must be an int in 2..{len(manifest)} (rows), got {n_splits!r}")
    strata = _strata(manifest, stratify)
    groups = _groups(manifest, group)
    placeholder = np.zeros((len(manifest), 1))
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        folds = splitter.split(placeholder, strata)
    else:
        if len(set(groups)) < n_splits:
            raise ValueError(f"only {len(set(groups))} distinct {group} groups for n_splits={n_splits}")
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        folds = splitter.split(placeholder, strata, groups)
    return [(train.astype(np.int64), val.astype(np.int64)) for train, val in folds]


def assign_splits(manifest: pd.DataFrame, val: float = 0.15, test: float = 0.15, *,
                  stratify: str | None = "dr_grade", group: str | None = "patient_id", seed: int = 0,
                  source_split: str | None = None) -> pd.DataFrame:
    """Return a copy whose ``split`` column divides some rows into train / val / test.

    The rows divided are those whose split is NA (``source_split=None``), or those in
    ``source_split`` (e.g. ``source_split="train", test=0`` carves a validation set out of an
    official training set and keeps the official test set as it is); other rows are untouched.
    Each held-out part is one fold of a stratified (group) k-fold with ``k = round(1 / share)``,
    so the realised fractions are the requested ones rounded to 1/k. The result passes
    :func:`check_no_leakage` or this raises.
    """
    validate_manifest(manifest)
    for name, fraction in (("val", val), ("test", test)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1), got {fraction!r}")
    if val + test >= 1.0:
        raise ValueError(f"val + test must leave rows for training, got {val} + {test}")
    if source_split is not None and source_split not in SPLITS:
        raise ValueError(f"source_split must be one of {SPLITS} or None, got {source_split!r}")
    out = manifest.copy()
    selected = out["split"].isna() if source_split is None else out["split"] == source_split
    positions = np.flatnonzero(selected.to_numpy(dtype=bool, na_value=False))
    if len(positions) == 0:
        raise ValueError(f"no rows to split (split == {source_split!r})" if source_split
                         else "no rows with an NA split; pass source_split to re-divide an existing split")
    labels = np.full(len(positions), "train", dtype=object)
    remaining, remaining_share = np.arange(len(positions)), 1.0
    for name, fraction in (("test", test), ("val", val)):
        if fraction == 0.0:
            continue
        k = max(2, round(remaining_share / fraction))
        part = out.iloc[positions[remaining]].reset_index(drop=True)
        held_out = stratified_kfold(part, k, stratify=stratify, group=group, seed=seed)[0][1]
        labels[remaining[held_out]] = name
        remaining = np.delete(remaining, held_out)
        remaining_share -= fraction
    split = out["split"].astype(object)
    split.iloc[positions] = labels
    out["split"] = split.astype("string")
    check_no_leakage(out)
    return out


def _named_parts(splits: pd.DataFrame | Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame]) -> dict[str, pd.DataFrame]:
    if isinstance(splits, pd.DataFrame):
        if "split" not in splits.columns:
            raise ValueError("a single manifest needs a 'split' column to be checked for leakage")
        named = splits[splits["split"].notna()]
        return {str(name): part for name, part in named.groupby(named["split"].astype(str))}
    if isinstance(splits, Mapping):
        return {str(name): part for name, part in splits.items()}
    return {str(i): part for i, part in enumerate(splits)}


def check_no_leakage(splits: pd.DataFrame | Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame],
                     keys: Sequence[str] = LEAKAGE_KEYS) -> None:
    """Raise :class:`LeakageError` when a value of any of ``keys`` occurs in two splits.

    ``splits``: one manifest with a ``split`` column (rows with NA split are ignored), a mapping
    ``{name: manifest}``, or a sequence of manifests (named by position). Image paths are
    compared after normalisation (``a/./b.png`` == ``a/b.png``), patient ids by
    :func:`patient_key` (``"P1"`` == ``" p1 "``); the message shows the spellings found. Keys a
    part lacks are skipped.
    """
    parts = _named_parts(splits)
    problems: list[str] = []
    for key in keys:
        frames = []
        for name, part in parts.items():
            if key in part.columns:
                values = part[key].dropna().astype(str)
                if key == "image_path":
                    compared = values.map(lambda p: os.path.normpath(os.path.abspath(p)))
                else:
                    compared = patient_key(values) if key == "patient_id" else values
                frames.append(pd.DataFrame({"value": compared.to_numpy(), "spelling": values.to_numpy(),
                                            "split": name}).drop_duplicates())
        if len(frames) < 2:
            continue
        table = pd.concat(frames, ignore_index=True)
        grouped = table.groupby("value")
        spread = grouped["split"].agg(lambda s: sorted(set(s)))
        spellings = grouped["spelling"].agg(lambda s: " / ".join(repr(v) for v in sorted(set(s))))
        shared = spread[spread.map(len) > 1]
        if len(shared):
            examples = "; ".join(f"{spellings[value]} in {where}" for value, where in shared.head(5).items())
            problems.append(f"{len(shared)} {key} value(s) occur in more than one split, e.g. {examples}")
    if problems:
        raise LeakageError("data leakage between splits:\n  - " + "\n  - ".join(problems))

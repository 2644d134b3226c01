"""Figures for the notebooks, in one style: image grids, overlays of attention maps and lesion
masks, confusion matrices, ROC curves and learning curves.

Every plotting function returns a :class:`matplotlib.figure.Figure` built with matplotlib's object
API (``Figure()``, not ``pyplot``): nothing is shown or kept alive behind the caller's back, so a
notebook displays the figure by leaving it as a cell's last value (or ``display(fig)``), and a
loop that makes hundreds of figures leaks none. Functions drawing a single panel take an
optional ``ax`` to draw into an existing figure instead.

Images may be (H, W, C) NumPy arrays (uint8 in 0..255 or float in [0, 1]), (C, H, W) torch
tensors or arrays, or (H, W) grey images. Network inputs normalised with the ImageNet statistics
are shown as pictures with ``normalized=True`` (see :func:`to_display_image`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import cv2
import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.metrics import roc_curve

from fundus_lib.metrics import as_numpy, confusion_matrix, roc_auc
from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.transforms import denormalize

ArrayLike = Any  # np.ndarray | torch.Tensor

#: One colour per lesion class of :data:`~fundus_lib.data.manifest.LESIONS` (RGB in [0, 1]),
#: chosen to stand out against the orange-red fundus and from each other.
lesion_colors: dict[str, tuple[float, float, float]] = {
    lesion: to_rgb(colour) for lesion, colour in zip(LESIONS, (
        "#00e5ff",  # MA: cyan
        "#2962ff",  # iHE: blue
        "#ffea00",  # HaEx: yellow
        "#f5f5f5",  # CWS: white
        "#d500f9",  # vHE: violet
        "#ff4081",  # pHE: pink
        "#00e676",  # NV: green
        "#8d6e63",  # FiP: brown
    ))
}


def set_style(figure_format: str = "png") -> None:
    """Apply the course's figure style (seaborn "whitegrid", colour-blind palette, readable
    sizes). Calling it again is harmless.

    Inside IPython / Jupyter it also registers the display formatter for matplotlib figures in
    ``figure_format`` ("png", or "jpeg" for notebooks with many photographs, to keep them small):
    the functions of this module build figures without pyplot, and a figure returned as a cell's
    last value is then shown inline (no ``plt.show()``, no figure left open in pyplot).
    """
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python: nothing to register
        get_ipython = lambda: None  # noqa: E731
    if get_ipython() is not None:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats(figure_format)
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", rc={
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "legend.frameon": False,
        "image.interpolation": "nearest",
    })


# --------------------------------------------------------------------------------------------
# image conversion
# --------------------------------------------------------------------------------------------

def to_display_image(image: ArrayLike, *, normalized: bool = False) -> np.ndarray:
    """Float image in [0, 1] ready for ``imshow``: (H, W, 3) for colour, (H, W) for grey.

    Accepts (H, W, C) arrays, (C, H, W) tensors or arrays (C = 1 or 3) and (H, W) images; uint8
    is scaled by 1/255. ``normalized=True`` undoes the ImageNet normalisation of a network input
    (:func:`fundus_lib.data.transforms.denormalize`) and clips to [0, 1]. A float image outside
    [0, 1] without ``normalized=True`` is an error rather than a silently clipped picture.
    """
    is_tensor = isinstance(image, torch.Tensor)
    array = as_numpy(image, "image")
    if array.ndim == 3:
        channels_last = not is_tensor and array.shape[-1] in (1, 3)
        if not channels_last and array.shape[0] not in (1, 3):
            raise ValueError(f"image must be (H, W, C) or (C, H, W) with C = 1 or 3, got shape {array.shape}")
        if not channels_last:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"image must be (H, W), (H, W, C) or (C, H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255.0
    elif array.dtype == bool:
        array = array.astype(np.float64)
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"integer images must be uint8, got dtype {array.dtype}")
    if normalized:
        if array.ndim != 3:
            raise ValueError("normalized=True needs a 3-channel image")
        chw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=np.float32))
        return np.clip(np.moveaxis(denormalize(chw).numpy(), 0, -1), 0.0, 1.0).astype(np.float64)
    array = array.astype(np.float64)
    if array.min() < -1e-6 or array.max() > 1 + 1e-6:
        raise ValueError(f"float image values lie in [{array.min():.3g}, {array.max():.3g}], expected [0, 1]; "
                         "pass normalized=True for an ImageNet-normalised network input")
    return np.clip(array, 0.0, 1.0)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def _resize(array: np.ndarray, shape: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize a 2-D (or channel-first 3-D) map to ``shape`` = (H, W)."""
    if array.shape[-2:] == shape:
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    planes = array.reshape(-1, *array.shape[-2:]).astype(np.float32)
    resized = [cv2.resize(plane, (shape[1], shape[0]), interpolation=interpolation) for plane in planes]
    return np.stack(resized).reshape(*array.shape[:-2], *shape)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def _squeeze_map(map_or_mask: ArrayLike) -> np.ndarray:
    m = as_numpy(map_or_mask, "map_or_mask")
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"map_or_mask must be a single (H, W) map, got shape {m.shape}; "
                         "use mask_overlay for a stack of lesion masks")
    return m


def blend(image: ArrayLike, map_or_mask: ArrayLike, *, alpha: float = 0.5, cmap: str = "jet",
          color: str | Sequence[float] = "cyan", normalized: bool = False) -> np.ndarray:
    """(H, W, 3) float image: ``map_or_mask`` laid over ``image``, resized to the image's size.

    - A boolean mask colours its pixels with ``color`` at opacity ``alpha``; other pixels keep the
      image (nearest-neighbour resizing).
    - Any other (H', W') map (attention, saliency, probability) is min-max scaled to [0, 1],
      resized bilinearly, coloured with ``cmap`` and mixed as ``(1 - alpha) * image + alpha * map``.
    """
    _check_alpha(alpha)
    img = _as_rgb(to_display_image(image, normalized=normalized))
    m = _squeeze_map(map_or_mask)
    shape = img.shape[:2]
    if m.dtype == bool:
        mask = _resize(m.astype(np.uint8), shape, nearest=True) > 0
        tinted = (1 - alpha) * img + alpha * np.asarray(to_rgb(color))
        return np.where(mask[..., None], tinted, img)
    m = m.astype(np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError("map_or_mask contains NaN or infinite values")
    span = m.max() - m.min()
    scaled = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    coloured = mpl.colormaps[cmap](_resize(scaled, shape, nearest=False).clip(0, 1))[..., :3]
    return (1 - alpha) * img + alpha * coloured


def _lesion_names(n_channels: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        if n_channels != len(LESIONS):
            raise ValueError(f"masks have {n_channels} channels; pass names=[...] to name them")
        return list(LESIONS)
    if len(names) != n_channels:
        raise ValueError(f"names has {len(names)} entries for {n_channels} mask channels")
    return list(names)


def _lesion_palette(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    fallback = sns.color_palette("tab10", len(names))
    return {name: lesion_colors.get(name, fallback[i]) for i, name in enumerate(names)}


def blend_masks(image: ArrayLike, masks: ArrayLike, *, lesions: Sequence[str] | None = None,
                names: Sequence[str] | None = None, alpha: float = 0.6, threshold: float = 0.5,
                normalized: bool = False) -> np.ndarray:
    """(H, W, 3) float image with each lesion mask of a (L, H', W') stack painted in its colour.

    ``names`` labels the L channels (default :data:`LESIONS` when L = 8); ``lesions`` selects
    which of them to paint (default all). Float masks / probability maps count where
    ``>= threshold``. Later lesions are painted over earlier ones where they overlap.
    """
    _check_alpha(alpha)
    img = _as_rgb(to_display_image(image, normalized=normalized))
    stack = as_numpy(masks, "masks")
    if stack.ndim != 3:
        raise ValueError(f"masks must be an (L, H, W) stack, got shape {stack.shape}")
    channel_names = _lesion_names(stack.shape[0], names)
    selected = channel_names if lesions is None else list(lesions)
    unknown = sorted(set(selected) - set(channel_names))
    if unknown:
        raise ValueError(f"lesions {unknown} are not among the mask channels {channel_names}")
    palette = _lesion_palette(channel_names)
    binary = _resize((stack >= threshold).astype(np.uint8), img.shape[:2], nearest=True) > 0
    out = img.copy()
    for name in selected:  # at most a handful of channels; each is one vectorised blend
        mask = binary[channel_names.index(name)][..., None]
        out = np.where(mask, (1 - alpha) * out + alpha * np.asarray(palette[name]), out)
    return out


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------

def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _show(ax: Axes, image: np.ndarray, title: str | None) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)


def image_grid(images: Sequence[ArrayLike] | ArrayLike, titles: Sequence[str] | None = None, ncols: int = 4, *,
               normalized: bool = False, size: float = 3.0, suptitle: str | None = None) -> Figure:
    """Grid of images, ``ncols`` per row; one axes per image (no empty panels).

    ``images`` is a list of images in any layout :func:`to_display_image` accepts, or a 4-D batch
    ((N, C, H, W) tensor, (N, H, W, C) array).
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim != 4:
            raise ValueError(f"an array of images must be a 4-D batch, got shape {tuple(images.shape)}; "
                             "wrap a single image in a list")
        images = list(images)
    images = list(images)
    if not images:
        raise ValueError("images is empty")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles has {len(titles)} entries for {len(images)} images")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig = Figure(figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0.0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.remove()
            continue
        _show(ax, to_display_image(images[i], normalized=normalized), None if titles is None else titles[i])
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def overlay(image: ArrayLike, map_or_mask: ArrayLike, *, alpha: float = 0.5, cmap: str = "jet",
            color: str | Sequence[float] = "cyan", title: str | None = None, normalized: bool = False,
            ax: Axes | None = None, size: float = 4.0) -> Figure:
    """An attention / saliency map or a binary mask over a fundus image (see :func:`blend`)."""
    fig, ax = _figure_and_axes(ax, (size, size))
    _show(ax, blend(image, map_or_mask, alpha=alpha, cmap=cmap, color=color, normalized=normalized), title)
    return fig


def mask_overlay(image: ArrayLike, masks: ArrayLike, *, lesions: Sequence[str] | None = None,
                 names: Sequence[str] | None = None, alpha: float = 0.6, threshold: float = 0.5,
                 title: str | None = None, legend: bool = True, normalized: bool = False,
                 ax: Axes | None = None, size: float = 4.0) -> Figure:
    """Lesion masks (L, H, W) over a fundus image, one colour per lesion (:data:`lesion_colors`),
    with a legend of the painted lesions (see :func:`blend_masks`)."""
    stack = as_numpy(masks, "masks")
    channel_names = _lesion_names(stack.shape[0], names) if stack.ndim == 3 else None
    painted = blend_masks(image, stack, lesions=lesions, names=channel_names, alpha=alpha,
                          threshold=threshold, normalized=normalized)
    fig, ax = _figure_and_axes(ax, (size * 1.35 if legend else size, size))
    _show(ax, painted, title)
    if legend:
        palette = _lesion_palette(channel_names)
        handles = [Patch(facecolor=palette[name], edgecolor="0.3", label=name)
                   for name in (channel_names if lesions is None else lesions)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def confusion_matrix_plot(cm_or_y_true: ArrayLike, y_pred: ArrayLike | None = None, *,
                          labels: Sequence[str] | None = None,
                          normalize: Literal["true", "pred", "all"] | None = None,
                          title: str | None = None, cmap: str = "Blues", ax: Axes | None = None) -> Figure:
    """Annotated heatmap of a confusion matrix (rows = true class, columns = predicted).

    Pass a (K, K) count matrix, or ``y_true, y_pred`` labels (the matrix then spans
    ``len(labels)`` classes when ``labels`` is given, so a missing class keeps its row).
    ``normalize`` divides by row sums ("true": recall per class), column sums ("pred") or the total
    ("all"); an empty row or column shows 0.
    """
    if y_pred is not None:
        cm = confusion_matrix(cm_or_y_true, y_pred, None if labels is None else len(labels))
    else:
        cm = as_numpy(cm_or_y_true, "cm")
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or (cm < 0).any():
            raise ValueError(f"cm must be a square matrix of non-negative counts, got shape {cm.shape}; "
                             "pass y_true, y_pred to compute one")
    k = cm.shape[0]
    labels = [str(i) for i in range(k)] if labels is None else [str(label) for label in labels]
    if len(labels) != k:
        raise ValueError(f"labels has {len(labels)} entries for a {k}x{k} matrix")
    if normalize not in (None, "true", "pred", "all"):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")
    values = cm.astype(np.float64)
    if normalize is not None:
        totals = {"true": values.sum(axis=1, keepdims=True), "pred": values.sum(axis=0, keepdims=True),
                  "all": values.sum()}[normalize]
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.nan_to_num(values / totals)
    fig, ax = _figure_and_axes(ax, (1.0 + 0.7 * k, 0.8 + 0.6 * k))
    sns.heatmap(values, annot=True, fmt=".2f" if normalize else ".0f", cmap=cmap, cbar=False, square=True,
                xticklabels=labels, yticklabels=labels, vmin=0, ax=ax)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.tick_params(axis="y", rotation=0)
    if title is not None:
        ax.set_title(title)
    return fig


def roc_curves(y_true: ArrayLike, scores: ArrayLike, *, labels: Sequence[str] | None = None,
               title: str | None = None, ax: Axes | None = None, size: float = 4.0) -> Figure:
    """ROC curves with their AUC in the legend.

    Binary: ``scores`` 1-D (or (N, 2)) against 0/1 labels, one curve. Several classes: an (N, C)
    score matrix gives one one-vs-rest curve per class (named by ``labels``); a class absent from
    ``y_true`` has no curve and says so in the legend.
    """
    t = as_numpy(y_true, "y_true").astype(np.int64)
    s = as_numpy(scores, "scores").astype(np.float64)
    if t.ndim != 1 or s.ndim not in (1, 2):
        raise ValueError(f"y_true must be 1-D and scores 1-D or (N, C), got {t.shape} and {s.shape}")
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"y_true and scores must have the same length, got {t.shape[0]} and {s.shape[0]}")
    binary = s.ndim == 1
    n_curves = 1 if binary else s.shape[1]
    if labels is not None and len(labels) != (2 if binary else n_curves):
        raise ValueError(f"labels has {len(labels)} entries, expected {2 if binary else n_curves}")
    fig, ax = _figure_and_axes(ax, (size * 1.2, size))
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    for c in range(n_curves):
        positive = t == 1 if binary else t == c
        column = s if binary else s[:, c]
        name = (labels[1] if labels is not None else "positive") if binary else \
            (labels[c] if labels is not None else f"class {c}")
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{name}: not in y_true" if not positive.any() else f"{name}: no negatives")
            continue
        fpr, tpr, _ = roc_curve(positive, column)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(positive, column):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(loc="lower right")
    if title is not None:
        ax.set_title(title)
    return fig


def learning_curves(history: pd.DataFrame, metrics: Sequence[str] | None = None, *,
                    title: str | None = None, ncols: int = 3, size: float = 3.5) -> Figure:
    """Panels over epochs: the loss (train and validation), each metric, and the learning rate.

    ``history`` is :func:`fundus_lib.train.fit`'s table: ``epoch``, ``train_loss``, ``val_loss``,
    ``val_<metric>``..., ``lr``. ``metrics`` are names without the ``val_`` prefix (``"kappa"``
    plots ``val_kappa``, and ``train_kappa`` too if present); by default every ``val_<x>`` whose
    ``train_<x>`` is absent, which leaves out the loss parts ``fit`` logs for both splits.
    """
    if not isinstance(history, pd.DataFrame) or "epoch" not in history.columns:
        raise ValueError("history must be a DataFrame with an 'epoch' column (as returned by train.fit)")
    columns = set(history.columns)
    if metrics is None:
        metrics = [c[4:] for c in history.columns
                   if c.startswith("val_") and c != "val_loss" and f"train_{c[4:]}" not in columns]
    missing = [m for m in metrics if f"val_{m}" not in columns]
    if missing:
        raise ValueError(f"history has no column(s) {[f'val_{m}' for m in missing]}; "
                         f"columns are {list(history.columns)}")
    panels: list[tuple[str, list[str]]] = []
    loss_columns = [c for c in ("train_loss", "val_loss") if c in columns]
    if loss_columns:
        panels.append(("loss", loss_columns))
    panels += [(m, [c for c in (f"train_{m}", f"val_{m}") if c in columns]) for m in metrics]
    if "lr" in columns:
        panels.append(("learning rate", ["lr"]))
    if not panels:
        raise ValueError(f"history has nothing to plot; columns are {list(history.columns)}")
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(size * ncols, size * 0.8 * nrows + (0.4 if title else 0.0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.remove()
    for ax, (name, cols) in zip(axes, panels):
        for col in cols:
            split = {"train": "training", "val": "validation"}.get(col.split("_", 1)[0], col)
            ax.plot(history["epoch"], history[col], marker="o", markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        if name == "learning rate" and (history["lr"] > 0).all():
            ax.set_yscale("log")
        elif len(cols) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    return fig

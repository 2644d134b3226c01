"""fundus_lib.viz: figures are built headless, hold the expected axes / titles / pixels, and bad
inputs raise clear errors."""
from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from sklearn.metrics import confusion_matrix as sk_confusion_matrix  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from fundus_lib import viz  # noqa: E402
from fundus_lib.data.manifest import LESIONS  # noqa: E402
from fundus_lib.data.transforms import normalize  # noqa: E402

RNG = np.random.default_rng(0)
IMAGE = (RNG.random((40, 48, 3)) * 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def no_pyplot_figures() -> None:
    """Every function must build its figure without registering it with pyplot."""
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def _shown(fig, index: int = 0) -> np.ndarray:
    return np.asarray(fig.axes[index].images[0].get_array())


def test_lesion_colors_are_distinct_rgb_per_lesion() -> None:
    assert tuple(viz.lesion_colors) == LESIONS
    colours = np.array(list(viz.lesion_colors.values()))
    assert colours.shape == (8, 3) and colours.min() >= 0 and colours.max() <= 1
    assert len({tuple(c) for c in colours}) == 8


def test_set_style_sets_rc() -> None:
    with matplotlib.rc_context():
        viz.set_style()
        assert matplotlib.rcParams["axes.titleweight"] == "bold"
        assert matplotlib.rcParams["savefig.bbox"] == "tight"


def test_to_display_image_layouts_and_ranges() -> None:
    expected = IMAGE / 255.0
    np.testing.assert_allclose(viz.to_display_image(IMAGE), expected)
    chw = torch.from_numpy(expected).permute(2, 0, 1)
    np.testing.assert_allclose(viz.to_display_image(chw), expected, atol=1e-7)
    np.testing.assert_allclose(viz.to_display_image(chw.numpy()), expected, atol=1e-7)
    assert viz.to_display_image(IMAGE[..., 0]).shape == (40, 48)
    assert viz.to_display_image(chw[:1]).shape == (40, 48)
    normalised = normalize(chw.float())
    assert normalised.min() < 0  # really outside [0, 1]
    np.testing.assert_allclose(viz.to_display_image(normalised, normalized=True), expected, atol=1e-6)


def test_to_display_image_errors() -> None:
    with pytest.raises(ValueError, match="normalized=True"):
        viz.to_display_image(torch.randn(3, 8, 8) * 3)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        viz.to_display_image(np.zeros((5, 8, 8)))
    with pytest.raises(ValueError, match="uint8"):
        viz.to_display_image(np.zeros((8, 8, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="shape"):
        viz.to_display_image(np.zeros((1, 3, 8, 8)))


def test_image_grid_axes_titles_and_pixels() -> None:
    images = [IMAGE, torch.from_numpy(IMAGE / 255.0).permute(2, 0, 1), IMAGE[..., 1], IMAGE, IMAGE]
    fig = viz.image_grid(images, titles=list("abcde"), ncols=3, suptitle="five")
    assert len(fig.axes) == 5  # the sixth grid cell is removed, not left empty
    assert [ax.get_title() for ax in fig.axes] == list("abcde")
    np.testing.assert_allclose(_shown(fig, 0), IMAGE / 255.0)
    assert _shown(fig, 2).shape == (40, 48)
    assert fig._suptitle.get_text() == "five"

    batch = viz.image_grid(torch.rand(2, 3, 16, 16), ncols=4)
    assert len(batch.axes) == 2 and _shown(batch, 1).shape == (16, 16, 3)


def test_image_grid_errors() -> None:
    with pytest.raises(ValueError, match="titles"):
        viz.image_grid([IMAGE, IMAGE], titles=["one"])
    with pytest.raises(ValueError, match="4-D batch"):
        viz.image_grid(IMAGE)
    with pytest.raises(ValueError, match="empty"):
        viz.image_grid([])
    with pytest.raises(ValueError, match="ncols"):
        viz.image_grid([IMAGE], ncols=0)


def test_blend_mask_colours_only_mask_pixels() -> None:
    mask = np.zeros((40, 48), bool)
    mask[10:20, 5:15] = True
    out = viz.blend(IMAGE, mask, alpha=0.25, color="yellow")
    image = IMAGE / 255.0
    assert out.shape == IMAGE.shape
    np.testing.assert_allclose(out[~mask], image[~mask])
    np.testing.assert_allclose(out[mask], 0.75 * image[mask] + 0.25 * np.array(to_rgb("yellow")))


def test_blend_map_is_scaled_coloured_and_mixed() -> None:
    saliency = RNG.random((40, 48)) * 7 - 2  # any range: min-max scaled for display
    np.testing.assert_allclose(viz.blend(IMAGE, saliency, alpha=0.0), IMAGE / 255.0)
    grey = viz.blend(IMAGE, saliency, alpha=1.0, cmap="gray")
    scaled = (saliency - saliency.min()) / np.ptp(saliency)
    np.testing.assert_allclose(grey[..., 0], scaled, atol=1 / 255)  # colormaps have 256 levels
    half = viz.blend(IMAGE, saliency, alpha=0.5, cmap="gray")
    np.testing.assert_allclose(half, 0.5 * IMAGE / 255.0 + 0.5 * grey)


def test_blend_low_resolution_map_is_resized_to_the_image() -> None:
    cam = torch.zeros(1, 4, 6)
    cam[..., 3:] = 1.0  # right half hot
    out = viz.blend(IMAGE, cam, alpha=1.0, cmap="gray")
    assert out.shape == IMAGE.shape
    np.testing.assert_allclose(out[:, :20], 0.0)
    np.testing.assert_allclose(out[:, 28:], 1.0)


def test_blend_errors() -> None:
    with pytest.raises(ValueError, match="mask_overlay"):
        viz.blend(IMAGE, np.zeros((8, 40, 48), bool))
    with pytest.raises(ValueError, match="alpha"):
        viz.blend(IMAGE, np.zeros((40, 48)), alpha=1.5)
    with pytest.raises(ValueError, match="NaN"):
        viz.blend(IMAGE, np.full((4, 4), np.nan))


def test_overlay_figure_keeps_image_shape_and_title() -> None:
    fig = viz.overlay(torch.from_numpy(IMAGE).permute(2, 0, 1), RNG.random((7, 7)), title="Grad-CAM")
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "Grad-CAM"
    assert _shown(fig).shape == IMAGE.shape


def _lesion_masks() -> np.ndarray:
    masks = np.zeros((8, 20, 24), dtype=np.float32)  # half resolution: resized to the image
    masks[0, 2:5, 2:5] = 1.0   # MA
    masks[2, 10:15, 10:20] = 0.9  # HaEx, as a probability map
    return masks


def test_blend_masks_paints_selected_lesions_in_their_colours() -> None:
    out = viz.blend_masks(IMAGE, _lesion_masks(), alpha=1.0)
    assert out.shape == IMAGE.shape
    np.testing.assert_allclose(out[6, 6], viz.lesion_colors["MA"])
    np.testing.assert_allclose(out[25, 30], viz.lesion_colors["HaEx"])
    np.testing.assert_allclose(out[38, 46], IMAGE[38, 46] / 255.0)
    only_haex = viz.blend_masks(IMAGE, _lesion_masks(), lesions=["HaEx"], alpha=1.0)
    np.testing.assert_allclose(only_haex[6, 6], IMAGE[6, 6] / 255.0)
    named = viz.blend_masks(IMAGE, _lesion_masks()[:3], names=["a", "b", "c"], alpha=1.0)
    assert not np.allclose(named[6, 6], IMAGE[6, 6] / 255.0)  # unknown names get a palette colour


def test_blend_masks_errors() -> None:
    with pytest.raises(ValueError, match="names="):
        viz.blend_masks(IMAGE, _lesion_masks()[:3])
    with pytest.raises(ValueError, match="not among"):
        viz.blend_masks(IMAGE, _lesion_masks(), lesions=["XX"])
    with pytest.raises(ValueError, match="L, H, W"):
        viz.blend_masks(IMAGE, _lesion_masks()[0])


def test_mask_overlay_legend_lists_the_painted_lesions() -> None:
    fig = viz.mask_overlay(IMAGE, torch.from_numpy(_lesion_masks()), lesions=["MA", "HaEx"], title="masks")
    ax = fig.axes[0]
    assert ax.get_title() == "masks" and _shown(fig).shape == IMAGE.shape
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MA", "HaEx"]
    assert viz.mask_overlay(IMAGE, _lesion_masks(), legend=False).axes[0].get_legend() is None


def test_confusion_matrix_plot_annotations_equal_counts() -> None:
    y_true = RNG.choice([0, 1, 3], 60)  # class 2 absent
    y_pred = RNG.choice([0, 1, 2, 3], 60)
    labels = ["none", "mild", "moderate", "severe"]
    fig = viz.confusion_matrix_plot(y_true, y_pred, labels=labels, title="DR")
    ax = fig.axes[0]
    shown = np.array([float(t.get_text()) for t in ax.texts]).reshape(4, 4)
    np.testing.assert_array_equal(shown, sk_confusion_matrix(y_true, y_pred, labels=range(4)))
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert ax.get_title() == "DR" and ax.get_xlabel() == "predicted"

    normalised = viz.confusion_matrix_plot(shown, normalize="true").axes[0]
    values = np.array([float(t.get_text()) for t in normalised.texts]).reshape(4, 4)
    np.testing.assert_allclose(values[[0, 1, 3]].sum(axis=1), 1.0, atol=0.03)  # 2-decimal rounding
    np.testing.assert_array_equal(values[2], 0.0)  # empty row shows 0, not NaN


def test_confusion_matrix_plot_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        viz.confusion_matrix_plot(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        viz.confusion_matrix_plot(np.eye(3), labels=["a", "b"])
    with pytest.raises(ValueError, match="normalize"):
        viz.confusion_matrix_plot(np.eye(3), normalize="rows")


def test_roc_curves_binary_matches_sklearn() -> None:
    y = RNG.integers(0, 2, 80)
    scores = RNG.random(80)
    fig = viz.roc_curves(y, scores, labels=["no DR", "DR"], title="referable")
    ax = fig.axes[0]
    assert len(ax.lines) == 2  # chance diagonal + one curve
    fpr, tpr, _ = roc_curve(y, scores)
    np.testing.assert_allclose(ax.lines[1].get_xdata(), fpr)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), tpr)
    assert ax.get_legend().get_texts()[0].get_text() == f"DR (AUC {roc_auc_score(y, scores):.3f})"


def test_roc_curves_per_class_with_an_absent_class() -> None:
    y = RNG.choice([0, 2], 50)
    scores = RNG.random((50, 3))
    ax = viz.roc_curves(torch.from_numpy(y), torch.from_numpy(scores)).axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == 3 and texts[1] == "class 1: not in y_true"
    assert texts[2] == f"class 2 (AUC {roc_auc_score(y == 2, scores[:, 2]):.3f})"
    with pytest.raises(ValueError, match="same length"):
        viz.roc_curves(y[:10], scores)


def _history() -> pd.DataFrame:
    epochs = np.arange(1, 6)
    return pd.DataFrame({"epoch": epochs, "train_loss": 1 / epochs, "train_seg": 1 / epochs,
                         "val_loss": 1.2 / epochs, "val_seg": 1.1 / epochs, "val_kappa": epochs / 10,
                         "val_acc": epochs / 8, "lr": [1e-3, 1e-3, 1e-3, 1e-4, 1e-4], "seconds": 1.0})


def test_learning_curves_panels() -> None:
    fig = viz.learning_curves(_history(), title="run")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "kappa", "acc", "learning rate"]
    loss_ax = fig.axes[0]
    np.testing.assert_allclose(loss_ax.lines[1].get_ydata(), _history()["val_loss"])
    assert fig.axes[3].get_yscale() == "log"

    only = viz.learning_curves(_history().drop(columns="lr"), metrics=["seg"])
    assert [ax.get_title() for ax in only.axes] == ["loss", "seg"]
    assert len(only.axes[1].lines) == 2  # train_seg and val_seg


def test_learning_curves_errors() -> None:
    with pytest.raises(ValueError, match="val_f1"):
        viz.learning_curves(_history(), metrics=["f1"])
    with pytest.raises(ValueError, match="epoch"):
        viz.learning_curves(_history().drop(columns="epoch"))


def test_single_panel_functions_draw_into_a_given_axes() -> None:
    from matplotlib.figure import Figure
    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert viz.overlay(IMAGE, np.ones((4, 4)), ax=left) is fig
    assert viz.confusion_matrix_plot(np.eye(2, dtype=int), ax=right) is fig
    assert len(fig.axes) == 2 and len(left.images) == 1


def test_set_style_registers_inline_display_of_figures_in_ipython() -> None:
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        viz.set_style(figure_format="jpeg")
        jpeg = shell.display_formatter.formatters["image/jpeg"]
        fig = viz.image_grid([np.zeros((4, 4, 3))])
        assert jpeg.lookup_by_type(type(fig)) is not None
        data = jpeg(fig)  # IPython may hand back the bytes base64-encoded
        raw = base64.b64decode(data) if isinstance(data, str) else data
        assert raw[:2] == b"\xff\xd8"  # a JPEG stream
    finally:
        InteractiveShell.clear_instance()

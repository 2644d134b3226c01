"""fundus_lib.widgets driven without a browser: setting a control's value re-renders, and the
state, title and pixels shown follow."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fundus_lib import viz, widgets  # noqa: E402

RNG = np.random.default_rng(0)
IMAGES = [(RNG.random((24, 32, 3)) * 255).astype(np.uint8) for _ in range(5)]
CAMS = [RNG.random((4, 4)) for _ in range(5)]


def _shown(explorer) -> np.ndarray:
    return np.asarray(explorer.figure.axes[0].images[0].get_array())


def test_image_explorer_slider_overlay_and_alpha_rerender() -> None:
    explorer = widgets.ImageExplorer(IMAGES, overlays={"cam": CAMS}, labels=[f"DR {i}" for i in range(5)])
    assert explorer.current == {"index": 0, "overlay": "cam", "alpha": 0.5, "title": "#0 | DR 0 | cam"}
    assert explorer.slider.max == 4 and explorer.overlay.options == ("none", "cam")
    first_png = explorer.png
    assert first_png.startswith(b"\x89PNG")

    explorer.slider.value = 3
    assert explorer.current["index"] == 3
    assert explorer.figure.axes[0].get_title() == "#3 | DR 3 | cam"
    assert explorer.png != first_png
    np.testing.assert_allclose(_shown(explorer), viz.blend(IMAGES[3], CAMS[3], alpha=0.5))

    explorer.alpha.value = 0.9
    np.testing.assert_allclose(_shown(explorer), viz.blend(IMAGES[3], CAMS[3], alpha=0.9))

    explorer.overlay.value = "none"
    assert explorer.figure.axes[0].get_title() == "#3 | DR 3"
    np.testing.assert_allclose(_shown(explorer), IMAGES[3] / 255.0)


def test_image_explorer_over_dataset_like_samples_with_mask_stacks() -> None:
    masks = np.zeros((5, 8, 24, 32), dtype=np.float32)
    masks[:, 2, 5:10, 5:10] = 1.0
    samples = [{"image": torch.from_numpy(IMAGES[i] / 255.0).permute(2, 0, 1), "masks": torch.from_numpy(masks[i])}
               for i in range(5)]
    explorer = widgets.ImageExplorer(samples, overlays=["masks"], alpha=1.0)
    legend = explorer.figure.axes[0].get_legend()
    assert len(legend.get_texts()) == 8
    np.testing.assert_allclose(_shown(explorer)[7, 7], viz.lesion_colors["HaEx"])
    explorer.slider.value = 4
    np.testing.assert_allclose(_shown(explorer), viz.blend_masks(samples[4]["image"], masks[4], alpha=1.0))


def test_image_explorer_from_a_callable() -> None:
    calls: list[int] = []

    def load(index: int) -> dict:
        calls.append(index)
        return {"image": IMAGES[index], "cam": CAMS[index]}

    explorer = widgets.ImageExplorer(load, n=5, overlays=["cam"], labels=lambda i: f"image {i}")
    explorer.slider.value = 2
    assert calls == [0, 2]
    assert explorer.current["title"] == "#2 | image 2 | cam"
    with pytest.raises(ValueError, match="n "):
        widgets.ImageExplorer(load)


def test_image_explorer_errors() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        widgets.ImageExplorer([])
    with pytest.raises(ValueError, match="overlays must be"):
        widgets.ImageExplorer(IMAGES, overlays="cam")
    with pytest.raises(ValueError, match="reserved"):
        widgets.ImageExplorer(IMAGES, overlays={"none": CAMS})
    with pytest.raises(ValueError, match="'masks' is not in the sample"):
        widgets.ImageExplorer([{"image": IMAGES[0]}], overlays=["masks"])
    with pytest.raises(ValueError, match="'image' is not in the sample"):
        widgets.ImageExplorer([{"picture": IMAGES[0]}])
    with pytest.raises(ValueError, match="exceeds"):
        widgets.ImageExplorer(IMAGES, n=6)
    with pytest.raises(ValueError, match="sequence"):
        widgets.ImageExplorer(IMAGES, overlays={"cam": 3})


def test_explorer_displays_as_a_widget() -> None:
    explorer = widgets.ImageExplorer(IMAGES[:2])
    assert explorer.overlay.value == "none"
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert isinstance(explorer.widget, ipywidgets.VBox)


def test_parameter_explorer_reruns_func_on_slider_change() -> None:
    calls: list[dict] = []

    def brighten(image: np.ndarray, gain: float = 1.0, invert: bool = False) -> np.ndarray:
        calls.append({"gain": gain, "invert": invert})
        out = np.clip(image.astype(np.float64) / 255.0 * gain, 0, 1)
        return 1 - out if invert else out

    explorer = widgets.ParameterExplorer(brighten, IMAGES[0], gain=(0.5, 2.0, 0.25), invert=False)
    assert isinstance(explorer.controls["gain"], ipywidgets.FloatSlider)
    assert isinstance(explorer.controls["invert"], ipywidgets.Checkbox)
    assert len(calls) == 1 and explorer.params == explorer.current == calls[0]
    titles = [ax.get_title() for ax in explorer.figure.axes]
    assert titles == ["input", f"brighten(gain={calls[0]['gain']:.3g}, invert=False)"]

    explorer.controls["gain"].value = 2.0
    assert calls[-1] == {"gain": 2.0, "invert": False}
    np.testing.assert_allclose(explorer.result, np.clip(IMAGES[0] / 255.0 * 2.0, 0, 1))
    np.testing.assert_allclose(np.asarray(explorer.figure.axes[1].images[0].get_array()), explorer.result)
    explorer.controls["invert"].value = True
    assert explorer.figure.axes[1].get_title() == "brighten(gain=2, invert=True)"


def test_parameter_explorer_options_and_errors() -> None:
    slider = ipywidgets.IntSlider(value=3, min=1, max=9, description="kernel")
    explorer = widgets.ParameterExplorer(lambda image, k: image, IMAGES[0], show_input=False, k=slider)
    assert explorer.controls["k"] is slider and len(explorer.figure.axes) == 1
    assert explorer.params == {"k": 3}
    with pytest.raises(ValueError, match="at least one"):
        widgets.ParameterExplorer(lambda image: image, IMAGES[0])
    with pytest.raises(ValueError, match="cannot make a control"):
        widgets.ParameterExplorer(lambda image, k: image, IMAGES[0], k=object())
    with pytest.raises(ValueError, match="callable"):
        widgets.ParameterExplorer("not a function", IMAGES[0], k=(1, 3))


def test_the_module_docstring_examples_run() -> None:
    """The three lines after ``Example::`` in fundus_lib.widgets, on a dataset-like list of samples."""
    from fundus_lib import preprocess

    example = widgets.__doc__.split("Example::")[1].split("\n\n")[1]
    lines = [line.strip() for line in example.splitlines() if line.strip()]
    assert len(lines) == 3
    masks = torch.zeros(8, 24, 32)
    dataset = [{"image": torch.from_numpy(IMAGES[i] / 255.0).permute(2, 0, 1).float(), "masks": masks, "dr": i % 5}
               for i in range(5)]
    namespace = {"ImageExplorer": widgets.ImageExplorer, "ParameterExplorer": widgets.ParameterExplorer,
                 "preprocess": preprocess, "dataset": dataset, "images": IMAGES, "cams": CAMS, "saliency": CAMS,
                 "image": IMAGES[0]}
    explorers = [eval(line, namespace) for line in lines]  # noqa: S307 - the module's own example
    assert explorers[0].current["title"].endswith("DR 0 | masks")
    clahe = explorers[2]
    clahe.controls["clip"].value = 4.0
    np.testing.assert_array_equal(clahe.result, preprocess.clahe_green(IMAGES[0], clip=4.0, tiles=clahe.params["tiles"]))

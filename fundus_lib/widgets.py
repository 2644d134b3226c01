"""ipywidgets explorers for the notebooks: browse images with their overlays, and turn the
parameters of an image function into sliders.

Both explorers render with :mod:`fundus_lib.viz` into an ``ipywidgets.Image`` holding PNG bytes,
so they work in JupyterLab and classic notebooks and can be driven without a browser: set a
control's ``value`` and the picture re-renders (``explorer.slider.value = 3``); ``current``,
``figure`` and ``png`` expose what is shown, which is how the unit tests check them. Display an
explorer by leaving it as a cell's last value (or ``display(explorer)``).

Example::

    ImageExplorer(dataset, overlays=["masks"], labels=lambda i: f"DR {dataset[i]['dr']}")
    ImageExplorer(images, overlays={"Grad-CAM": cams, "GMSM": saliency})
    ParameterExplorer(preprocess.clahe_green, image, clip=(0.5, 4.0, 0.5), tiles=(2, 16, 2))

(tests/unit/test_widgets.py runs these three lines.)
"""
from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from fundus_lib import viz
from fundus_lib.metrics import as_numpy

NO_OVERLAY = "none"


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of a figure (rendered off-screen; no GUI, no pyplot state)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class _FigureView:
    """Shared plumbing: an ``ipywidgets.Image`` showing the last rendered figure, a layout box,
    and notebook display through that box."""

    def __init__(self, dpi: int) -> None:
        self.dpi = dpi
        self.view = widgets.Image(format="png")
        self.figure: Figure | None = None
        self.widget: widgets.Box = widgets.VBox([self.view])

    def _show(self, fig: Figure) -> Figure:
        self.figure = fig
        self.view.value = figure_png(fig, self.dpi)
        return fig

    @property
    def png(self) -> bytes:
        """PNG bytes currently displayed."""
        return bytes(self.view.value)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)


def _indexed(source: Any, name: str) -> Callable[[int], Any]:
    """``source[i]`` for an indexable (list, array, Dataset) or ``source(i)`` for a callable."""
    if callable(source) and not hasattr(source, "__getitem__"):
        return source
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return source.__getitem__
    raise ValueError(f"{name} must be a sequence (list, array, Dataset) or a callable(index), "
                     f"got {type(source).__name__}")


class ImageExplorer(_FigureView):
    """Browse images with an index slider, an overlay selector and an opacity slider.

    ``images`` is an indexable of images or of sample dicts with an ``"image"`` key (for instance
    a :class:`~fundus_lib.data.datasets.FundusDataset`), or a callable ``index -> image or dict``
    together with ``n``. ``overlays`` is either a list of keys of those dicts (e.g. ``["masks"]``),
    or a mapping ``name -> indexable or callable(index)`` of maps computed elsewhere (attention,
    saliency). A 2-D overlay is drawn with :func:`viz.overlay` (``cmap``; boolean masks in one
    colour); an (L, H, W) stack with :func:`viz.mask_overlay` (one colour per lesion; ``names``
    labels its channels, default the 8 lesions). ``labels`` (a sequence or callable(index)) adds a
    caption to each title. ``normalized=True`` shows ImageNet-normalised network inputs.
    """

    def __init__(self, images: Sequence[Any] | Callable[[int], Any], *, n: int | None = None,
                 overlays: Sequence[str] | Mapping[str, Any] | None = None,
                 labels: Sequence[str] | Callable[[int], str] | None = None,
                 names: Sequence[str] | None = None, alpha: float = 0.5, cmap: str = "jet",
                 normalized: bool = False, size: float = 4.0, dpi: int = 80) -> None:
        super().__init__(dpi)
        if callable(images) and not hasattr(images, "__getitem__"):
            if n is None:
                raise ValueError("n (the number of images) is required when images is a callable")
        elif n is None:
            n = len(images)
        elif n > len(images):
            raise ValueError(f"n={n} exceeds the {len(images)} images given")
        self.n = n
        if self.n < 1:
            raise ValueError(f"there must be at least one image, got n={self.n}")
        self._load = _indexed(images, "images")
        self._overlays = self._overlay_getters(overlays)
        self._labels = None if labels is None else _indexed(labels, "labels")
        self.names, self.cmap, self.normalized, self.size = names, cmap, normalized, size

        self.slider = widgets.IntSlider(value=0, min=0, max=self.n - 1, description="image",
                                        continuous_update=False)
        options = [NO_OVERLAY, *self._overlays]
        self.overlay = widgets.Dropdown(options=options, value=options[min(1, len(options) - 1)],
                                        description="overlay")
        self.alpha = widgets.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="alpha",
                                         continuous_update=False)
        self.widget = widgets.VBox([widgets.HBox([self.slider, self.overlay, self.alpha]), self.view])
        for control in (self.slider, self.overlay, self.alpha):
            control.observe(lambda _change: self.render(), names="value")
        self.render()

    @staticmethod
    def _overlay_getters(overlays: Sequence[str] | Mapping[str, Any] | None
                         ) -> dict[str, Callable[[int, Any], Any]]:
        """name -> getter(index, sample) for both ways of naming overlays."""
        if overlays is None:
            return {}
        if isinstance(overlays, str) or not all(isinstance(key, str) for key in overlays):
            raise ValueError("overlays must be a list of sample keys or a mapping name -> maps, "
                             f"got {overlays!r}")
        if NO_OVERLAY in overlays:
            raise ValueError(f"{NO_OVERLAY!r} is reserved for 'no overlay'; rename that overlay")
        if isinstance(overlays, Mapping):
            getters = {}
            for name, source in overlays.items():
                load = _indexed(source, f"overlays[{name!r}]")
                getters[name] = lambda index, _sample, load=load: load(index)
            return getters
        return {key: lambda _index, sample, key=key: ImageExplorer._sample_key(sample, key) for key in overlays}

    @staticmethod
    def _sample_key(sample: Any, key: str) -> Any:
        if not isinstance(sample, Mapping) or key not in sample:
            keys = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
            raise ValueError(f"key {key!r} is not in the sample (it has {keys})")
        return sample[key]

    @property
    def current(self) -> dict[str, Any]:
        """The state shown: ``index``, ``overlay`` name, ``alpha`` and the figure ``title``."""
        return {"index": self.slider.value, "overlay": self.overlay.value, "alpha": self.alpha.value,
                "title": self._title(self.slider.value, self.overlay.value)}

    def _title(self, index: int, overlay: str) -> str:
        parts = [f"#{index}"]
        if self._labels is not None:
            parts.append(str(self._labels(index)))
        if overlay != NO_OVERLAY:
            parts.append(overlay)
        return " | ".join(parts)

    def render(self) -> Figure:
        """Draw the current image and overlay, show it, and return the figure."""
        index, overlay = self.slider.value, self.overlay.value
        sample = self._load(index)
        image = self._sample_key(sample, "image") if isinstance(sample, Mapping) else sample
        title = self._title(index, overlay)
        common = dict(title=title, normalized=self.normalized, size=self.size)
        if overlay == NO_OVERLAY:
            fig = viz.image_grid([image], [title], ncols=1, normalized=self.normalized, size=self.size)
        else:
            layer = as_numpy(self._overlays[overlay](index, sample), f"overlay {overlay!r}")
            if layer.ndim == 3 and layer.shape[0] > 1:
                fig = viz.mask_overlay(image, layer, names=self.names, alpha=self.alpha.value, **common)
            else:
                fig = viz.overlay(image, layer, alpha=self.alpha.value, cmap=self.cmap, **common)
        return self._show(fig)


class ParameterExplorer(_FigureView):
    """Sliders for the keyword parameters of ``func(image, **params) -> image``; every change
    re-runs ``func`` and shows the input next to the result.

    Each keyword of ``sliders`` is an ipywidgets control or an ``interact`` abbreviation:
    ``(min, max[, step])`` gives an Int/FloatSlider, a list a Dropdown, a bool a Checkbox. The
    controls are in ``explorer.controls``; ``params`` and ``result`` hold the last call.
    """

    def __init__(self, func: Callable[..., Any], image: Any, *, show_input: bool = True,
                 normalized: bool = False, size: float = 4.0, dpi: int = 80, **sliders: Any) -> None:
        super().__init__(dpi)
        if not callable(func):
            raise ValueError(f"func must be callable, got {type(func).__name__}")
        if not sliders:
            raise ValueError("give at least one parameter slider, e.g. clip=(0.5, 4.0, 0.5)")
        self.func, self.image = func, image
        self.show_input, self.normalized, self.size = show_input, normalized, size
        self.controls: dict[str, widgets.ValueWidget] = {}
        for name, abbrev in sliders.items():
            control = widgets.interactive.widget_from_abbrev(abbrev)
            if control is None:
                raise ValueError(f"cannot make a control for {name}={abbrev!r}; pass a widget, "
                                 "(min, max[, step]), a list of options or a bool")
            control.description = control.description or name
            control.continuous_update = False
            control.observe(lambda _change: self.render(), names="value")
            self.controls[name] = control
        self.params: dict[str, Any] = {}
        self.result: Any = None
        self.widget = widgets.VBox([widgets.HBox(list(self.controls.values())), self.view])
        self.render()

    @property
    def current(self) -> dict[str, Any]:
        """The controls' values (the parameters of the next call)."""
        return {name: control.value for name, control in self.controls.items()}

    def render(self) -> Figure:
        """Call ``func(image, **params)`` with the current values, show and return the figure."""
        self.params = self.current
        self.result = self.func(self.image, **self.params)
        name = getattr(self.func, "__name__", type(self.func).__name__)
        title = f"{name}(" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in self.params.items()) + ")"
        images, titles = [self.result], [title]
        if self.show_input:
            images, titles = [self.image, self.result], ["input", title]
        fig = viz.image_grid(images, titles, ncols=len(images), normalized=self.normalized, size=self.size)
        return self._show(fig)

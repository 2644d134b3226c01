"""The o_O regression network: ELLG's "DR detection net" (Lin et al., IJCAI-W 2020, Sec. 2.1, 3.1).

ELLG keeps the DR detection net of Team o_O's Kaggle 2015 solution [Antony and Brüggemann, 2016]
unchanged: a regression CNN whose single linear output is the DR severity, mapped to grades by
thresholds. The paper describes it only as "three convolutional blocks with output sizes 27x27,
13x13, 6x6 and the subsequent classifier" fed with 512 px images and trained at 128, 256 and 512
px; the layer list is the original solution's "net B" (all filters 4x4), read from its released
code (``sveitser/kaggle_diabetic``, ``configs/c_512_4x4_32.py``, ``layers.py``,
``solution_outline.md``) and distilled in ``shared/spec/ellg.md``:

=====  ==========================  ==============  =========================================
block  layers (width n = 32)       sizes at 448    notes
=====  ==========================  ==============  =========================================
1      Conv n /2, Conv n, MaxPool  224, 225, 112   MaxPool 3 / stride 2 after blocks 1-4
2      Conv 2n /2, Conv 2n x2, MP  56, 57, 56, 27  paper's first block output: 27 x 27
3      Conv 4n x3, MaxPool         28, 27, 28, 13  paper's second block output: 13 x 13
4      Conv 8n x3, MaxPool         14, 13, 14, 6   paper's third block output: 6 x 6
5      Conv 16n                    5
head   RMSPool 3 / 2, Dropout .5, Dense 1024 + maxout 2, Dropout .5, Dense 1024 + maxout 2, Dense 1
=====  ==========================  ==============  =========================================

Details taken from the original code (the ELLG paper and the spec are silent on them):

* **Input size.** The paper says the net "takes 512 x 512 fundus images"; the original net sees
  448 x 448 crops of the 512 px images, and only a 448 input gives the block sizes the paper
  itself quotes (27, 13, 6; a 512 input would give 31, 15, 7). ``input_size=448`` is the default.
* **Padding.** Lasagne's cuDNN ``'same'`` pads an even 4x4 filter by ``(4 - 1) // 2 = 1``; the
  configuration alternates it with an explicit ``pad=2``, hence the 224/225/112 sizes above.
* **LeakyReLU 0.01** after every convolution and after both hidden dense layers (before the
  maxout; the two commute because LeakyReLU is monotonic). The last dense layer is linear.
* **Maxout** (Lasagne ``FeaturePoolLayer``, pool 2) takes the max of consecutive unit pairs.
* **RMS pooling** ``sqrt(avg_pool(x^2) + 1e-12)``, 3 x 3, stride 2 (the solution outline's table
  prints filter 4 for net B, but the code uses 3 / 2, the only choice that gives its size 2).
* **Untied biases** ("The convolutional networks have untied biases", report and outline): every
  convolution has one bias per channel *and pixel*. ``untied_biases=False`` gives the usual
  per-channel biases (8.18 M parameters at 448 instead of 12.47 M).
* **Initialisation**: orthogonal weights (gain 1) and biases 0.05 for the convolutions and hidden
  dense layers; Glorot-uniform weights and a zero bias for the output (Lasagne's defaults).

**Stage-wise training** (solution outline, "Training"; ELLG Sec. 3.1 "resized to 512, 256 and
128 respectively for the three-part training"): 128 px images (112 crops) train blocks 1-3 plus
the head, 256 px images (224 crops) blocks 1-4 with blocks 1-3 initialised from the previous
stage, 512 px images (448 crops) all blocks with blocks 1-4 initialised. :data:`STAGES` lists the
stages; :func:`transfer_conv_weights` copies the convolution weights between them.

**Grades from the regression output.** Training minimises the mean squared error between
``score`` and the grade; :func:`apply_thresholds` maps scores to grades (the original solution
used ``(0.5, 1.5, 2.5, 3.5)``) and :func:`fit_thresholds` fits thresholds that maximise the
quadratic kappa on *validation* predictions (never test predictions).

``OONet.forward(x)`` returns ``{"score": (B,)}``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fundus_lib.metrics import ArrayLike, as_numpy

#: Leak of every LeakyReLU (Lasagne's ``leaky_rectify``).
LEAK = 0.01
#: Initial value of the convolution and hidden dense biases.
BIAS_INIT = 0.05
#: Units of the two hidden dense layers (each followed by a maxout of pool 2).
DENSE_UNITS = 1024
MAXOUT_POOL = 2
#: Epsilon inside the square root of RMS pooling (original ``RMSPoolLayer``).
RMS_EPS = 1e-12
#: Image size (px) -> (n_blocks, crop size fed to the network) of the original three stages.
STAGES: dict[int, tuple[int, int]] = {128: (3, 112), 256: (4, 224), 512: (5, 448)}
#: Thresholds of the original solution: score < 0.5 -> grade 0, [0.5, 1.5) -> 1, ...
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 1.5, 2.5, 3.5)

# Every 4x4 convolution of net B, block by block: (channels as a multiple of the width, stride, padding).
_CONVS: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((1, 2, 1), (1, 1, 2)),
    ((2, 2, 1), (2, 1, 2), (2, 1, 1)),
    ((4, 1, 2), (4, 1, 1), (4, 1, 2)),
    ((8, 1, 2), (8, 1, 1), (8, 1, 2)),
    ((16, 1, 1),),
)
MAX_BLOCKS = len(_CONVS)
_FILTER = 4
_POOL = (3, 2)  # size, stride of the max and RMS pools
_SPATIAL = ("conv", "maxpool", "rmspool")


@dataclass(frozen=True)
class LayerPlan:
    """One row of the architecture: ``name`` is the module's path inside :class:`OONet`."""

    name: str
    kind: str  # conv | maxpool | rmspool | dropout | dense | maxout | output
    in_units: int  # input channels (spatial layers) or features
    units: int  # output channels or features
    kernel: int | None = None  # filter / pool size
    stride: int | None = None
    padding: int | None = None
    size: int | None = None  # output height = width of spatial layers

    def n_params(self, untied_biases: bool) -> int:
        """Parameters of this layer (untied convolution biases: one per channel and pixel)."""
        if self.kind == "conv":
            biases = self.units * self.size ** 2 if untied_biases else self.units
            return self.in_units * self.units * self.kernel ** 2 + biases
        if self.kind in ("dense", "output"):
            return self.in_units * self.units + self.units
        return 0


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")


def _spatial_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def architecture(n_blocks: int = MAX_BLOCKS, input_size: int = 448, width: int = 32) -> list[LayerPlan]:
    """The layers of the o_O net with ``n_blocks`` convolution blocks for ``input_size`` x ``input_size`` inputs.

    Raises a ValueError naming ``input_size`` when a layer would have no output pixel (or the RMS
    pool no 3 x 3 window).
    """
    _check_int("n_blocks", n_blocks, 1, MAX_BLOCKS)
    _check_int("input_size", input_size, 1)
    _check_int("width", width, 1)
    rows: list[LayerPlan] = []
    channels, size = 3, input_size

    def spatial(name: str, kind: str, units: int, kernel: int, stride: int, padding: int) -> None:
        nonlocal channels, size
        size = _spatial_size(size, kernel, stride, padding)
        if size < 1:
            raise ValueError(f"input_size={input_size} is too small for n_blocks={n_blocks}: "
                             f"{name} would have no output pixel")
        rows.append(LayerPlan(name, kind, channels, units, kernel, stride, padding, size))
        channels = units

    for b, convs in enumerate(_CONVS[:n_blocks], start=1):
        for i, (multiple, stride, padding) in enumerate(convs, start=1):
            spatial(f"features.block{b}.conv{i}", "conv", multiple * width, _FILTER, stride, padding)
        if b < n_blocks:
            spatial(f"features.block{b}.pool", "maxpool", channels, *_POOL, 0)
    spatial("head.rmspool", "rmspool", channels, *_POOL, 0)
    features = channels * size ** 2
    maxout_units = DENSE_UNITS // MAXOUT_POOL
    rows += [
        LayerPlan("head.dropout1", "dropout", features, features),
        LayerPlan("head.dense1", "dense", features, DENSE_UNITS),
        LayerPlan("head.maxout1", "maxout", DENSE_UNITS, maxout_units, MAXOUT_POOL),
        LayerPlan("head.dropout2", "dropout", maxout_units, maxout_units),
        LayerPlan("head.dense2", "dense", maxout_units, DENSE_UNITS),
        LayerPlan("head.maxout2", "maxout", DENSE_UNITS, maxout_units, MAXOUT_POOL),
        LayerPlan("head.output", "output", maxout_units, 1),
    ]
    return rows


def layer_table(n_blocks: int = MAX_BLOCKS, input_size: int = 448, width: int = 32,
                untied_biases: bool = True) -> pd.DataFrame:
    """The architecture as a table for the notebook: one row per layer with its output shape and parameters."""
    rows = architecture(n_blocks, input_size, width)
    return pd.DataFrame({
        "layer": [r.name for r in rows],
        "type": [r.kind for r in rows],
        "filter": [r.kernel for r in rows],
        "stride": [r.stride for r in rows],
        "padding": [r.padding for r in rows],
        "output": [f"{r.units}x{r.size}x{r.size}" if r.kind in _SPATIAL else str(r.units) for r in rows],
        "parameters": [r.n_params(untied_biases) for r in rows],
    }).astype({"filter": "Int64", "stride": "Int64", "padding": "Int64"})


def parameter_count(n_blocks: int = MAX_BLOCKS, input_size: int = 448, width: int = 32,
                    untied_biases: bool = True) -> int:
    """Number of parameters of the net (12,465,121 for the original 512 px net; 8,181,633 with tied biases)."""
    return sum(r.n_params(untied_biases) for r in architecture(n_blocks, input_size, width))


class LeakyConv2d(nn.Conv2d):
    """4x4 convolution + LeakyReLU(0.01); ``untied_size`` gives one bias per channel and output pixel."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, padding: int,
                 untied_size: int | None = None) -> None:
        super().__init__(in_channels, out_channels, _FILTER, stride, padding, bias=untied_size is None)
        self.untied_bias = (None if untied_size is None
                            else nn.Parameter(torch.empty(out_channels, untied_size, untied_size)))

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.untied_bias is not None:
            y = y + self.untied_bias
        return F.leaky_relu(y, LEAK)


class LeakyDense(nn.Linear):
    """Dense layer + LeakyReLU(0.01) on the flattened input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(super().forward(x.flatten(1)), LEAK)


class RMSPool2d(nn.Module):
    """Root-mean-square pooling ``sqrt(avg_pool(x^2) + 1e-12)`` (Dieleman et al.'s ``RMSPoolLayer``)."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Tensor) -> Tensor:
        return torch.sqrt(F.avg_pool2d(x * x, self.kernel_size, self.stride) + RMS_EPS)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class Maxout(nn.Module):
    """Maxout over groups of ``pool_size`` consecutive features (Lasagne ``FeaturePoolLayer``)."""

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(1, (-1, self.pool_size)).amax(dim=2)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"


def _module(row: LayerPlan, dropout: float, untied_biases: bool) -> nn.Module:
    if row.kind == "conv":
        return LeakyConv2d(row.in_units, row.units, row.stride, row.padding, row.size if untied_biases else None)
    if row.kind == "maxpool":
        return nn.MaxPool2d(row.kernel, row.stride)
    if row.kind == "rmspool":
        return RMSPool2d(row.kernel, row.stride)
    if row.kind == "dropout":
        return nn.Dropout(dropout)
    if row.kind == "dense":
        return LeakyDense(row.in_units, row.units)
    if row.kind == "maxout":
        return Maxout(row.kernel)
    return nn.Linear(row.in_units, row.units)


def _initialise(module: nn.Module) -> None:
    """Orthogonal weights and 0.05 biases; the linear output layer gets Glorot-uniform weights and a zero bias."""
    if isinstance(module, (LeakyConv2d, LeakyDense)):
        nn.init.orthogonal_(module.weight, gain=1.0)
        for bias in (module.bias, getattr(module, "untied_bias", None)):
            if bias is not None:
                nn.init.constant_(bias, BIAS_INIT)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class OONet(nn.Module):
    """The o_O DR detection net (see the module docstring for the layer table and its sources).

    Args:
        n_blocks: convolution blocks, 5 for the final 512 px net (3 and 4: the 128 and 256 px stages).
        input_size: height = width of the input crops (448 for 512 px images; see :data:`STAGES`).
        width: channels of the first block (32 in the original; smaller for CPU runs).
        dropout: dropout probability before each hidden dense layer (0.5).
        untied_biases: one convolution bias per channel and pixel, as in the original.

    ``forward(x)`` takes (B, 3, input_size, input_size) images and returns ``{"score": (B,)}``,
    the regressed severity. Convolution blocks are ``features.block1`` .. ``features.block<n>``
    (:attr:`block_names`), each ending with its max pool except the last; at 448 px the outputs of
    blocks 2, 3, 4 are the paper's 27 x 27, 13 x 13 and 6 x 6 blocks, the layers that
    :func:`fundus_lib.explain.gmsm` fuses.
    """

    def __init__(self, n_blocks: int = MAX_BLOCKS, input_size: int = 448, width: int = 32,
                 dropout: float = 0.5, untied_biases: bool = True) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_blocks, self.input_size, self.width = n_blocks, input_size, width
        self.untied_biases = untied_biases
        blocks: dict[str, OrderedDict[str, nn.Module]] = OrderedDict()
        head: OrderedDict[str, nn.Module] = OrderedDict()
        for row in architecture(n_blocks, input_size, width):
            part, *path = row.name.split(".")
            module = _module(row, dropout, untied_biases)
            if part == "features":
                blocks.setdefault(path[0], OrderedDict())[path[1]] = module
            else:
                head[path[0]] = module
        self.features = nn.Sequential(OrderedDict((name, nn.Sequential(layers)) for name, layers in blocks.items()))
        self.head = nn.Sequential(head)
        self.apply(_initialise)

    @property
    def block_names(self) -> tuple[str, ...]:
        """Dotted names of the convolution blocks, for :mod:`fundus_lib.explain`."""
        return tuple(f"features.{name}" for name in self.features._modules)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        expected = (3, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"OONet was built for input_size={self.input_size}: images must be "
                             f"(B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return {"score": self.head(self.features(x)).squeeze(1)}


def transfer_conv_weights(source: OONet, target: OONet) -> list[str]:
    """Initialise ``target``'s convolution blocks from a smaller trained ``source`` (stage-wise training).

    Copies every ``features.*`` parameter whose name and shape agree and returns the copied names.
    As with the original ``--weights_from`` loader, which skipped shape mismatches, untied biases
    of a different input size and the dense head (whose input size changes) keep their
    initialisation. Raises a ValueError when nothing matches (e.g. different ``width``).
    """
    source_state = source.state_dict()
    copied: list[str] = []
    with torch.no_grad():
        for name, parameter in target.named_parameters():
            match = source_state.get(name)
            if name.startswith("features.") and match is not None and match.shape == parameter.shape:
                parameter.copy_(match)
                copied.append(name)
    if not copied:
        raise ValueError(f"no convolution weights of source (width={source.width}) fit target "
                         f"(width={target.width}); build both with the same width")
    return copied


# --------------------------------------------------------------------------------------------
# regression scores -> grades
# --------------------------------------------------------------------------------------------

def _check_thresholds(thresholds: ArrayLike, name: str = "thresholds") -> np.ndarray:
    t = as_numpy(thresholds, name).astype(np.float64)
    if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0):
        raise ValueError(f"{name} must be a non-empty, finite, non-decreasing 1-D sequence, got {t.tolist()}")
    return t


def _check_scores(scores: ArrayLike) -> np.ndarray:
    s = as_numpy(scores, "scores").astype(np.float64)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be a non-empty 1-D array of finite values, got shape {s.shape}")
    return s


def apply_thresholds(scores: ArrayLike, thresholds: ArrayLike = DEFAULT_THRESHOLDS) -> np.ndarray:
    """Grades from regression scores: the number of thresholds ``<= score`` (ELLG's ``classify()``, Eq. 6).

    With the default ``(0.5, 1.5, 2.5, 3.5)``: 0.49 -> 0, 0.5 -> 1, 3.7 -> 4.
    """
    return np.searchsorted(_check_thresholds(thresholds), _check_scores(scores), side="right").astype(np.int64)


def _batched_kappa(confusions: np.ndarray) -> np.ndarray:
    """Quadratic weighted kappa of each (K, K) confusion matrix in a (M, K, K) stack (NaN when undefined)."""
    k = confusions.shape[-1]
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2
    n = confusions.sum(axis=(1, 2))
    expected = confusions.sum(axis=2)[:, :, None] * confusions.sum(axis=1)[:, None, :] / n[:, None, None]
    observed = (weights * confusions).sum(axis=(1, 2))
    chance = (weights * expected).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(chance > 0, 1.0 - observed / chance, np.nan)


def _best_threshold(scores: np.ndarray, grades: np.ndarray, thresholds: np.ndarray, j: int, n_classes: int) -> float:
    """The value of threshold ``j`` (between grades j and j + 1) that maximises kappa, the others fixed.

    Only the scores between the neighbouring thresholds can change grade; splitting them (sorted)
    after each of their k lowest values enumerates every distinct outcome, and the confusion
    matrices of all splits come from one cumulative sum. The current value is kept unless a split
    is strictly better; new values are midpoints between scores (half a grade beyond the most
    extreme score when the threshold has no neighbour on that side).
    """
    lo = thresholds[j - 1] if j > 0 else -np.inf
    hi = thresholds[j + 1] if j + 1 < thresholds.size else np.inf
    window = (scores >= lo) & (scores < hi)
    if not window.any():
        return float(thresholds[j])
    order = np.argsort(scores[window], kind="stable")
    s, y = scores[window][order], grades[window][order]
    predicted = np.searchsorted(thresholds, scores[~window], side="right")
    base = np.bincount(grades[~window] * n_classes + predicted, minlength=n_classes ** 2).reshape(n_classes, n_classes)
    below = np.vstack([np.zeros(n_classes), np.cumsum(np.eye(n_classes)[y], axis=0)])  # true counts of the k lowest
    confusions = np.repeat(base[None].astype(np.float64), s.size + 1, axis=0)
    confusions[:, :, j] += below
    confusions[:, :, j + 1] += below[-1] - below
    kappas = _batched_kappa(confusions)
    distinct = np.ones(s.size + 1, dtype=bool)
    distinct[1:-1] = s[:-1] < s[1:]  # a split between equal scores is not realisable
    kappas = np.where(distinct & np.isfinite(kappas), kappas, -np.inf)
    current = int(np.sum(s < thresholds[j]))
    best = int(np.argmax(kappas))
    if kappas[best] <= kappas[current]:
        return float(thresholds[j])
    low_end = s[0] - 0.5 if np.isinf(lo) else (lo + s[0]) / 2
    high_end = s[-1] + 0.5 if np.isinf(hi) else (s[-1] + hi) / 2
    edges = np.concatenate([[low_end], (s[:-1] + s[1:]) / 2, [high_end]])
    return float(edges[best])


def fit_thresholds(scores: ArrayLike, grades: ArrayLike, n_classes: int = 5,
                   initial: ArrayLike | None = None, max_sweeps: int = 100) -> np.ndarray:
    """Thresholds that maximise the quadratic kappa of :func:`apply_thresholds` on **validation** predictions.

    Coordinate ascent: each threshold in turn moves to its exactly best position given the others
    (see :func:`_best_threshold`), sweeping until a full sweep changes nothing. Kappa never
    decreases, so the search stops at thresholds that no single move improves (a local optimum,
    starting from ``initial``, by default ``(0.5, 1.5, ...)``, the original solution's thresholds).
    Fit on the validation split only: thresholds fitted on the test split inflate its kappa.
    """
    s = _check_scores(scores)
    _check_int("n_classes", n_classes, 2)
    _check_int("max_sweeps", max_sweeps, 1)
    y = as_numpy(grades, "grades")
    if y.shape != s.shape or not np.all(np.isin(y, np.arange(n_classes))):
        raise ValueError(f"grades must be {s.size} integer grades in [0, {n_classes}), one per score")
    y = y.astype(np.int64)
    if np.unique(y).size < 2:
        raise ValueError("grades hold a single class: kappa is undefined, there is nothing to fit")
    t = _check_thresholds(np.arange(1, n_classes) - 0.5 if initial is None else initial, "initial").copy()
    if t.size != n_classes - 1:
        raise ValueError(f"initial must hold n_classes - 1 = {n_classes - 1} thresholds, got {t.size}")
    for _ in range(max_sweeps):
        before = t.copy()
        for j in range(t.size):
            t[j] = _best_threshold(s, y, t, j, n_classes)
        if np.array_equal(before, t):
            break
    return t

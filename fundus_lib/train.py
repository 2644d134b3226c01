"""One training loop for every model in the project: :func:`fit`, :func:`evaluate`, :func:`predict`.

Conventions that let one loop serve classification, regression, segmentation, super-resolution
and multi-task models:

* a batch is a dict (``FundusDataset`` and ``TensorLoader`` yield ``image``, ``dr``, ``masks``, ...);
* the model is called as ``model(batch[input_key])`` and returns a dict of named outputs;
* a loss is ``loss_fn(outputs, batch) -> Tensor`` or ``-> (Tensor, {part_name: Tensor})``;
* validation metrics are ``metrics_fn(outputs, targets) -> {name: float}`` on NumPy arrays.

:func:`fit` adds what every paper's training needs and students should not re-write: progress
bars, gradient clipping, per-batch or per-epoch schedulers, early stopping and best-checkpoint
selection on the **validation** split (never the test split), atomic checkpoints with exact
resume, a clear stop on a non-finite or diverging loss, bf16 autocast + channels_last on CUDA,
optional ``torch.compile``, and DistributedDataParallel when launched with ``torchrun``.

The GPU, not the loop, should be the bottleneck: nothing in a training step reads a value back
to the host. Loss sums and the "was any loss non-finite, and where first" flag live on the
device (:class:`EpochMeter`) and are read once per epoch and every ``check_every`` batches.
The pieces — :func:`train_one_epoch`, :func:`validate`, :class:`ModelSelection`,
:func:`save_checkpoint` / :func:`load_checkpoint` — are small enough to read with ``show_source``.
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from fundus_lib.utils import atomic_write, choose_device

LossFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], "torch.Tensor | tuple[torch.Tensor, dict]"]
MetricsFn = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], Mapping[str, float]]
SchedulerArg = Any  # an LRScheduler / ReduceLROnPlateau, or a factory (optimizer, total_steps) -> scheduler
Callback = Callable[[int, dict, nn.Module], None]

#: Default number of batches between two reads of the device-side non-finite flag. One read
#: waits for the GPU to drain its queue once; every 100 batches that costs well under 1 %.
CHECK_EVERY = 100
#: Default divergence threshold: an epoch's mean training loss above this multiple of the first
#: batch's loss stops training (a learning rate far too high, not a slow start).
DIVERGENCE_FACTOR = 1e4


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the epoch and the first bad batch."""


class DivergenceError(FloatingPointError):
    """The training loss grew by more than ``divergence_factor`` over its first value."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


# --------------------------------------------------------------------------- devices and batches

def _progress_disabled(progress: bool) -> bool:
    return (not progress) or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_distributed() else 0


def init_distributed() -> bool:
    """Initialise torch.distributed from torchrun's environment variables, if present.

    Returns True when running with more than one process. Uses NCCL on CUDA and gloo on CPU.
    """
    if _is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else choose_device(device)


def move_to_device(batch: Mapping[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Move every tensor of a batch dict to ``device`` (asynchronously from pinned memory; 4-D
    float tensors to channels_last if asked). Tensors already there are not copied."""
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.ndim == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def _on_device(loader: Iterable, device: torch.device) -> Iterable:
    """A loader that yields batches on ``device`` when it can (``TensorLoader.to``), else itself."""
    return loader.to(device) if callable(getattr(loader, "to", None)) else loader


def _split_loss(result: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(result, tuple):
        total, parts = result
        return total, dict(parts)
    return result, {}


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op context elsewhere (CPU AMP does not pay off here)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> bool:
    """Move ``model`` to ``device`` (channels_last on CUDA when asked); return whether channels_last is used."""
    use = channels_last and device.type == "cuda"
    model.to(device)
    if use:
        model.to(memory_format=torch.channels_last)
    return use


# --------------------------------------------------------------------------- loss bookkeeping on the device

class EpochMeter:
    """Sums of the loss and its parts over an epoch, kept on the device, plus a non-finite flag.

    :meth:`add` only queues device operations (no host synchronisation). :meth:`first_bad` and
    :meth:`means` read back to the host — call them at epoch end or every ``check_every`` batches.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = 0
        self.batches = 0
        self.first_loss: torch.Tensor | None = None
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_value = torch.zeros((), dtype=torch.float32, device=device)
        self._reduced_seen: torch.Tensor | None = None

    def add(self, total: torch.Tensor, parts: Mapping[str, Any], n: int) -> None:
        self.batches += 1
        self.seen += n
        total = total.detach().float()
        if self.first_loss is None:
            self.first_loss = total
        newly_bad = (self._first_bad < 0) & ~torch.isfinite(total)
        self._first_bad = torch.where(newly_bad, self.batches, self._first_bad)
        self._bad_value = torch.where(newly_bad, total, self._bad_value)
        for name, value in {"loss": total, **parts}.items():
            value = torch.as_tensor(value, device=self.device).detach().float() * n
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def first_bad(self) -> tuple[int, float] | None:
        """(batch number, loss value) of the first non-finite loss, or None. Reads the device once.

        Under DistributedDataParallel the flag is first reduced over the ranks (MAX), so every rank
        stops at the same check instead of one waiting forever in the next gradient all-reduce.
        """
        if _is_distributed():
            dist.all_reduce(self._first_bad, op=dist.ReduceOp.MAX)
        index, value = torch.stack([self._first_bad.float(), self._bad_value]).tolist()
        return (int(index), value) if index >= 0 else None

    def all_reduce(self) -> None:
        """Sum the loss sums and image counts over DistributedDataParallel ranks, on the device (the
        non-finite flag is reduced by :meth:`first_bad`)."""
        names = sorted(self.sums)
        packed = torch.stack([self.sums[k].double() for k in names]
                             + [torch.tensor(float(self.seen), dtype=torch.float64, device=self.device)])
        dist.all_reduce(packed)
        self.sums = {k: packed[i] for i, k in enumerate(names)}
        self._reduced_seen = packed[-1]

    def means(self) -> dict[str, float]:
        """Per-image means of every summed part (one device read); updates :attr:`seen` after a reduction."""
        names = sorted(self.sums)
        if not names:
            return {}
        extra = [self._reduced_seen] if self._reduced_seen is not None else []
        values = torch.stack([self.sums[k].double() for k in names] + extra).tolist()
        if extra:
            self.seen = int(values.pop())
        return {k: v / max(self.seen, 1) for k, v in zip(names, values)}


def _raise_non_finite(meter: EpochMeter, epoch: int, last_path: Path | None) -> None:
    bad = meter.first_bad()
    if bad is not None:
        where = f" (last good checkpoint: {last_path})" if last_path and last_path.is_file() else ""
        raise NonFiniteLossError(f"loss is {bad[1]} at epoch {epoch}, batch {bad[0]}; training stopped{where}")


# --------------------------------------------------------------------------- inference

def _collect(store: dict[str, list[torch.Tensor]], tensors: Mapping[str, Any], keys: Sequence[str] | None,
             skip: str | None = None) -> None:
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and key != skip and (keys is None or key in keys):
            store.setdefault(key, []).append(value.detach())


def _to_numpy(store: dict[str, list[torch.Tensor]], as_float: bool) -> dict[str, np.ndarray]:
    """Concatenate each key's chunks where they are, then copy once to the host."""
    result = {}
    for key, chunks in store.items():
        joined = torch.cat(chunks)
        result[key] = (joined.float() if as_float else joined).cpu().numpy()
    return result


@torch.no_grad()
def _run_eval(model: nn.Module, loader: Iterable, device: torch.device, *, input_key: str,
              loss_fn: LossFn | None, keys: Sequence[str] | None, collect: bool, amp: bool, channels_last: bool,
              progress: bool, desc: str) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One pass over ``loader`` in eval mode: mean loss (and parts), and optionally the outputs
    named in ``keys`` (None: all) and every target tensor. Nothing is read back per batch."""
    was_training = model.training
    model.eval()
    meter = EpochMeter(device)
    outputs: dict[str, list[torch.Tensor]] = {}
    targets: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in tqdm(_on_device(loader, device), desc=desc, leave=False, disable=_progress_disabled(progress)):
            if collect:
                _collect(targets, batch, None, skip=input_key)  # as the loader gave them: no copy
            batch = move_to_device(batch, device, channels_last)
            with _autocast(device, amp):
                out = model(batch[input_key])
                if loss_fn is not None:
                    total, parts = _split_loss(loss_fn(out, batch))
                    meter.add(total, parts, int(batch[input_key].shape[0]))
            if collect:
                _collect(outputs, out, keys)
    finally:
        model.train(was_training)
    return meter.means(), _to_numpy(outputs, as_float=True), _to_numpy(targets, as_float=False)


def predict(model: nn.Module, loader: Iterable, *, device: str | torch.device = "auto", input_key: str = "image",
            keys: Sequence[str] | None = None, amp: bool = True, channels_last: bool = True,
            progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run ``model`` over ``loader``; return ``(outputs, targets)`` as dicts of NumPy arrays.

    ``outputs`` holds the tensors the model returned — only those named in ``keys`` when given
    (e.g. leave out SiAN's 2048-channel attention) — concatenated over batches, as float32;
    ``targets`` holds every tensor of the batches except the input (labels, masks, ...). On CUDA
    the model runs with the same bf16 autocast and channels_last as in :func:`fit`.
    """
    device = _device(device)
    use_channels_last = _prepare_model(model, device, channels_last)
    _, outputs, targets = _run_eval(model, loader, device, input_key=input_key, loss_fn=None, keys=keys,
                                    collect=True, amp=amp, channels_last=use_channels_last, progress=progress,
                                    desc="predict")
    return outputs, targets


def evaluate(model: nn.Module, loader: Iterable, *, loss_fn: LossFn | None = None,
             metrics_fn: MetricsFn | None = None, device: str | torch.device = "auto", input_key: str = "image",
             keys: Sequence[str] | None = None, amp: bool = True, channels_last: bool = True,
             progress: bool = True) -> dict[str, float]:
    """Mean loss (and its parts) plus ``metrics_fn(outputs, targets)`` over a loader, as floats."""
    device = _device(device)
    use_channels_last = _prepare_model(model, device, channels_last)
    losses, outputs, targets = _run_eval(model, loader, device, input_key=input_key, loss_fn=loss_fn, keys=keys,
                                         collect=metrics_fn is not None, amp=amp, channels_last=use_channels_last,
                                         progress=progress, desc="evaluate")
    results = dict(losses)
    if metrics_fn is not None:
        results.update({k: float(v) for k, v in metrics_fn(outputs, targets).items()})
    return results


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write a checkpoint atomically (:func:`~fundus_lib.utils.atomic_write`: a temporary file in the
    same folder, then a rename), so ``path`` is always the previous checkpoint or the complete new one.

    A failed write (disk full, read-only folder) raises :class:`CheckpointError` naming the
    checkpoint and leaves no temporary file; one left by a killed process is removed by the next save.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        with atomic_write(path, "wb") as stream:
            torch.save(state, stream)
    except OSError as error:
        raise CheckpointError(f"could not write checkpoint {path}: {error}") from error


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> dict:
    """Load a checkpoint written by :func:`fit` (and its weights into ``model`` when given).

    Loads with ``weights_only=True``: tensors and plain Python values only, so a crafted file
    cannot run code. Missing, empty, truncated or foreign files raise an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes; an interrupted copy?); delete it and "
                              "train again or resume from another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain values; "
                                  "refusing to unpickle it (that could run code). Load it yourself with "
                                  "torch.load(..., weights_only=False) only if you trust where it came from") from error
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); it may be "
                              "truncated or not a PyTorch checkpoint") from error
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a fundus_lib checkpoint (expected a dict with 'model')")
    if model is not None:
        _unwrap(model).load_state_dict(state["model"])
    return state


def _rng_state(loader: Any) -> dict:
    """Every random state that decides what happens next — Python, NumPy, torch (CPU/CUDA) and the
    train loader's own (its generator: order, augmentation, worker seeds) — as tensors and plain
    values, so a ``weights_only`` load restores them and a resumed run replays exactly."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if callable(getattr(loader, "state_dict", None)):
        state["loader"] = loader.state_dict()
    elif getattr(loader, "generator", None) is not None:
        state["loader"] = {"generator": loader.generator.get_state()}
    return state


def _set_rng_state(state: dict, loader: Any) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy().astype(np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loader" in state:
        if callable(getattr(loader, "load_state_dict", None)):
            loader.load_state_dict(state["loader"])
        elif getattr(loader, "generator", None) is not None:
            loader.generator.set_state(state["loader"]["generator"])


# --------------------------------------------------------------------------- model selection

class ModelSelection:
    """Best-epoch bookkeeping on one validation column (``monitor``), with early stopping.

    A NaN value (e.g. an AUC on a one-class validation split) never counts as an improvement; a
    warning names the column and the epoch. The best weights are kept on the CPU.
    """

    def __init__(self, monitor: str | None, mode: Literal["min", "max"], patience: int | None) -> None:
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.stale_epochs = 0

    def check_column(self, row: Mapping[str, Any]) -> None:
        """Fail clearly when the monitored column is missing from an epoch's row."""
        if self.monitor is not None and self.monitor not in row:
            raise KeyError(f"monitor={self.monitor!r} is not a validation column of this run; available: "
                           f"{[k for k in row if k.startswith('val_')]} (check metrics_fn's names)")

    def update(self, epoch: int, row: Mapping[str, Any], model: nn.Module) -> bool:
        """Record the epoch; return True when it is the new best."""
        if self.monitor is None:
            return False
        value = float(row[self.monitor])
        if math.isnan(value):
            warnings.warn(f"{self.monitor} is NaN at epoch {epoch} (e.g. an AUC on a one-class validation split); "
                          "this epoch cannot be selected", RuntimeWarning, stacklevel=3)
            improved = False
        else:
            improved = (self.best_value is None or (value < self.best_value if self.mode == "min"
                                                    else value > self.best_value))
        if improved:
            self.best_value, self.best_epoch, self.stale_epochs = value, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.stale_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "stale_epochs": self.stale_epochs}

    def load_state_dict(self, state: Mapping[str, Any], best_path: Path | None) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.stale_epochs = state["stale_epochs"]
        if best_path is not None and best_path.is_file():
            self.best_state = load_checkpoint(best_path)["model"]


# --------------------------------------------------------------------------- one epoch

def _distributed_loader(loader: Any, world: int, rank: int) -> Any:
    """The same loader, sharded over ranks, with per-rank batch = global batch / world size."""
    if callable(getattr(loader, "shard", None)):
        return loader.shard(rank, world)
    if loader.batch_size is None or loader.batch_size % world:
        raise ValueError(f"under DistributedDataParallel the batch size ({loader.batch_size}) must be divisible "
                         f"by the number of processes ({world}) so the global batch stays the same")
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      persistent_workers=loader.persistent_workers if loader.num_workers else False)


def train_one_epoch(model: nn.Module, loss_fn: LossFn, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                    device: torch.device, epoch: int, input_key: str = "image", amp: bool = True,
                    channels_last: bool = False, grad_clip_norm: float | None = None,
                    batch_scheduler: Any = None, check_every: int = CHECK_EVERY, progress: bool = False,
                    last_checkpoint: Path | None = None) -> EpochMeter:
    """One pass of optimisation over ``loader``; returns the epoch's :class:`EpochMeter`.

    Each step: forward under autocast, loss, backward, optional clipping, optimiser step,
    optional per-batch scheduler step. Nothing is read back to the host except the non-finite
    flag every ``check_every`` batches and at the end (:class:`NonFiniteLossError`).
    """
    model.train()
    meter = EpochMeter(device)
    parameters = [p for p in _unwrap(model).parameters() if p.requires_grad]
    for index, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False,
                                       disable=_progress_disabled(progress)), start=1):
        batch = move_to_device(batch, device, channels_last)
        with _autocast(device, amp):
            total, parts = _split_loss(loss_fn(model(batch[input_key]), batch))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
        optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        meter.add(total, parts, int(batch[input_key].shape[0]))
        if index % check_every == 0:
            _raise_non_finite(meter, epoch, last_checkpoint)
    if _is_distributed():
        meter.all_reduce()
    _raise_non_finite(meter, epoch, last_checkpoint)
    return meter


def validate(model: nn.Module, loader: Iterable, loss_fn: LossFn, metrics_fn: MetricsFn | None, *,
             device: torch.device, input_key: str = "image", keys: Sequence[str] | None = None, amp: bool = True,
             channels_last: bool = False, progress: bool = False) -> dict[str, float]:
    """Validation columns of one epoch: ``val_loss`` (+ parts) and ``val_<metric>`` for every metric."""
    losses, outputs, targets = _run_eval(model, loader, device, input_key=input_key, loss_fn=loss_fn, keys=keys,
                                         collect=metrics_fn is not None, amp=amp, channels_last=channels_last,
                                         progress=progress, desc="validate")
    row = {f"val_{k}": v for k, v in losses.items()}
    if metrics_fn is not None:
        row.update({f"val_{k}": float(v) for k, v in metrics_fn(outputs, targets).items()})
    return row


# --------------------------------------------------------------------------- fit

def _build_scheduler(scheduler: SchedulerArg, optimizer: torch.optim.Optimizer, total_steps: int):
    if isinstance(scheduler, type):
        raise TypeError(f"scheduler={scheduler.__name__} is a class; pass an instance built on the optimizer or a "
                        f"factory, e.g. scheduler=lambda optimizer, steps: {scheduler.__name__}(optimizer, ...)")
    if scheduler is None or hasattr(scheduler, "step"):
        return scheduler
    if callable(scheduler):
        return scheduler(optimizer, total_steps)
    raise TypeError(f"scheduler must be a scheduler object or a factory (optimizer, total_steps) -> scheduler, "
                    f"got {type(scheduler).__name__}")


def _check_fit_arguments(epochs: int, scheduler_interval: str, monitor: str | None, val_loader: Any,
                         early_stopping_patience: int | None, resume: Any, checkpoint_dir: Any, check_every: int,
                         divergence_factor: float | None) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if scheduler_interval not in ("batch", "epoch"):
        raise ValueError(f"scheduler_interval must be 'batch' or 'epoch', got {scheduler_interval!r}")
    if monitor is not None and not monitor.startswith("val_"):
        raise ValueError(f"monitor={monitor!r}: model selection must use a validation column ('val_...')")
    if monitor is not None and val_loader is None:
        raise ValueError(f"monitor={monitor!r} needs a val_loader")
    if early_stopping_patience is not None and monitor is None:
        raise ValueError("early stopping needs a validation loader to monitor")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}")
    if divergence_factor is not None and not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1 or None, got {divergence_factor!r}")


def _check_divergence(means: Mapping[str, float], reference: float | None, factor: float | None, epoch: int,
                      lr: float) -> None:
    if factor is None or reference is None or reference <= 0:
        return
    if means["loss"] > factor * reference:
        raise DivergenceError(f"training diverged at epoch {epoch}: mean loss {means['loss']:.4g} is more than "
                              f"{factor:g} x the first batch's loss {reference:.4g} (lr={lr:g}); lower the learning "
                              "rate, or pass divergence_factor=None to train on regardless")


def fit(model: nn.Module, loss_fn: LossFn, train_loader: Iterable, val_loader: Iterable | None = None, *,
        epochs: int, optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
        scheduler: SchedulerArg = None, scheduler_interval: Literal["batch", "epoch"] = "epoch",
        metrics_fn: MetricsFn | None = None, metric_keys: Sequence[str] | None = None, monitor: str | None = None,
        mode: Literal["min", "max"] | None = None, early_stopping_patience: int | None = None,
        restore_best: bool = True, grad_clip_norm: float | None = None, device: str | torch.device = "auto",
        input_key: str = "image", checkpoint_dir: str | Path | None = None,
        resume: bool | Literal["auto"] = False, amp: bool = True, channels_last: bool = True,
        compile: bool = False, check_every: int = CHECK_EVERY, divergence_factor: float | None = DIVERGENCE_FACTOR,
        callbacks: Sequence[Callback] = (), progress: bool = True, desc: str = "fit") -> pd.DataFrame:
    """Train ``model`` and return the per-epoch history as a DataFrame.

    History columns: ``epoch``, ``train_loss`` (+ ``train_<part>``), ``val_loss`` (+ parts and
    every metric as ``val_<name>``), ``lr`` (the rate the epoch trained with, before an epoch-level
    scheduler step), ``seconds``, ``images_per_s``. ``history.attrs`` holds ``best_epoch``,
    ``best_value``, ``monitor``, ``stopped_early`` and ``seconds`` (the whole run).

    Model selection: ``monitor`` (default ``"val_loss"`` when there is a validation loader) names a
    validation column; the best epoch's weights are saved to ``best.pt`` and, with
    ``restore_best``, loaded back at the end. Only ``val_loader`` is ever looked at — pass the test
    split to :func:`evaluate` after training, never here. NaN values are never selected.
    ``metric_keys`` limits the outputs collected for ``metrics_fn`` (default: all).

    Checkpoints (with ``checkpoint_dir``): ``last.pt`` after every epoch and ``best.pt``, each
    written atomically; they hold the model, optimizer, scheduler, loss state (if the loss has
    ``state_dict``), history, model-selection state and every RNG state, so ``resume=True``
    (``"auto"``: only if ``last.pt`` exists) continues an interrupted run to the same weights as
    an uninterrupted one on CPU, with or without DataLoader workers.

    Failures: a NaN/inf loss raises :class:`NonFiniteLossError` naming the epoch and the first bad
    batch (checked every ``check_every`` batches and at each epoch end, so up to that many
    batches may run after it); a mean epoch loss above ``divergence_factor`` x the first batch's
    loss raises :class:`DivergenceError`. Either way the checkpoint on disk is the last good epoch.

    ``scheduler`` may be a scheduler or a factory ``(optimizer, total_steps) -> scheduler``;
    ``scheduler_interval`` says whether it steps per batch or per epoch. ``ReduceLROnPlateau``
    steps per epoch on the monitored value. ``compile=True`` trains ``torch.compile(model)``.
    ``callbacks`` are called as ``callback(epoch, history_row, model)`` after each epoch, before its
    checkpoint is written (so state a callback changes, e.g. a :class:`~fundus_lib.losses.DualLossSchedule` phase,
    is resumed as it was).
    """
    if monitor is None and val_loader is not None:
        monitor = "val_loss"
    _check_fit_arguments(epochs, scheduler_interval, monitor, val_loader, early_stopping_patience, resume,
                         checkpoint_dir, check_every, divergence_factor)
    mode = mode or ("min" if monitor is None or "loss" in monitor else "max")
    device = _device(device)
    use_channels_last = _prepare_model(model, device, channels_last)
    core = model
    train_loader = _on_device(train_loader, device)
    rank = _rank()
    if _is_distributed():
        train_loader = _distributed_loader(train_loader, dist.get_world_size(), rank)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0]
                                                    if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    if optimizer is None:
        optimizer = torch.optim.Adam([p for p in core.parameters() if p.requires_grad], lr=lr,
                                     weight_decay=weight_decay)
    scheduler = _build_scheduler(scheduler, optimizer, len(train_loader) * epochs)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    batch_scheduler = scheduler if scheduler is not None and scheduler_interval == "batch" and not plateau else None

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = checkpoint_dir / "last.pt" if checkpoint_dir else None
    best_path = checkpoint_dir / "best.pt" if checkpoint_dir else None
    selection = ModelSelection(monitor, mode, early_stopping_patience)
    rows: list[dict] = []
    reference_loss: float | None = None
    start_epoch = 1
    if resume and last_path is not None and (resume is True or last_path.is_file()):
        state = load_checkpoint(last_path, core)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if hasattr(loss_fn, "load_state_dict") and state.get("loss") is not None:
            loss_fn.load_state_dict(state["loss"])
        rows = list(state["history"])
        selection.load_state_dict(state["selection"], best_path if restore_best else None)
        reference_loss = state.get("reference_loss")
        _set_rng_state(state["rng"], train_loader)
        start_epoch = state["epoch"] + 1

    started_run = time.perf_counter()
    stopped_early = bool(rows) and selection.should_stop
    epoch_bar = tqdm(range(start_epoch, epochs + 1), desc=desc, disable=_progress_disabled(progress) or rank != 0)
    for epoch in epoch_bar if not stopped_early else []:
        if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        lr_used = optimizer.param_groups[0]["lr"]
        meter = train_one_epoch(model, loss_fn, train_loader, optimizer, device=device, epoch=epoch,
                                input_key=input_key, amp=amp, channels_last=use_channels_last,
                                grad_clip_norm=grad_clip_norm, batch_scheduler=batch_scheduler,
                                check_every=check_every, progress=progress and rank == 0, last_checkpoint=last_path)
        train_means = meter.means()
        if reference_loss is None and meter.first_loss is not None:
            reference_loss = float(meter.first_loss)  # once per run: the scale a diverging loss is measured on
        _check_divergence(train_means, reference_loss, divergence_factor, epoch, lr_used)
        train_seconds = time.perf_counter() - started
        row: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in train_means.items()}}
        if val_loader is not None:
            row.update(validate(core, val_loader, loss_fn, metrics_fn, device=device, input_key=input_key,
                                keys=metric_keys, amp=amp, channels_last=use_channels_last,
                                progress=progress and rank == 0))
        row.update(lr=lr_used, seconds=time.perf_counter() - started,
                   images_per_s=meter.seen / train_seconds if train_seconds > 0 else math.nan)
        selection.check_column(row)
        if scheduler is not None and scheduler_interval == "epoch":
            if plateau:
                scheduler.step(row[monitor] if monitor else row["train_loss"])
            else:
                scheduler.step()
        if selection.update(epoch, row, core) and best_path is not None and rank == 0:
            save_checkpoint(best_path, {"model": selection.best_state, "epoch": epoch, "monitor": monitor,
                                        "value": selection.best_value})
        rows.append(row)
        epoch_bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("train_loss", "val_loss", monitor)})
        for callback in callbacks:  # before the checkpoint: what a callback changes (a loss phase) is resumed too
            callback(epoch, row, core)
        if last_path is not None and rank == 0:
            save_checkpoint(last_path, {
                "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "loss": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
                "history": rows, "epoch": epoch, "selection": selection.state_dict(),
                "reference_loss": reference_loss, "rng": _rng_state(train_loader),
            })
        if selection.should_stop:
            stopped_early = True
            break

    if restore_best and selection.best_state is not None:
        core.load_state_dict(selection.best_state)
    history = pd.DataFrame(rows)
    history.attrs.update(best_epoch=selection.best_epoch, best_value=selection.best_value, monitor=monitor,
                         stopped_early=stopped_early, seconds=time.perf_counter() - started_run)
    return history

"""One training loop for every model in the project: :func:`fit`, :func:`evaluate`, :func:`predict`.

Conventions that let one loop serve classification, regression, segmentation, super-resolution
and multi-task models:

* a batch is a dict (``FundusDataset`` yields ``image``, ``dr``, ``dme``, ``masks``, ...);
* the model is called as ``model(batch[input_key])`` and returns a dict of named outputs;
* a loss is ``loss_fn(outputs, batch) -> Tensor`` or ``-> (Tensor, {part_name: Tensor})``;
* validation metrics are ``metrics_fn(outputs, targets) -> {name: float}`` on NumPy arrays.

:func:`fit` adds what every paper's training needs and students should not re-write: progress
bars, gradient clipping, per-batch or per-epoch schedulers, early stopping and best-checkpoint
selection on the **validation** split (never the test split), atomic checkpoints with exact
resume, a clear stop on a non-finite loss, bf16 autocast + channels_last on CUDA, and
DistributedDataParallel when launched with ``torchrun``.
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from fundus_lib.utils import choose_device

LossFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], "torch.Tensor | tuple[torch.Tensor, dict]"]
MetricsFn = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], Mapping[str, float]]
SchedulerArg = Any  # an LRScheduler / ReduceLROnPlateau, or a factory (optimizer, total_steps) -> scheduler
Callback = Callable[[int, dict, nn.Module], None]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the epoch and batch."""


# --------------------------------------------------------------------------- small helpers

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


def move_to_device(batch: Mapping[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Move every tensor of a batch dict to ``device`` (4-D float tensors to channels_last if asked)."""
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.ndim == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def _split_loss(result: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(result, tuple):
        total, parts = result
        return total, dict(parts)
    return result, {}


def _batch_size(batch: Mapping[str, Any], input_key: str) -> int:
    return int(batch[input_key].shape[0])


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op context elsewhere (CPU AMP does not pay off here)."""
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _targets_of(batch: Mapping[str, Any], input_key: str) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k != input_key}


def _concat(chunks: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate(v, axis=0) for k, v in chunks.items()}


# --------------------------------------------------------------------------- inference

@torch.no_grad()
def _run_eval(model: nn.Module, loader: Iterable, device: torch.device, *, input_key: str,
              loss_fn: LossFn | None, collect: bool, amp: bool, channels_last: bool,
              progress: bool, desc: str) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One pass over ``loader`` in eval mode: mean loss (and parts), and optionally every output."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    seen = 0
    outputs: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list[np.ndarray]] = {}
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=_progress_disabled(progress)):
            batch = move_to_device(batch, device, channels_last)
            n = _batch_size(batch, input_key)
            with _autocast(device, amp):
                out = model(batch[input_key])
                if loss_fn is not None:
                    total, parts = _split_loss(loss_fn(out, batch))
                    for name, value in {"loss": total, **parts}.items():
                        sums[name] = sums.get(name, 0.0) + float(value) * n
            seen += n
            if collect:
                for key, value in out.items():
                    if isinstance(value, torch.Tensor):
                        outputs.setdefault(key, []).append(value.detach().float().cpu().numpy())
                for key, value in _targets_of(batch, input_key).items():
                    targets.setdefault(key, []).append(value)
    finally:
        model.train(was_training)
    means = {name: total / max(seen, 1) for name, total in sums.items()}
    return means, _concat(outputs), _concat(targets)


def predict(model: nn.Module, loader: Iterable, *, device: str | torch.device = "auto", input_key: str = "image",
            amp: bool = True, progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run ``model`` over ``loader``; return ``(outputs, targets)`` as dicts of NumPy arrays.

    ``outputs`` holds every tensor the model returned (concatenated over batches, float32);
    ``targets`` holds every tensor of the batches except the input (labels, masks, ...).
    """
    device = device if isinstance(device, torch.device) else choose_device(device)
    model.to(device)
    _, outputs, targets = _run_eval(model, loader, device, input_key=input_key, loss_fn=None, collect=True,
                                    amp=amp, channels_last=False, progress=progress, desc="predict")
    return outputs, targets


def evaluate(model: nn.Module, loader: Iterable, *, loss_fn: LossFn | None = None,
             metrics_fn: MetricsFn | None = None, device: str | torch.device = "auto",
             input_key: str = "image", amp: bool = True, progress: bool = True) -> dict[str, float]:
    """Mean loss (and its parts) plus ``metrics_fn(outputs, targets)`` over a loader, as floats."""
    device = device if isinstance(device, torch.device) else choose_device(device)
    model.to(device)
    losses, outputs, targets = _run_eval(model, loader, device, input_key=input_key, loss_fn=loss_fn,
                                         collect=metrics_fn is not None, amp=amp, channels_last=False,
                                         progress=progress, desc="evaluate")
    results = dict(losses)
    if metrics_fn is not None:
        results.update({k: float(v) for k, v in metrics_fn(outputs, targets).items()})
    return results


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically: to a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> dict:
    """Load a checkpoint written by :func:`fit` (and its weights into ``model`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if model is not None:
        _unwrap(model).load_state_dict(state["model"])
    return state


def _rng_state(loader_generator: torch.Generator | None) -> dict:
    """Every random state that decides what happens next: Python, NumPy, torch (CPU/CUDA) and the
    train loader's own generator (shuffling and worker seeds), so a resumed run replays exactly."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def _set_rng_state(state: dict, loader_generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


# --------------------------------------------------------------------------- fit

def _distributed_loader(loader: DataLoader, world: int, rank: int) -> DataLoader:
    """The same loader, sharded over ranks, with per-rank batch = global batch / world size."""
    if loader.batch_size is None or loader.batch_size % world:
        raise ValueError(f"under DistributedDataParallel the batch size ({loader.batch_size}) must be divisible "
                         f"by the number of processes ({world}) so the global batch stays the same")
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers if loader.num_workers else False)


def _build_scheduler(scheduler: SchedulerArg, optimizer: torch.optim.Optimizer, total_steps: int):
    if scheduler is None or hasattr(scheduler, "step"):
        return scheduler
    if callable(scheduler):
        return scheduler(optimizer, total_steps)
    raise TypeError(f"scheduler must be a scheduler object or a factory (optimizer, total_steps) -> scheduler, "
                    f"got {type(scheduler).__name__}")


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def fit(model: nn.Module, loss_fn: LossFn, train_loader: DataLoader, val_loader: Iterable | None = None, *,
        epochs: int, optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
        scheduler: SchedulerArg = None, scheduler_interval: Literal["batch", "epoch"] = "epoch",
        metrics_fn: MetricsFn | None = None, monitor: str | None = None, mode: Literal["min", "max"] | None = None,
        early_stopping_patience: int | None = None, restore_best: bool = True, grad_clip_norm: float | None = None,
        device: str | torch.device = "auto", input_key: str = "image", checkpoint_dir: str | Path | None = None,
        resume: bool | Literal["auto"] = False, amp: bool = True, channels_last: bool = True,
        callbacks: Sequence[Callback] = (), progress: bool = True, desc: str = "fit") -> pd.DataFrame:
    """Train ``model`` and return the per-epoch history as a DataFrame.

    History columns: ``epoch``, ``train_loss`` (+ ``train_<part>``), ``val_loss`` (+ parts and
    every metric as ``val_<name>``), ``lr`` (the rate the epoch trained with, before an epoch-level
    scheduler step), ``seconds``, ``images_per_s``. ``history.attrs``
    holds ``best_epoch``, ``best_value``, ``monitor`` and ``stopped_early``.

    Model selection: ``monitor`` (default ``"val_loss"`` when there is a validation loader) names a
    validation column; the best epoch's weights are saved to ``best.pt`` and, with
    ``restore_best``, loaded back at the end. Only ``val_loader`` is ever looked at — pass the test
    split to :func:`evaluate` after training, never here.

    Checkpoints (with ``checkpoint_dir``): ``last.pt`` after every epoch and ``best.pt``, each
    written atomically; they hold the model, optimizer, scheduler, loss state (if the loss has
    ``state_dict``), history, early-stopping state and every RNG state, so ``resume=True``
    (``"auto"``: only if ``last.pt`` exists) continues an interrupted run to the same weights as
    an uninterrupted one on CPU.

    A NaN/inf loss raises :class:`NonFiniteLossError` naming the epoch and batch; the last
    checkpoint on disk is the last good epoch.

    ``scheduler`` may be a scheduler or a factory ``(optimizer, total_steps) -> scheduler``;
    ``scheduler_interval`` says whether it steps per batch or per epoch. ``ReduceLROnPlateau``
    steps per epoch on the monitored value. ``callbacks`` are called as
    ``callback(epoch, history_row, model)`` after each epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if scheduler_interval not in ("batch", "epoch"):
        raise ValueError(f"scheduler_interval must be 'batch' or 'epoch', got {scheduler_interval!r}")
    if monitor is None and val_loader is not None:
        monitor = "val_loss"
    if monitor is not None and not monitor.startswith("val_"):
        raise ValueError(f"monitor={monitor!r}: model selection must use a validation column ('val_...')")
    if monitor is not None and val_loader is None:
        raise ValueError(f"monitor={monitor!r} needs a val_loader")
    if early_stopping_patience is not None and monitor is None:
        raise ValueError("early stopping needs a validation loader to monitor")
    mode = mode or ("min" if monitor is None or "loss" in monitor else "max")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir")

    device = device if isinstance(device, torch.device) else choose_device(device)
    use_channels_last = channels_last and device.type == "cuda"
    model.to(device)
    if use_channels_last:
        model.to(memory_format=torch.channels_last)
    distributed = _is_distributed()
    rank = _rank()
    if distributed:
        world = dist.get_world_size()
        train_loader = _distributed_loader(train_loader, world, rank)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    core = _unwrap(model)
    if optimizer is None:
        optimizer = torch.optim.Adam([p for p in core.parameters() if p.requires_grad],
                                     lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = _build_scheduler(scheduler, optimizer, steps_per_epoch * epochs)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = checkpoint_dir / "last.pt" if checkpoint_dir else None
    best_path = checkpoint_dir / "best.pt" if checkpoint_dir else None
    rows: list[dict] = []
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: dict | None = None
    stale_epochs = 0
    start_epoch = 1

    if resume and last_path is not None and (resume is True or last_path.is_file()):
        state = load_checkpoint(last_path, core)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if hasattr(loss_fn, "load_state_dict") and state.get("loss") is not None:
            loss_fn.load_state_dict(state["loss"])
        rows = list(state["history"])
        best_value, best_epoch, stale_epochs = state["best_value"], state["best_epoch"], state["stale_epochs"]
        if restore_best and best_path is not None and best_path.is_file():
            best_state = torch.load(best_path, map_location="cpu", weights_only=False)["model"]
        _set_rng_state(state["rng"], getattr(train_loader, "generator", None))
        start_epoch = state["epoch"] + 1

    stopped_early = bool(rows) and early_stopping_patience is not None and stale_epochs >= early_stopping_patience
    epoch_bar = tqdm(range(start_epoch, epochs + 1), desc=desc, disable=_progress_disabled(progress) or rank != 0)
    for epoch in epoch_bar if not stopped_early else []:
        if distributed and isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        seen = 0
        batches = tqdm(train_loader, desc=f"epoch {epoch}", leave=False,
                       disable=_progress_disabled(progress) or rank != 0)
        for index, batch in enumerate(batches, start=1):
            batch = move_to_device(batch, device, use_channels_last)
            n = _batch_size(batch, input_key)
            with _autocast(device, amp):
                total, parts = _split_loss(loss_fn(model(batch[input_key]), batch))
            if not torch.isfinite(total.detach()).all():
                where = f" (last good checkpoint: {last_path})" if last_path and last_path.is_file() else ""
                raise NonFiniteLossError(f"loss is {float(total.detach())} at epoch {epoch}, batch {index}; "
                                         f"training stopped{where}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(core.parameters(), grad_clip_norm)
            optimizer.step()
            if scheduler is not None and scheduler_interval == "batch" and not plateau:
                scheduler.step()
            for name, value in {"loss": total, **parts}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            seen += n
        train_seconds = time.perf_counter() - started
        train_means = {name: value / max(seen, 1) for name, value in sums.items()}
        if distributed:
            packed = torch.tensor([train_means[k] * seen for k in sorted(train_means)] + [seen], dtype=torch.float64)
            dist.all_reduce(packed)
            seen_total = packed[-1].item()
            train_means = {k: packed[i].item() / seen_total for i, k in enumerate(sorted(train_means))}
            seen = int(seen_total)
        row: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in train_means.items()}}

        if val_loader is not None:
            val_losses, outputs, targets = _run_eval(
                core, val_loader, device, input_key=input_key, loss_fn=loss_fn, collect=metrics_fn is not None,
                amp=amp, channels_last=use_channels_last, progress=progress and rank == 0, desc="validate")
            row.update({f"val_{k}": v for k, v in val_losses.items()})
            if metrics_fn is not None:
                row.update({f"val_{k}": float(v) for k, v in metrics_fn(outputs, targets).items()})
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["seconds"] = time.perf_counter() - started
        row["images_per_s"] = seen / train_seconds if train_seconds > 0 else math.nan

        if scheduler is not None and scheduler_interval == "epoch":
            if plateau:
                scheduler.step(row[monitor] if monitor else row["train_loss"])
            else:
                scheduler.step()

        if monitor is not None:
            if monitor not in row:
                raise KeyError(f"monitor={monitor!r} is not a validation column; available: "
                               f"{[k for k in row if k.startswith('val_')]}")
            if _improved(row[monitor], best_value, mode):
                best_value, best_epoch, stale_epochs = float(row[monitor]), epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
                if best_path is not None and rank == 0:
                    save_checkpoint(best_path, {"model": best_state, "epoch": epoch, monitor: best_value})
            else:
                stale_epochs += 1
        rows.append(row)
        epoch_bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                               if k in ("train_loss", "val_loss") or k == monitor})
        if last_path is not None and rank == 0:
            save_checkpoint(last_path, {
                "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "loss": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
                "history": rows, "epoch": epoch, "best_value": best_value, "best_epoch": best_epoch,
                "stale_epochs": stale_epochs, "rng": _rng_state(getattr(train_loader, "generator", None)),
            })
        for callback in callbacks:
            callback(epoch, row, core)
        if early_stopping_patience is not None and stale_epochs >= early_stopping_patience:
            stopped_early = True
            break

    if restore_best and best_state is not None:
        core.load_state_dict(best_state)
    history = pd.DataFrame(rows)
    history.attrs.update(best_epoch=best_epoch, best_value=best_value, monitor=monitor, stopped_early=stopped_early)
    return history

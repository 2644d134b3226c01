"""Small shared utilities: seeding, device choice, DataLoader worker counts, a timer, atomic file writes.

Importing it also makes every process forked from this one leave the objects it inherits to the
parent's garbage collector (:func:`_leave_inherited_objects_to_the_parent`).
"""
from __future__ import annotations

import gc
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
import torch

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) and return a torch Generator seeded alike.

    Pass the returned generator to a DataLoader (``generator=``) and :func:`seed_worker` as its
    ``worker_init_fn`` so that shuffling and augmentation in worker processes are reproducible.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _leave_inherited_objects_to_the_parent() -> None:
    """Run in every child right after ``fork()``: freeze the objects inherited from the parent, so the
    child's garbage collector never finalises them.

    Why: a DataLoader iterator with persistent workers (the validation and test loaders) that has
    become unreachable inside a reference cycle waits for the parent's next collection. A training
    loader's worker forked before that collection inherits the garbage; when the worker's own
    collector freed it, the iterator's ``__del__`` tried to join workers that are not its children
    and printed ``AssertionError: can only test a child process`` into the notebook. Frozen
    objects are finalised by the parent only, as they should be; copy-on-write pages also stay shared.
    """
    gc.freeze()


if hasattr(os, "register_at_fork"):  # POSIX; Windows and spawned workers inherit nothing
    os.register_at_fork(after_in_child=_leave_inherited_objects_to_the_parent)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive NumPy and Python seeds from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def choose_device(device: str = "auto") -> torch.device:
    """Resolve a device name: "auto" picks CUDA, then Apple MPS, then CPU.

    An explicit "cuda" or "mps" that is not available raises a clear error instead of silently
    falling back to the CPU.
    """
    if device not in DEVICE_CHOICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICE_CHOICES} or 'cuda:N', got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device='mps' was requested but Apple MPS is not available; use 'auto' or 'cpu'")
    return torch.device(device)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers(requested: int | None = None) -> int:
    """DataLoader workers: ``requested`` when given, else ``min(4, cores - 1)`` (0 on 1 core)."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"num_workers must be >= 0, got {requested}")
        return requested
    return max(0, min(4, usable_cores() - 1))


class Timer:
    """Wall-clock timer usable as a context manager: ``with Timer() as t: ...; t.seconds``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds: float = 0.0

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - (self.start or time.perf_counter())


def seconds_per_call(step: Callable[[], object], device: torch.device, iters: int, warmup: int = 1) -> float:
    """Wall-clock seconds per call of ``step`` over ``iters`` calls after ``warmup`` untimed ones; on
    CUDA the queue is drained before and after, so queued kernels are counted (benchmarks)."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (benchmarks use it to pin one core)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends normally it replaces
    ``path`` (:func:`os.replace`), otherwise it is removed.

    ``path`` is therefore always absent, the old file or the complete new one, never half-written
    (a full disk, a read-only folder or Ctrl-C leave nothing behind; a SIGKILL can leave a hidden
    ``.<name>.*.tmp`` file, which is never a final name). ``mode`` is "w" (text) or "wb".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

"""fundus_lib.utils: seeding, device choice, worker counts, timer, thread pinning, atomic writes."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fundus_lib import utils


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_makes_python_numpy_and_torch_repeat():
    generator = utils.seed_everything(7)
    first, first_generated = _draws(), torch.rand(3, generator=generator)
    generator = utils.seed_everything(7)
    assert _draws() == first
    assert torch.equal(torch.rand(3, generator=generator), first_generated)
    utils.seed_everything(8)
    assert _draws() != first
    utils.seed_everything(2**40)  # beyond NumPy's 32-bit range: reduced, not rejected
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValueError, match="seed"):
            utils.seed_everything(bad)


class _NumpyNoise(torch.utils.data.Dataset):
    """Each item is a NumPy draw made inside the worker, as augmentations do."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> float:
        return float(np.random.rand())


def _worker_draws(seed: int) -> list[float]:
    loader = DataLoader(_NumpyNoise(), batch_size=1, num_workers=2, worker_init_fn=utils.seed_worker,
                        generator=utils.seed_everything(seed))
    return [float(batch) for batch in loader]


@pytest.mark.slow
def test_seed_worker_makes_numpy_in_workers_reproducible_and_distinct():
    first = _worker_draws(3)
    assert first == _worker_draws(3)
    assert len(set(first)) == len(first)  # the two workers do not repeat each other's draws
    assert first != _worker_draws(4)


def test_choose_device():
    assert utils.choose_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    assert utils.choose_device("auto").type == expected
    with pytest.raises(ValueError, match="device must be one of"):
        utils.choose_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            utils.choose_device("cuda:0")


def test_choose_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert utils.choose_device("auto") == torch.device("cuda")
    assert utils.choose_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert utils.choose_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert utils.choose_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="MPS is not available"):
        utils.choose_device("mps")


@pytest.mark.parametrize("cores,expected", [(1, 0), (2, 1), (3, 2), (16, 4)])
def test_default_num_workers_leaves_a_core_and_caps_at_four(monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert utils.default_num_workers() == expected
    assert utils.default_num_workers(6) == 6 and utils.default_num_workers(0) == 0
    with pytest.raises(ValueError, match="num_workers"):
        utils.default_num_workers(-1)


def test_timer_measures_the_block():
    with utils.Timer() as timer:
        time.sleep(0.05)
    assert 0.04 <= timer.seconds < 2.0
    assert utils.Timer().seconds == 0.0


def test_torch_threads_restores_the_previous_count_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(KeyError):
        with utils.torch_threads(1):
            assert torch.get_num_threads() == 1
            raise KeyError("inside")
    assert torch.get_num_threads() == before


def test_atomic_write_replaces_whole_files_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "result.json"
    with utils.atomic_write(target) as stream:
        stream.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with utils.atomic_write(target) as stream:
            stream.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "first"
    with utils.atomic_write(target, "wb") as stream:
        stream.write(b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left
    with pytest.raises(ValueError, match="mode"):
        with utils.atomic_write(target, "a"):
            pass


_ORPHANED_ITERATOR = """
import gc
import torch
from torch.utils.data import DataLoader, Dataset
import fundus_lib.utils

class Tiny(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, index):
        return torch.zeros(2)

gc.disable()  # keep the orphan below uncollected in this process until the workers fork
evaluation = DataLoader(Tiny(), batch_size=4, num_workers=2, persistent_workers=True)
for _ in evaluation:
    pass
cycle = {"loader": evaluation}
cycle["self"] = cycle  # unreachable only through a cycle: freed by a collection, not by refcount
del evaluation, cycle
training = DataLoader(Tiny(), batch_size=4, num_workers=2, worker_init_fn=lambda _: (gc.enable(), gc.collect()))
for _ in training:
    pass
print("finished")
"""


def test_a_worker_never_finalises_an_iterator_it_inherited(tmp_path):
    """An orphaned persistent-worker iterator, inherited by a training worker that collects garbage,
    is left to the parent: no 'can only test a child process' traceback (it appears without the fork hook)."""
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHANED_ITERATOR)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-2000:]
    assert "can only test a child process" not in result.stderr and "can only join" not in result.stderr, result.stderr


def test_seconds_per_call_counts_only_the_timed_calls():
    import torch

    from fundus_lib.utils import seconds_per_call

    calls = []
    seconds = seconds_per_call(lambda: calls.append(1), torch.device("cpu"), iters=5, warmup=2)
    assert len(calls) == 7 and seconds >= 0
    with pytest.raises(ValueError, match="iters must be >= 1"):
        seconds_per_call(lambda: None, torch.device("cpu"), iters=0)
